"""How the next token is chosen from the model's logits: the knobs, and the rule that applies them.

Design decisions:
- One rule, written twice: in PyTorch here (`reference_draw`, which runs on a GPU and wherever the C
  decode step is not loaded) and in C (`draw` in model/decode_step.c, which runs inside the C
  decode loop so a token costs no Python). tests/test_model.py checks that both draw the same tokens
  from the same logits and random numbers.
- Inverse-CDF sampling: each draw takes one uniform number u in [0, 1) and picks the first token
  whose running probability exceeds it. The same distribution as `torch.multinomial`, cheaper, and
  the numbers come from one seeded torch generator per call whether they are drawn one token at a
  time or many at once, so the same logits and seed give the same tokens in C and in PyTorch (the
  decode steps that compute the logits agree exactly only in fp32 without int8 weights: model/decoder.py).
- Only the special tokens that end generation (end of turn, document separator) may be drawn; the
  others (turn markers, reserved ids) would mean nothing inside generated text.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from model import native
from model.errors import UserError
from model.tokenizer import DOC_SEPARATOR, END_OF_TURN, Tokenizer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1 means off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    stop_at_special: bool = True  # end at the end-of-turn and document-separator tokens

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 100:
            raise UserError(f"temperature must be between 0 and 100 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top-k must be 0 (off) or a positive number of tokens, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise UserError(f"the seed must be in [0, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one below float32's smallest normal number, which the C draw reads as 0
        or as a number too small to divide by: both draws then take the likeliest token."""
        return self.temperature < torch.finfo(torch.float32).tiny


class Sampler:
    """One generation call's sampling: its knobs, its random numbers, and which tokens may be drawn
    (`banned` never) and which end a row (`stop_ids`), both as PyTorch tensors and as decode_step.c's
    `Sampling` struct (`native`, None without the C library)."""

    def __init__(self, config: SamplingConfig, tokenizer: Tokenizer, device: torch.device, library=None):
        config.validate()
        self.config = config
        self.vocab = tokenizer.n_vocab
        self.generator = torch.Generator(device=device)
        if config.seed is None:
            self.generator.seed()  # fresh randomness, without touching the global RNG
        else:
            self.generator.manual_seed(config.seed)
        specials = tokenizer.special_ids
        self.stop_ids = {specials[t] for t in (DOC_SEPARATOR, END_OF_TURN)} if config.stop_at_special else set()
        banned = [i for i in specials.values() if i not in self.stop_ids]
        self.banned = torch.tensor(banned, dtype=torch.long, device=device)
        self.library = library
        if library is not None:  # flags over the vocabulary, as decode_step.c reads them
            self.banned_flags, self.stop_flags = self._flags(banned), self._flags(self.stop_ids)
            temperature = 0.0 if config.greedy else config.temperature
            top_k = min(config.top_k, self.vocab)  # as the C int holds it: a larger k would wrap around
            self.native = native.Sampling(self.vocab, temperature, top_k, config.top_p, self.banned_flags.data_ptr())

    def _flags(self, ids) -> torch.Tensor:
        """One uint8 per token of the vocabulary: 1 for `ids`, 0 for the rest."""
        flags = torch.zeros(self.vocab, dtype=torch.uint8)
        flags[list(ids)] = 1
        return flags

    def uniforms(self, steps: int, rows: int) -> torch.Tensor:
        """(steps, rows) numbers in [0, 1), the same sequence however a call splits it into steps."""
        return torch.rand(steps, rows, generator=self.generator, device=self.generator.device)

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row (B,) from its fp32 logits (B, >= vocab)."""
        u = self.uniforms(1, logits.size(0))[0]
        if self.library is not None and logits.dtype == torch.float32 and logits.stride(-1) == 1:
            tokens = torch.empty(logits.size(0), dtype=torch.long)
            status = self.library.draw_tokens(
                logits.data_ptr(), logits.size(0), logits.stride(0), ctypes.byref(self.native), u.data_ptr(),
                tokens.data_ptr(),
            )  # fmt: skip
            if status != 0:
                raise MemoryError("the C sampling step could not allocate its scratch memory")
            return tokens
        return reference_draw(logits[:, : self.vocab].index_fill(1, self.banned, float("-inf")), self.config, u)


def reference_draw(logits: torch.Tensor, config: SamplingConfig, u: torch.Tensor) -> torch.Tensor:
    """The sampling rule in PyTorch: logits (B, vocab), one u in [0, 1) per row -> tokens (B,).

    Greedy at temperature 0; otherwise top-k, then top-p (the smallest set of likeliest tokens that
    holds top_p of the probability; the likeliest always stays), then the inverse CDF of
    softmax(logits / temperature) at u."""
    if config.greedy:
        return logits.argmax(dim=-1)
    if config.top_k and config.top_k < logits.size(-1):
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Less the largest logit first, as decode_step.c does: at a tiny temperature logits / temperature
    # would be +inf and -inf, whose softmax is NaN; this way the likeliest token keeps 0 and the rest -inf.
    tempered = (logits - logits.amax(dim=-1, keepdim=True)) / config.temperature
    if config.top_p < 1.0:
        ordered, order = tempered.sort(dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        outside = probs.cumsum(dim=-1) - probs > config.top_p
        tempered = torch.empty_like(tempered).scatter_(-1, order, ordered.masked_fill(outside, float("-inf")))
    cdf = torch.softmax(tempered, dim=-1).cumsum(dim=-1)
    target = u[:, None] * cdf[:, -1:]  # in [0, total)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.size(-1) - 1)
