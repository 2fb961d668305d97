"""Faults injected into real training runs: kill -9 anywhere, Ctrl-C and SIGTERM, a full disk.

Every run here is `train.py` in its own process on the tiny preset, killed for real. The claims
under test: a checkpoint that fails to load is never left behind, `--resume` loses at most one
checkpoint interval and then produces the same losses, step for step, as a run never stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.checkpoint import load_checkpoint
from model.errors import UserError
from tests.conftest import ROOT, run_script

STEPS, INTERVAL = 60, 5


def run_flags(corpus: Path, out: Path, cache: Path) -> list[str]:
    return [
        "--preset", "tiny", "--data", str(corpus), "--out-dir", str(out), "--cache-dir", str(cache),
        "--max-steps", str(STEPS), "--eval-interval", str(INTERVAL), "--log-interval", "1",
        "--sample-tokens", "0", "--dtype", "fp32", "--seed", "3", "--no-progress",
    ]  # fmt: skip


def logged_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]


def assert_same_run(run: Path, reference: Path) -> None:
    resumed, straight = logged_losses(run), logged_losses(reference)
    assert [step for step, _ in resumed] == list(range(1, STEPS + 1)), "each step logged exactly once"
    for (step, loss), (_, expected) in zip(resumed, straight, strict=True):
        assert loss == pytest.approx(expected, rel=1e-6, abs=1e-6), step


def crash(spec: str, *args: str) -> subprocess.CompletedProcess:
    return run_script(str(ROOT / "tests" / "crash.py"), spec, "train.py", *args)


@pytest.fixture(scope="module")
def reference(corpus_file, tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    base = tmp_path_factory.mktemp("reference")
    result = run_script("train.py", *run_flags(corpus_file, base / "run", base / "cache"))
    assert result.returncode == 0, result.stderr
    return base / "run"


# (where the kill lands, the crash.py spec, the step whose checkpoint must survive)
KILL_POINTS = [
    ("during step 13, after backward", "torch:Tensor.backward:13", 10),
    ("during the evaluation at step 15", "training.trainer:bits_per_byte:3", 10),
    ("while the step-15 files are flushed", "model.files:fsync:2:step-0000015", 10),
    ("after step-15 is renamed into place, before LATEST moves", "model.checkpoint:write_atomically:3:LATEST", 10),
    ("after LATEST moves to step 10, before BEST does", "model.checkpoint:write_atomically:2:BEST", 10),
]


@pytest.mark.parametrize("where, spec, survivor", KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_kill_9_leaves_a_loadable_checkpoint_and_resume_continues_exactly(
    where, spec, survivor, corpus_file, reference, tmp_path
):
    run = tmp_path / "run"
    flags = run_flags(corpus_file, run, tmp_path / "cache")
    killed = crash(spec, *flags)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(run, latest=True).step == survivor  # at most one interval lost
    load_checkpoint(run)  # BEST loads too
    resumed = run_script("train.py", "--resume", "--out-dir", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {survivor}" in resumed.stdout
    assert_same_run(run, reference)
    assert not list(run.glob(".tmp-*")), "the killed writer's temporary folder is cleaned up"
    pointed = {(run / pointer).read_text().strip() for pointer in ("LATEST", "BEST")}
    assert {p.name for p in run.glob("step-*")} == pointed, "no orphaned checkpoint folders"


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_a_clean_log(corpus_file, reference, tmp_path):
    """Killed at step 3 (steps 1-2 logged, no checkpoint yet): the same command again is one clean run."""
    run = tmp_path / "run"
    flags = run_flags(corpus_file, run, tmp_path / "cache")
    killed = crash("torch:Tensor.backward:3", *flags)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run / "LATEST").exists() and [step for step, _ in logged_losses(run)] == [1, 2]
    again = run_script("train.py", *flags)
    assert again.returncode == 0, again.stderr
    assert_same_run(run, reference)


def test_kill_9_at_random_moments_never_leaves_a_broken_run(corpus_file, reference, tmp_path):
    """Unaided kills from outside, at moments chosen by a seeded coin, then resume to the end."""
    run, rng = tmp_path / "run", random.Random(5)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "train.py", *run_flags(corpus_file, run, tmp_path / "cache")]
    kills = 0
    for _ in range(4):
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = time.monotonic()
        while time.monotonic() - start < 60 and process.poll() is None and not (run / "metrics.jsonl").exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.4))
        process.send_signal(signal.SIGKILL)
        code = process.wait(30)
        kills += code == -signal.SIGKILL
        if (run / "LATEST").exists():
            load_checkpoint(run, latest=True)
            load_checkpoint(run)
            command = [sys.executable, "train.py", "--resume", "--out-dir", str(run), "--no-progress"]
        if code == 0:
            break
    assert kills >= 2, "the kills should land while the run is training"
    if not (run / "LATEST").exists():
        command = [sys.executable, "train.py", *run_flags(corpus_file, run, tmp_path / "cache")]
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert_same_run(run, reference)


def test_kill_9_while_preparing_data_leaves_no_cache_entry_to_trust(corpus_file, reference, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    killed = crash("data.prepare:_write_tokens:2", *run_flags(corpus_file, run, cache))
    assert killed.returncode == -signal.SIGKILL
    assert [p.name.startswith(".tmp-") for p in cache.iterdir()] == [True], "only the abandoned temporary"
    again = run_script("train.py", *run_flags(corpus_file, run, cache))
    assert again.returncode == 0, again.stderr
    assert not list(cache.glob(".tmp-*")) and len(list(cache.iterdir())) == 1
    assert_same_run(run, reference)


def test_sigterm_while_preparing_data_cleans_up_and_says_so(corpus_file, tmp_path):
    """Before the training loop SIGTERM (kill's default) ended the run silently, leaving the
    preparation's temporary folder and the new run folder with its lock behind."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    env = {"CRASH_SIGNAL": "SIGTERM"}
    stopped = run_script(
        str(ROOT / "tests" / "crash.py"),
        "data.prepare:_write_tokens:2",
        "train.py",
        *run_flags(corpus_file, run, cache),
        env=env,
    )
    assert stopped.returncode == 128 + signal.SIGTERM and stopped.stderr.strip().splitlines()[-1] == "terminated", (
        stopped.stderr
    )
    assert not list(cache.iterdir()) and not run.exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_save_and_say_how_to_resume(signum, corpus_file, tmp_path):
    run = tmp_path / "run"
    flags = run_flags(corpus_file, run, tmp_path / "cache")
    flags[flags.index("--max-steps") + 1] = "100000"
    flags[flags.index("--eval-interval") + 1] = "0"  # so the only checkpoint is the one the signal causes
    process = subprocess.Popen(
        [sys.executable, "train.py", *flags],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_lines(run / "metrics.jsonl")) < 5:
        time.sleep(0.05)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr  # unfinished, as the signal's own status says
    step = load_checkpoint(run, latest=True).step
    assert step >= 5
    assert f"stopped at step {step}; continue with: python train.py --resume --out-dir {run}" in stdout
    assert f"saved: step {step}," in stdout and "done:" not in stdout, stdout
    assert "Traceback" not in stderr
    resumed = run_script("train.py", "--resume", "--out-dir", str(run), "--max-steps", str(step + 3), "--no-progress")
    assert resumed.returncode == 0 and f"from step {step}" in resumed.stdout, resumed.stderr
    assert load_checkpoint(run, latest=True).step == step + 3


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(corpus_file, tmp_path):
    """A real full disk: a 'tmpfs' of limited size, mounted in a private mount namespace (unshare)."""
    assert shutil.which("unshare"), "util-linux's unshare is needed to mount a small private filesystem"
    run = tmp_path / "run"
    flags = run_flags(corpus_file, run, tmp_path / "cache")
    flags[flags.index("--max-steps") + 1] = "10"
    assert run_script("train.py", *flags).returncode == 0
    used = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    one_checkpoint = sum(p.stat().st_size for p in load_checkpoint(run).folder.iterdir())
    size_kb = (used + one_checkpoint // 2) // 1024 + 64
    script = f"""
set -e
mount -t tmpfs -o size={size_kb}k tmpfs {tmp_path}/small
cp -r {run} {tmp_path}/small/run
set +e
{sys.executable} train.py --resume --out-dir {tmp_path}/small/run --max-steps 30 --no-progress 2> {tmp_path}/err.txt
echo $? > {tmp_path}/code.txt
{sys.executable} -c "from model.checkpoint import load_checkpoint as l; c = l('{tmp_path}/small/run', latest=True); print('loads', c.step)" > {tmp_path}/after.txt 2>&1
ls -a {tmp_path}/small/run > {tmp_path}/listing.txt
"""
    (tmp_path / "small").mkdir()
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    error = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "code.txt").read_text().strip() == "2"
    assert "No space left on device" in error and "step-0000010 is intact" in error and "--resume" in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1, error
    assert (tmp_path / "after.txt").read_text().strip() == "loads 10"
    assert ".tmp-" not in (tmp_path / "listing.txt").read_text()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_meta(**changes):
    def edit(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _edit_model(**changes):
    def edit(path: Path) -> None:
        meta = json.loads(path.read_text())
        path.write_text(json.dumps({**meta, "model": {**meta["model"], **changes}}))

    return edit


# (what is wrong, the file to damage, how, what the refusal must say)
DAMAGE = [
    ("truncated weights", "model.safetensors", _truncate, "model.safetensors does not match its checksum"),
    ("a flipped byte in the optimizer state", "trainer.safetensors", _flip_a_byte, "trainer.safetensors does not match"),
    ("truncated metadata", "checkpoint.json", _truncate, "checkpoint.json cannot be read"),
    ("another program's file", "checkpoint.json", _edit_meta(format="other"), "is not a pocketgpt-checkpoint file"),
    ("a newer format version", "checkpoint.json", _edit_meta(version=99), "format version 99; this code reads version 1"),
    ("no checksums", "checkpoint.json", _edit_meta(files={}), "lists no checksum"),
    ("no model config", "checkpoint.json", _edit_meta(model=None), "has no usable model config"),
    ("a negative step", "checkpoint.json", _edit_meta(step=-1), "records sizes that are not positive whole numbers"),
    ("a context of a billion tokens", "checkpoint.json", _edit_model(context=10**9), "records a context of 1,000,000,000 tokens"),
    ("a width of a billion", "checkpoint.json", _edit_model(n_embd=10**9, n_head=1, n_kv_head=1), "but model.safetensors holds"),
    ("a rotary base of 0", "checkpoint.json", _edit_model(rope_theta=0), "records a model setting no model has (rope_theta = 0)"),
    ("a norm epsilon that is text", "checkpoint.json", _edit_model(norm_eps="x", tie_embeddings="yes"), 'norm_eps = "x", tie_embeddings = "yes"'),
    ("a dropout of 2", "checkpoint.json", _edit_model(dropout=2), "(dropout = 2); it is damaged"),
    ("a metric that is text", "checkpoint.json", _edit_meta(metrics={"val_bpb": "x"}), 'records a field of the wrong type (metrics.val_bpb = "x"); it is damaged'),
    ("tokens trained on that are text", "checkpoint.json", _edit_meta(tokens_seen="lots"), 'tokens_seen = "lots"'),
    ("a data description that is text", "checkpoint.json", _edit_meta(data="hello"), 'data = "hello"'),
    ("a chat template that is a number", "checkpoint.json", _edit_meta(chat={"template": 5}), "chat.template = 5"),
    ("LATEST in another encoding", "../LATEST", lambda p: p.write_bytes(b"\xff\xfe\x00"), "does not name a checkpoint folder"),
    ("a missing tokenizer", "tokenizer.json", Path.unlink, "tokenizer.json is missing"),
    ("LATEST pointing outside the run", "../LATEST", lambda p: p.write_text("../../elsewhere\n"), "does not name a checkpoint folder"),
    ("LATEST naming a deleted checkpoint", "../LATEST", lambda p: p.write_text("step-0000999\n"), "step-0000999, which is missing"),
]  # fmt: skip


@pytest.mark.parametrize("what, name, damage, message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_reason(
    what, name, damage, message, reference, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    folder = load_checkpoint(run, latest=True).folder
    damage(folder / name)
    with pytest.raises(UserError, match=re.escape(message)) as refused:
        load_checkpoint(run, latest=True)
    if name != "../LATEST":
        assert str(folder) in str(refused.value), "the message names the checkpoint's folder"


def test_a_second_run_into_a_folder_being_trained_is_refused(corpus_file, tmp_path):
    """The same command in a second terminal, before the first run has saved anything (so no LATEST
    tells it the folder is taken): the folder's lock refuses it, and the first run is untouched."""
    run = tmp_path / "run"
    flags = run_flags(corpus_file, run, tmp_path / "cache")
    flags[flags.index("--max-steps") + 1] = "100000"
    flags[flags.index("--eval-interval") + 1] = "0"
    first = subprocess.Popen(
        [sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_lines(run / "metrics.jsonl")) < 2:
            time.sleep(0.05)
        second = run_script("train.py", *flags, timeout=60)  # refused in seconds; without the lock it trains on
    finally:
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=60)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"another training process is using {run}" in second.stderr
    assert first.returncode == 128 + signal.SIGINT, stderr
    steps = [step for step, _ in logged_losses(run)]
    assert steps == list(range(1, len(steps) + 1)), "one run's log, not two interleaved"
