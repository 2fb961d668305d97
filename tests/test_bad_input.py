"""Bad input, everywhere a user can type: one table, each row a tool, an input and what must happen.

"error" rows must give exactly one line `error: ...` on stderr matching the pattern, exit status 2
and no traceback (argparse's own refusals print its usage line first, still exit 2). "ok" rows are
inputs that look odd but are valid and must be handled correctly; the pattern is checked against
the output. The UI rows go through the running app's API, as a browser or script would send them.
"""

from __future__ import annotations

import json
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client

from benchmarks.load import chat_arguments, reply_text, serve
from tests.conftest import run_script
from tests.test_cli import assert_clean_error

SPECIALS = "<|endoftext|><|user|><|assistant|><|end|>"


def expect(kind: str):
    """`error`: one clean error line; `usage`: argparse's refusal; `ok`: valid input, handled."""
    return lambda pattern: (kind, pattern)


error, usage, ok = expect("error"), expect("usage"), expect("ok")


# (tool, what, arguments with {bad} = the folder of bad files and {run} = a trained tiny run, expected)
BAD_INPUTS = [
    ("train.py", "missing corpus", ["--data", "{bad}/missing.txt"], error("does not exist")),
    ("train.py", "empty corpus", ["--data", "{bad}/empty.txt"], error("no text")),
    ("train.py", "an empty corpus name (an unset $DATA)", ["--data", ""], error("--data is empty")),
    ("train.py", "an empty validation name", ["--val-data", ""], error("--val-data is empty")),
    ("train.py", "binary corpus", ["--data", "{bad}/binary.txt"], error("binary")),
    ("train.py", "Latin-1 corpus", ["--data", "{bad}/latin1.txt"], error("not UTF-8")),
    ("train.py", "corpus with a BOM and CRLF line ends", ["--data", "{bad}/bom_crlf.txt", "--max-steps", "2"], ok("done: step 2")),
    ("train.py", "dataset that does not exist", ["--data", "nobody-here/no-such-dataset"], error("Hugging Face")),
    ("train.py", "unknown flag", ["--no-such-flag"], usage("unrecognized arguments: --no-such-flag")),
    ("train.py", "a word for a number", ["--max-steps", "many"], usage("invalid int value: 'many'")),
    ("train.py", "zero layers", ["--n-layer", "0"], error("--n-layer must be at least 1")),
    ("train.py", "negative steps", ["--max-steps", "-5"], error("positive")),
    ("train.py", "dropout out of range", ["--dropout", "1.5"], error(r"--dropout must be in \[0, 1\)")),
    ("train.py", "token noise out of range", ["--token-noise", "-0.1"], error(r"--token-noise must be in \[0, 1\)")),
    ("train.py", "negative learning rate", ["--lr", "-1"], error("learning rates must be positive")),
    ("train.py", "a vocabulary too small for bytes", ["--vocab-size", "10"], error("at least 264")),
    ("train.py", "a bpe vocabulary size for the char tokenizer", ["--tokenizer", "char", "--vocab-size", "1000000000"], error("--vocab-size sets the size of the bpe tokenizer; --tokenizer char")),
    ("train.py", "a conversation limit for pre-training", ["--max-conversations", "5"], error("--max-conversations applies to chat fine-tuning")),
    ("train.py", "a negative conversation limit", ["--chat-data", "builtin", "--init-from", "{run}", "--max-conversations", "-1"], error(r"--max-conversations must be 0 \(all\) or more")),
    ("train.py", "a model too big for memory", ["--n-embd", "1000000"], error("GB .* are free")),
    ("train.py", "a batch too big for memory", ["--batch-size", "100000000"], error("GB .* are free")),
    ("train.py", "resuming a run that does not exist", ["--resume", "--out-dir", "{bad}/no-run"], error("does not exist")),
    ("train.py", "conversations with broken JSON", ["--chat-data", "{bad}/broken.jsonl", "--init-from", "{run}"], error("line 2: broken JSON")),
    ("train.py", "a conversation file that cannot be read", ["--chat-data", "{bad}/unreadable.jsonl", "--init-from", "{run}"], error("cannot read .*unreadable.jsonl: Input/output error")),
    ("train.py", "a conversation file that does not exist", ["--chat-data", "{bad}/nope.jsonl", "--init-from", "{run}"], error("does not exist")),
    ("train.py", "conversations nested too deeply, or with a number for text", ["--chat-data", "{bad}/odd.jsonl", "--init-from", "{run}"], error(r"line 2: broken JSON \(nested too deeply\)")),
    ("train.py", "conversations all longer than the context", ["--chat-data", "{bad}/long_chats.jsonl", "--init-from", "{run}"], error("none has an assistant reply within the model's context")),
    ("train.py", "a fine-tune with another shape than its base", ["--chat-data", "builtin", "--init-from", "{run}", "--n-embd", "128"], error("--n-embd 128 differs from the base model's")),
    ("train.py", "resuming with another optimizer", ["--resume", "--out-dir", "{run}", "--optimizer", "adamw"], error("--optimizer adamw differs from the resumed run's")),
    ("train.py", "resuming a pre-training run as a fine-tune", ["--resume", "--out-dir", "{run}", "--chat-data", "builtin"], error("--chat-data builtin differs from the resumed run's \\(none\\)")),
    ("train.py", "a device file for a corpus", ["--data", "/dev/null"], error("neither a file nor a folder")),
    ("train.py", "a non-UTF-8 JSONL corpus", ["--data", "{bad}/latin1.jsonl"], error("not UTF-8 text .*line 1")),
    ("train.py", "a learning rate of nan", ["--lr", "nan"], error("--lr must be a finite number")),
    ("train.py", "an endless budget", ["--max-minutes", "inf"], error("--max-minutes must be a finite number")),
    ("train.py", "logging every 0 steps", ["--log-interval", "0"], error("--log-interval must be at least 1")),
    ("train.py", "a negative seed", ["--seed", "-1"], error(r"--seed must be in \[0, 2\*\*63\)")),
    ("train.py", "a device that does not exist", ["--device", "foo"], error("not a device this machine has")),
    ("train.py", "a cache folder that is a file", ["--cache-dir", "{bad}/empty.txt"], error("cannot create the data cache")),
    ("train.py", "an output folder inside a file", ["--out-dir", "{bad}/empty.txt/run"], error("cannot create --out-dir")),
    ("train.py", "an output folder of other files", ["--out-dir", "{bad}"], error("holds files that are not a run's")),
    ("train.py", "a fine-tune with another tokenizer than its base", ["--chat-data", "builtin", "--init-from", "{run}", "--tokenizer", "char"], error("--tokenizer char differs from the base model's \\(bpe\\)")),
    ("train.py", "a chat fine-tune given a pre-training corpus", ["--chat-data", "builtin", "--init-from", "{run}", "--data", "{bad}/empty.txt"], error("--data .* differs from the base model's")),
    ("train.py", "a chat fine-tune given --eval-tokens", ["--chat-data", "builtin", "--init-from", "{run}", "--eval-tokens", "100"], error("scores every validation conversation")),
    ("train.py", "empty chat data", ["--chat-data", "", "--init-from", "{run}"], error("--chat-data is empty")),
    ("train.py", "resuming a folder with no checkpoint yet", ["--resume", "--out-dir", "{bad}/no-checkpoint"], error("nothing to resume .* without --resume")),
    ("train.py", "token noise in chat fine-tuning", ["--chat-data", "builtin", "--init-from", "{run}", "--token-noise", "0.1"], error("applies to pre-training")),
    ("sample.py", "missing checkpoint", ["--checkpoint", "{bad}/missing"], error("does not exist")),
    ("sample.py", "a folder that is not a checkpoint", ["--checkpoint", "{bad}"], error("not a checkpoint")),
    ("sample.py", "negative temperature", ["--temperature", "-1"], error("temperature")),
    ("sample.py", "temperature nan", ["--temperature", "nan"], error("temperature")),
    ("sample.py", "top-p above 1", ["--top-p", "2"], error("top-p")),
    ("sample.py", "negative top-k", ["--top-k", "-3"], error("top-k")),
    ("sample.py", "zero new tokens", ["--max-new-tokens", "0"], error("max new tokens")),
    ("sample.py", "zero samples", ["--num-samples", "0"], error("num-samples")),
    ("sample.py", "more samples than memory holds", ["--num-samples", str(10**7)], error(r"needs about .* GB for the key/value cache .* GB are free: ask for fewer")),
    ("sample.py", "unknown flag", ["--temp", "0.5", "--frobnicate"], usage("unrecognized arguments")),
    ("sample.py", "missing prompt file", ["--prompt-file", "{bad}/nope.txt"], error("does not exist")),
    ("sample.py", "an empty checkpoint path (an unset $RUN)", ["--checkpoint", ""], error("--checkpoint is empty")),
    ("sample.py", "a system prompt longer than the context, before any message", ["--chat", "--system", "word " * 3000], error(r"the system prompt alone is longer than the model's context leaves a conversation \(\d+ tokens")),
    ("sample.py", "a folder for a prompt file", ["--prompt-file", "{bad}"], error("is a folder")),
    ("sample.py", "a seed too large", ["--seed", str(10**30)], error(r"seed must be in \[0, 2\*\*64\)")),
    ("sample.py", "a device that does not exist", ["--device", "mps"], error("not a device this machine has")),
    ("sample.py", "a device without data", ["--device", "meta"], error("--device meta is not a device this machine has")),
    ("model.evaluate", "a second CPU", ["--text", "{bad}/bom_crlf.txt", "--device", "cpu:1"], error("--device cpu:1 is not a device this machine has")),
    ("sample.py", "binary prompt file", ["--prompt-file", "{bad}/binary.txt"], error("not UTF-8")),
    ("sample.py", "a prompt that is not UTF-8", ["--prompt", "abc\udcff"], error("the text of --prompt is not UTF-8 text")),  # argv's byte 0xff
    ("sample.py", "a stop string that is not UTF-8", ["--stop", "\udcff"], error("the text of --stop is not UTF-8 text")),
    ("sample.py", "a system prompt without --chat", ["--system", "be brief"], error("--system is the system prompt of --chat")),
    ("sample.py", "a chat given a prompt", ["--chat", "--prompt", "hi"], error("--chat reads each message from standard input .* leave out --prompt$")),
    ("sample.py", "a chat given a prompt file", ["--chat", "--prompt-file", "{bad}/bom_crlf.txt"], error("leave out --prompt-file")),
    ("sample.py", "a chat asked for several samples", ["--chat", "--num-samples", "2"], error("leave out --num-samples")),
    ("sample.py", "both a prompt and a prompt file", ["--prompt", "a", "--prompt-file", "{bad}/bom_crlf.txt"], error("--prompt or with --prompt-file, not both")),
    ("sample.py", "a file of a run for a checkpoint", ["--checkpoint", "{run}/metrics.jsonl"], error("metrics.jsonl is a file, not a checkpoint: pass its folder, ")),
    ("sample.py", "a prompt of special-token text", ["--prompt", SPECIALS, "--max-new-tokens", "3"], ok("^" + re.escape(SPECIALS))),
    ("sample.py", "a prompt file with a BOM and CRLF", ["--prompt-file", "{bad}/bom_crlf.txt", "--max-new-tokens", "3"], ok("^Old stone river.\nThe lantern")),
    ("sample.py", "a 1 MB prompt", ["--prompt-file", "{bad}/huge.txt", "--max-new-tokens", "3"], ok("the model sees its last 64")),
    ("model.evaluate", "missing text", ["--text", "{bad}/none.txt"], error("not a file")),
    ("model.evaluate", "empty text", ["--text", "{bad}/empty.txt"], error("empty")),
    ("model.evaluate", "binary text", ["--text", "{bad}/binary.txt"], error("binary")),
    ("model.evaluate", "Latin-1 text", ["--text", "{bad}/latin1.txt"], error("not UTF-8")),
    ("model.evaluate", "text with a BOM and CRLF", ["--text", "{bad}/bom_crlf.txt"], ok('"bytes": 14400,')),  # 400 x 36: BOM and CRs gone
    ("model.evaluate", "stride 0", ["--text", "{bad}/bom_crlf.txt", "--stride", "0"], error("--stride must be between 1")),
    ("model.evaluate", "batch size 0", ["--text", "{bad}/bom_crlf.txt", "--batch-size", "0"], error("--batch-size must be at least 1")),
    ("model.evaluate", "a batch too big for memory", ["--text", "{bad}/bom_crlf.txt", "--batch-size", "1000000000"], error("--batch-size 1,000,000,000 needs about .* GB for its windows")),
    ("model.evaluate", "unknown flag", ["--text", "{bad}/bom_crlf.txt", "--fast"], usage("unrecognized arguments")),
    ("model.export", "missing checkpoint", ["--checkpoint", "{bad}/missing"], error("does not exist")),
    ("model.export", "an output folder of other files", ["--out", "{bad}"], error("holds files that are not an export")),
    ("model.export", "an output path that is a file", ["--out", "{bad}/empty.txt"], error("is a file; --out names the folder")),
    ("model.export", "an output folder inside a file", ["--out", "{bad}/empty.txt/hf"], error("cannot create the folder of --out")),
    ("model.export", "an unknown precision", ["--dtype", "int4"], usage("invalid choice: 'int4'")),
    ("ui", "port out of range", ["--port", "99999"], error("--port must be 1-65535")),
    ("ui", "no concurrency", ["--concurrency", "0"], error("--concurrency at least 1")),
    ("ui", "auth without a password", ["--auth", "alice"], error("user:password")),
    ("ui", "missing checkpoint", ["--checkpoint", "{bad}/missing"], error("does not exist")),
]  # fmt: skip


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.txt").write_text("")
    (folder / "no-checkpoint").mkdir()  # a run stopped before it saved anything
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 10)
    (folder / "latin1.txt").write_bytes("déjà vu ".encode("latin-1") * 100)
    (folder / "bom_crlf.txt").write_bytes(b"\xef\xbb\xbf" + b"Old stone river.\r\nThe lantern opens.\r\n" * 400)
    (folder / "huge.txt").write_text("word " * 200_000)
    (folder / "broken.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        '{"messages": [{"role": "user", "content": "unfinished"\n'
    )
    (folder / "odd.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        + "[" * 100_000
        + "]" * 100_000
        + "\n"
        + '{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}, {"role": "assistant", "content": "x"}]}\n'
    )
    long_chat = {"messages": [{"role": "user", "content": "word " * 3000}, {"role": "assistant", "content": "ok"}]}
    (folder / "long_chats.jsonl").write_text(f"{json.dumps(long_chat)}\n" * 3)
    (folder / "latin1.jsonl").write_bytes('{"text": "déjà vu"}\n'.encode("latin-1"))
    (folder / "unreadable.jsonl").symlink_to("/proc/self/mem")  # reading it at offset 0 fails with EIO (Linux)
    return folder


def command(tool: str, args: list[str], bad, run, tmp_path) -> list[str]:
    args = [a.replace("{bad}", str(bad)).replace("{run}", str(run)) for a in args]
    if tool == "train.py":
        return ["train.py", "--preset", "tiny", "--out-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--no-progress", *args]  # fmt: skip
    if tool in ("sample.py", "model.evaluate", "model.export") and "--checkpoint" not in args:
        args = ["--checkpoint", str(run), *args]
    if tool == "model.export" and "--out" not in args:
        args = [*args, "--out", str(tmp_path / "hf")]
    return [tool, *args] if tool.endswith(".py") else ["-m", tool, *args]


@pytest.fixture(scope="module")
def outcomes(request, bad, tiny_run, tmp_path_factory) -> dict:
    """The run of every selected row (its folder and result), two at a time: each row is a fresh
    interpreter that spends most of its second or two importing, and the table is the suite's longest
    stretch of them. Rows write only into their own folder, so they cannot meet."""

    def run(row: int):
        tool, _, args, _ = BAD_INPUTS[row]
        folder = tmp_path_factory.mktemp("row")
        return folder, run_script(*command(tool, args, bad, tiny_run, folder))

    selected = [item.callspec.params["row"] for item in request.session.items if item.originalname == "test_bad_input_on_the_command_line"]  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(selected, pool.map(run, selected), strict=True))


