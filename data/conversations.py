"""Conversations for chat fine-tuning: where they come from, and which ones are fit to learn from.

`--chat-data SOURCE` takes:
    builtin             the offline set generated from the built-in corpus (data/builtin_chat.py)
    file.jsonl          one {"messages": [{"role": ..., "content": ...}, ...]} per line (OpenAI style)
    file.parquet        a Parquet table with a messages column (`--messages-column`)
    owner/name[:conf]   a Hugging Face dataset with a messages column (`--messages-column`), streamed
                        (a local folder laid out as a dataset repository, or one
                        `save_to_disk` wrote, works too)

A conversation is kept only if it is well formed: a list of messages, each with a role of
system/user/assistant and non-empty text content (a string, or a list of text parts; a lone
surrogate escape, which no UTF-8 holds, is not text); a system message only first; user and
assistant turns alternating, starting with the user; at least one assistant reply. A trailing
user message (no reply to learn) is dropped. Anything else is skipped and reported with its line
number (or row index), never half-used; if nothing usable is left, that is an error.
Conversations longer than the model's context are truncated by the packer (data/loader.py),
which reports them too.

Validation: the dataset's own validation split where a hub dataset has one; otherwise the last 10%
of the conversations (at least one).

`limit` (--max-conversations) reads only the first conversations of a source (of a hub dataset's
validation split, a tenth as many): a large dataset (smoltalk's million) is held in memory whole,
and a CPU fine-tune of a few minutes sees only thousands. The description says when it cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data.sources import (
    dataset_rows,
    load_dataset_splits,
    missing_local_path,
    open_parquet,
    parquet_values,
    read_jsonl,
)
from model.chat_template import message_text
from model.errors import UserError
from model.tokenizer import has_lone_surrogate

Conversation = list[dict]
KINDS = "builtin, a .jsonl or .parquet file of conversations, a dataset folder, or a Hugging Face dataset name"


@dataclass
class ConversationSet:
    description: str
    train: list[Conversation]
    val: list[Conversation]
    problems: list[str] = field(default_factory=list)  # "line 7: empty content", one per skipped conversation


def load_conversations(spec: str, messages_column: str = "messages", limit: int = 0) -> ConversationSet:
    """The conversations of `spec` (see the module's doc), the first `limit` of them if `limit`."""
    if spec == "builtin":
        from data.builtin_chat import builtin_conversations

        rows = [(f"conversation {i + 1}", c) for i, c in enumerate(builtin_conversations())]
        return _checked("builtin chat set", rows, None, limit)
    path = Path(spec)
    if path.is_file():
        return _checked(str(path), _file_rows(path, messages_column), None, limit)
    if missing_local_path(spec):
        raise UserError(f"{spec} does not exist; --chat-data takes {KINDS}")
    return _hub_conversations(spec, messages_column, limit)  # a hub name, or a local dataset folder


class BrokenJSON(str):
    """Stands in for the messages of a line that could not be read; its text is the problem."""


def check(messages: object) -> tuple[Conversation | None, str | None]:
    """A cleaned conversation, or None and the reason it cannot be used."""
    if isinstance(messages, BrokenJSON):
        return None, str(messages)
    if not isinstance(messages, list) or not messages:
        return None, "no messages list"
    cleaned = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            return None, f"message {index + 1} has no role"
        role, content = message["role"], message_text(message.get("content"))
        if role not in ("system", "user", "assistant"):
            return None, f"message {index + 1} has unknown role '{role}'"
        if not content.strip():
            return None, f"message {index + 1} {_no_text(message.get('content'))}"
        if has_lone_surrogate(content):  # --data refuses the same; here the conversation is skipped and listed
            return None, f"message {index + 1} holds a lone surrogate escape (such as \\ud800), which is not text"
        cleaned.append({"role": role, "content": content})
    system = cleaned[:1] if cleaned[0]["role"] == "system" else []
    turns = cleaned[len(system) :]
    if any(m["role"] == "system" for m in turns):
        return None, "a system message may only come first"
    if turns and turns[-1]["role"] == "user":
        turns = turns[:-1]  # nothing to learn from an unanswered message
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            return None, f"turns do not alternate user/assistant ({message['role']} where {expected} belongs)"
    if not turns:
        return None, "no assistant reply"
    return system + turns, None


def _no_text(content: object) -> str:
    """Why a message's content gave no text, in JSON's words (a number is not "empty")."""
    if content is None:
        return "has no content"
    if isinstance(content, str):
        return "has empty content"
    if isinstance(content, list):
        return "has a list of content parts with no text in them"
    what = {bool: "true or false", int: "a number", float: "a number", dict: "an object"}.get(type(content))
    return f"has content that is {what or type(content).__name__}, not text"


def _checked(description: str, rows, val_rows, limit: int = 0) -> ConversationSet:
    """The usable conversations of `rows` ((where, messages) pairs) and of a validation split's `val_rows`
    (None: the last 10% of `rows`), with every one skipped, of either split, listed; only the first
    `limit` rows (and `limit` // 10 validation rows) if `limit`."""
    problems: list[str] = []
    cut_short: list[bool] = []
    rows = _first_rows(rows, limit, cut_short)
    val_rows = val_rows and _first_rows(val_rows, max(1, limit // 10) if limit else 0, cut_short)
    good = _usable(rows, problems)
    if val_rows is None:
        if len(good) < 2:
            raise UserError(
                f"{_told(description, cut_short, limit)} has {len(good)} usable conversation(s); at least 2 are "
                f"needed (one to validate on){'; raise --max-conversations' if any(cut_short) else ''}"
                + _first(problems)
            )
        cut = len(good) - max(1, len(good) // 10)
        return ConversationSet(_told(description, cut_short, limit), good[:cut], good[cut:], problems)
    val = _usable(val_rows, problems)
    description = _told(description, cut_short, limit)
    if not good or not val:
        raise UserError(f"{description} has no usable conversations in its train or validation split{_first(problems)}")
    return ConversationSet(description, good, val, problems)


def _first_rows(rows, limit: int, cut_short: list[bool]):
    """The first `limit` of `rows` (all if 0), appending to `cut_short` whether there were more."""
    for count, row in enumerate(rows):
        if limit and count == limit:
            cut_short.append(True)
            return
        yield row


def _told(description: str, cut_short: list[bool], limit: int) -> str:
    return description + (f" (cut to --max-conversations {limit:,})" if any(cut_short) else "")


def _first(problems: list[str]) -> str:
    return f" (first problem: {problems[0]})" if problems else ""


def _usable(rows, problems: list[str]) -> list[Conversation]:
    """The conversations of `rows` that pass `check`; each one that does not adds a line to `problems`."""
    good = []
    for where, messages in rows:
        conversation, problem = check(messages)
        if problem:
            problems.append(f"{where}: {problem}")
        else:
            good.append(conversation)
    return good


def _file_rows(path: Path, column: str):
    if path.suffix.lower() == ".jsonl":
        return _jsonl_rows(path, column)
    if path.suffix.lower() == ".parquet":
        return _parquet_rows(path, column)
    raise UserError(f"{path} is neither a .jsonl nor a .parquet file; --chat-data takes {KINDS}")


def _parquet_rows(path: Path, column: str):
    """A Parquet file's rows, numbered from 0 as a dataset folder holding the same file numbers them."""
    table = open_parquet(path, column, "--messages-column")
    for index, messages in enumerate(parquet_values(table, path, column)):
        yield f"{path} row {index}", messages


def _jsonl_rows(path: Path, column: str):
    for number, row, problem in read_jsonl(path):
        where = f"{path} line {number}"
        if problem:
            yield where, BrokenJSON(f"broken JSON ({problem})")
        elif not isinstance(row, dict) or column not in row:
            yield where, BrokenJSON(f"no '{column}' field (name it with --messages-column)")
        else:
            yield where, row[column]


def _hub_conversations(name: str, column: str, limit: int = 0) -> ConversationSet:
    """Every conversation of the train split and of the validation split, if there is one (the first
    `limit` if `limit`): the same conversations in a .jsonl file are all read, and a silent cap would
    leave some out unseen."""
    splits = load_dataset_splits(name)
    train_split = next((s for s in ("train", "train_sft") if s in splits), None)
    if train_split is None:
        raise UserError(f"dataset '{name}' has no train split (it has {list(splits)})")

    def rows(split: str):
        for index, row in dataset_rows(splits, split, name):
            if column not in row:
                raise UserError(f"dataset '{name}' has no '{column}' column; name it with --messages-column")
            yield f"{name} [{split}] row {index}", row[column]

    held_out = next((s for s in ("validation", "test", "test_sft") if s in splits), None)
    return _checked(f"{name} [{train_split}]", rows(train_split), held_out and rows(held_out), limit)
