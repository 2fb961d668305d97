"""How fast this machine trains: the rate the budget rule (training/budget.py) sizes a run from.

The rate is measured, not looked up: `anchor_step_flops` times real training steps of the budget
rule's anchor model on this process's device and dtype, so whatever the processor, its thread count
and its matrix units are, the model FLOP/s that a run's steps will reach is what is read.

The rate that sizes a run is the best this machine has shown, not only this process's measurement
(`remembered_best`): on a shared machine a measurement now and then reads half the speed (3 of
about 45 sweep runs read half the peak), and a 5-minute run sized for a machine half as fast
memorises Tiny Shakespeare (2.47 bits/byte instead of 2.02). Remembering the best also makes the
same command give the same model on the same machine, run after run. The matmul peak is
remembered the same way (the run's MFU is still reported against this process's own measurement).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from model.config import ModelConfig
from model.device import autocast, cpu_info
from model.files import write_atomically
from model.gpt import GPT
from training.budget import ANCHOR_BATCH, ANCHOR_SHAPE
from training.config import PRESETS, TrainConfig
from training.optim import build_optimizers

REMEMBERED = "step_flops.json"  # anchor step rates and matmul peaks (earlier versions kept peaks in peak_flops.json)


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


def machine_name(device: torch.device, dtype: torch.dtype) -> str:
    """What a remembered rate is valid for: the processor, the thread count and the dtype."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = cpu_info("model name") or platform.processor() or platform.machine()
        chip += f", {torch.get_num_threads()} threads"
    return f"{chip}, {str(dtype).removeprefix('torch.')}"


def peak_name(machine: str) -> str:
    """What `remembered_best` keeps a machine's matmul peak under, beside its training-step rate."""
    return f"{machine}, matmul peak"


def remembered_best(measured: float, machine: str, folder: Path) -> float:
    """The best of `measured` and the rates measured earlier on `machine` (kept in folder/REMEMBERED)."""
    path = folder / REMEMBERED
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: start afresh
        known = {}
    known = known if isinstance(known, dict) else {}
    previous = float(known.get(machine, 0.0))
    if measured <= previous:
        return previous
    known[machine] = measured
    try:
        os.makedirs(folder, exist_ok=True)
        write_atomically(path, json.dumps(known, indent=1))
    except OSError:  # a read-only cache only loses the memory, not the run
        pass
    return measured
