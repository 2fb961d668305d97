"""The output temperature: how much a run that saw its data many times must soften its logits.

A model that sees a small corpus many times ends overconfident: on text it has not seen, its
probabilities are too sharp, and dividing its logits by a temperature above 1 scores better. How
much depends on how often the run saw its data, so the trainer folds a temperature into the saved
model's final norm (the logits are linear in its scale, so sampling, the UI and an export compute
the calibrated model with no new parameter), chosen in one of two ways:

- By default, from the passes the run made over its training data: 1 + 0.062 x sqrt(passes - 1),
  and 1 for a run that saw its data once or less (`temperature_for_passes`). On the tuning split
  (never the validation text) the best temperatures of 11 runs (90 seconds and 5 minutes, 3 to 17
  passes, 1.7M to 11.4M parameters) lay along this curve, and its temperature scored within 0.0015
  bits/byte of each run's best: 0.019-0.030 better than as trained for the default models, 0.001-0.003
  for a run that saw its data 3 times (benchmarks/NOTES.md). It assumes a run long enough to memorise
  what it repeats, as budget-sized runs are: a 60-step toy run over 12 passes was not overconfident.
- With `--calibration-tokens N`, fitted: the last N tokens of the training split (at most 5%) stay
  out of training, and every evaluation picks the temperature that minimises the loss on them. It
  needs no rule, but text from the end of the training split is easier for the model than new text
  (probably because it continues the play the training text ends in), so in two 5-minute runs it chose
  1.11 and 1.12 where about 1.18 was best, and the tokens it keeps cost training. Never the
  validation text: that would tune the model to the text it is scored on.

The loss is convex in 1 / temperature, so a golden-section search over logits computed once finds
the fitted one in about a second.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from model.device import autocast
from model.evaluate import windows
from model.gpt import GPT

PASS_SLOPE = 0.062  # T rises with the square root of the passes beyond the first (chosen on the tuning split, above)
MAX_SHARE = 0.05  # of the training split; a small corpus cannot give more to calibration
INVERSE_RANGE = (0.1, 10.0)  # 1 / temperature is searched here: temperatures from 0.1 to 10


def temperature_for_passes(passes: float) -> float:
    """The output temperature for a run that has gone `passes` times over its training data."""
    return 1 + PASS_SLOPE * math.sqrt(max(0.0, passes - 1))


def held_out_count(requested: int, train_tokens: int) -> int:
    """How many tokens calibration takes from the end of a training split of `train_tokens`."""
    return min(requested, int(train_tokens * MAX_SHARE))


@torch.inference_mode()
def fit_temperature(model: GPT, tokens: np.ndarray, token_bytes: torch.Tensor, dtype: torch.dtype) -> float:
    """The temperature T that minimises the mean loss of softmax(logits / T) over `tokens`' next-token predictions.

    Scored in non-overlapping windows of the model's context (model/evaluate.py's `windows`); tokens
    that stand for no bytes (special tokens) are left out, as bits per byte leaves them out.
    """
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    was_training = model.training
    model.eval()
    logits, chosen = [], []
    for inputs, targets in windows(tokens, model.config.context):
        with autocast(device, dtype):
            z = model(inputs.to(device)).float().flatten(0, 1)  # (tokens, vocab)
        y = targets.flatten().to(device)
        counted = (y >= 0) & (token_bytes[y.clamp(min=0)] > 0)
        kept = z[counted]  # (counted tokens, vocab)
        logits.append(kept)
        chosen.append(kept.gather(1, y[counted, None]).squeeze(1))
    model.train(was_training)
    if not logits:  # fewer than two tokens: nothing to fit
        return 1.0
    # In float64: for a model whose logits barely vary (early in training) the loss is so flat near its
    # minimum that fp32 rounding moved the minimiser by 0.1%.
    z, zy = torch.cat(logits).double(), torch.cat(chosen).double()

    def loss(inverse: float) -> float:
        return float((torch.logsumexp(z * inverse, dim=1) - zy * inverse).mean())

    low, high = INVERSE_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(40):  # the bracket shrinks to 0.62^40 of its width, about 1e-8 x 10
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return 1 / ((low + high) / 2)
