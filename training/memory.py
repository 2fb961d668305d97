"""Will a training run fit in this machine's memory? Asked before anything large is allocated.

A typo like `--n-embd 1000000` or `--batch-size 100000000` would otherwise end in an allocator
traceback, or worse, in the kernel's out-of-memory killer taking the machine down with it. The
estimate is rough (it leaves out the framework's own few hundred MB), so it refuses only runs that
clearly cannot fit; a run near the limit still starts.

- Parameters: fp32 weights, gradients and up to two optimizer moments, 16 bytes each.
- Activations kept for the backward pass, per token of a micro-batch: about 40 bytes per layer
  and width (attention and MLP inputs, norms, the SwiGLU hidden state in bf16 and fp32), plus
  12 bytes per vocabulary entry for the logits, their softmax and gradient.
"""

from __future__ import annotations

import os

from model.config import ModelConfig
from model.errors import UserError

BYTES_PER_PARAMETER = 16


def activation_bytes(model: ModelConfig, rows: int, layers: int) -> int:
    """Activations of `rows` full-context rows through `layers` layers, and their logits."""
    return rows * model.context * (40 * layers * model.n_embd + 12 * model.vocab_size)


def training_bytes(model: ModelConfig, micro_batch_rows: int) -> int:
    return BYTES_PER_PARAMETER * model.num_parameters() + activation_bytes(model, micro_batch_rows, model.n_layer)


def available_bytes() -> int:
    """Memory the kernel says it can give us now (MemAvailable), else all physical memory."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(model: ModelConfig, micro_batch_rows: int) -> None:
    """Refuse, with the numbers, a CPU run whose weights, optimizer and activations cannot fit."""
    need, have = training_bytes(model, micro_batch_rows), available_bytes()
    if need > have:
        raise UserError(
            f"this run needs about {need / 2**30:,.1f} GB ({model.num_parameters() / 1e6:,.1f}M parameters, "
            f"micro-batch {micro_batch_rows} x {model.context} tokens) but {have / 2**30:,.1f} GB are free: "
            "use a smaller --n-layer/--n-embd, or a smaller --batch-size (--grad-accum keeps the batch)"
        )
