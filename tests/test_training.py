"""Training: checkpoints round-trip, resume continues exactly, DDP matches one process."""

from __future__ import annotations

import copy
import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.load import free_port
from model.checkpoint import load_checkpoint, write_failed
from model.config import ModelConfig
from model.device import REMEMBERED, can_compile, machine_name, matmul_peak_flops, pick_dtype, remembered_best
from model.errors import UserError
from model.evaluate import bits_per_byte
from model.gpt import GPT
from tests.conftest import ROOT, TINY
from training.budget import (
    ANCHOR_SHAPE,
    ANCHOR_STEP_FLOPS,
    COMPILED_MFU,
    MAX_PASSES,
    MEMORISING_PASSES,
    depth_for,
    describe,
    predicted_passes,
    training_rate,
)
from training.calibration import fit_temperature, temperature_for_passes
from training.config import TrainConfig, assemble, budget_minutes
from training.distributed import Distributed
from training.machine_speed import anchor_step_flops, peak_name
from training.muon import MOMENTUM_WARMUP_STEPS, StackedMuon, orthogonalise
from training.optim import NS_STEPS, REFINEMENTS
from training.trainer import Trainer, assemble_for, train

SHAKESPEARE_TOKENS = 380_000  # about Tiny Shakespeare's training tokens with the cpu preset's 1,024-token vocabulary
XEON_RATE, XEON_PEAK = 1.74 * ANCHOR_STEP_FLOPS, 1600e9  # the Xeon's best anchor rate (290 GFLOP/s), bf16 matmul peak


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

    def _train_step(self) -> tuple[float, int]:
        loss = super()._train_step()
        if self.step + 1 == 10:
            self.request_stop()
        return loss


DELIVERED = {
    "last weights": dict(pass_temperature=False),
    "temperature from passes": {},
    "calibrated": dict(calibration_tokens=1024),
    "dropout": dict(dropout=0.2),  # the masks come from the saved random state
    "token noise": dict(token_noise=0.1),  # fixed by (seed, step, row), and off from step 12, the cooldown
}


@pytest.mark.parametrize("delivered", list(DELIVERED))
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(corpus_file, tmp_path, delivered):
    extra = DELIVERED[delivered]
    train(flags(corpus_file, tmp_path, "straight", **extra))
    config = assemble(flags(corpus_file, tmp_path, "interrupted", **extra))
    StopsAtStep10(config, None, resuming=False).run()
    assert load_checkpoint(tmp_path / "interrupted").step == 10
    train({"resume": True, "out_dir": str(tmp_path / "interrupted"), "progress": False})  # saved arguments reused
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "interrupted")
    assert sorted(resumed) == list(range(1, 21))
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-6), step
    # The score of the weights saved at the end (with the fitted temperature folded in) continues exactly too.
    final = [
        load_checkpoint(tmp_path / run, latest=True).meta["metrics"]["val_bpb"] for run in ("straight", "interrupted")
    ]
    assert final[1] == pytest.approx(final[0], rel=1e-6)


def test_the_output_temperature_is_fitted_on_held_out_training_tokens_and_folded_into_the_saved_model(
    corpus_file, tmp_path
):
    train(flags(corpus_file, tmp_path, "run", calibration_tokens=1024))
    checkpoint = load_checkpoint(tmp_path / "run", latest=True)
    temperature = checkpoint.meta["metrics"]["temperature"]
    saved, trained_norm = checkpoint.load_model(), checkpoint.load_trainer_state()["trained_norm"]
    assert temperature != pytest.approx(1.0, abs=0.01)
    assert torch.allclose(saved.norm.weight, trained_norm / temperature, rtol=1e-3)  # the log has 4 decimals
    # The held-out tokens are the end of the training split, and training never sees them.
    trainer = Trainer(assemble(flags(corpus_file, tmp_path, "again", calibration_tokens=1024)), None, resuming=False)
    train_tokens = trainer.data.tokens("train")
    assert len(trainer.calibration_tokens) == 1024
    assert (trainer.calibration_tokens == train_tokens[-1024:]).all()
    assert len(trainer.batches.tokens) == len(train_tokens) - 1024
    # Sharpening the logits k times makes the fitted temperature k times larger: it undoes any scale.
    model, token_bytes = checkpoint.load_model(), torch.tensor(checkpoint.load_tokenizer().token_byte_lengths())
    held_out = trainer.calibration_tokens
    fitted = fit_temperature(model, held_out, token_bytes, torch.float32)
    assert fitted == pytest.approx(1.0, abs=1e-3)  # the saved model is already calibrated on these tokens
    with torch.no_grad():
        model.norm.weight.mul_(1.5)
    assert fit_temperature(model, held_out, token_bytes, torch.float32) == pytest.approx(1.5 * fitted, rel=1e-3)
    # And it is the minimum: a temperature 10% either side scores the held-out tokens worse.
    losses_at = {}
    for factor in (0.9, 1.0, 1.1):
        scaled = checkpoint.load_model()
        with torch.no_grad():
            scaled.norm.weight.div_(fitted * factor)
        losses_at[factor] = bits_per_byte(scaled, held_out, token_bytes)["loss"]
    assert losses_at[1.0] < min(losses_at[0.9], losses_at[1.1])


