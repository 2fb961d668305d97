"""The output temperature: fitted on training text the run never trained on, folded into the saved model.

A model that sees a small corpus many times ends overconfident: on text it has not seen, its
probabilities are too sharp, and dividing its logits by a temperature a little above 1 scores better.
On the tuning split the default 5-minute and 90-second models scored 0.01-0.03 bits/byte better at
the best temperature, 1.1-1.2 (benchmarks/NOTES.md). The temperature that helps depends on how far
a run has memorised its data (about 1 on a corpus it sees once), so it is fitted, not fixed:
`--calibration-tokens N` keeps the last N tokens of the training split out of training (at most 5% of
it), and every evaluation picks the temperature that minimises the loss on them. Never the validation
text: that would tune the model to the text it is scored on. Off by default: on Tiny Shakespeare the
tokens it keeps from training cost about what the temperature gains (benchmarks/NOTES.md).

The loss is convex in 1 / temperature, so a golden-section search over logits computed once finds
it in about a second. The saved model has the temperature folded into its final norm's scale (the
logits are linear in it), so sampling, the UI and an export compute the calibrated model with no
new parameter.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from model.device import autocast
from model.evaluate import windows
from model.gpt import GPT

MAX_SHARE = 0.05  # of the training split; a small corpus cannot give more to calibration
INVERSE_RANGE = (0.1, 10.0)  # 1 / temperature is searched here: temperatures from 0.1 to 10


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
        logits.append(z[counted])
        chosen.append(z[counted].gather(1, y[counted, None]).squeeze(1))
    model.train(was_training)
    if not logits:  # fewer than two tokens: nothing to fit
        return 1.0
    z, zy = torch.cat(logits), torch.cat(chosen)

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
