"""The one-token decode step, rewritten for speed: what makes batch-1 generation fast on a CPU.

Generating one token at batch 1 is a chain of matrix-vector products, and on a CPU it is bound by
memory traffic and per-operation overhead, not arithmetic. Measured on the 2-core reference machine
with the default model, `GPT.forward` needs about 2.7 ms per token, although its weights (17 MB)
stream from memory in under 0.4 ms. This module computes the same function as `model/gpt.py` for
one new position per row, with three changes:

- Fused, transposed weights: q/k/v are one matrix and gate/up are one, stored input-major, so each
  layer is four `x @ W` calls on contiguous memory (the layout MKL's GEMV streams fastest).
- Fewer, cheaper operations: norm scales and the attention's 1/sqrt(d) are folded into the weights,
  each RMSNorm divides by the vector's length, with its epsilon added under the root by `hypot`
  (three operations instead of five; the norm's sqrt(width) goes into the weights too),
  the q and k norms and the rotary embedding run once over the stacked q and k heads, attention
  for one query is two small matmuls and a softmax (the fused attention kernel costs more than it
  saves at this size), and residual additions are fused into the matmul (`addmm`).
- fp32 throughout: at batch 1 bf16 buys no speed on CPU (conversion costs what it saves) and fp32
  is closer to the trained model's master weights.

The engine decodes with a single intra-op thread (see `single_thread` below): with two threads
the synchronisation per small GEMV costs more than the second core gives. Correctness is tested
against `GPT.forward` (tests/test_model.py), which stays the reference implementation.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from model.gpt import GPT


class FusedDecoder:
    """Weights of a GPT rearranged for decoding, and the step that uses them (no autograd)."""

    @torch.no_grad()
    def __init__(self, model: GPT):
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

    @staticmethod
    def _unit(x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its sqrt(width), which the weights carry: x / sqrt(|x|^2 + width * eps)."""
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), floor)

    @torch.inference_mode()
    def step(
        self, token: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, mask
    ) -> torch.Tensor:
        """token, positions (B,) -> logits (B, vocab) of the next token.

        keys/values (n_layer, B, n_kv_head, context, head_dim) hold `length` filled positions; this
        step writes position `length` and attends to 0..length. `mask` (B, 1, 1, length + 1) bool or None.
        """
        c = self.config
        B, H, Hkv, D = token.size(0), c.n_head, c.n_kv_head, c.head_dim
        cos, sin = self.rotary(positions[:, None])  # (B, 1, 1, D)
        sin = sin * self.sign
        x = self.embed[token]  # (B, C)
        for i, w in enumerate(self.layers):
            qkv = self._unit(x, self.floor) @ w["qkv"]
            qk = self._unit(qkv[:, : (H + Hkv) * D].view(B, H + Hkv, 1, D), self.head_floor) * w["qk_norm"]
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)  # rotary embedding
            keys[i, :, :, length] = qk[:, H:, 0]
            values[i, :, :, length] = qkv[:, (H + Hkv) * D :].view(B, Hkv, D)
            q = qk[:, :H].reshape(B, Hkv, H // Hkv, D)  # query heads grouped by the key/value head they share
            scores = q @ keys[i, :, :, : length + 1].transpose(-1, -2)  # (B, Hkv, H/Hkv, length + 1)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores, dim=-1) @ values[i, :, :, : length + 1]
            x = torch.addmm(x, y.view(B, H * D), w["o"])
            gate, up = (self._unit(x, self.floor) @ w["gate_up"]).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, w["down"])
        return self._unit(x, self.floor) @ self.head


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
