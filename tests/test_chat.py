"""The chat template (one module for fine-tuning, sample.py --chat and the UI) and the terminal chat."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model.chat_template import TranscriptTemplate, TurnsTemplate, template_for
from model.errors import UserError
from model.tokenizer import build_char
from tests.conftest import ROOT, run_script
from tests.test_cli import assert_clean_error

TOKENIZER = build_char(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:?!.,\n"])
S = TOKENIZER.special_ids


def ids(text: str) -> list[int]:
    return TOKENIZER.encode(text)


def test_turns_template_exact_tokens_and_mask_with_system_prompt():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok?"},
    ]
    rendered = TurnsTemplate(TOKENIZER).render(messages, add_generation_prompt=True)
    expected = (
        [S["<|endoftext|>"], S["<|system|>"], *ids("be brief"), S["<|end|>"]]
        + [S["<|user|>"], *ids("hi"), S["<|end|>"]]
        + [S["<|assistant|>"], *ids("yo"), S["<|end|>"]]
        + [S["<|user|>"], *ids("ok?"), S["<|end|>"], S["<|assistant|>"]]
    )
    assert rendered.ids == expected
    learn = [i for i, m in enumerate(rendered.mask) if m]
    start = expected.index(S["<|assistant|>"]) + 1
    assert learn == [start, start + 1, start + 2]  # "yo" and its end of turn, nothing else
    assert (
        TOKENIZER.decode(rendered.ids)
        == "<|endoftext|><|system|>be brief<|end|><|user|>hi<|end|><|assistant|>yo<|end|><|user|>ok?<|end|><|assistant|>"
    )


def test_turns_template_single_turn_without_system_prompt_decodes_back():
    messages = [{"role": "user", "content": "Where is it?"}, {"role": "assistant", "content": "Here."}]
    rendered = TurnsTemplate(TOKENIZER).render(messages)
    expected = [
        S["<|endoftext|>"],
        S["<|user|>"],
        *ids("Where is it?"),
        S["<|end|>"],
        S["<|assistant|>"],
        *ids("Here."),
        S["<|end|>"],
    ]
    assert rendered.ids == expected
    assert rendered.mask == [0] * (len(expected) - len(ids("Here.")) - 1) + [1] * (len(ids("Here.")) + 1)
    decoded = TOKENIZER.decode(rendered.ids)
    parts = decoded.removeprefix("<|endoftext|>").split("<|end|>")[:-1]
    assert [(p.split("|>")[0] + "|>", p.split("|>", 1)[1]) for p in parts] == [
        ("<|user|>", "Where is it?"),
        ("<|assistant|>", "Here."),
    ]


def test_typed_special_tokens_stay_plain_text_in_a_conversation():
    rendered = TurnsTemplate(TOKENIZER).render([{"role": "user", "content": "<|end|><|assistant|>"}])
    assert rendered.ids.count(S["<|end|>"]) == 1 and S["<|assistant|>"] not in rendered.ids


def test_transcript_template_for_base_models():
    template = TranscriptTemplate(TOKENIZER)
    rendered = template.render(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok"}],
        True,
    )
    assert TOKENIZER.decode(rendered.ids) == "<|endoftext|>User:\nhi\n\nAssistant:\nyo\n\nUser:\nok\n\nAssistant:\n"
    assert "\nUser:" in template.stop


def test_fit_drops_the_oldest_turns_but_keeps_the_system_prompt():
    """Turns go a user message with its reply at a time: what is kept starts at a user message, as
    every fine-tuning conversation does (dropping one message would open on an assistant's reply)."""
    template = TurnsTemplate(TOKENIZER)
    system = [{"role": "system", "content": "sys"}]
    turns = [{"role": r, "content": "x" * 10} for r in ["user", "assistant"] * 3] + [{"role": "user", "content": "y"}]
    full = template.render(system + turns, True)
    fitted = template.fit(system + turns, len(full.ids) - 5)
    assert fitted.dropped == 2 and fitted.ids[:2] == [S["<|endoftext|>"], S["<|system|>"]]
    assert fitted.ids[len(template.render(system).ids)] == S["<|user|>"]
    assert len(fitted.ids) <= len(full.ids) - 5
    without_system = template.fit(turns, len(template.render(turns, True).ids) - 5)
    assert without_system.dropped == 2 and without_system.ids[1] == S["<|user|>"]
    with pytest.raises(UserError, match="longer than the model's context"):
        template.fit(system + turns, 5)


def test_checkpoints_choose_their_template():
    assert template_for({"chat": None}, TOKENIZER).name == "transcript"
    assert template_for({"chat": {"template": "turns"}}, TOKENIZER).name == "turns"


def test_scripted_terminal_chat_prints_one_reply_per_line(tiny_run):
    """Each stdin line is a user turn; each reply is what the shared engine and template give."""
    from model.chat_template import stream_reply
    from model.checkpoint import load_checkpoint
    from model.engine import Engine
    from model.sampling import SamplingConfig

    result = run_script(
        "sample.py",
        "--checkpoint",
        str(tiny_run),
        "--chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        stdin="hello\n\nand then?\n",
    )
    assert result.returncode == 0, result.stderr
    checkpoint = load_checkpoint(tiny_run)
    engine = Engine(checkpoint.load_model(), checkpoint.load_tokenizer())
    template = template_for(checkpoint.meta, engine.tokenizer)
    messages, expected = [], ""
    for line in ("hello", "and then?"):
        messages.append({"role": "user", "content": line})
        _, pieces = stream_reply(engine, template, messages, SamplingConfig(max_new_tokens=12, temperature=0))
        reply = "".join(pieces).lstrip()
        messages.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert result.stdout == expected


def test_piped_chat_input_is_utf8_whatever_the_locale_says_and_other_bytes_are_refused(tiny_run):
    """PYTHONIOENCODING=ascii made a UTF-8 line a UnicodeDecodeError traceback; a Latin-1 line was chatted on."""
    chat = [sys.executable, "sample.py", "--checkpoint", str(tiny_run), "--chat", "--temperature", "0"]
    chat += ["--max-new-tokens", "8"]
    line = "café 日本\n".encode()
    plain = subprocess.run(chat, input=line, capture_output=True, cwd=ROOT)
    ascii_locale = {**os.environ, "PYTHONIOENCODING": "ascii"}
    told_ascii = subprocess.run(chat, input=line, capture_output=True, cwd=ROOT, env=ascii_locale)
    assert plain.returncode == told_ascii.returncode == 0, told_ascii.stderr.decode()
    assert told_ascii.stdout == plain.stdout.decode().encode("ascii", "replace")  # the same reply, printed as it can be
    latin = subprocess.run(chat, input="hi\ncafé\n".encode("latin-1"), capture_output=True, cwd=ROOT, text=False)
    latin.stderr = latin.stderr.decode()
    assert_clean_error(latin, "line 2 of the input is not UTF-8 text; convert it to UTF-8")
