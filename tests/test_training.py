"""Training: checkpoints round-trip, resume continues exactly, DDP matches one process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.errors import UserError
from tests.conftest import ROOT, TINY
from training.config import assemble
from training.trainer import Trainer, train


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def flags(corpus: Path, tmp: Path, out: str, **extra) -> dict:
    values = dict(
        preset="tiny",
        data=str(corpus),
        out_dir=str(tmp / out),
        cache_dir=str(tmp / "cache"),
        progress=False,
        max_steps=20,
        eval_interval=10,
        log_interval=1,
        sample_tokens=0,
        dtype="fp32",
        seed=3,
    )
    return {**values, **extra}


class StopsAtStep10(Trainer):
    """A real trainer, interrupted after step 10 the way Ctrl-C interrupts one."""

    def _train_step(self) -> float:
        loss = super()._train_step()
        if self.step + 1 == 10:
            self.request_stop()
        return loss


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(corpus_file, tmp_path):
    train(flags(corpus_file, tmp_path, "straight"))
    config = assemble(flags(corpus_file, tmp_path, "interrupted"))
    StopsAtStep10(config, None, resuming=False).run()
    assert load_checkpoint(tmp_path / "interrupted").step == 10
    train({"resume": True, "out_dir": str(tmp_path / "interrupted"), "progress": False})  # saved arguments reused
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "interrupted")
    assert sorted(resumed) == list(range(1, 21))
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-6), step


def test_checkpoint_round_trip_restores_weights_config_and_tokenizer(corpus_file, tmp_path):
    trainer, metrics = train(flags(corpus_file, tmp_path, "run", max_steps=10))
    checkpoint = load_checkpoint(tmp_path / "run")
    model = checkpoint.load_model()
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert checkpoint.model_config == trainer.model.config
    assert checkpoint.load_tokenizer().fingerprint == trainer.tokenizer.fingerprint
    assert checkpoint.meta["train"]["max_steps"] == 10 and checkpoint.meta["metrics"]["val_bpb"] == metrics["val_bpb"]
    assert sorted(p.name for p in checkpoint.folder.iterdir()) == [
        "checkpoint.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.tiktoken",
        "trainer.safetensors",
    ]


def test_damaged_or_foreign_checkpoints_are_refused(corpus_file, tmp_path):
    train(flags(corpus_file, tmp_path, "run", max_steps=5, eval_interval=0))
    folder = load_checkpoint(tmp_path / "run").folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors does not match its checksum"):
        load_checkpoint(broken)
    meta = json.loads((folder / "checkpoint.json").read_text())
    shutil.copytree(folder, tmp_path / "future")
    (tmp_path / "future" / "checkpoint.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(UserError, match="version 99"):
        load_checkpoint(tmp_path / "future")
    (broken / "model.safetensors").unlink()
    with pytest.raises(UserError, match="missing"):
        load_checkpoint(broken)


def test_init_from_starts_a_new_run_from_existing_weights(corpus_file, tmp_path):
    first, _ = train(flags(corpus_file, tmp_path, "base", max_steps=10, eval_interval=0))
    second = Trainer(
        assemble(flags(corpus_file, tmp_path, "next", init_from=str(tmp_path / "base"))),
        load_checkpoint(tmp_path / "base"),
        resuming=False,
    )
    assert second.step == 0
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], tensor)


def test_an_existing_run_is_not_overwritten(corpus_file, tmp_path):
    train(flags(corpus_file, tmp_path, "run", max_steps=3, eval_interval=0))
    with pytest.raises(UserError, match="--resume"):
        train(flags(corpus_file, tmp_path, "run", max_steps=3))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_with_the_same_global_batch(corpus_file, tmp_path):
    # AdamW, not Muon: torch's Muon orthogonalises in bf16, which turns the all-reduce's different
    # summation order (1e-7) into bf16 rounding differences; AdamW keeps the comparison in fp32.
    common = [
        "train.py",
        *TINY,
        "--data",
        str(corpus_file),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--max-steps",
        "6",
        "--eval-interval",
        "0",
        "--log-interval",
        "1",
        "--sample-tokens",
        "0",
        "--dtype",
        "fp32",
        "--batch-size",
        "8",
        "--optimizer",
        "adamw",
    ]
    single = subprocess.run(
        [sys.executable, *common, "--out-dir", str(tmp_path / "one")], cwd=ROOT, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            *common,
            "--out-dir",
            str(tmp_path / "two"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr
    assert "2 process(es)" in ddp.stdout
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    a, b = load_checkpoint(tmp_path / "one").load_model(), load_checkpoint(tmp_path / "two").load_model()
    for name, tensor in a.state_dict().items():
        assert torch.allclose(b.state_dict()[name], tensor, atol=1e-5), name