def test_the_default_output_temperature_follows_the_passes_over_the_training_data(corpus_file, tmp_path):
    assert temperature_for_passes(0.5) == temperature_for_passes(1.0) == 1.0  # data seen once: as trained
    assert temperature_for_passes(10.0) == pytest.approx(1 + 0.062 * 3)
    small = tmp_path / "small.txt"
    small.write_text(corpus_file.read_text()[:15_000])
    short = dict(max_steps=200, eval_interval=200)  # about 40 passes over the small text
    trainer, _ = train(flags(small, tmp_path, "run", **short))
    checkpoint = load_checkpoint(tmp_path / "run", latest=True)
    passes = checkpoint.meta["tokens_seen"] / len(trainer.batches.tokens)
    assert passes > 2  # the tiny corpus is seen several times, so the rule has something to do
    temperature = checkpoint.meta["metrics"]["temperature"]
    assert temperature == pytest.approx(temperature_for_passes(passes), abs=1e-4)
    saved = checkpoint.load_model()
    trained_norm = checkpoint.load_trainer_state()["trained_norm"]
    assert torch.allclose(trained_norm, trainer.model.norm.weight)  # training goes on from its own norm
    assert torch.allclose(saved.norm.weight, trained_norm / temperature_for_passes(passes))
    # The temperature helps the held-out text of this overfitted run, and --no-pass-temperature turns it off.
    val_tokens = trainer.data.tokens("val")
    token_bytes = torch.tensor(trainer.tokenizer.token_byte_lengths())
    as_trained = checkpoint.load_model()
    with torch.no_grad():
        as_trained.norm.weight.copy_(trained_norm)
    assert (
        bits_per_byte(saved, val_tokens, token_bytes)["bpb"] < bits_per_byte(as_trained, val_tokens, token_bytes)["bpb"]
    )
    train(flags(small, tmp_path, "plain", pass_temperature=False, **short))
    plain = load_checkpoint(tmp_path / "plain", latest=True)
    assert "temperature" not in plain.meta["metrics"]
    assert torch.equal(plain.load_model().norm.weight, trained_norm)  # same seed and steps: the same training


def test_stacked_muon_takes_the_same_steps_as_pytorchs_muon():
    """Three steps on a real model (square, tall and wide matrices, with weight decay): the same
    weights as torch.optim.Muon up to bf16 rounding, the same momentum buffers, and state dicts that
    load into each other."""
    config = ModelConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, context=16, vocab_size=97)
    models = [GPT(config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    settings = dict(lr=0.05, weight_decay=0.4, momentum=0.95, adjust_lr_fn="original", ns_steps=4)
    optimizers = [
        kind([p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n], **settings)
        for kind, model in zip((torch.optim.Muon, StackedMuon), models, strict=True)
    ]
    tokens = torch.randint(0, 97, (3, 4, 17), generator=torch.Generator().manual_seed(0))
    start = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    for batch in tokens:
        for model, optimizer in zip(models, optimizers, strict=True):
            model(batch[:, :-1], batch[:, 1:]).backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
    theirs, ours = (dict(model.named_parameters()) for model in models)
    shapes = {tuple(p.shape) for p in optimizers[1].param_groups[0]["params"]}
    assert {(64, 64), (32, 64), (192, 64), (64, 192), (97, 64)} <= shapes  # q/o, GQA k/v, MLP up and down, head
    for name in theirs:
        moved = (theirs[name] - start[name]).norm()
        assert (ours[name] - theirs[name]).norm() <= 0.02 * moved + 1e-6, name
    for param_theirs, param_ours in zip(*(o.param_groups[0]["params"] for o in optimizers), strict=True):
        buffers = [o.state[p]["momentum_buffer"] for o, p in zip(optimizers, (param_theirs, param_ours), strict=True)]
        torch.testing.assert_close(buffers[0], buffers[1], rtol=0.05, atol=1e-4)
    optimizers[0].load_state_dict(optimizers[1].state_dict())  # checkpoints of either resume with the other
    optimizers[1].load_state_dict(optimizers[0].state_dict())  # PyTorch's has no NorMuon setting: ours keeps its own
    assert optimizers[1].param_groups[0]["normuon_beta2"] == 0.0


def test_compiled_muon_takes_the_same_steps_as_the_eager_one():
    """The trainer's Muon (its refinements) with its momentum and tail compiled, on a tall, a wide and
    a square matrix: three steps at three learning rates, with the momentum warming up, each from the
    same weights and optimizer state, move the weights as the eager functions do and leave the same
    state. A compiled copy that kept the first step's learning rate or momentum as a constant would
    fail. (Both are made equal again before each step, and the gradients are well-conditioned, their
    singular values near 1: Newton-Schulz blows a difference of one part in 10^7 up along near-zero
    singular directions.)"""
    assert can_compile(torch.device("cpu")), "torch.compile on a CPU needs a C++ compiler (g++)"
    generator = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 48), (24, 24)]
    start = [0.1 * torch.randn(shape, generator=generator) for shape in shapes]
    settings = dict(lr=0.05, weight_decay=0.4, momentum=0.95, adjust_lr_fn="original", ns_steps=NS_STEPS, **REFINEMENTS)
    params = [[torch.nn.Parameter(weights.clone()) for weights in start] for _ in range(2)]
    optimizers = [
        StackedMuon(group, compiled=compiled, **settings) for compiled, group in zip((False, True), params, strict=True)
    ]
    for lr in (0.05, 0.02, 0.005):
        for eager, compiled in zip(*params, strict=True):
            compiled.data.copy_(eager.data)
        optimizers[1].load_state_dict(copy.deepcopy(optimizers[0].state_dict()))
        grads = [torch.eye(*shape) + 0.05 * torch.randn(shape, generator=generator) for shape in shapes]
        before = [param.detach().clone() for param in params[0]]
        for group, optimizer in zip(params, optimizers, strict=True):
            optimizer.param_groups[0]["lr"] = lr
            for param, grad in zip(group, grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
        for eager, compiled, weights in zip(*params, before, strict=True):
            assert (compiled - eager).norm() <= 1e-5 * (eager - weights).norm(), (lr, tuple(eager.shape))
            states = [optimizer.state[param] for optimizer, param in zip(optimizers, (eager, compiled), strict=True)]
            for key in ("momentum_buffer", "neuron_second_moment"):
                torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-5, atol=1e-7)
    assert optimizers[1].param_groups[0]["steps_taken"] == 3  # every step counted, which the warm-up reads


