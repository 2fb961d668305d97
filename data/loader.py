"""Training batches: windows of the token array, shuffled pass by pass, the same for a given (seed, step).

A small corpus is seen many times (Tiny Shakespeare about 3 times in 90 seconds, 6 in 5 minutes),
so windows are drawn without replacement: each pass over the data (an epoch) cuts the tokens into
back-to-back windows starting at a random phase and visits every one of them once, in a random
order. Drawn with replacement instead, some windows come up twice as often as the average and
others not at all; benchmarks/NOTES.md has the comparison. The n-th row of the run is window n mod
(windows per epoch) of epoch n div (windows per epoch), and an epoch's order and phase come from
a generator seeded with (seed, epoch); rank r of a distributed run takes its own slice of each
step's rows, micro-step by micro-step. So the data a step sees depends only on the seed and the
step number: resuming needs no loader state, and N processes see exactly the rows one process
would see with the same global batch.
"""

from __future__ import annotations

import numpy as np
import torch


class Batches:
    def __init__(self, tokens: np.ndarray, context: int, seed: int):
        if len(tokens) < context + 2:
            raise ValueError(f"only {len(tokens)} tokens, fewer than one window of {context + 1}")
        self.tokens, self.context, self.seed = tokens, context, seed
        last_start = len(tokens) - context - 1
        self.per_epoch = max(1, last_start // context)
        self.max_phase = min(context - 1, last_start)  # every window of an epoch fits whatever its phase
        self._epoch: tuple[int, int, np.ndarray] | None = None  # (epoch, phase, window order), the last one used

    def window_starts(self, epoch: int) -> np.ndarray:
        """Start offsets of an epoch's windows, in the order the epoch visits them."""
        if self._epoch is None or self._epoch[0] != epoch:
            generator = np.random.default_rng([self.seed, epoch])
            phase = int(generator.integers(0, self.max_phase + 1))
            self._epoch = (epoch, phase, generator.permutation(self.per_epoch))
        _, phase, order = self._epoch
        return phase + order * self.context

    def get(self, step: int, rows: range, global_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (len(rows), context) for `rows` out of this step's `global_rows`."""
        offsets = []
        for row in range(step * global_rows + rows.start, step * global_rows + rows.stop):
            epoch, index = divmod(row, self.per_epoch)
            offsets.append(self.window_starts(epoch)[index])
        windows = np.stack([self.tokens[o : o + self.context + 1] for o in offsets]).astype(np.int64)
        batch = torch.from_numpy(windows)
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]


class ConversationBatches:
    """One conversation per row, padded to the longest in the batch; loss only on assistant tokens.

    Rows are not packed with several conversations: attention would cross from one into the next,
    and a model would learn answers that depend on the conversation before them, which is never
    there when someone chats. Padding goes after the text, where causal attention cannot see it,
    and to the batch's longest row rather than the full context, so little compute is wasted.
    A conversation longer than the context is cut to it (and reported by the caller). Rows for a
    step are drawn from (seed, step), like `Batches`.
    """

    def __init__(self, rendered: list[tuple[list[int], list[int]]], context: int, seed: int):
        self.rows = []
        for ids, mask in rendered:
            ids, mask = torch.tensor(ids[: context + 1]), torch.tensor(mask[: context + 1], dtype=torch.bool)
            self.rows.append((ids[:-1], torch.where(mask[1:], ids[1:], -1)))
        self.context, self.seed = context, seed

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, step: int, rows: range, global_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        generator = np.random.default_rng([self.seed, step])
        picks = generator.integers(0, len(self.rows), size=global_rows)[rows.start : rows.stop]
        return self._pad([self.rows[i] for i in picks], device)

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
