"""Shared test fixtures: small corpora the tests write themselves, and a way to run the CLIs.

Nothing here reads ../shared or the network: a user without either runs the same suite.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the a one every some river stone garden window letter morning evening lantern harbour village "
    "quiet bright old young careful sudden gentle walks carries finds opens remembers builds watches "
    "near under across beyond through with without and but so because while after before"
).split()


def make_text(n_sentences: int, seed: int = 0) -> str:
    """Deterministic pseudo-English with some Unicode, paragraphs and numbers."""
    rng = random.Random(seed)
    sentences = []
    for i in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", "!", "?", "; café, naïve — ok."])
        sentences.append(sentence + ("\n\n" if i % 7 == 6 else " "))
    return "".join(sentences)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_text(3000), encoding="utf-8")
    return path


def run_script(
    *args: str, cwd: Path = ROOT, stdin: str | None = None, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a project script with this interpreter, capturing text output (`env`: extra variables)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


TINY = ["--preset", "tiny", "--no-progress", "--max-steps", "30", "--sample-tokens", "8"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_file) -> Path:
    """One tiny model trained through train.py, shared by the sampling and evaluation tests."""
    base = tmp_path_factory.mktemp("run")
    out = base / "out" / "tiny"
    result = run_script(
        "train.py", *TINY, "--data", str(corpus_file), "--out-dir", str(out), "--cache-dir", str(base / "cache")
    )
    assert result.returncode == 0, result.stderr
    return out


PAIRS = [
    ("What colour is the river?", "The river is green."),
    ("Who keeps the lantern?", "The old harbour keeper."),
    ("Where is the garden?", "Beyond the stone window."),
    ("When does the village wake?", "Every bright morning."),
]


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="session")
def chat_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run fine-tuned on a few conversations (two bad lines included): a chat model."""
    folder = tmp_path_factory.mktemp("sft")
    lines = [json.dumps(conversation(q, a)) for _ in range(6) for q, a in PAIRS]
    lines += ['{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}', "not json"]
    (folder / "qa.jsonl").write_text("\n".join(lines) + "\n")
    out = folder / "out" / "chat"
    result = run_script(
        "train.py",
        "--init-from",
        str(tiny_run),
        "--chat-data",
        str(folder / "qa.jsonl"),
        "--out-dir",
        str(out),
        "--max-steps",
        "150",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--muon-lr",
        "0.02",
        "--eval-interval",
        "0",
        "--no-progress",
        "--sample-tokens",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert "qa.jsonl line 25: message 1 has empty content" in result.stdout
    assert "qa.jsonl line 26: broken JSON" in result.stdout
    return out