def test_normuon_gives_every_neuron_a_step_of_the_same_size_and_keeps_the_updates_norm():
    """One step from fresh state on a tall, a wide and a square matrix: with NorMuon every neuron (a
    row; a column of the wide matrix) moves by the same amount, and each matrix moves as far as plain
    Muon moves it. A second step keeps one running mean square per neuron."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 48), (24, 24)]
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    moves = []
    for normuon_beta2 in (0.0, 0.95):
        params = [torch.nn.Parameter(weights.clone()) for weights in start]
        optimizer = StackedMuon(params, lr=0.1, weight_decay=0.0, adjust_lr_fn="original", normuon_beta2=normuon_beta2)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
        moves.append([(weights - param).detach() for weights, param in zip(start, params, strict=True)])
    for plain, normalised, (rows, columns) in zip(*moves, shapes, strict=True):
        each_neuron = 0 if rows < columns else 1  # the wide matrix's neurons are its columns
        neurons = normalised.norm(dim=each_neuron)
        torch.testing.assert_close(neurons, neurons.mean().expand_as(neurons), rtol=1e-3, atol=0)
        plain_neurons = plain.norm(dim=each_neuron)
        assert plain_neurons.std() > 0.01 * plain_neurons.mean()  # without it they differ
        torch.testing.assert_close(normalised.norm(), plain.norm(), rtol=1e-3, atol=0)
    for param, grad in zip(params, grads, strict=True):
        param.grad = -grad
    optimizer.step()
    assert [tuple(optimizer.state[p]["neuron_second_moment"].shape) for p in params] == [(48, 1), (1, 48), (24, 1)]


def test_cautious_weight_decay_spares_weights_the_update_pushes_away_from_zero_and_momentum_warms_up():
    generator = torch.Generator().manual_seed(1)
    before, grad = torch.randn(32, 16, generator=generator), torch.randn(32, 16, generator=generator)
    lr, weight_decay = 0.1, 0.4
    after = {}
    for cautious in (False, True):
        param = torch.nn.Parameter(before.clone())
        optimizer = StackedMuon([param], lr=lr, weight_decay=weight_decay, cautious_weight_decay=cautious)
        param.grad = grad.clone()
        optimizer.step()
        after[cautious] = param.detach()
    step_lr, decay = lr * 2**0.5, lr * weight_decay  # `adjust_lr_fn="original"`: sqrt(32 / 16)
    update = (before * (1 - decay) - after[False]) / step_lr  # the orthogonalised update both took
    decayed = update * before >= 0
    assert 0.3 < decayed.float().mean() < 0.7
    torch.testing.assert_close(after[True], before - decay * before * decayed - step_lr * update)

    param = torch.nn.Parameter(before.clone())
    optimizer = StackedMuon([param], lr=lr, momentum=0.95, momentum_warmup=0.85)
    param.grad = grad.clone()
    optimizer.step()
    buffer = optimizer.state[param]["momentum_buffer"]
    torch.testing.assert_close(buffer, 0.15 * grad)  # the first step's momentum is 0.85
    optimizer.param_groups[0]["steps_taken"] = MOMENTUM_WARMUP_STEPS // 2  # halfway: 0.90
    expected = buffer + 0.10 * (grad - buffer)
    optimizer.step()
    torch.testing.assert_close(optimizer.state[param]["momentum_buffer"], expected)
    assert optimizer.param_groups[0]["steps_taken"] == MOMENTUM_WARMUP_STEPS // 2 + 1


def test_muon_orthogonalises_in_the_precision_of_the_models_matmuls(corpus_file, tmp_path):
    """A run in fp32 (the automatic choice on a CPU without native bf16, where PyTorch's emulated bf16
    batched products made Muon 50 times slower) orthogonalises in fp32: its update is the Newton-Schulz
    polynomial computed in float64 to a part in 10^5, which bf16 misses by far more. A run in bf16
    keeps bf16, as PyTorch's Muon does."""
    generator = torch.Generator().manual_seed(0)
    updates = [torch.randn(24, 40, generator=generator), torch.randn(40, 24, generator=generator)]
    coefficients = [(3.4445, -4.775, 2.0315)] * NS_STEPS
    exact = orthogonalise([u.double() for u in updates], coefficients, 1e-7, dtype=torch.float64)
    for dtype, (low, high) in ((torch.float32, (0, 1e-5)), (torch.bfloat16, (1e-3, 1))):
        for result, reference in zip(orthogonalise(updates, coefficients, 1e-7, dtype=dtype), exact, strict=True):
            assert result.dtype == dtype
            assert low <= ((result.double() - reference).norm() / reference.norm()).item() < high, dtype
    for dtype, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        trainer, _ = train(flags(corpus_file, tmp_path, dtype, max_steps=1, eval_interval=0, dtype=dtype))
        assert [type(o).__name__ for o in trainer.optimizers] == ["AdamW", "StackedMuon"]
        assert trainer.optimizers[1].dtype == expected


def test_checkpoint_round_trip_restores_weights_config_and_tokenizer(corpus_file, tmp_path):
    trainer, metrics = train(flags(corpus_file, tmp_path, "run", max_steps=10, pass_temperature=False))
    checkpoint = load_checkpoint(tmp_path / "run")
    model = checkpoint.load_model()
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert checkpoint.model_config == trainer.model.config
    assert checkpoint.load_tokenizer().fingerprint == trainer.tokenizer.fingerprint
    assert checkpoint.meta["train"]["max_steps"] == 10 and checkpoint.meta["metrics"]["val_bpb"] == metrics["val_bpb"]
    assert 0 < metrics["mfu"] < 1.5 and metrics["tokens_per_sec"] > 0  # utilisation is reported with the metrics
    assert all(
        0 < r["mfu"] < 1.5 for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "train_loss" in r
    )
    assert sorted(p.name for p in checkpoint.folder.iterdir()) == [
        "checkpoint.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.tiktoken",
        "trainer.safetensors",
    ]
    new_file = tmp_path / "new"
    new_file.write_text("")  # the mode the umask gives a new file; safetensors alone would give 0o600
    assert {p.stat().st_mode & 0o777 for p in checkpoint.folder.iterdir()} == {new_file.stat().st_mode & 0o777}


def test_the_best_checkpoint_is_kept_and_loaded_for_inference_while_resume_takes_the_latest(tmp_path):
    from model.checkpoint import save_checkpoint
    from model.tokenizer import build_char

    model, tokenizer, run = (
        GPT(ModelConfig(vocab_size=300, n_layer=1, n_embd=16, n_head=2, n_kv_head=2)),
        build_char(["ab"]),
        tmp_path / "run",
    )
    for step, best in ((1, True), (2, False), (3, False)):
        save_checkpoint(run, step, model, tokenizer, {"metrics": {"step": step}}, {"step": step}, best=best)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-0000001", "step-0000003"]  # step 2 was neither
    assert load_checkpoint(run).step == 1 and load_checkpoint(run, latest=True).step == 3
    save_checkpoint(run, 4, model, tokenizer, {"metrics": {"step": 4}}, {"step": 4}, best=True)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-0000004"]
    assert load_checkpoint(run).step == 4 == load_checkpoint(run, latest=True).step


