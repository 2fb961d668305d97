"""Optimizers and the learning-rate schedule.

- Muon for the hidden weight matrices (attention and MLP projections): it orthogonalises each
  update (Newton-Schulz), which makes every direction of a matrix learn at the same rate. In the
  speed-run literature (modded-nanogpt, nanochat) it reaches a given loss in markedly fewer steps
  than AdamW, which is what a time-limited CPU run needs. PyTorch ships it (`torch.optim.Muon`).
  Its orthogonalisation is matmul work that is not the model's: 16% of the default CPU step with
  PyTorch's 5 iterations, so we run 4 (NS_STEPS; same scores on the tuning split, benchmarks/NOTES.md),
  on stacks of same-shaped matrices (training/muon.py: 2.3x as fast for small matrices), with
  nanochat's refinements (REFINEMENTS: per-iteration coefficients, NorMuon's neuron-wise step sizes,
  cautious weight decay, a momentum warm-up; together 0.003-0.014 bits/byte better on the tuning
  split at the 5-minute size and step count, three seeds, and level at 90 seconds; benchmarks/NOTES.md).
- AdamW for what Muon does not suit: embeddings, the output head and the norm scales (1-D).
  The token embedding gets its own, larger learning rate (`--embed-lr`, several times `--lr`): a
  row only learns when its token occurs. benchmarks/NOTES.md has the sweep: 0.1 is best for 90
  seconds at 4 x 256 but memorises the corpus in longer runs; 0.01 is the compromise.
  `--optimizer adamw` uses AdamW for everything, for comparison.
- Schedule: linear warm-up, a constant plateau, then linear decay to zero over the last
  `cooldown` fraction of the budget ("warmup-stable-decay"). Progress is measured in steps or in
  wall time, whichever budget is nearer its end, so a `--max-minutes` run decays exactly into its
  deadline.
"""

from __future__ import annotations

import torch

from model.gpt import GPT
from training.config import TrainConfig
from training.muon import StackedMuon

NS_STEPS = 4  # Newton-Schulz iterations per Muon update (PyTorch's default is 5)
REFINEMENTS = dict(polar_express=True, normuon_beta2=0.95, cautious_weight_decay=True, momentum_warmup=0.85)


def build_optimizers(
    model: GPT, config: TrainConfig, dtype: torch.dtype, fused: bool = False
) -> list[torch.optim.Optimizer]:
    """AdamW, and Muon for the hidden matrices (unless `config.optimizer` is "adamw"); Muon orthogonalises
    in `dtype`, the precision of the model's matmuls (training/muon.py)."""
    matrices, embeddings, head, scales = [], [], [], []
    for name, param in model.named_parameters():  # a tied head is the embedding: listed once, as it
        if name.startswith("embed_tokens"):
            embeddings.append(param)
        elif name.startswith("lm_head"):
            head.append(param)
        elif param.dim() == 2:
            matrices.append(param)
        else:
            scales.append(param)
    adam_groups = [
        {"params": embeddings, "weight_decay": 0.0, "lr": config.embed_lr},
        {"params": head, "weight_decay": 0.0},
        {"params": scales, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        adam_groups.append({"params": matrices, "weight_decay": config.weight_decay})
    adamw = torch.optim.AdamW(adam_groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-10, fused=fused or None)
    optimizers: list[torch.optim.Optimizer] = [adamw]
    if config.optimizer == "muon":
        muon = StackedMuon(
            matrices,
            lr=config.muon_lr,
            weight_decay=config.weight_decay,
            momentum=0.95,
            adjust_lr_fn="original",
            ns_steps=NS_STEPS,
            compiled=config.compile,
            dtype=dtype,
            **REFINEMENTS,
        )
        optimizers.append(muon)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def lr_factor(step: int, progress: float, warmup_steps: int, cooldown: float) -> float:
    """Multiplier of the peak learning rate at `step`, with `progress` in [0, 1] of the budget."""
    warmup = min(1.0, (step + 1) / max(1, warmup_steps))
    if not cooling(progress, cooldown):
        return warmup
    return warmup * max(0.0, (1 - progress) / cooldown)


def cooling(progress: float, cooldown: float) -> bool:
    """Whether the learning rate has started its cooldown, the last `cooldown` share of the budget."""
    return cooldown > 0 and progress >= 1 - cooldown


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
