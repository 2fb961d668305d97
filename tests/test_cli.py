"""The command lines as a user meets them: the README quick start, sampling, evaluation, damaged checkpoints.

Every bad input must give a one-line `error: ...` on stderr, exit status 2, and no traceback (the
table of bad inputs is tests/test_bad_input.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from model.checkpoint import load_checkpoint
from tests.conftest import ROOT, run_script


def assert_clean_error(result, pattern: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def quick_start_commands() -> list[list[str]]:
    """The `python ...` commands of the README's quick start block."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- quick start -->", 1)[1].split("```", 2)[1]
    commands = []
    for line in block.splitlines():
        for part in line.split("&&"):
            words = part.split()
            if words[:1] == ["python"] and words[1].endswith(".py"):
                commands.append(words[1:])
    return commands


def test_readme_quick_start_runs_end_to_end_on_the_tiny_preset(tmp_path):
    commands = quick_start_commands()
    assert [c[0] for c in commands] == ["train.py", "sample.py"]
    train, sample = commands
    result = run_script(
        str(ROOT / train[0]), *train[1:], "--preset", "tiny", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "builtin" in result.stdout and "val" in result.stdout and "bits/byte" in result.stdout
    assert (tmp_path / "out" / "base" / "LATEST").is_file()
    result = run_script(
        str(ROOT / sample[0]), *[w.strip("'\"") for w in sample[1:]], "--max-new-tokens", "20", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 0


def test_sample_streams_reproducible_text(tiny_run):
    args = [
        "sample.py",
        "--checkpoint",
        str(tiny_run),
        "--prompt",
        "The river",
        "--max-new-tokens",
        "20",
        "--seed",
        "1",
    ]
    first, second = run_script(*args), run_script(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("The river")
    several = run_script(*args[:-2], "--num-samples", "2", "--temperature", "0")
    assert several.stdout.count("--- sample") == 2
    piped = run_script(
        "sample.py", "--checkpoint", str(tiny_run), "--prompt", "-", "--max-new-tokens", "5", stdin="Old stone"
    )
    assert piped.returncode == 0 and piped.stdout.startswith("Old stone")
    echoed = [*args[:3], "--prompt", "-", *args[5:]]  # echo's line end is not part of the prompt
    assert run_script(*echoed, stdin="The river\n").stdout == first.stdout


def test_sample_stops_quietly_when_its_reader_goes_away(tiny_run):
    """`python sample.py ... | head -1`: the pipe closes before the text is written."""
    command = [sys.executable, "sample.py", "--checkpoint", str(tiny_run), "--prompt", "The river"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # no reader: the first write fails with a broken pipe
    assert process.wait(timeout=300) == 141
    assert process.stderr.read() == ""


def test_sample_defaults_to_the_newest_run_under_out(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "out" / "mine")
    result = run_script(str(ROOT / "sample.py"), "--max-new-tokens", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_evaluate_prints_bits_per_byte_as_json(tiny_run, corpus_file, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(corpus_file.read_text()[:5000])
    result = run_script("-m", "model.evaluate", "--checkpoint", str(tiny_run), "--text", str(text))
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["bytes"] == len(text.read_bytes())
    assert 0.5 < figures["bpb"] < 8
    stride_full = run_script(
        "-m", "model.evaluate", "--checkpoint", str(tiny_run), "--text", str(text), "--stride", "64"
    )
    assert json.loads(stride_full.stdout)["bytes"] == figures["bytes"]


def test_help_explains_every_flag():
    import sample
    from model import export
    from training.budget import CHOSEN
    from training.config import PRESETS, build_parser

    for parser in (build_parser(), sample.build_parser(), export.build_parser()):
        undocumented = [a.option_strings for a in parser._actions if not a.help]
        assert not undocumented
    chosen = [a for a in build_parser()._actions if a.dest in CHOSEN]  # the budget rule's settings say so
    assert len(chosen) == len(CHOSEN) and all("sized for --max-minutes" in a.help for a in chosen)
    preset_set = [a for a in build_parser()._actions if a.dest in PRESETS["cpu"]]  # the default preset's values
    assert preset_set and all(f"{PRESETS['cpu'][a.dest]} in the cpu preset" in a.help for a in preset_set)
    result = run_script("train.py", "--help")
    assert result.returncode == 0 and "--max-minutes" in result.stdout and "--preset" in result.stdout


NO_TORCH = "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['train.py', *sys.argv[1:]]; runpy.run_path('train.py', run_name='__main__')"


@pytest.mark.parametrize(
    "flags, refusal",
    [
        (["--lr", "-1"], "error: learning rates must be positive"),
        (["--tokenizer", "char", "--vocab-size", "1000"], "error: --vocab-size sets the size of the bpe tokenizer"),
        (["--n-layer", "many"], "invalid int value: 'many'"),
        (["--help"], None),
    ],
)
def test_train_checks_its_flags_before_loading_torch(flags, refusal):
    """A mistyped flag is refused, and --help shown, in a fraction of a second: importing torch takes
    two seconds on two cores, so train.py checks the flags first (torch is made unimportable here)."""
    result = run_script("-c", NO_TORCH, *flags)
    if refusal is None:
        assert result.returncode == 0 and "--max-minutes" in result.stdout, result.stderr
    else:
        assert result.returncode == 2 and refusal in result.stderr and "Traceback" not in result.stderr


def test_sample_help_shows_each_default_once_and_no_empty_ones():
    result = run_script("sample.py", "--help")
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    assert "(default: None)" not in help_text and "(default: )" not in help_text and "(default: [])" not in help_text
    assert "(default: the newest run under --out-root) (default:" not in help_text  # said once, by the help
    assert "(default: 256)" in help_text


def test_sample_writes_what_the_output_encoding_lacks_as_question_marks(tiny_run):
    args = ["sample.py", "--checkpoint", str(tiny_run), "--prompt", "café — ok", "--max-new-tokens", "20"]
    result = run_script(*args, "--seed", "1", env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("caf? ? ok") and result.stdout.isascii()


def test_a_prompt_longer_than_the_context_is_cut_to_its_newest_tokens_with_a_note(tiny_run):
    result = run_script("sample.py", "--checkpoint", str(tiny_run), "--prompt", "word " * 400, "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "the model sees its last 64" in result.stderr and result.stdout.startswith("word " * 400)


def test_the_long_prompt_note_counts_the_prompts_tokens_not_the_document_start(tiny_run):
    """A prompt of exactly the context's 64 tokens is seen whole (only the document separator before it
    is dropped); the note said 'the prompt is 65 tokens' for it."""
    tokenizer = load_checkpoint(tiny_run).load_tokenizer()
    words = [f"{word} " for word in "the old stone river ran past the lantern by the quiet harbour".split()] * 40
    fitting = next("".join(words[:n]) for n in range(len(words)) if len(tokenizer.encode("".join(words[:n]))) == 64)
    result = run_script("sample.py", "--checkpoint", str(tiny_run), "--prompt", fitting, "--max-new-tokens", "2")
    assert result.returncode == 0 and "note" not in result.stderr, result.stderr
    longer = fitting + "lantern lantern"
    result = run_script("sample.py", "--checkpoint", str(tiny_run), "--prompt", longer, "--max-new-tokens", "2")
    assert f"note: the prompt is {len(tokenizer.encode(longer))} tokens; the model sees its last 64" in result.stderr


def test_incomplete_and_incompatible_checkpoints_are_refused(tiny_run, tmp_path):
    folder = next(tiny_run.glob("step-*"))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(folder, incomplete)
    (incomplete / "model.safetensors").unlink()
    assert_clean_error(run_script("sample.py", "--checkpoint", str(incomplete)), "model.safetensors is missing")
    future = tmp_path / "future"
    shutil.copytree(folder, future)
    meta = json.loads((future / "checkpoint.json").read_text())
    (future / "checkpoint.json").write_text(json.dumps({**meta, "version": 2}))
    assert_clean_error(run_script("sample.py", "--checkpoint", str(future)), "version 2")
    result = run_script(str(ROOT / "sample.py"), cwd=tmp_path)
    assert_clean_error(result, "no checkpoint found")


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(tiny_run, tmp_path):
    """Tokenizer files from another run, their checksums updated: the first special token's id would
    be past the model's embedding (an IndexError in sample.py and model.evaluate)."""
    from model.checkpoint import _sha256
    from model.tokenizer import Tokenizer

    folder = tmp_path / "mixed"
    shutil.copytree(next(tiny_run.glob("step-*")), folder)
    tokenizer = Tokenizer.load(folder)
    extra = {f"extra {i}".encode(): len(tokenizer.ranks) + i for i in range(100)}
    Tokenizer(tokenizer.kind, tokenizer.pattern, {**tokenizer.ranks, **extra}).save(folder)
    meta = json.loads((folder / "checkpoint.json").read_text())
    meta["files"].update({name: _sha256(folder / name) for name in ("tokenizer.json", "tokenizer.tiktoken")})
    (folder / "checkpoint.json").write_text(json.dumps(meta))
    message = r"tokenizer.tiktoken has \d+ ids but the model has \d+; the checkpoint is damaged"
    assert_clean_error(run_script("sample.py", "--checkpoint", str(folder), "--max-new-tokens", "3"), message)
    (tmp_path / "text.txt").write_text("The river runs.")
    evaluate = run_script("-m", "model.evaluate", "--checkpoint", str(folder), "--text", str(tmp_path / "text.txt"))
    assert_clean_error(evaluate, message)


def test_an_error_of_the_device_is_not_blamed_on_the_checkpoint(tiny_run):
    """The weights are read on the CPU and then moved: an error of the file is the file's, and a
    device that cannot hold them is no sign of damage (meta holds them without their data)."""
    from model.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_run).load_model("meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_without_a_c_compiler_sampling_falls_back_to_the_pytorch_step_with_a_note(tiny_run, tmp_path):
    args = ["sample.py", "--checkpoint", str(tiny_run), "--prompt", "The", "--max-new-tokens", "30"]
    args += ["--temperature", "0", "--dtype", "fp32", "--no-int8-weights"]  # fp32: both steps compute the same logits
    compiled = run_script(*args)
    fallback = run_script(*args, env={"CC": str(tmp_path / "no-such-compiler")})
    assert compiled.returncode == 0 and fallback.returncode == 0, fallback.stderr
    assert "PyTorch decode step" not in compiled.stderr
    note = [line for line in fallback.stderr.splitlines() if "PyTorch decode step" in line]
    assert len(note) == 1 and "no-such-compiler' names no program that is installed" in note[0]
    assert "Traceback" not in fallback.stderr
    assert fallback.stdout == compiled.stdout and len(compiled.stdout) > len("The")


def test_a_compiler_command_of_several_words_in_cc_builds_the_c_step(tiny_run):
    """CC="ccache gcc" is a command, as make and the shell read it, not one program's name."""
    wrapped = f"env {shutil.which('cc') or shutil.which('gcc')}"  # a wrapper every system has
    args = ["sample.py", "--checkpoint", str(tiny_run), "--prompt", "The", "--max-new-tokens", "5"]
    result = run_script(*args, env={"CC": wrapped})
    assert result.returncode == 0, result.stderr
    assert "PyTorch decode step" not in result.stderr