def test_a_run_points_best_at_its_lowest_evaluation(corpus_file, tmp_path):
    trainer, metrics = train(flags(corpus_file, tmp_path, "run", max_steps=40, eval_interval=5))
    evaluations = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "val_bpb" in r]
    lowest = min(evaluations, key=lambda r: r["val_bpb"])
    assert load_checkpoint(tmp_path / "run").step == lowest["step"] == trainer.best["step"]
    assert load_checkpoint(tmp_path / "run", latest=True).step == 40


class RecordsNoisySteps(Trainer):
    """A real trainer that notes, step by step, whether its training inputs were noised."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noisy_steps: list[bool] = []

    def _train_step(self) -> tuple[float, int]:
        self.noisy_steps.append(self.batches.noisy)
        return super()._train_step()


def test_token_noise_stops_when_the_learning_rate_starts_to_cool(corpus_file, tmp_path):
    config = assemble(flags(corpus_file, tmp_path, "run", token_noise=0.1, cooldown=0.25))
    trainer = RecordsNoisySteps(config, None, resuming=False)
    trainer.run()
    assert trainer.noisy_steps == [True] * 15 + [False] * 5  # 20 steps: the last quarter trains on the real text


def test_a_run_stops_after_max_passes_over_its_data_with_the_schedule_ended_there(corpus_file, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text(corpus_file.read_text()[:15_000])
    trainer, _ = train(flags(small, tmp_path, "run", max_steps=500, max_passes=3, eval_interval=0))
    window = 8 * 64  # the tiny preset's batch x context
    train_tokens = len(trainer.batches.tokens)
    assert trainer.step == -(-3 * train_tokens // window) < 500  # the first step that completes three passes
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    factors = [r["lr_factor"] for r in records if "lr_factor" in r]
    assert factors[-1] < 0.2 < max(factors) == 1.0  # the cooldown ran down to the passes (step 500's is at 1.0 here)
    stopped = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("stopped after"))
    assert "stopped after 3 passes over the training data (--max-passes)" in stopped
    assert "memorise" not in stopped  # three passes are too few to memorise (the reason given from MEMORISING_PASSES)
    for bad in ({"max_passes": -1}, {"max_passes": 2, "chat_data": "builtin"}):
        with pytest.raises(UserError, match="--max-passes"):
            assemble({"max_steps": 9, **bad})


def test_a_bpe_vocabulary_too_small_for_the_bytes_is_refused_before_any_data_is_prepared():
    """It was refused by the BPE trainer, after the corpus was read and counted (seconds here, minutes for 100 MB)."""
    with pytest.raises(UserError, match="--vocab-size must be at least 264"):
        assemble({"vocab_size": 10})
    assert assemble({"vocab_size": 10, "tokenizer": "char"}).vocab_size == 10  # the flag does not size char


def test_a_refused_run_leaves_no_folder_it_created_and_keeps_one_the_user_made(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError, match="does not exist"):
        train(flags(missing, tmp_path, "new/run"))
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="does not exist"):
        train(flags(missing, tmp_path, "mine"))
    assert (tmp_path / "mine").is_dir()


def test_the_time_budget_sizes_the_default_model_and_typed_or_saved_flags_win():
    laptop = ANCHOR_STEP_FLOPS  # the reference machine's training FLOP/s
    shakespeare = SHAKESPEARE_TOKENS

    # The reference Zen 4's and the Xeon's best anchor rates (214 and 290 GFLOP/s) and bf16 matmul peaks.
    zen4, zen4_peak, xeon, xeon_peak = 1.28 * laptop, 435e9, XEON_RATE, XEON_PEAK

    def sized(minutes: float, rate: float = laptop, corpus: int = shakespeare, peak=None, **typed) -> TrainConfig:
        return assemble({"max_minutes": minutes, **typed}, step_flops=rate, corpus_tokens=corpus, peak_flops=peak)

    sizes = [sized(m) for m in (1.5, 5, 60)]
    assert [c.n_layer for c in sizes[:2]] == [3, 4] < [sizes[2].n_layer]  # 3 and 4: what the sweeps found there
    assert all(c.n_embd == 64 * c.n_layer and c.n_head == c.n_layer for c in sizes)
    # Regularisation comes with depth: the 90-second model has none, the 5-minute one dropout and token noise.
    assert (sizes[0].dropout, sizes[0].token_noise) == (0, 0) and (sizes[1].dropout, sizes[1].token_noise) == (
        0.1,
        0.05,
    )
    # ... and 0.1 more dropout a layer, up to 0.3: deeper models see their data more times.
    assert [sized(5, xeon, peak=xeon_peak).dropout, sizes[2].dropout] == [0.2, 0.3]
    assert sized(5, token_noise=0.0).token_noise == 0  # typed wins
    # ... and the head's learning rate halves with them (a quarter of the dataclass default).
    assert (sizes[0].lr, sizes[1].lr) == (1.5e-3, 7.5e-4) and assemble({"max_steps": 9}).lr == 1.5e-3
    assert sized(5, lr=0.002).lr == 0.002
    # ... but only where the budget goes over the corpus MEMORISING_PASSES times or more: the same
    # model on a corpus 10 times as big (seen under once) gets none of it.
    assert predicted_passes(5, laptop, sizes[1].model_config(), shakespeare) > MEMORISING_PASSES
    bigger = sized(5, corpus=10 * shakespeare)
    assert (bigger.n_layer, bigger.dropout, bigger.token_noise, bigger.lr) == (4, 0, 0, 1.5e-3)
    # (on the Rust documentation's 1.8 MB, 4 passes, they cost 0.15 bits/byte: 1.8x Tiny Shakespeare gets none)
    assert sized(5, corpus=int(1.8 * shakespeare), peak=zen4_peak).dropout == 0
    assert sized(60, corpus=100 * shakespeare).dropout == 0  # 60 minutes over 38M tokens: no memorising
    # The passes are counted for the model the run trains: GPT-2's 50,257-token head makes each token about
    # four times dearer for the 4 x 256, so the same 5 minutes go over the same tokens about twice, not 8 times.
    gpt2 = sized(5, zen4, peak=zen4_peak, tokenizer="gpt2")
    assert (gpt2.n_layer, gpt2.dropout, sized(5, zen4, peak=zen4_peak).dropout) == (4, 0, 0.1)
    assert predicted_passes(5, zen4, gpt2.model_config(), shakespeare) < MEMORISING_PASSES
    # Without the corpus's size (or the machine's rate) nothing is sized.
    assert assemble({"max_minutes": 5}, step_flops=laptop).n_embd == TrainConfig.n_embd
    # Every sized run stops after MAX_PASSES over its data; a --max-steps run has no such limit; 0 lifts it.
    assert all(c.max_passes == MAX_PASSES for c in sizes) and assemble({"max_steps": 9}).max_passes == 0
    unlimited = sized(5, max_passes=0)
    assert unlimited.max_passes == 0 and "no pass limit" in describe(5, laptop, laptop, None, shakespeare, unlimited)
    line = describe(5, laptop, laptop, None, shakespeare, sizes[1])
    assert "at most 12 passes over the data" in line and "passes over 380,000 training tokens" in line
    # Compiling pays from three minutes on: the 90-second run stays eager, --no-compile wins.
    assert (sizes[0].compile, sizes[1].compile) == (False, True)
    assert sized(5, compile=False).compile is False
    # The Xeon with AMX (benchmarks/NOTES.md) steps 1.6x as fast: still 3 layers at 90 seconds, 5 at 5 minutes.
    assert [sized(m, 1.6 * laptop).n_layer for m in (1.5, 5)] == [3, 5]
    # Its compiled steps run at about half its matmul peak, 2.5x the anchor's rate, and that is what
    # predicts the passes; an eager run (90 seconds) keeps the anchor's rate, as does the Zen 4.
    assert training_rate(True, xeon, xeon_peak) == COMPILED_MFU * xeon_peak > 2 * xeon
    assert training_rate(False, xeon, xeon_peak) == xeon and training_rate(True, zen4, zen4_peak) == zen4
    assert "(45% of the matmul peak)" in describe(5, xeon, xeon, xeon_peak, shakespeare, sized(5, xeon, peak=xeon_peak))
    # Its 10 and 15 minutes take a 5 x 320 past MAX_PASSES (data run out): they train the 6 x 384. On the
    # reference machine 15 minutes do not (11 passes), so the 5 x 320 gets them; 20 minutes would.
    assert [sized(m, xeon, peak=xeon_peak).n_layer for m in (10, 15)] == [6, 6]
    # A typed --no-compile is predicted at the eager anchor's rate: its 10 minutes would not take the 5 x 320
    # past MAX_PASSES, so that is the model it trains (and the log line says no peak set the rate).
    eager = sized(10, xeon, peak=xeon_peak, compile=False)
    assert (eager.n_layer, eager.compile) == (5, False)
    assert "matmul peak" not in describe(10, xeon, xeon, xeon_peak, shakespeare, eager)
    zen4_15 = sized(15, zen4, peak=zen4_peak)
    assert (zen4_15.n_layer, zen4_15.dropout) == (5, 0.2) and sized(20, zen4, peak=zen4_peak).n_layer == 6
    assert depth_for(15, zen4) == 6  # (what the depth rule alone gives it)
    # ... and a probe that reads it 10% fast or slow does not change that (at depth ~ compute^(1/4) a 6% slow one did).
    assert sized(1.5, 1.1 * 1.6 * laptop).n_layer == 3
    assert sized(5, 0.9 * 1.6 * laptop).n_layer == 5
    # Below the anchor's compute the depth falls with its square root: a 2-core Zen 3 in fp32 (anchor rate
    # 79-106 GFLOP/s) trains 2 x 128 for 90 seconds, which beat 3 x 192 there by 0.04-0.06 bits/byte; the Xeon
    # without AMX in fp32 (125-135) keeps 3 x 192, and the Zen 3's 5 minutes (above the anchor) 4 x 256.
    zen3, zen3_best = 0.58 * laptop, 0.64 * laptop
    assert [sized(1.5, zen3_best).n_layer, sized(1.5, 0.75 * laptop).n_layer, sized(5, zen3).n_layer] == [2, 3, 4]
    assert sized(60, 1e14).n_layer == 12  # a big GPU: capped at GPT-2 small
    assert sized(5, n_layer=7).n_layer == 7
    saved = {"n_layer": 2, "n_embd": 96, "n_head": 2, "n_kv_head": 2}
    resumed = assemble({"max_minutes": 60}, saved=saved, step_flops=laptop, corpus_tokens=shakespeare)
    assert resumed.n_embd == 96  # a resumed run keeps its shape
    assert sized(60, preset="tiny").n_embd == 64  # other presets are fixed


def test_the_budget_is_measured_in_training_steps_of_the_anchor_model():
    """The anchor's rate is its step's model FLOPs per second, below the matmul peak of the same dtype."""
    assert ANCHOR_STEP_FLOPS == 15_252 * GPT(ModelConfig(**ANCHOR_SHAPE)).flops_per_token()
    cpu = torch.device("cpu")
    step_flops = anchor_step_flops(cpu, torch.float32, seconds=0.5)
    assert 0.02 * matmul_peak_flops(cpu, torch.float32, seconds=0.3) < step_flops
    assert step_flops < matmul_peak_flops(cpu, torch.float32, seconds=1.0)  # best over a second: steadier


def test_auto_precision_is_whichever_of_bf16_and_fp32_multiplies_faster_here():
    """A bf16 flag is not a speed: a Xeon whose hypervisor hides AMX lists AVX-512 BF16 yet multiplies
    bf16 at half its fp32 rate, so "auto" must not pick the slower of the two on any machine."""
    cpu = torch.device("cpu")
    rate = {dtype: matmul_peak_flops(cpu, dtype, size=512, seconds=0.5) for dtype in (torch.bfloat16, torch.float32)}
    picked = pick_dtype(cpu)
    other = torch.float32 if picked == torch.bfloat16 else torch.bfloat16
    assert rate[picked] > 0.6 * rate[other]  # the two differ 2x or more wherever bf16 is native
    assert (pick_dtype(cpu, "bf16"), pick_dtype(cpu, "fp32")) == (torch.bfloat16, torch.float32)


def test_auto_precision_follows_the_best_rates_this_machine_has_shown(tmp_path):
    """Each process timed bf16 against fp32 anew, and beside a test suite one sample.py in nine read
    them crossed, chose the other precision and printed other text for the same --seed: the choice
    is made on the best rates remembered for this machine, which one slow process cannot lower."""
    from model.device import bf16_multiplies_faster

    measured = bf16_multiplies_faster(tmp_path / "fresh")  # a first process remembers what it timed
    rates = json.loads((tmp_path / "fresh" / REMEMBERED).read_text())
    (bf16_name,) = [name for name in rates if "bfloat16" in name]
    (fp32_name,) = [name for name in rates if "float32" in name]
    assert measured == (rates[bf16_name] > rates[fp32_name]) and min(rates.values()) > 0
    for bf16_shown, fp32_shown in ((1e18, 1.0), (1.0, 1e18)):  # what earlier processes showed wins
        folder = tmp_path / f"shown-{bf16_shown:g}"
        folder.mkdir()
        (folder / REMEMBERED).write_text(json.dumps({bf16_name: bf16_shown, fp32_name: fp32_shown}))
        assert bf16_multiplies_faster(folder) == (bf16_shown > fp32_shown)


def test_the_budget_sizes_from_the_best_rate_this_machine_has_shown(corpus_file, tmp_path, capsys):
    """A momentarily slow measurement must not shrink the model: the best one seen sizes it."""
    cache, cpu = tmp_path / "cache", torch.device("cpu")
    machine = machine_name(cpu, torch.float32)
    assert remembered_best(2e11, machine, cache) == 2e11  # the first measurement is remembered
    assert remembered_best(1e11, machine, cache) == 2e11  # a dip is overruled by it
    assert remembered_best(3e11, "another machine", cache) == 3e11  # machines are kept apart
    assert json.loads((cache / REMEMBERED).read_text()) == {machine: 2e11, "another machine": 3e11}
    (cache / REMEMBERED).write_text("{not json")
    assert remembered_best(1e11, machine, cache) == 1e11  # an unreadable memory is started afresh
    (cache / REMEMBERED).write_text("[]")
    assert remembered_best(1e11, machine, cache) == 1e11  # and so is valid JSON of the wrong shape
    # A real run in a fresh cache remembers the rate of its training steps, the one it sized the model from
    # (not the matmul peak: comparing the two figures' sizes failed on a Zen 3 whose peak read half its
    # usual 170-180 GFLOP/s for a second) ...
    cache = tmp_path / "fresh"
    run = {"preset": "cpu", "data": str(corpus_file), "cache_dir": str(cache), "max_minutes": 0.05, "dtype": "fp32"}
    first, _ = train({**run, "out_dir": str(tmp_path / "first"), "progress": False, "sample_tokens": 0})
    remembered = json.loads((cache / REMEMBERED).read_text())
    measured = remembered[machine]
    assert 0 < measured != first.peak_flops
    assert f"x {measured / 1e9:,.0f} GFLOP/s of training steps = " in capsys.readouterr().out
    assert remembered[peak_name(machine)] == first.peak_flops  # ... and, apart, the matmul peak
    # ... and one whose remembered rate is 1,000 times this machine's gets the model sized for that rate
    # (100 times was not enough when a run sharing the machine made the probe read a tenth of its speed).
    (cache / REMEMBERED).write_text(json.dumps({machine: 1000 * measured}))
    trainer, _ = train({**run, "out_dir": str(tmp_path / "run"), "progress": False, "sample_tokens": 0})
    assert trainer.config.n_layer == depth_for(0.05, 1000 * measured) > depth_for(0.05, measured)
    out = capsys.readouterr().out
    assert f"x {1000 * measured / 1e9:,.0f} GFLOP/s of training steps (the best measured here" in out
    # The rule was told the size of the corpus the run then trained on.
    assert f"passes over {trainer.data.manifest['splits']['train']['tokens']:,} training tokens" in out


def test_compile_without_a_compiler_is_refused_in_one_line(corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert can_compile(torch.device("cpu")) is False
    with pytest.raises(UserError, match="--compile needs a C\\+\\+ compiler"):
        train(flags(corpus_file, tmp_path, "typed", compile=True))


def test_a_compiled_run_trains_like_an_eager_one(corpus_file, tmp_path):
    """torch.compile is the default from three minutes on: the compiled step must compute the same losses."""
    assert can_compile(torch.device("cpu")), "torch.compile on a CPU needs a C++ compiler (g++)"
    losses = {}
    for compiled in (False, True):
        trainer, _ = train(flags(corpus_file, tmp_path, f"compiled-{compiled}", compile=compiled, max_steps=4))
        assert (trainer.train_model is not trainer.model) == compiled
        lines = map(json.loads, (tmp_path / f"compiled-{compiled}" / "metrics.jsonl").open())
        losses[compiled] = [r["train_loss"] for r in lines if "train_loss" in r]
    assert len(losses[True]) == 4 and losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_without_a_compiler_a_budget_that_chose_compiling_trains_eagerly_with_a_note(
    corpus_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CXX", "no-such-compiler")
    small = dict(n_layer=1, n_embd=64, n_head=1, n_kv_head=1, context=64, batch_size=4, vocab_size=512)
    run = flags(corpus_file, tmp_path, "eager", preset="cpu", max_minutes=5, max_steps=2, eval_interval=0, **small)
    trainer, metrics = train(run)
    assert trainer.config.compile is False and trainer.train_model is trainer.model and metrics["step"] == 2
    notes = [line for line in capsys.readouterr().err.splitlines() if "C++ compiler" in line]
    assert len(notes) == 1 and "training without it" in notes[0]


def test_without_a_compiler_the_budget_sizes_the_model_for_eager_steps(monkeypatch, capsys):
    """The Xeon's 10 minutes train the 6 x 384 compiled; without a compiler its eager steps would not take
    the 5 x 320 past MAX_PASSES, so that is the model sized (as for a typed --no-compile)."""
    sizing = (XEON_RATE, SHAKESPEARE_TOKENS, XEON_PEAK)
    cpu = torch.device("cpu")
    assert assemble_for(cpu, {"max_minutes": 10}, None, *sizing).n_layer == 6
    monkeypatch.setenv("CXX", "no-such-compiler")
    eager = assemble_for(cpu, {"max_minutes": 10}, None, *sizing)
    assert (eager.n_layer, eager.compile) == (5, False)
    assert eager == assemble({"max_minutes": 10, "compile": False}, None, *sizing)
    assert "training without it" in capsys.readouterr().err
    # A resumed run that saved --compile keeps its shape and trains eagerly.
    saved = {"compile": True, "n_layer": 2, "n_embd": 96, "n_head": 2, "n_kv_head": 2}
    resumed = assemble_for(cpu, {"max_minutes": 10}, saved, *sizing)
    assert (resumed.n_layer, resumed.compile) == (2, False)


REFAULTS = """
import resource, sys, torch
from training.trainer import train
if sys.argv[1] == "train":
    train({"preset": "tiny", "data": sys.argv[2], "out_dir": sys.argv[3], "cache_dir": sys.argv[4],
           "progress": False, "max_steps": 2, "eval_interval": 0, "sample_tokens": 0})