@pytest.mark.parametrize("row", range(len(BAD_INPUTS)), ids=[f"{t}: {w}" for t, w, _, _ in BAD_INPUTS])
def test_bad_input_on_the_command_line(row, outcomes):
    folder, result = outcomes[row]
    kind, pattern = BAD_INPUTS[row][3]
    if kind == "error":
        assert_clean_error(result, pattern)
        assert not (folder / "o" / "LATEST").exists(), "a refused run writes no checkpoint"
    elif kind == "usage":
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert re.search(pattern, result.stderr.strip().splitlines()[-1]), result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert re.search(pattern, result.stdout) or re.search(pattern, result.stderr), (result.stdout, result.stderr)


def test_a_new_run_refuses_a_folder_of_other_files_and_leaves_them_alone(corpus_file, tmp_path):
    """A run deletes old checkpoint folders and rewrites its log: never among files it did not write."""
    mine = tmp_path / "mine"
    (mine / "step-by-step").mkdir(parents=True)
    (mine / "step-by-step" / "notes.txt").write_text("precious")
    (mine / "metrics.jsonl").write_text('{"my": "log"}\n')
    result = run_script(
        "train.py", "--preset", "tiny", "--data", str(corpus_file), "--out-dir", str(mine), "--max-steps", "2"
    )
    assert_clean_error(result, r"holds files that are not a run's \(step-by-step\)")
    assert (mine / "step-by-step" / "notes.txt").read_text() == "precious"
    assert (mine / "metrics.jsonl").read_text() == '{"my": "log"}\n'


