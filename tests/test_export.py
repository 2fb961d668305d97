"""Export to Hugging Face: `transformers` loads the folder and computes, tokenizes and chats as we do.

Everything runs offline on real checkpoints (the tiny run, its chat fine-tune, and in-process
models of other shapes); the Hugging Face side is the real `transformers`, no custom code.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model.export
from model.chat_template import TurnsTemplate
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.engine import Engine
from model.errors import UserError
from model.export import export
from model.gpt import GPT
from model.sampling import SamplingConfig
from model.tokenizer import SPECIAL_TOKENS, build_char, train_bpe
from tests.conftest import ROOT, make_text, run_script
from tests.test_cli import assert_clean_error
from tests.test_model import SlidingWindow

ALPHABET = "abcdefghijklmnop ABCD   \n\n\t0123456789.,;:'!?()-—éüß€日本語🙂" + "'s 've 're"


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    corpus = make_text(300, seed=seed)
    texts = []
    for i in range(n):
        if i % 2:
            texts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 120))))
        else:
            start = rng.randrange(len(corpus) - 300)
            texts.append(corpus[start : start + rng.randint(1, 300)])
    return texts


def with_specials(texts: list[str], seed: int) -> list[tuple[str, list[str | None]]]:
    """Texts with special tokens spliced in, and the pieces to encode: text, or None before a special."""
    rng = random.Random(seed)
    spliced = []
    for text in texts:
        pieces, parts = [], []
        for piece in text.split(" ", 3):
            special = rng.choice(SPECIAL_TOKENS)
            pieces += [piece, special]
            parts.append(piece + special)
        spliced.append(("".join(parts), pieces))
    return spliced


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """The tiny base run, exported through the command line."""
    out = tmp_path_factory.mktemp("hf") / "base"
    result = run_script("-m", "model.export", "--checkpoint", str(tiny_run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "checked: yes" in result.stdout
    return out


@pytest.fixture(scope="module")
def exported_chat(chat_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "chat"
    export(chat_run, out)
    return out


def test_the_export_writes_a_standard_qwen3_folder(exported, tiny_run):
    assert sorted(p.name for p in exported.iterdir()) == sorted(model.export.FILES)
    config = json.loads((exported / "config.json").read_text())
    ours = load_checkpoint(tiny_run).model_config
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (
        ours.n_embd,
        ours.n_layer,
        ours.mlp_hidden,
    )
    assert "chat_template" not in json.loads((exported / "tokenizer_config.json").read_text())  # a base model
    new_file = exported.parent / "new"
    new_file.write_text("")  # the mode the umask gives a new file; safetensors alone would give 0o600
    assert {p.stat().st_mode & 0o777 for p in exported.iterdir()} == {new_file.stat().st_mode & 0o777}
    assert not list(exported.parent.glob(".tmp-*")), "no temporary folder is left behind"


def test_exported_logits_match_ours_on_random_prompts(exported, tiny_run):
    ours = load_checkpoint(tiny_run).load_model()
    theirs = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for length in (1, 7, 33, ours.config.context):
            ids = torch.randint(0, ours.config.vocab_size, (2, length), generator=generator)
            expected = ours(ids)
            got = theirs(ids).logits
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_past_the_context_the_export_attends_to_the_newest_context_positions_as_our_engine_does(exported, tiny_run):
    ours = load_checkpoint(tiny_run).load_model()
    theirs = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    length = 2 * ours.config.context + 9
    ids = torch.randint(0, ours.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = ours(ids, cache=SlidingWindow(length, ours.config.context))  # the rolling cache's attention
        got = theirs(ids).logits
        everything = ours(ids)  # attending to every earlier position instead
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[:, -1], everything[:, -1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fixture", ["exported", "exported_chat"])
def test_greedy_generation_gives_the_same_tokens(fixture, request, tiny_run, chat_run):
    folder = request.getfixturevalue(fixture)
    checkpoint = load_checkpoint(tiny_run if fixture == "exported" else chat_run)
    tokenizer = checkpoint.load_tokenizer()
    engine = Engine(checkpoint.load_model(), tokenizer)
    theirs = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    context = checkpoint.model_config.context
    if fixture == "exported":
        texts = ("The river", "Every old lantern", "A")
        prompts = [engine.encode_prompt(text) for text in texts]
        their_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        assert [their_tokenizer(text)["input_ids"] for text in texts] == prompts  # generate(**tokenizer(text))
    else:
        template = TurnsTemplate(tokenizer)
        prompts = [
            template.render([{"role": "user", "content": q}], add_generation_prompt=True).ids
            for q in ("What colour is the river?", "Who keeps the lantern?")
        ]
    for prompt in prompts:
        new = 2 * context  # past the context too: our rolling cache, their sliding window
        text = "".join(piece for _, piece in engine.stream([prompt], SamplingConfig(max_new_tokens=new, temperature=0)))
        with torch.inference_mode():
            output = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new)
        generated = output[0, len(prompt) :].tolist()
        if generated and tokenizer.is_special(generated[-1]):  # the stop token ends both; ours does not print it
            generated = generated[:-1]
        assert not any(tokenizer.is_special(t) for t in generated)
        assert tokenizer.decode(generated) == text
        assert len(generated) > 5
        if fixture == "exported":  # the base model runs on past the context (a chat reply ends sooner)
            assert len(prompt) + len(generated) > context


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_the_exported_tokenizer_gives_our_ids_special_tokens_included(kind, tmp_path):
    texts = [*make_text(2000, seed=3).split("\n\n"), *random_texts(2000, seed=8)]  # digits, Unicode, odd spacing
    tokenizer = train_bpe(texts, 700) if kind == "bpe" else build_char(texts)
    config = ModelConfig(vocab_size=tokenizer.n_vocab, context=32, n_layer=1, n_embd=32, n_head=2, n_kv_head=1)
    save_checkpoint(tmp_path / "run", 0, GPT(config), tokenizer, {})
    export(tmp_path / "run", tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    for token in SPECIAL_TOKENS:
        assert theirs.convert_tokens_to_ids(token) == tokenizer.special_ids[token]
    texts = random_texts(400, seed=4)
    for text in texts:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text), text
        assert theirs.decode(ids) == text
        assert theirs(text)["input_ids"] == [tokenizer.doc_separator, *ids]  # a text starts a document, as ours
    long = " ".join(texts[:50])
    kept = theirs(long, truncation=True)["input_ids"]  # the newest tokens, as our engine keeps
    assert kept == [tokenizer.doc_separator, *tokenizer.encode(long)[-(config.context - 1) :]]
    for text, pieces in with_specials(texts[:100], seed=5):
        expected = []
        for piece in pieces:
            expected += [tokenizer.special_ids[piece]] if piece in SPECIAL_TOKENS else tokenizer.encode(piece)
        assert theirs.encode(text, add_special_tokens=False) == expected, text


def test_the_chat_template_renders_conversations_to_our_tokens(exported_chat, chat_run):
    tokenizer = load_checkpoint(chat_run).load_tokenizer()
    ours = TurnsTemplate(tokenizer)
    theirs = AutoTokenizer.from_pretrained(exported_chat, local_files_only=True)
    rng = random.Random(6)
    texts = random_texts(60, seed=7)
    for _ in range(30):
        messages = [{"role": "system", "content": rng.choice(texts)}] if rng.random() < 0.5 else []
        for turn in range(rng.randint(1, 4)):
            messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": rng.choice(texts)})
        for opened in (False, True):
            expected = ours.render(messages, add_generation_prompt=opened).ids
            rendered = theirs.apply_chat_template(messages, add_generation_prompt=opened, tokenize=False)
            assert theirs.encode(rendered, add_special_tokens=False) == expected, messages
            tokenized = theirs.apply_chat_template(messages, add_generation_prompt=opened, return_dict=True)
            assert tokenized["input_ids"] == expected, messages  # one document start, not two
    parts = [{"role": "user", "content": [{"type": "text", "text": "Who keeps "}, {"type": "text", "text": "it?"}]}]
    rendered = theirs.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|endoftext|><|user|>Who keeps it?<|end|><|assistant|>"
    with pytest.raises(Exception, match="unknown chat role tool"):
        theirs.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    generation = json.loads((exported_chat / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.special_ids["<|end|>"], tokenizer.doc_separator]


def test_other_shapes_and_half_precision_export_too(tmp_path):
    """Grouped-query attention, tied embeddings, a char tokenizer and bf16 weights."""
    tokenizer = build_char([make_text(50)])
    config = ModelConfig(
        vocab_size=tokenizer.n_vocab, context=48, n_layer=2, n_embd=48, n_head=4, n_kv_head=2, tie_embeddings=True
    )
    torch.manual_seed(0)
    ours = GPT(config)
    save_checkpoint(tmp_path / "run", 3, ours, tokenizer, {})
    result = export(tmp_path / "run", tmp_path / "hf", dtype="bfloat16")
    assert result["max_logit_difference"] <= 1e-4
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype="auto")
    assert theirs.config.tie_word_embeddings and theirs.config.num_key_value_heads == 2
    assert theirs.dtype == torch.bfloat16
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()


def test_a_padded_batch_generates_what_each_prompt_generates_alone(exported):
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    theirs = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True, dtype=torch.float32)
    prompts = ["A", "The quick brown fox jumps over"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    together = theirs.generate(**batch, max_new_tokens=12, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for prompt, row in zip(prompts, together, strict=True):
        alone = tokenizer(prompt, return_tensors="pt")
        expected = theirs.generate(**alone, max_new_tokens=12, do_sample=False)[0, alone["input_ids"].shape[1] :]
        assert row.tolist() == expected.tolist()


def test_an_earlier_export_is_replaced_only_when_asked(exported, tiny_run, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(exported, out)
    again = ["-m", "model.export", "--checkpoint", str(tiny_run), "--out", str(out), "--dtype", "bfloat16"]
    assert_clean_error(run_script(*again), "already holds an export; pass --overwrite")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    result = run_script(*again, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["hf"], "the earlier export and the temporary are gone"


def test_a_model_transformers_would_compute_differently_is_refused(tiny_run, tmp_path, monkeypatch):
    real = model.export.qwen3_config
    monkeypatch.setattr(model.export, "qwen3_config", lambda *a, **k: {**real(*a, **k), "hidden_act": "gelu"})
    with pytest.raises(UserError, match="transformers does not compute what this model computes"):
        export(tiny_run, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == [], "nothing is written, not even a temporary"


def test_a_checkpoint_with_settings_the_exporter_does_not_know_is_refused(tiny_run, tmp_path):
    assert {f.name for f in fields(ModelConfig)} == model.export.MAPPED | model.export.TRAINING_ONLY
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta_file = load_checkpoint(run).folder / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta["model"]["mlp_activation"] = "relu2"
    meta_file.write_text(json.dumps(meta))
    result = run_script("-m", "model.export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"))
    assert_clean_error(result, "cannot map onto Qwen3 \\(mlp_activation\\)")
    assert not (tmp_path / "hf").exists()


def test_the_readme_example_runs_on_an_exported_chat_model(exported_chat):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Export to Hugging Face") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))]
    result = run_script("-c", example.replace('"hf/chat"', repr(str(exported_chat))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the example prints the model's reply"


def test_the_export_cleans_up_only_its_own_leftovers_in_a_folder_that_is_not_ours(tiny_run, tmp_path):
    dead = 2**22 + 12345  # above the largest pid Linux allows (2**22): no process has it
    ours, theirs = tmp_path / f".tmp-hf-{dead}", tmp_path / f".tmp-notes-{dead}"
    ours.mkdir()
    theirs.write_text("another program's temporary file")
    mine = [tmp_path / ".tmp-hf-mystuff", tmp_path / ".tmp-hf.txt", tmp_path / f".tmp-hfbackup-{dead}"]
    for path in mine:  # names that start like the export's temporaries but are not: a user's own files
        path.write_text("precious")
    export(tiny_run, tmp_path / "hf", check=False)
    assert not ours.exists(), "an export killed mid-write is cleaned up by the next one"
    assert theirs.read_text() == "another program's temporary file"
    assert all(path.read_text() == "precious" for path in mine)


def test_an_export_inside_a_run_folder_is_refused(tiny_run, tmp_path):
    """Training deletes old step folders as it saves, and would take an export inside one with them."""
    step = load_checkpoint(tiny_run).folder
    for out in (step / "hf", tiny_run / "hf"):
        with pytest.raises(UserError, match="is inside the run or checkpoint folder"):
            export(tiny_run, out, check=False)
        assert not out.exists()


def test_a_model_that_computes_nan_is_refused_by_export_evaluate_and_generation(tiny_run, tmp_path):
    """A run that diverged saves weights that are not numbers, with a valid checksum: no tool may
    report them as fine (export's check compared NaN with NaN and passed; evaluate printed NaN)."""
    checkpoint = load_checkpoint(tiny_run)
    diverged = checkpoint.load_model("cpu")
    with torch.no_grad():
        diverged.lm_head.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "run", 1, diverged, checkpoint.load_tokenizer(), {})
    with pytest.raises(UserError, match="computes logits that are not numbers"):
        export(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    (tmp_path / "text.txt").write_text(make_text(5))
    result = run_script(
        "-m", "model.evaluate", "--checkpoint", str(tmp_path / "run"), "--text", str(tmp_path / "text.txt")
    )
    assert_clean_error(result, "computes a loss that is not a number")
    result = run_script("sample.py", "--checkpoint", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "5")
    assert_clean_error(result, "computes logits that are not numbers")  # it printed nothing, successfully
    assert result.stdout == ""  # not the prompt echoed, with the error after it on the same terminal line


def test_sigterm_during_an_export_removes_its_half_built_folder(tiny_run, tmp_path):
    """SIGTERM (kill's default) left a full-size hidden .tmp-hf-PID folder where Ctrl-C cleaned up."""
    command = [sys.executable, "-m", "model.export", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "hf")]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".tmp-hf-*")) and time.monotonic() < deadline:  # the check runs on it for seconds
        time.sleep(0.02)
    assert list(tmp_path.glob(".tmp-hf-*")), "the export never started writing"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and stderr.strip().splitlines()[-1] == "terminated", stderr
    assert list(tmp_path.iterdir()) == []