def faults_taking_64_mb():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(2**24)  # 64 MB, every page touched
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_taking_64_mb()  # the first time the pages are new either way
print(min(faults_taking_64_mb() for _ in range(3)))
"""


def test_a_cpu_training_process_reuses_freed_memory_instead_of_faulting_it_in_again(corpus_file, tmp_path):
    """training/allocator.py: a block freed and taken again costs page faults (16,384 for 64 MB) only
    without the setting, which train() makes on a CPU with glibc (Linux, where this suite runs)."""

    def refaults(*args: str) -> int:
        done = subprocess.run([sys.executable, "-c", REFAULTS, *args], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    assert refaults("none") > 10_000
    assert refaults("train", str(corpus_file), str(tmp_path / "run"), str(tmp_path / "cache")) < 1_000


def test_init_from_starts_a_new_run_from_existing_weights(corpus_file, tmp_path):
    first, _ = train(flags(corpus_file, tmp_path, "base", max_steps=10, eval_interval=0, dropout=0.2))
    second = Trainer(
        assemble(flags(corpus_file, tmp_path, "next", init_from=str(tmp_path / "base"), dropout=0.05)),
        load_checkpoint(tmp_path / "base"),
        resuming=False,
    )
    assert second.step == 0
    assert first.model.config.dropout == 0.2 and second.model.config.dropout == 0.05  # dropout is the new run's choice
    assert all(block.dropout == 0.05 for block in second.model.layers)
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], tensor)


def test_resuming_refuses_a_corpus_that_changed_and_a_step_folder(corpus_file, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_file.read_text())
    train(flags(corpus, tmp_path, "run", max_steps=4, eval_interval=2))
    with pytest.raises(UserError, match="is one checkpoint of a run: give --resume its run folder"):
        train({"resume": True, "out_dir": str(tmp_path / "run" / "step-0000004"), "max_steps": 6})
    corpus.write_text(corpus_file.read_text() + "A line added since the run began.\n")
    with pytest.raises(UserError, match=r"changed since this run began \(train .* bytes then"):
        train({"resume": True, "out_dir": str(tmp_path / "run"), "max_steps": 6})


def test_a_damaged_record_of_the_run_is_refused_on_resume(corpus_file, tmp_path):
    train(flags(corpus_file, tmp_path, "run", max_steps=2, eval_interval=2))
    meta_file = next((tmp_path / "run").glob("step-*/checkpoint.json"))
    meta = json.loads(meta_file.read_text())
    for damage, message in [
        ({"train": {**meta["train"], "batch_size": "abc"}}, "its batch_size is 'abc'"),
        ({"train": None}, "it has no run arguments"),
        ({"trainer_state": {"garbage": 1}}, "damaged trainer state"),
    ]:
        meta_file.write_text(json.dumps({**meta, **damage}))
        with pytest.raises(UserError, match=message):
            train({"resume": True, "out_dir": str(tmp_path / "run"), "max_steps": 4})


def test_a_typed_head_count_means_full_attention_unless_kv_heads_are_typed():
    assert (
        assemble({"preset": "tiny", "n_head": 4}).n_kv_head,
        assemble({"preset": "tiny", "n_head": 1}).n_kv_head,
    ) == (4, 1)
    assert assemble({"preset": "tiny", "n_head": 4, "n_kv_head": 2}).n_kv_head == 2
    with pytest.raises(UserError, match=r"--n-embd \(64\) must be a multiple of --n-head \(3\)"):
        assemble({"preset": "tiny", "n_head": 3})


def test_a_negative_byte_limit_is_refused_and_a_failed_write_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="--max-bytes must be at least 1, got -1"):
        assemble({"preset": "tiny", "max_bytes": -1})
    full = write_failed(tmp_path, "metrics.jsonl", OSError(errno.ENOSPC, "No space left on device"))
    denied = write_failed(tmp_path, "metrics.jsonl", PermissionError(errno.EACCES, "Permission denied"))
    assert "Free some space, then continue with --resume" in str(full)
    assert "Permission denied; no checkpoint was written yet. Make the run folder writable" in str(denied)


def test_a_run_typed_to_end_by_steps_is_not_sized_for_the_time_budget():
    assert budget_minutes({}, None) == 5.0 and budget_minutes({"max_minutes": 2}, None) == 2
    assert budget_minutes({"max_steps": 3}, None) is None
    assert budget_minutes({"max_steps": 3, "max_minutes": 2}, None) == 2
    assert (
        budget_minutes({"init_from": "out/base"}, None) is None
        and budget_minutes({"chat_data": "builtin"}, None) is None
    )


def test_an_existing_run_is_not_overwritten(corpus_file, tmp_path):
    train(flags(corpus_file, tmp_path, "run", max_steps=3, eval_interval=0))
    with pytest.raises(UserError, match="--resume"):
        train(flags(corpus_file, tmp_path, "run", max_steps=3))


def test_two_processes_match_one_with_the_same_global_batch(corpus_file, tmp_path):
    # AdamW, not Muon: torch's Muon orthogonalises in bf16, which turns the all-reduce's different
    # summation order (1e-7) into bf16 rounding differences; AdamW keeps the comparison in fp32.
    # Two micro-steps: DDP's no_sync for the first (it crashed: its context was entered twice).
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
        "--grad-accum",
        "2",
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


def torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# train.py with the second process disturbed as a busy machine disturbs it: it reaches the training
# loop 0.3 s after the first and its start-up probe reads the machine 100 times as fast. Each process
# prints its step, its clock and a digest of its weights at the end.
DISTURBED_RANK = """
import hashlib, os, sys, time
sys.argv = ["train.py", *sys.argv[1:]]
from model.errors import run_cli
from training import trainer
import train

