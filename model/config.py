"""The model's shape: every number that decides what network `model/gpt.py` builds, and what it costs.

Kept apart from the network itself, and free of torch, because the command line needs it before
any tensor exists: `train.py` checks its flags, and the budget rule (training/budget.py) weighs the
shapes it could train, by their parameters and FLOPs, without importing torch (about two seconds on
two cores) or allocating a weight. The field names are what checkpoint.json's "model" records and
what the export maps onto Qwen3's configuration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    context: int = 256  # the longest sequence the model is trained on
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int = 4
    head_dim: int = 0  # 0 means n_embd // n_head
    mlp_hidden: int = 0  # 0 means 8/3 * n_embd rounded up to a multiple of 64 (SwiGLU's usual ratio)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dropout: float = 0.0  # residual dropout while training (a data-limited run's regulariser); never at inference

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.n_embd // self.n_head
        if self.mlp_hidden == 0:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.n_head % self.n_kv_head:
            raise ValueError("n_head must be a multiple of n_kv_head")

    def to_dict(self) -> dict:
        return asdict(self)

    def num_parameters(self, include_embedding: bool = True) -> int:
        """What `GPT(self).num_parameters(include_embedding)` will be, without allocating anything (a tied
        head is the embedding, so without the embedding a tied model has no head either)."""
        d, hd = self.n_embd, self.head_dim
        attention = d * hd * (2 * self.n_head + 2 * self.n_kv_head) + 2 * hd
        layer = attention + 3 * d * self.mlp_hidden + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        embedding = self.vocab_size * d if include_embedding else 0
        return self.n_layer * layer + head + embedding + d

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), the PaLM estimate: 6N + 12 L T d."""
        return (
            6 * self.num_parameters(include_embedding=False)
            + 12 * self.n_layer * self.context * self.n_head * self.head_dim
        )

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
