"""Chat fine-tuning: conversations in, a model that answers through the UI's code path out."""

from __future__ import annotations

import json
import shutil

import pytest

from data.conversations import check, load_conversations
from model.chat_template import stream_reply
from model.errors import UserError
from model.sampling import SamplingConfig
from tests.conftest import PAIRS, conversation, run_script
from ui.models import ModelStore


def test_a_fine_tuned_tiny_model_answers_through_the_ui_code_path(chat_run):
    store = ModelStore(chat_run.parent)
    model = store.load(chat_run.name)
    assert model.is_chat_model and model.checkpoint.meta["chat"]["template"] == "turns"
    for question, answer in PAIRS:
        _, pieces = stream_reply(
            model.engine,
            model.template,
            [{"role": "user", "content": question}],
            SamplingConfig(max_new_tokens=40, temperature=0),
        )
        assert "".join(pieces) == answer  # the right answer, and nothing after its end of turn


def test_the_checkpoint_keeps_the_pretraining_corpus_and_records_the_chat_data(chat_run, tiny_run):
    chat = json.loads(next(chat_run.glob("step-*/checkpoint.json")).read_text())
    base = json.loads(next(tiny_run.glob("step-*/checkpoint.json")).read_text())
    assert chat["data"] == base["data"]
    for name in ("n_layer", "n_embd", "n_head", "n_kv_head", "context", "tokenizer", "vocab_size", "data", "max_bytes"):
        assert chat["train"][name] == base["train"][name], name  # the config describes the model it holds
    assert chat["chat"]["data"].endswith("qa.jsonl") and chat["chat"]["conversations"] == 22


def test_chat_validation_reports_how_surely_replies_end(chat_run, tiny_run):
    chat = [json.loads(line) for line in (chat_run / "metrics.jsonl").read_text().splitlines()]
    base = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    last = [record for record in chat if "val_bpb" in record][-1]
    assert 0 < last["val_end_loss"] < 0.1  # the model ends every answer it learnt (the test above)
    assert all("val_end_loss" not in record for record in base)  # pre-training has no replies


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "no messages"),
        ([{"content": "hi"}], "no role"),
        ([{"role": "robot", "content": "hi"}], "unknown role"),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "message 1 has empty content"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}],
            "message 2 has content that is a number, not text",
        ),
        (
            [{"role": "user", "content": {"text": "d"}}, {"role": "assistant", "content": "x"}],
            "content that is an object, not text",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}, {"role": "assistant", "content": "x"}],
            "no text in them",
        ),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], "message 1 has no content"),
        (
            [{"role": "user", "content": "half \ud800"}, {"role": "assistant", "content": "x"}],
            "message 1 holds a lone surrogate escape",
        ),
        ([{"role": "assistant", "content": "x"}], "do not alternate"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
            "do not alternate",
        ),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only come first"),
        ([{"role": "user", "content": "unanswered"}], "no assistant reply"),
    ],
)
def test_malformed_conversations_are_named(messages, problem):
    conversation_, reason = check(messages)
    assert conversation_ is None and problem in reason


def test_a_lone_surrogate_escape_skips_its_conversation_with_its_line(tmp_path):
    """--data refuses a .jsonl line with "\\ud800" (no UTF-8 holds it); --chat-data skips and lists it."""
    path = tmp_path / "chats.jsonl"
    lines = [json.dumps(conversation(q, a)) for q, a in PAIRS]
    lines[1] = lines[1].replace("lantern", "lan\\ud800tern")  # the JSON escape, as a file would hold it
    path.write_text("\n".join(lines) + "\n")
    loaded = load_conversations(str(path))
    assert len(loaded.train) + len(loaded.val) == 3
    assert loaded.problems == [
        f"{path} line 2: message 1 holds a lone surrogate escape (such as \\ud800), which is not text"
    ]


