"""Training batches: random windows of the token array, the same for a given (seed, step).

Each optimizer step draws `global_rows` window offsets from a generator seeded with (seed, step);
rank r of a distributed run takes its own slice of those rows, micro-step by micro-step. So the
data a step sees depends only on the seed and the step number: resuming needs no loader state, and
N processes see exactly the rows one process would see with the same global batch.
"""

from __future__ import annotations

import numpy as np
import torch


class Batches:
    def __init__(self, tokens: np.ndarray, context: int, seed: int):
        if len(tokens) < context + 2:
            raise ValueError(f"only {len(tokens)} tokens, fewer than one window of {context + 1}")
        self.tokens, self.context, self.seed = tokens, context, seed

    def get(self, step: int, rows: range, global_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (len(rows), context) for `rows` out of this step's `global_rows`."""
        generator = np.random.default_rng([self.seed, step])
        offsets = generator.integers(0, len(self.tokens) - self.context - 1, size=global_rows)[rows.start : rows.stop]
        windows = np.stack([self.tokens[o : o + self.context + 1] for o in offsets]).astype(np.int64)
        batch = torch.from_numpy(windows)
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]
