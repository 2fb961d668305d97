"""The one-token decode step, rewritten for speed: what makes batch-1 generation fast on a CPU.

Generating one token at batch 1 is a chain of matrix-vector products, and on a CPU it is bound by
memory traffic and per-operation overhead, not arithmetic. `GPT.forward` spends most of its time per
token on the overhead of its many small operations. This module computes the same function as
`model/gpt.py` for one new position per row, with three changes:

- Fused, transposed weights: q/k/v are one matrix and gate/up are one, stored input-major, so each
  layer is four `x @ W` products over contiguous memory.
- Fewer, cheaper operations: norm scales and the attention's 1/sqrt(d) are folded into the weights,
  each RMSNorm divides by the vector's length, with its epsilon added under the root by `hypot`
  (the norm's sqrt(width) goes into the weights too), the q and k norms and the rotary embedding
  run once over the stacked q and k heads, attention for one query is two small matmuls and a
  softmax, and residual additions are fused into the matmul (`addmm`).
- On a CPU, the whole step is one call into `model/decode_step.c` (built by `model/native.py`),
  which removes the per-operation overhead altogether; `decode_tokens` makes a run of steps, each
  followed by its draw (model/sampling.py), in one call. With `int8_weights` its matrices are stored
  as int8 with one scale per output row: a quarter of the memory each token streams in fp32, at a
  cost too small to see in bits per byte (benchmarks/NOTES.md, "Int8 weights for the decode
  step"). Without a C compiler the PyTorch step below runs instead (fp32 weights: at batch 1,
  lower precision buys PyTorch no speed on a CPU).

The PyTorch step runs on a single intra-op thread (see `single_thread` below): with two threads
the synchronisation per small GEMV costs more than the second core gives. The C step is one
thread of its own (two were tried: benchmarks/NOTES.md). Both steps are tested
against `GPT.forward` (tests/test_model.py), which stays the reference implementation.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

import torch
import torch.nn.functional as F

from model import native
from model.gpt import GPT

KV_DTYPES = (torch.float32, torch.bfloat16)  # what the C step's key/value cache may hold


class FusedDecoder:
    """Weights of a GPT rearranged for decoding, and the step that uses them (no autograd)."""

    @torch.no_grad()
    def __init__(self, model: GPT, int8_weights: bool = False, use_c: bool = True):
        c = model.config
        self.config = c
        self.layers = []

        def folded(norm: torch.Tensor, *linears: torch.nn.Linear) -> torch.Tensor:
            """rms(x) * norm @ W.T == x / |x| @ (W * norm * sqrt(C)).T: the norm folded into the matrix, input-major."""
            return (torch.cat([m.weight for m in linears]) * norm * norm.numel() ** 0.5).float().t().contiguous()

        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            # The attention's 1/sqrt(d) cancels the q norm's sqrt(d); the k norm keeps its own.
            q_scale, k_scale = attn.q_norm.weight, attn.k_norm.weight * c.head_dim**0.5
            qk_norm = torch.cat([q_scale.expand(c.n_head, -1), k_scale.expand(c.n_kv_head, -1)])
            self.layers.append(
                dict(
                    qkv=folded(block.input_layernorm.weight, attn.q_proj, attn.k_proj, attn.v_proj),
                    qk_norm=qk_norm.float()[:, None, :].contiguous(),  # (n_head + n_kv_head, 1, head_dim)
                    o=attn.o_proj.weight.float().t().contiguous(),
                    gate_up=folded(block.post_attention_layernorm.weight, mlp.gate_proj, mlp.up_proj),
                    down=mlp.down_proj.weight.float().t().contiguous(),
                )
            )
        self.embed = model.embed_tokens.weight.detach().float()
        self.floor = torch.tensor((c.n_embd * c.norm_eps) ** 0.5, device=self.embed.device)  # see _unit
        self.head_floor = torch.tensor((c.head_dim * c.norm_eps) ** 0.5, device=self.embed.device)
        self.head = folded(model.norm.weight, model.lm_head)
        self.rotary = model.rotary
        half = c.head_dim // 2  # rotate_half(x) == roll(x, half) * sign, sign = (-1.. , +1..)
        self.sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(self.embed.device)
        self.native = native.load() if use_c and self.embed.device.type == "cpu" else None
        if self.native:
            self._bind_native(model, int8_weights)

    def _bind_native(self, model: GPT, int8: bool) -> None:
        """Describe these weights to decode_step.c, which reads them where they are.

        With `int8` each matrix is replaced by an int8 copy, output-major, and one scale per output
        (the PyTorch step above never runs once the C one is bound, so the fp32 ones need not stay).
        """
        c = self.config
        if int8:
            for layer in self.layers:
                for name in ("qkv", "o", "gate_up", "down"):
                    layer[name] = quantized(layer[name])
            self.head = quantized(self.head)
        self.inv_freq = model.rotary.inv_freq.float().contiguous()

        def described(matrix: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> native.Matrix:
            values, scales = matrix if isinstance(matrix, tuple) else (matrix, None)
            return native.Matrix(values.data_ptr(), None if scales is None else scales.data_ptr())

        def per_layer(name: str) -> ctypes.Array:
            return (native.Matrix * c.n_layer)(*(described(layer[name]) for layer in self.layers))

        qk_norms = (ctypes.c_void_p * c.n_layer)(*(layer["qk_norm"].data_ptr() for layer in self.layers))
        self._native_model = native.Model(
            c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.mlp_hidden, c.vocab_size, c.context,
            float(self.floor), float(self.head_floor), self.embed.data_ptr(), self.inv_freq.data_ptr(),
            per_layer("qkv"), qk_norms, *(per_layer(name) for name in ("o", "gate_up", "down")), described(self.head),
        )  # fmt: skip
        self._native_model_ref = ctypes.byref(self._native_model)

    @staticmethod
    def _unit(x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its sqrt(width), which the weights carry: x / sqrt(|x|^2 + width * eps)."""
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), floor)

    def step(
        self, token: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, mask
    ) -> torch.Tensor:
        """token, positions (B,) -> logits (B, vocab) of the next token.

        keys/values (n_layer, B, n_kv_head, context, head_dim) are a ring (decode_step.c): `length`
        positions have entered it, this step writes position `length` into slot length % context and
        attends to every filled slot. `mask` (B, mask_len <= context) bool or None says which of the
        first mask_len positions each row may see (a left-padded prompt); later ones are all seen.
        No autograd here (the weights are detached copies), and no `inference_mode` wrapper either:
        entering it costs about 10 us a token, and the engine calls this inside its own.
        """
        if self.native:
            return self._native_step(token, positions, keys, values, length, mask)
        c = self.config
        B, H, Hkv, D = token.size(0), c.n_head, c.n_kv_head, c.head_dim
        cos, sin = self.rotary(positions[:, None])  # (B, 1, 1, D)
        sin = sin * self.sign
        x = self.embed[token]  # (B, C)
        slot, filled = length % c.context, min(length + 1, c.context)
        if mask is not None:  # per slot: a masked position stays masked until a later one overwrites it
            seen = torch.ones(B, filled, dtype=torch.bool, device=mask.device)
            seen[:, : mask.size(1)] = mask | (torch.arange(mask.size(1), device=mask.device) <= length - c.context)
            mask = seen[:, None, None, :]
        for i, w in enumerate(self.layers):
            qkv = self._unit(x, self.floor) @ w["qkv"]
            qk = self._unit(qkv[:, : (H + Hkv) * D].view(B, H + Hkv, 1, D), self.head_floor) * w["qk_norm"]
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)  # rotary embedding
            keys[i, :, :, slot] = qk[:, H:, 0]
            values[i, :, :, slot] = qkv[:, (H + Hkv) * D :].view(B, Hkv, D)
            q = qk[:, :H].reshape(B, Hkv, H // Hkv, D)  # query heads grouped by the key/value head they share
            scores = q @ keys[i, :, :, :filled].transpose(-1, -2)  # (B, Hkv, H/Hkv, filled)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores, dim=-1) @ values[i, :, :, :filled]
            x = torch.addmm(x, y.view(B, H * D), w["o"])
            gate, up = (self._unit(x, self.floor) @ w["gate_up"]).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, w["down"])
        return self._unit(x, self.floor) @ self.head

    def _native_step(self, token, positions, keys, values, length: int, mask) -> torch.Tensor:
        """The same step in C: one call, no per-operation overhead (model/decode_step.c)."""
        B, c = token.size(0), self.config
        self._check_cache(keys, values, B, positions)
        token, positions = token.long().contiguous(), positions.long().contiguous()
        mask = None if mask is None else mask.contiguous()  # bool: one byte, 0 or 1, as C reads it
        logits = torch.empty(B, c.vocab_size)
        status = self.native.decode_step(
            self._native_model_ref, token.data_ptr(), positions.data_ptr(), B, keys.data_ptr(), values.data_ptr(),
            int(keys.dtype == torch.bfloat16), length, None if mask is None else mask.data_ptr(),
            0 if mask is None else mask.size(1), logits.data_ptr(),
        )  # fmt: skip
        if status == -2:
            raise IndexError(
                f"decode step: a token id is outside the vocabulary, or the length {length} or the mask is out of range"
            )
        if status != 0:
            raise MemoryError("the C decode step could not allocate its scratch memory")
        return logits

    def _check_cache(self, keys, values, rows: int, positions) -> None:
        """Refuse what decode_step.c would index out of bounds."""
        c = self.config
        shape = (c.n_layer, rows, c.n_kv_head, c.context, c.head_dim)  # the layout decode_step.c indexes
        if not (keys.is_contiguous() and values.is_contiguous() and keys.dtype == values.dtype in KV_DTYPES):
            raise ValueError("the C decode step needs contiguous keys and values, both fp32 or both bf16")
        if keys.shape != shape or values.shape != shape or positions.numel() != rows:
            raise ValueError(f"the C decode step needs keys and values of shape {shape} and one position per row")

    def decode_tokens(self, sampler, last, positions, keys, values, length: int, mask, done, count: int):
        """`count` steps of generation in one C call (decode_step.c's `decode_tokens`), each a step that
        feeds every row its newest token and a draw of its next one by `sampler` (model/sampling.py).

        last, positions (B,): the newest tokens, not yet in the cache, and their rotary positions;
        `length` positions have entered the cache (a ring, see `step`); mask (B, mask_len <= context)
        bool or None masks the first of them.
        done (B,) uint8 marks rows that need no more tokens, and is updated: the call ends early once
        every row has drawn a stop token. Returns the tokens drawn, (steps, B).
        """
        B = last.size(0)
        self._check_cache(keys, values, B, positions)
        if not (done.dtype == torch.uint8 and done.is_contiguous() and done.numel() == B):
            raise ValueError("the C decode loop needs `done` as contiguous uint8, one flag per row")
        u = sampler.uniforms(count, B)
        drawn = torch.empty(count, B, dtype=torch.long)
        mask = None if mask is None else mask.contiguous()  # bool: one byte, 0 or 1, as C reads it
        last, positions = last.long().contiguous(), positions.long().contiguous()
        steps = self.native.decode_tokens(
            self._native_model_ref, ctypes.byref(sampler.native), last.data_ptr(), positions.data_ptr(), B,
            keys.data_ptr(), values.data_ptr(), int(keys.dtype == torch.bfloat16), length,
            None if mask is None else mask.data_ptr(), 0 if mask is None else mask.size(1),
            sampler.stop_flags.data_ptr(), done.data_ptr(), count, u.data_ptr(), drawn.data_ptr(),
        )  # fmt: skip
        if steps == -2:
            raise IndexError("decode: a token id is outside the vocabulary, or the length or the mask is out of range")
        if steps < 0:
            raise MemoryError("the C decode step could not allocate its scratch memory")
        return drawn[:steps]


def quantized(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An input-major fp32 matrix (in, out) as int8 values (out, in) and one fp32 scale per output:
    matrix[i, o] ~ scales[o] * values[o, i], each row rounded to 255 levels of its largest |weight|."""
    rows = matrix.t()
    scales = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    values = (rows / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return values.contiguous(), scales.contiguous()


_threads_lock = threading.Lock()
_threads_users = 0
_threads_before = 0


@contextlib.contextmanager
def single_thread():
    """Run torch ops on one intra-op thread inside the block; safe when several threads use it."""
    global _threads_users, _threads_before
    with _threads_lock:
        if _threads_users == 0:
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_before)
