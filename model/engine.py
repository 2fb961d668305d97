"""Generation: the one engine behind `sample.py`, the evaluation samples in training, and the UI.

Design decisions:
- A KV cache: each new token costs one position of compute instead of re-running the whole
  context. The cache is allocated once per call at the model's context length.
- A batch of prompts of different lengths is left-padded; padded keys are masked out and each row
  gets its own rotary positions, so every row computes exactly what it would alone (past the
  context, a padded row's window holds its padding a little longer: all rows share one ring).
- Prefill: a prompt is run through the model in one batched forward pass, on a CPU with the
  matrices cast once to the autocast dtype (autocast would cast them again on every pass, to the
  same values).
  A prompt of at most SHORT_PROMPT tokens goes through the decode step a token at a time instead,
  which costs less than the fixed cost of a forward pass (benchmarks/NOTES.md).
- Past the context, a rolling cache: the cache is a ring of `context` slots (position p in slot
  p % context), so each new token overwrites the oldest and attends to the newest `context`, with
  the rotary positions it would have had anyway. Attention depends only on relative distance, so
  this is the model with sliding-window attention as wide as its context, and the cost per token
  stays flat with no re-computation at all. (It replaced a slide that kept the newest half of the
  window and re-ran it through the model every half-context; the ring generates 8-11% more bytes
  a second past the context and scores held-out text no worse; benchmarks/NOTES.md,
  "A rolling cache past the context".)
- Streaming is UTF-8 safe: bytes go through an incremental decoder, so half a character is never
  emitted, and text that might be the start of a stop sequence is held back until it is decided.
- Decoding runs in C a stretch at a time: where the C decode step is loaded, one call makes up to
  TOKENS_PER_CALL steps and draws (model/decoder.py, `decode_tokens`), and Python looks at the text
  between calls (streaming, stop strings). Per token, the Python loop around a step had cost about
  as much again as the step (benchmarks/NOTES.md, "Decoding a run of tokens in C"). The C loop
  ends early when every row has drawn a stop token; a stop string costs at most one call too many.
  Without the C step, the PyTorch one decodes a token per round of the same loop.
- Sampling (model/sampling.py): temperature (0 = greedy), top-k, top-p, a seed for
  reproducibility, stop strings, and stopping at the end-of-turn / document-separator tokens.
"""

from __future__ import annotations

import codecs
import contextlib
import copy
from collections.abc import Iterator

import torch

from model.decoder import FusedDecoder, single_thread
from model.device import autocast
from model.errors import UserError
from model.gpt import GPT
from model.sampling import Sampler, SamplingConfig
from model.tokenizer import Tokenizer

SHORT_PROMPT = 8  # tokens; up to this many, prefill through the C decode step (see the module doc)
TOKENS_PER_CALL = 16  # tokens decoded per call into C, between looks at the text (see the module doc)


