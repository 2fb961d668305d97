"""Training batches, drawn as shuffled passes over the data: the same for a given (seed, step).

A small corpus is seen many times (Tiny Shakespeare about 3 times in 90 seconds, 6 in 5 minutes;
the built-in conversations about as often in chat fine-tuning), so rows are drawn without
replacement (`ShuffledPasses`): each pass over the data (an epoch) visits every item once, in its
own random order. Drawn with replacement instead, some items come up twice as often as the average
and others not at all, and a repeat can come a few steps after the first sight; benchmarks/NOTES.md
measures the difference. For pre-training an item is a window of the token array, cut back to
back at a random phase per pass (`Batches`); for chat it is a conversation (`ConversationBatches`).

A run's n-th row is fixed by (seed, n), and a step's rows are rows step x batch onwards; rank r of
a distributed run takes its own slice of them, micro-step by micro-step. So the data a step sees
depends only on the seed and the step number: resuming needs no loader state, and N processes see
exactly the rows one process would see with the same global batch.

Input-token noise (`--token-noise`, on for runs long enough to memorise a small corpus) replaces a
fraction of each window's inputs with random ordinary tokens and leaves its targets alone, so a
pass the model has seen before reads a little differently: data augmentation for text, after Xie
et al. 2017 ("Data noising as smoothing in neural network language models"). It too is fixed by
(seed, step, row), and stops when the learning rate starts to cool (`noisy`, set by the trainer): the
last part of the run fits the real text. That took 0.009 off the tuning score of the Zen 4's 5-minute
model (4 x 256, dropout 0.1) and left the 5 x 320 (dropout 0.2) level. benchmarks/NOTES.md has both sweeps.
"""

from __future__ import annotations

import numpy as np
import torch


class ShuffledPasses:
    """Which item the run's n-th draw from `size` items is: passes over all of them, each in a fresh order.

    Draw n is item order[n mod size] of pass n div size, where a pass's order is a permutation
    seeded with (seed, pass): every item once per pass, and a repeat a whole pass later.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._last: tuple[int, np.ndarray] | None = None  # (pass, order): the pass being drawn from

    def draw(self, n: int) -> tuple[int, int]:
        """(pass, item) of draw n."""
        epoch, index = divmod(n, self.size)
        if self._last is None or self._last[0] != epoch:
            self._last = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size))
        return epoch, int(self._last[1][index])

    def for_step(self, step: int, rows: range, global_rows: int) -> list[tuple[int, int]]:
        """The draws of `rows` out of a step's `global_rows`."""
        return [self.draw(step * global_rows + row) for row in rows]


class Batches:
    """Windows of the token array: each pass cuts it into back-to-back windows at its own random phase."""

    def __init__(self, tokens: np.ndarray, context: int, seed: int, noise: float = 0.0, noise_ids: int = 0):
        if len(tokens) < context + 2:
            raise ValueError(f"only {len(tokens)} tokens, fewer than one window of {context + 1}")
        self.tokens, self.context, self.seed = tokens, context, seed
        self.noise, self.noise_ids = noise, noise_ids  # the share of inputs replaced, by ids in [0, noise_ids)
        self.noisy = True  # the trainer turns the noise off for the cooldown
        last_start = len(tokens) - context - 1
        self.passes = ShuffledPasses(max(1, last_start // context), seed)
        self.max_phase = min(context - 1, last_start)  # every window of a pass fits whatever its phase

    def phase(self, epoch: int) -> int:
        """Where the pass's first window starts (about 20 us a row, against 300 ms a step: not cached)."""
        return int(np.random.default_rng([self.seed, epoch, 1]).integers(0, self.max_phase + 1))

    def get(self, step: int, rows: range, global_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (len(rows), context) for `rows` out of this step's `global_rows`."""
        starts = [
            self.phase(epoch) + window * self.context for epoch, window in self.passes.for_step(step, rows, global_rows)
        ]
        windows = np.stack([self.tokens[o : o + self.context + 1] for o in starts]).astype(np.int64)
        inputs, targets = windows[:, :-1].copy(), windows[:, 1:]
        if self.noise and self.noisy:
            for i, row in enumerate(rows):
                rng = np.random.default_rng([self.seed, step, row, 2])
                replaced = rng.random(self.context) < self.noise
                inputs[i, replaced] = rng.integers(0, self.noise_ids, int(replaced.sum()))
        batch = torch.from_numpy(np.concatenate([inputs, targets], axis=1))
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        return batch[:, : self.context], batch[:, self.context :]


class ConversationBatches:
    """One conversation per row, padded to the longest in the batch; loss only on assistant tokens.

    Rows are not packed with several conversations: attention would cross from one into the next,
    and a model would learn answers that depend on the conversation before them, which is never
    there when someone chats. Padding goes after the text, where causal attention cannot see it,
    and to the batch's longest row rather than the full context, so little compute is wasted.
    A conversation longer than the context is cut to it (and reported by the caller). Rows are
    shuffled passes over the conversations, like `Batches`' windows.
    """

    def __init__(self, rendered: list[tuple[list[int], list[int]]], context: int, seed: int):
        self.rows = []
        for ids, mask in rendered:
            ids, mask = torch.tensor(ids[: context + 1]), torch.tensor(mask[: context + 1], dtype=torch.bool)
            self.rows.append((ids[:-1], torch.where(mask[1:], ids[1:], -1)))
        self.passes = ShuffledPasses(len(self.rows), seed)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, step: int, rows: range, global_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pad([self.rows[i] for _, i in self.passes.for_step(step, rows, global_rows)], device)

    def in_order(self, batch_size: int, device: torch.device):
        """Every conversation once, for validation."""
        for start in range(0, len(self.rows), batch_size):
            yield self._pad(self.rows[start : start + batch_size], device)

    @staticmethod
    def _pad(rows: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(inputs) for inputs, _ in rows)
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.full((len(rows), width), -1, dtype=torch.long)
        for row, (x, y) in enumerate(rows):
            inputs[row, : len(x)], targets[row, : len(y)] = x, y
        return inputs.to(device), targets.to(device)