def test_a_busy_port_is_one_line_before_any_model_loads(tiny_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_script("-m", "ui", "--checkpoint", str(tiny_run), "--port", str(port), timeout=60)
    assert_clean_error(result, f"cannot listen on 127.0.0.1:{port} .*pick another --port")


@pytest.fixture(scope="module")
def ui(tiny_run):
    with serve("--checkpoint", str(tiny_run)) as (_, url):
        yield Client(url, verbose=False, analytics_enabled=False)


def chat(client: Client, message, max_new_tokens=8, **settings) -> str:
    return reply_text(
        client.predict(*chat_arguments(message, max_new_tokens=max_new_tokens, **settings), api_name="/chat")
    )


# (what, chat arguments, expected: ("ok", None) for a reply, or ("error", pattern) for a message)
UI_INPUTS = [
    ("empty message", dict(message=""), error("The message is empty: type something to send")),
    ("a message of spaces and newlines", dict(message=" \n\t "), error("The message is empty")),
    ("only special-token text", dict(message=SPECIALS), ok("")),
    ("control characters and NUL", dict(message="a\x00b\x07c\x1b[31m"), ok("")),
    ("a message far longer than the context", dict(message="word " * 50_000), error("longer than the model's context")),
    ("negative temperature", dict(message="hi", temperature=-5), error("less than minimum value 0")),
    ("top-k over the maximum", dict(message="hi", top_k=10_000), error("greater than maximum")),
    ("zero new tokens", dict(message="hi", max_new_tokens=0), error("less than minimum value 1")),
    (
        "a seed a browser cannot send exactly",
        dict(message="hi", seed=2**53),
        error(r"the seed must be a whole number from 0 to 9,007,199,254,740,991 \(2\*\*53 - 1"),
    ),
    ("a seed that is not whole", dict(message="hi", seed=1.5), error("the seed must be a whole number")),
    ("the largest seed", dict(message="hi", seed=2**53 - 1), ok("")),
    (
        "a word for a number",
        dict(message="hi", max_new_tokens="lots"),
        error("Expected a `float`, but the value passed .* 'lots'"),
    ),
]


@pytest.mark.parametrize("what, arguments, expected", UI_INPUTS, ids=[u[0] for u in UI_INPUTS])
def test_bad_input_in_the_ui(what, arguments, expected, ui):
    kind, pattern = expected
    if kind == "ok":
        assert isinstance(chat(ui, **arguments), str)
        assert isinstance(chat(ui, "still answering"), str)
    else:
        with pytest.raises(Exception, match=pattern):
            chat(ui, **arguments)
        assert isinstance(chat(ui, "still answering"), str), "the server carries on"