rank, run = os.environ["RANK"], trainer.Trainer.run
if rank == "1":
    probe = trainer.anchor_step_flops
    trainer.anchor_step_flops = lambda *args, **kwargs: 100 * probe(*args, **kwargs)

def reporting_run(self):
    if rank == "1":
        time.sleep(0.3)
    metrics = run(self)
    weights = b"".join(p.detach().float().numpy().tobytes() for p in self.model.parameters())
    print(f"rank {rank}: step {self.step}, {self.elapsed:.6f} s, weights {hashlib.sha256(weights).hexdigest()}")
    return metrics

trainer.Trainer.run = reporting_run
run_cli(train.main)
"""


def test_the_processes_of_a_torchrun_agree_on_the_model_and_the_clock(corpus_file, tmp_path):
    """Each process used to measure the machine and keep the time budget by its own clock: ranks that
    read the speed differently sized different models (a DDP traceback), and a rank that started late
    cooled its learning rate apart from the others (different weights, only rank 0's saved) or waited
    forever in a collective the others had left. Rank 0 measures for all, and a step's time is the
    slowest rank's."""
    command = [
        "--no-python",
        sys.executable,
        "-c",
        DISTURBED_RANK,
        "--data",
        str(corpus_file),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    command += ["--out-dir", str(tmp_path / "run"), "--max-minutes", "0.05", "--no-progress", "--sample-tokens", "0"]
    result = torchrun(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = dict(re.findall(r"rank (\d): (step \d+, [\d.]+ s, weights \w+)", result.stdout))  # lines may interleave
    assert len(reports) == 2 and reports["0"] == reports["1"], result.stdout


def test_a_corpus_that_fails_on_rank_0_is_one_error_line_under_torchrun(tmp_path):
    """Rank 0 prepares the data while the others wait: its refusal used to leave them at a barrier that
    failed with a traceback from gloo, and rank 0 itself aborted ("terminate called ...") with its
    process group open. Now the others hear of the failure, rank 0 says why and exits with 2."""
    result = torchrun("train.py", *TINY, "--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "run"))
    assert result.stderr.count("error: ") == 1 and "missing.txt does not exist" in result.stderr, result.stderr
    assert "RuntimeError" not in result.stderr and "terminate called" not in result.stderr, result.stderr
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: 2 ", result.stderr), result.stderr  # torchrun's summary


def test_a_batch_the_processes_cannot_share_is_refused_before_anything_loads(tmp_path):
    """--batch-size 7 over two processes was refused after the corpus was prepared and the model built."""
    result = torchrun("train.py", *TINY, "--batch-size", "7", "--data", str(tmp_path / "unread.txt"))
    assert "--batch-size (7) must be divisible by --grad-accum (1) times the number of processes (2)" in result.stderr
    assert "does not exist" not in result.stderr  # refused from the flags, before the corpus was looked at


# train.py stopped as Ctrl-C stops it, on every process, right after its first checkpoint.
STOP_AFTER_FIRST_CHECKPOINT = """
import sys
sys.argv = ["train.py", *sys.argv[1:]]
from model.errors import run_cli
from training import trainer
import train

save = trainer.Trainer._evaluate_and_save

def save_then_stop(self, bar):
    save(self, bar)
    self.request_stop()

trainer.Trainer._evaluate_and_save = save_then_stop
run_cli(train.main)
"""


def test_a_torchrun_run_with_dropout_resumes_as_if_never_stopped(corpus_file, tmp_path):
    """Rank 0's random stream is saved in the checkpoint; the other ranks' follows from the step, so a
    resumed run draws the dropout masks the uninterrupted run drew (rank 1 reseeded from the step it
    resumed at, then went on from there: 21 of 42 logged losses differed)."""
    common = ["train.py", *TINY, "--data", str(corpus_file), "--cache-dir", str(tmp_path / "cache")]
    common += ["--max-steps", "12", "--eval-interval", "6", "--log-interval", "1", "--dropout", "0.2"]
    whole = torchrun(*common, "--out-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = torchrun(
        "--no-python",
        sys.executable,
        "-c",
        STOP_AFTER_FIRST_CHECKPOINT,
        *common[1:],
        "--out-dir",
        str(tmp_path / "parts"),
    )
    assert "stopped at step 6" in first.stdout, first.stdout + first.stderr[-3000:]
    resumed = torchrun(*common, "--out-dir", str(tmp_path / "parts"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")


def test_each_process_draws_its_own_dropout_masks():
    """After the shared initialisation every rank but 0 reseeds, so the ranks' masks differ; rank 0 keeps
    the single-process stream, and a resumed session does not replay the first one's masks."""

    def draw(rank: int, step: int = 0) -> torch.Tensor:
        torch.manual_seed(1337)  # what every process does before it builds the model
        Distributed(rank=rank, world=3).seed_own_stream(1337, step)
        return torch.rand(64)

    torch.manual_seed(1337)
    single_process = torch.rand(64)
    assert torch.equal(draw(0), single_process)
    assert not torch.equal(draw(1), draw(0))
    assert not torch.equal(draw(2), draw(1))
    assert torch.equal(draw(1), draw(1))  # reproducible: a seeded run stays a seeded run
    assert not torch.equal(draw(1, step=100), draw(1))