def test_well_formed_conversations_pass_and_lose_an_unanswered_last_message():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "left unanswered"},
    ]
    cleaned, problem = check(messages)
    assert problem is None and [m["content"] for m in cleaned] == ["s", "hi", "yo"]


def test_files_without_usable_conversations_are_errors(tmp_path, tiny_run):
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\nnot json\n{"text": "wrong field"}\n')
    with pytest.raises(UserError, match="0 usable conversation"):
        load_conversations(str(tmp_path / "bad.jsonl"))
    result = run_script(
        "train.py",
        "--init-from",
        str(tiny_run),
        "--chat-data",
        str(tmp_path / "bad.jsonl"),
        "--out-dir",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "usable conversation" in result.stderr
    result = run_script("train.py", "--chat-data", "builtin", "--out-dir", str(tmp_path / "o2"))
    assert result.returncode == 2 and "--init-from" in result.stderr
    result = run_script(
        "train.py",
        "--init-from",
        str(tiny_run),
        "--chat-data",
        str(tmp_path / "none.jsonl"),
        "--out-dir",
        str(tmp_path / "o3"),
    )
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_builtin_chat_set_asks_about_the_corpus_several_ways():
    from data.builtin import builtin_documents
    from data.builtin_chat import builtin_conversations

    conversations = builtin_conversations()
    corpus = "".join(builtin_documents())
    assert len(conversations) > 1000
    about_assert = [c for c in conversations if "assert statement" in c[-2]["content"]]
    assert len({c[-2]["content"] for c in about_assert}) >= 3  # phrased several ways
    answers = [m["content"] for c in conversations[:300] for m in c if m["role"] == "assistant"]
    from_corpus = [a for a in answers if a.rstrip(".").removesuffix(" ...")[:60] in " ".join(corpus.split())]
    assert len(from_corpus) > 0.8 * len(answers)
    assert any(len(c) >= 4 for c in conversations)  # multi-turn
    assert any(c[0]["content"] in ("Hello!", "Hi") for c in conversations)  # greetings
    assert any(c[0]["role"] == "system" for c in conversations)
    assert all(check(c)[1] is None for c in conversations)


def test_resuming_a_chat_run_keeps_it_a_chat_run(chat_run, tmp_path):
    run = tmp_path / "chat"
    shutil.copytree(chat_run, run)
    shape = ["--n-layer", "2", "--context", "64", "--tokenizer", "bpe"]  # the base's: typing them is no change
    result = run_script("train.py", "--resume", "--out-dir", str(run), "--max-steps", "160", "--no-progress", *shape)
    assert result.returncode == 0, result.stderr
    meta = json.loads(next(run.glob("step-*/checkpoint.json")).read_text())
    assert meta["step"] == 160 and meta["chat"]["template"] == "turns"


def test_hub_chat_dataset_loader_reads_a_local_dataset_repository(tmp_path):
    """`datasets` treats a local folder of Parquet files like a hub repo: the code path online users take."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "owner_chat" / "data"
    repo.mkdir(parents=True)
    rows = [conversation(q, a)["messages"] for q, a in PAIRS] * 3
    rows.append([{"role": "user", "content": "no reply"}])
    pq.write_table(pa.table({"messages": rows}), repo / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"messages": rows[:2]}), repo / "test-00000-of-00001.parquet")
    loaded = load_conversations(str(repo.parent))
    assert len(loaded.train) == 12 and len(loaded.val) == 2
    assert loaded.train[1] == conversation(*PAIRS[1])["messages"]
    assert len(loaded.problems) == 1 and "row 12: no assistant reply" in loaded.problems[0]
    with pytest.raises(UserError, match="--messages-column"):
        load_conversations(str(repo.parent), messages_column="conversation")


def test_a_dataset_folder_is_read_whole_and_its_validation_split_reports_what_it_skips(tmp_path):
    """No silent cap (it was 100,000 conversations, and a tenth of that for validation): the same
    conversations in a .jsonl file are all read. Skipped validation rows are listed like training's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "owner_chat" / "data"
    repo.mkdir(parents=True)
    short = conversation("q", "a")["messages"]
    pq.write_table(pa.table({"messages": [short] * 100_001}), repo / "train-00000-of-00001.parquet")
    unanswered = [{"role": "user", "content": "no reply"}]
    pq.write_table(pa.table({"messages": [short] * 10_001 + [unanswered]}), repo / "test-00000-of-00001.parquet")
    loaded = load_conversations(str(repo.parent))
    assert (len(loaded.train), len(loaded.val)) == (100_001, 10_001)
    assert loaded.problems == [f"{repo.parent} [test] row 10001: no assistant reply"]
    capped = load_conversations(str(repo.parent), limit=1_000)  # the flag that bounds it: said, not silent
    assert (len(capped.train), len(capped.val)) == (1_000, 100) and capped.problems == []
    assert capped.description.endswith("(cut to --max-conversations 1,000)")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(conversation(f"q{i}", "a")) + "\n" for i in range(30)))
    first = load_conversations(str(qa), limit=20)  # a file's validation conversations are the last of those read
    assert (len(first.train), len(first.val)) == (18, 2) and first.val[-1][0]["content"] == "q19"
    assert load_conversations(str(qa), limit=30).description == str(qa)  # nothing was left out
    with pytest.raises(UserError, match=r"\(cut to --max-conversations 1\) has 1 usable .*; raise --max-conversations"):
        load_conversations(str(qa), limit=1)  # the flag that left too few is named


