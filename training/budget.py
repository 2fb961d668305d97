"""The time budget is the dial: `--max-minutes` picks the model's size for the machine it runs on.

nanochat derives every setting from one number, the depth. Here that number comes from the budget:
the compute a run can spend is `minutes x 60 x the matmul peak measured on this machine`, and the
depth grows with the sixth root of it (parameters ~ depth^3 grow with the square root of compute, as
compute-optimal scaling has it), anchored where the sweep found the optimum on the reference CPU.
Everything else follows the depth, nanochat style: width = 64 x depth, one head per 64 dimensions,
and dropout and input-token noise once the model is big enough to memorise a small corpus in its
budget. One setting follows the minutes instead: from COMPILE_MINUTES on, `torch.compile` (about
half a minute to build on first use) pays for itself in faster steps.
The schedule needs nothing: it already ends exactly when the budget does (training/optim.py).

The sweep behind the anchor and the exponent is in benchmarks/NOTES.md. Flags typed on the
command line (or saved in a run being resumed) always win over these choices.

The peak that sizes a run is the best this machine has shown, not only this process's one-second
measurement (`remembered_peak`): on a shared machine a measurement now and then reads half the
peak (3 of about 45 sweep runs), and a 5-minute run sized for a machine half as fast memorises
Tiny Shakespeare (2.47 bits/byte instead of 2.02). Remembering the best also makes the same
command give the same model on the same machine, run after run.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.device import cpu_info
from model.files import write_atomically

if TYPE_CHECKING:  # training/config.py imports this module
    from training.config import TrainConfig

# 90 seconds at the 2-core reference machine's bf16 peak (~420 GFLOP/s): depth 3 was best.
ANCHOR_COMPUTE = 1.5 * 60 * 420e9
ANCHOR_DEPTH = 3
MIN_DEPTH, MAX_DEPTH = 2, 12  # 12 x 768 is GPT-2 small, the largest shape this project targets
HEAD_DIM = 64
TOKEN_NOISE = 0.05  # share of input tokens replaced at depth > 3 (0.10 scored worse; benchmarks/NOTES.md)
COMPILE_MINUTES = 3.0  # compiling costs ~30 s cold, ~15 s cached, and buys ~25% faster steps (benchmarks/NOTES.md)
CHOSEN = ("n_layer", "n_embd", "n_head", "n_kv_head", "dropout", "token_noise", "compile")  # what this rule fills in


def depth_for(minutes: float, peak_flops: float) -> int:
    compute = minutes * 60 * peak_flops
    depth = round(ANCHOR_DEPTH * (compute / ANCHOR_COMPUTE) ** (1 / 6))
    return max(MIN_DEPTH, min(MAX_DEPTH, depth))


def sized_for_budget(minutes: float, peak_flops: float) -> dict:
    """The model's shape and regularisation for a run of `minutes` on a machine with `peak_flops` FLOP/s.

    Beyond the anchor depth the model can memorise a small corpus within the budget, so it also
    gets residual dropout (0.2, nanoGPT's value for Tiny Shakespeare) and has TOKEN_NOISE of its
    input tokens replaced by random ones (benchmarks/NOTES.md has the sweeps behind both). Budgets of
    COMPILE_MINUTES or more are compiled.
    """
    depth = depth_for(minutes, peak_flops)
    regularised = depth > ANCHOR_DEPTH
    dropout, noise = (0.2, TOKEN_NOISE) if regularised else (0.0, 0.0)
    compiled = minutes >= COMPILE_MINUTES
    return dict(zip(CHOSEN, (depth, HEAD_DIM * depth, depth, depth, dropout, noise, compiled), strict=True))


def describe(minutes: float, peak_flops: float, measured: float, config: TrainConfig) -> str:
    """One line for the training log: the compute the budget buys and what the run uses."""
    now = "" if measured >= peak_flops else f" (the best measured here; {measured / 1e9:,.0f} now)"
    return (
        f"budget {minutes:g} min x {peak_flops / 1e9:,.0f} GFLOP/s peak{now} = {minutes * 60 * peak_flops:.2g} FLOPs "
        f"-> {config.n_layer} layers x {config.n_embd} wide, dropout {config.dropout:g}, token noise "
        f"{config.token_noise:g}, {'compiled' if config.compile else 'eager'} "
        f"({'/'.join('--' + name.replace('_', '-') for name in CHOSEN)} choose yourself)"
    )


def machine_name(device: torch.device, dtype: torch.dtype) -> str:
    """What a remembered peak is valid for: the processor, the thread count and the dtype."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = cpu_info("model name") or platform.processor() or platform.machine()
        chip += f", {torch.get_num_threads()} threads"
    return f"{chip}, {str(dtype).removeprefix('torch.')}"


def remembered_peak(measured: float, machine: str, folder: Path) -> float:
    """The best of `measured` and the peaks measured earlier on `machine` (kept in folder/peak_flops.json)."""
    path = folder / "peak_flops.json"
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
