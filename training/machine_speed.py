"""How fast this machine trains: the rate the budget rule (training/budget.py) sizes a run from.

The rate is measured, not looked up: `anchor_step_flops` times real training steps of the budget
rule's anchor model on this process's device and dtype, so whatever the processor, its thread count
and its matrix units are, the model FLOP/s that a run's steps will reach is what is read.

The rate that sizes a run is the best this machine has shown, not only this process's measurement
(`model.device.remembered_best`): on a shared machine a measurement now and then reads half the speed (3 of
about 45 sweep runs read half the peak), and a 5-minute run sized for a machine half as fast
memorises Tiny Shakespeare (2.47 bits/byte instead of 2.02). Remembering the best also makes the
same command give the same model on the same machine, run after run. The matmul peak is
remembered the same way (the run's MFU is still reported against this process's own measurement).
"""

from __future__ import annotations

import statistics
import time

import torch

from model.config import ModelConfig
from model.device import autocast
from model.gpt import GPT
from training.budget import ANCHOR_BATCH, ANCHOR_SHAPE
from training.config import PRESETS, TrainConfig
from training.optim import build_optimizers


def anchor_step_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.5) -> float:
    """Model FLOP/s of the anchor model's training step (forward, backward, Muon and AdamW, random
    tokens, eager), the median step over about `seconds` after two warm-up steps."""
    generator = torch.Generator().manual_seed(0)
    shape = ModelConfig(**ANCHOR_SHAPE)
    model = GPT(shape).to(device).train()
    optimizers = build_optimizers(model, TrainConfig(**PRESETS["cpu"]), dtype)
    x, y = torch.randint(0, shape.vocab_size, (2, ANCHOR_BATCH, shape.context), generator=generator).to(device)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        with autocast(device, dtype):
            loss = model(x, y)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[2:])  # the first two steps warm up
    return ANCHOR_BATCH * shape.context * model.flops_per_token() / step


def peak_name(machine: str) -> str:
    """What `remembered_best` keeps a machine's matmul peak under, beside its training-step rate."""
    return f"{machine}, matmul peak"
