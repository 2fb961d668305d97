"""How a conversation becomes tokens: the one chat format used by fine-tuning, `sample.py --chat`
and the UI, so what a model was trained on is exactly what it sees when people talk to it.

Two templates, chosen by what the checkpoint records (`checkpoint.json` -> "chat"):
- `turns` (chat models, fine-tuned on conversations): every message is
  `<|role|>content<|end|>` with the reserved special tokens, after a document separator. The
  reply is generated after `<|assistant|>` and ends at `<|end|>`. The special tokens cannot be
  typed (user text is always encoded as plain text), so a user cannot forge a turn.
- `transcript` (base models, trained only on a corpus): a plain-text play script,
  "User:\n...\n\nAssistant:\n...", which a model of almost any corpus continues sensibly.
  The reply ends where the model starts the next "User:" turn.

`render` also returns a loss mask (1 on the assistant's tokens, including its end-of-turn) for
supervised fine-tuning. `fit` drops the oldest turns (never the system prompt), a user message
with the replies after it, until the prompt leaves room to reply within the model's context.

`TurnsTemplate.jinja()` is the same template in the Jinja form Hugging Face tokenizers use, built
from the same special tokens, for the export (model/export.py); a test renders conversations
through both and compares the tokens. The transcript template has no exact Jinja twin: it encodes
each piece of the transcript separately, which a template that returns one string cannot express.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from model.engine import Engine
from model.errors import UserError
from model.sampling import SamplingConfig
from model.tokenizer import ASSISTANT, DOC_SEPARATOR, END_OF_TURN, SYSTEM, USER, Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 where the token is part of an assistant reply (what SFT learns)
    dropped: int = 0  # messages left out to fit the context


class ChatTemplate:
    name = ""
    stop: tuple[str, ...] = ()

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        """Tokens and loss mask of `messages` ([{"role", "content"}]); optionally open a reply."""
        ids, mask = [self.tokenizer.doc_separator], [0]
        for message in messages:
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise UserError(f"unknown chat role '{role}'; use system, user or assistant")
            head, body, tail = self._message(role, content)
            learn = int(role == "assistant")
            ids += head + body + tail
            mask += [0] * len(head) + [learn] * (len(body) + len(tail))
        if add_generation_prompt:
            head = self._reply_prefix()
            ids += head
            mask += [0] * len(head)
        return Rendered(ids, mask)

    def fit(self, messages: list[dict], budget: int) -> Rendered:
        """The generation prompt for `messages`, dropping the oldest turns until it fits `budget`.
        What is kept starts at a user message, as every conversation in fine-tuning does."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system) :]
        self.check_system(system, budget)
        for start in range(len(turns)):
            if start and turns[start]["role"] != "user":
                continue
            rendered = self.render(system + turns[start:], add_generation_prompt=True)
            if len(rendered.ids) <= budget:
                return replace(rendered, dropped=start)
        raise UserError(
            f"the last message alone is longer than the model's context leaves a conversation ({budget} tokens; "
            "the rest is kept for the reply); send a shorter one, or ask for fewer new tokens"
        )

    def check_system(self, system: list[dict], budget: int) -> None:
        """Refuse a system prompt (a list of at most that one message) that leaves no room for a turn."""
        if system and len(self.render(system, add_generation_prompt=True).ids) > budget:
            raise UserError(
                f"the system prompt alone is longer than the model's context leaves a conversation ({budget} "
                "tokens; the rest is kept for the reply); give a shorter one"
            )

    def _message(self, role: str, content: str) -> tuple[list[int], list[int], list[int]]:
        raise NotImplementedError

    def _reply_prefix(self) -> list[int]:
        raise NotImplementedError


class TurnsTemplate(ChatTemplate):
    name = "turns"
    markers = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

    def _message(self, role, content):
        special = self.tokenizer.special_ids
        return [special[self.markers[role]]], self.tokenizer.encode(content), [special[END_OF_TURN]]

    def _reply_prefix(self):
        return [self.tokenizer.special_ids[ASSISTANT]]

    @classmethod
    def jinja(cls) -> str:
        """This template for `tokenizer.apply_chat_template` (content as in `message_text`)."""
        markers = ", ".join(f"'{role}': '{marker}'" for role, marker in cls.markers.items())
        return (
            f"{{%- set markers = {{{markers}}} -%}}"
            f"{DOC_SEPARATOR}"
            "{%- for message in messages -%}"
            "{%- if message['role'] not in markers -%}"
            "{{ raise_exception('unknown chat role ' + message['role'] + '; use system, user or assistant') }}"
            "{%- endif -%}"
            "{{ markers[message['role']] }}"
            "{%- if message['content'] is string -%}{{ message['content'] }}"
            "{%- else -%}{%- for part in message['content'] -%}{{ part['text'] | default('') }}{%- endfor -%}"
            "{%- endif -%}"
            f"{END_OF_TURN}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{ASSISTANT}{{%- endif -%}}"
        )


class TranscriptTemplate(ChatTemplate):
    name = "transcript"
    speakers = {"system": "", "user": "User:\n", "assistant": "Assistant:\n"}
    stop = ("\nUser:",)

    def _message(self, role, content):
        encode = self.tokenizer.encode
        return encode(self.speakers[role]), encode(content.strip()), encode("\n\n")

    def _reply_prefix(self):
        return self.tokenizer.encode(self.speakers["assistant"])


TEMPLATES = {t.name: t for t in (TurnsTemplate, TranscriptTemplate)}


def message_text(content: object) -> str:
    """A message's content as text: a string, or a list of {"type": "text", "text": ...} parts
    (the OpenAI and Gradio 6 forms); anything else has no text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def template_for(meta: dict, tokenizer: Tokenizer) -> ChatTemplate:
    """The template a checkpoint was trained with: `turns` for chat models, else `transcript`."""
    chat = meta.get("chat") or {}
    name = chat.get("template", "transcript") if isinstance(chat, dict) else None
    if name not in TEMPLATES:
        raise UserError(
            f"the checkpoint records chat template {name!r}, which this code does not know ({', '.join(TEMPLATES)})"
        )
    return TEMPLATES[name](tokenizer)


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """How many tokens of conversation a prompt keeps: the context less room for the reply (at most a quarter)."""
    return context - min(max_new_tokens, context // 4)


def stream_reply(
    engine: Engine, template: ChatTemplate, messages: list[dict], sampling: SamplingConfig
) -> tuple[Rendered, Iterator[str]]:
    """Render and fit the conversation, then stream the reply's text pieces."""
    prompt = template.fit(messages, prompt_budget(engine.context, sampling.max_new_tokens))
    sampling = replace(sampling, stop=tuple(sampling.stop) + template.stop)
    pieces = (piece for _, piece in engine.stream([prompt.ids], sampling))
    return prompt, pieces
