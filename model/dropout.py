"""Residual dropout that costs little on a CPU, eager or compiled.

Dropout is the 5-minute model's main regulariser (it sees its 1 MB corpus about ten times), and
on a CPU its mask, not its arithmetic, is what costs:
- Eager: `F.dropout` draws a full random number per element. `cheap_dropout` takes one random byte
  per element from 64-bit random integers instead (p rounded to a multiple of 1/256), about 8% off
  the eager step (benchmarks/NOTES.md, "Cheaper dropout").
- Compiled (`torch.compile` on a CPU): the random bytes come from inductor's random-number kernels,
  and the mask is saved for the backward pass as one byte per element: dropout cost about 45 ms of
  a 355-ms step of the 5-minute model, most of it writing and reading those masks. So under
  compilation the mask is a hash of each element's index and a per-site seed (`hashed_keep`):
  inductor computes it inside the kernel that applies it, and the backward pass recomputes it from
  the seed instead of saving it (activation checkpointing around the masked multiply, which
  `torch.compile` turns into recomputation inside the backward's own kernels). The seeds, one
  31-bit random number per dropout site and forward pass, come from the model's random generator
  (`dropout_seeds`), so a seeded run is reproducible and every step and site gets a fresh mask
  (benchmarks/NOTES.md, "Dropout masks from a hash").
- On a GPU, `F.dropout` is already fused with fast random numbers: it stays.

Either way the mask drops round(256 p) / 256 of the elements and scales the rest by 256 / (256 -
round(256 p)), so the expectation is unchanged. The hash is Chris Wellons' lowbias32 (two
multiply-xorshift rounds, int32 arithmetic that wraps) over a Weyl sequence of the index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def cheap_dropout(x: torch.Tensor, p: float, seed: torch.Tensor | None = None) -> torch.Tensor:
    """Dropout of `x` with probability p; `seed` (from `dropout_seeds`) selects the hashed mask."""
    if p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p)  # fused, with its own fast random numbers, on a GPU
    threshold = min(255, round(p * 256))  # p just below 1 must still keep something
    if seed is not None:
        return checkpoint(_apply_hashed_mask, x, seed, threshold, use_reentrant=False)  # recomputed, not saved
    bits = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 7) // 8,), dtype=torch.int64, device=x.device)
    keep = bits.view(torch.uint8)[: x.numel()].view(x.shape) >= threshold
    return x * keep * (256 / (256 - threshold))


def dropout_seeds(count: int, device: torch.device) -> torch.Tensor | None:
    """`count` int32 seeds for the hashed masks of one forward pass, or None where the random-byte mask
    is the cheaper one (eager steps; and GPUs, which ignore the seeds)."""
    if device.type != "cpu" or not torch.compiler.is_compiling():
        return None
    return torch.randint(0, 2**31 - 1, (count,), dtype=torch.int32, device=device)


def hashed_keep(shape: torch.Size, seed: torch.Tensor, threshold: int) -> torch.Tensor:
    """True where an element is kept: the low byte of lowbias32(index x 0x61C88647 + seed) >= threshold."""
    h = torch.arange(math.prod(shape), dtype=torch.int32, device=seed.device).view(shape) * 0x61C88647 + seed
    h = (h ^ ((h >> 16) & 0xFFFF)) * 0x7FEB352D  # `>>` is arithmetic on int32: the masks make it logical
    h = (h ^ ((h >> 15) & 0x1FFFF)) * -0x7B935975  # 0x846CA68B as an int32
    h = h ^ ((h >> 16) & 0xFFFF)
    return (h & 0xFF) >= threshold


def _apply_hashed_mask(x: torch.Tensor, seed: torch.Tensor, threshold: int) -> torch.Tensor:
    return x * hashed_keep(x.shape, seed, threshold) * (256 / (256 - threshold))