class KVCache:
    """Keys and values of every layer for a batch, plus the positions and mask of the current call.

    Stored in fp32, or in bf16 when the engine computes in bf16 and decodes in C (which reads either;
    the PyTorch decode step wants fp32): at a full context of the 5 x 320 model the cache is half as
    many bytes per token as the int8 matrices; halving it saved about 0.04 ms of a 0.45-ms step.
    A prefill gets its keys back in its own autocast dtype.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        length: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (n_layer, batch, n_kv_head, length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions that have entered the cache (past the context, a ring: model/decoder.py)
        self.positions: torch.Tensor | None = None  # (B, T) rotary positions of the current call
        self.attn_mask: torch.Tensor | None = None  # (B, 1, T, Tk) bool, or None when nothing is masked

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end].to(k.dtype), self.values[layer, :, :, :end].to(v.dtype)


class TextStream:
    """Turns one row's token bytes into text pieces that are safe to show (see module docstring)."""

    def __init__(self, stops: tuple[str, ...]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, data: bytes, final: bool = False) -> str:
        self.text += self.decoder.decode(data, final=final)
        # The earliest match of any stop: cutting at each stop in turn could cut at a later one
        # first, leaving the start of an earlier one in the text.
        starts = [self.text.find(stop, max(0, self.emitted - len(stop))) for stop in self.stops]
        if found := [start for start in starts if start != -1]:
            self.text, self.stopped, final = self.text[: min(found)], True, True
        safe = len(self.text) if final else len(self.text) - self._held_back()
        piece, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        for size in range(min(len(self.text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = self.text[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0


class Engine:
    """Generates from one loaded model; safe to share, each call has its own cache and RNG.

    The decode step works on a rearranged copy of the weights made here (model/decoder.py), so a
    model that keeps training needs a new Engine to generate from its new weights (the trainer
    makes one per sample).
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        dtype: torch.dtype = torch.float32,
        use_c: bool = True,
        int8_weights: bool = False,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = dtype
        # On a CPU the prefill's matrices are cast once (with_matrices_in); on a GPU autocast's casts
        # are cheap, and a copy of the model during training would cost GPU memory.
        cast_once = dtype != torch.float32 and self.device.type == "cpu"
        self.prefill_model = with_matrices_in(model, dtype) if cast_once else model
        self.context = model.config.context
        # dtype is the prefill's autocast; int8_weights the C decode step's matrices (model/decoder.py);
        # use_c=False chooses the PyTorch decode step, for comparison.
        self.decoder = FusedDecoder(model, int8_weights, use_c)
        self.kv_dtype = torch.bfloat16 if dtype == torch.bfloat16 and self.decoder.native else torch.float32

    def cache_bytes(self, rows: int) -> int:
        """Bytes of the key/value cache that a call with `rows` prompts allocates: keys and values of
        every layer for `context` positions of each row, whatever the prompts' lengths."""
        c = self.model.config
        return 2 * c.n_layer * rows * c.n_kv_head * self.context * c.head_dim * self.kv_dtype.itemsize

    def encode_prompt(self, text: str) -> list[int]:
        """A text prompt as the start of a document, the way training data begins."""
        return [self.tokenizer.doc_separator, *self.tokenizer.encode(text)]

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[str]:
        """Complete each text prompt; returns the generated text of each (prompt not included)."""
        texts = [""] * len(prompts)
        for row, piece in self.stream([self.encode_prompt(p) for p in prompts], sampling):
            texts[row] += piece
        return texts

    @torch.inference_mode()
    def stream(self, prompts: list[list[int]], sampling: SamplingConfig) -> Iterator[tuple[int, str]]:
        """Yield (row, text piece) as tokens arrive for a batch of token prompts.

        A prompt longer than the context is conditioned on its newest `context` tokens, re-computed
        from them alone (generated text keeps the cached keys of what came before them).
        """
        sampler = Sampler(sampling, self.tokenizer, self.device, self.decoder.native)
        if not all(prompts):
            raise UserError("a prompt must have at least one token")
        prompts = [prompt[-self.context :] for prompt in prompts]  # the model sees at most its context
        # The prompts, left-padded to the longest; `valid` marks the real tokens.
        width = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        valid = torch.ones(len(prompts), width, dtype=torch.bool, device=self.device)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt) :] = torch.tensor(prompt)
            valid[row, : width - len(prompt)] = False
        padding = None if valid.all() else valid  # what the decode steps mask
        generated = 0
        streams = [TextStream(sampling.stop) for _ in prompts]
        active = [True] * len(streams)

        # The PyTorch decode step is faster on one intra-op thread (model/decoder.py), and switching
        # the thread count between prefill and decode costs more (oneDNN rebuilds its kernels) than
        # a second core saves on a prompt, so without the C step the whole call runs on one thread.
        # The C step uses no PyTorch threads, so with it the prefill keeps all of them.
        one_thread = self.device.type == "cpu" and not self.decoder.native
        with single_thread() if one_thread else contextlib.nullcontext():
            cache, logits = self._prefill(tokens, valid)
            if not torch.isfinite(logits).all():  # a diverged run's weights: its text would be empty or noise
                raise UserError(
                    "the model computes logits that are not numbers: its weights or settings are damaged "
                    "(or its training diverged); use an earlier checkpoint"
                )
            drawn = sampler.draw(logits)[:, None]  # (B, n): each row's tokens since the last look
            while True:
                for row, row_tokens in enumerate(drawn.tolist()):  # one read of the batch's tokens
                    if not active[row]:
                        continue
                    ends = [i for i, token in enumerate(row_tokens) if token in sampler.stop_ids]
                    data = self.tokenizer.decode_bytes(row_tokens[: ends[0]] if ends else row_tokens)
                    if piece := streams[row].push(data, final=bool(ends)):
                        yield row, piece
                    active[row] = not (ends or streams[row].stopped)
                generated += drawn.size(1)
                if not any(active) or generated == sampling.max_new_tokens:
                    break
                steps = min(TOKENS_PER_CALL, sampling.max_new_tokens - generated)
                drawn = self._decode(cache, drawn[:, -1], padding, sampler, active, steps)
            for row, still_going in enumerate(active):
                if still_going and (piece := streams[row].push(b"", final=True)):
                    yield row, piece

    def _prefill(self, tokens: torch.Tensor, valid: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
        """Fill a fresh cache with `tokens` (B, T); returns it and the logits of the last position."""
        config = self.model.config
        B, T = tokens.shape
        cache = KVCache(
            config.n_layer, B, config.n_kv_head, self.context, config.head_dim, tokens.device, self.kv_dtype
        )
        cache.positions = (valid.cumsum(dim=1) - 1).clamp(min=0)
        padded = not valid.all()
        if self.decoder.native and T <= SHORT_PROMPT and not padded:  # a token at a time
            for t in range(T):
                logits = self.decoder.step(tokens[:, t], cache.positions[:, t], cache.keys, cache.values, t, None)
            cache.length = T
            return cache, logits
        if padded:  # causal and not padding; a pad query sees itself so no row is empty
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=tokens.device)
            cache.attn_mask = ((causal & valid[:, None, :]) | eye)[:, None]
        with autocast(self.device, self.dtype):
            logits = self.prefill_model(tokens, cache=cache)
        cache.length = T
        return cache, logits[:, -1]

    def _decode(self, cache: KVCache, last: torch.Tensor, padding, sampler: Sampler, active, steps):
        """Feed each row its newest token `last` (B,) and draw the next: `steps` times in one C call
        where the C decode step is loaded, once in PyTorch otherwise. `padding` (B, prompt width) bool
        or None says which prompt positions each row may see; `active` which rows still want tokens.
        Returns the tokens drawn, (B, n)."""
        if not self.decoder.native:
            return sampler.draw(self._step(cache, last, padding))[:, None]
        positions = cache.positions[:, -1] + 1
        done = torch.tensor([not still_going for still_going in active], dtype=torch.uint8)
        drawn = self.decoder.decode_tokens(
            sampler, last, positions, cache.keys, cache.values, cache.length, padding, done, steps
        )
        cache.length += drawn.size(0)
        cache.positions = positions[:, None] + (drawn.size(0) - 1)
        return drawn.t()

    def _step(self, cache: KVCache, token: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """One step: feed one token per row, return the logits for the next (`padding` as in `_decode`)."""
        cache.positions = cache.positions[:, -1:] + 1
        logits = self.decoder.step(token, cache.positions[:, 0], cache.keys, cache.values, cache.length, padding)
        cache.length += 1
        return logits


def with_matrices_in(model: GPT, dtype: torch.dtype) -> GPT:
    """A copy of `model` whose linear layers hold their weights in `dtype`, for a prefill under
    autocast to `dtype`: it computes exactly what the model does (autocast rounds the weights to the
    same values), without casting them on every pass. Embeddings and norms stay as they are, so a
    tied output head gets its own copy."""
    cast = copy.deepcopy(model)
    for module in cast.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
    return cast