def test_a_parquet_file_reads_as_the_dataset_folder_holding_it_and_other_files_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "owner_chat" / "data"
    folder.mkdir(parents=True)
    rows = [conversation(q, a)["messages"] for q, a in PAIRS] * 3 + [[{"role": "user", "content": "no reply"}]]
    pq.write_table(pa.table({"messages": rows}), folder / "train-00000-of-00001.parquet")
    as_file = load_conversations(str(folder / "train-00000-of-00001.parquet"))
    as_folder = load_conversations(str(folder.parent))
    assert (as_file.train, as_file.val) == (as_folder.train, as_folder.val) and len(as_file.train) == 11
    assert as_file.problems == [f"{folder / 'train-00000-of-00001.parquet'} row 12: no assistant reply"]
    with pytest.raises(UserError, match="has no column 'conversation' .*; use --messages-column"):
        load_conversations(str(folder / "train-00000-of-00001.parquet"), messages_column="conversation")
    (tmp_path / "damaged.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="damaged.parquet is not a readable Parquet file"):
        load_conversations(str(tmp_path / "damaged.parquet"))
    (tmp_path / "array.json").write_text(json.dumps([conversation(q, a) for q, a in PAIRS]))
    with pytest.raises(
        UserError,
        match=r"^\S+array.json is neither a .jsonl nor a .parquet file; --chat-data takes builtin, a .jsonl or .parquet file",
    ):
        load_conversations(str(tmp_path / "array.json"))


def test_the_sample_question_is_one_that_leaves_room_for_a_reply(tiny_run, tmp_path):
    """The first validation conversation opens with a question longer than the context (training skips
    it); each evaluation's sample asks the first question that fits instead of stopping the run."""
    data = tmp_path / "chats"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(conversation(q, a)) + "\n" for q, a in PAIRS * 3))
    long_question = conversation("river " * 80, "Too long.")
    val = [long_question, conversation(*PAIRS[2])]
    (data / "validation.jsonl").write_text("".join(json.dumps(c) + "\n" for c in val))
    out = tmp_path / "out"
    args = ["--init-from", str(tiny_run), "--chat-data", str(data), "--out-dir", str(out), "--max-steps", "2"]
    result = run_script("train.py", *args, "--eval-interval", "1", "--batch-size", "4", "--sample-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "val conversation 1: no assistant reply within the context; skipped" in result.stdout
    assert f"user: {PAIRS[2][0]}" in result.stdout
    assert (out / "LATEST").is_file()
