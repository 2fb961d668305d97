"""The transformer: a decoder-only GPT that computes next-token logits, and nothing else.

Design decisions (each one is what makes small models train better, and each maps weight for
weight onto Hugging Face's Qwen3 architecture, so an export needs no retraining):
- Rotary position embeddings (RoPE, Llama's "rotate half" layout) instead of learned positions:
  attention depends only on relative distance, which generalises better and lets the generation
  engine keep a rolling cache past the context (each token attends to the newest `context`).
- RMSNorm before each sub-block (pre-norm), with a learned scale: cheaper than LayerNorm and just
  as good; pre-norm keeps gradients healthy without warm-up tricks.
- QK norm: an RMSNorm on each head's queries and keys before RoPE (as in Qwen3). It bounds the
  attention logits, so higher learning rates (and Muon) stay stable.
- SwiGLU MLP (gate, up, down projections): the gated MLP of Llama and Qwen; it beats a plain
  GELU MLP at equal parameter count. (Squared ReLU is as good, but no standard HF model uses it.)
- No biases anywhere: they cost time and do not help at this scale.
- Grouped-query attention is available (`n_kv_head < n_head`) to shrink the KV cache.
- Residual dropout (off by default) for runs that see their data many times; Qwen3 has no such
  layer, which is fine: dropout is training-only and the exported model computes the same thing.
  On a CPU its masks are cheaper than PyTorch's (model/dropout.py): random bytes in eager steps,
  a hash of the element's index that is never stored in compiled ones.
- Attention: `F.scaled_dot_product_attention`'s fused kernel, except in CPU training, where two
  batched matmuls and a softmax take about 10% off the step (`causal_attention`).
- In training under bf16 autocast the residual stream is bf16 too (the embedding's output is cast):
  the norms, residual adds, dropout and their backward read and write half the bytes, which takes
  3-7% off the compiled 5-minute step at the same loss per step (benchmarks/NOTES.md, "A bf16
  residual stream"). Scoring and generation keep it fp32.
- Module names follow Qwen3's (`embed_tokens`, `layers.N.self_attn.q_proj`, ...), so the weights
  file reads like theirs.

The model's shape (`ModelConfig`) lives in `model/config.py`, which the command line reads without torch.
The KV cache for generation lives in `model/engine.py`; this file only knows the cache interface:
`cache.update(layer, k, v) -> (k, v)` plus `cache.positions` and `cache.attn_mask` for the call.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.dropout import cheap_dropout, dropout_seeds


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


class Rotary(nn.Module):
    """cos/sin tables for RoPE; positions beyond the table are computed on demand."""

    def __init__(self, head_dim: int, theta: float, length: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(length)

    def _build(self, length: int) -> None:
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=self.inv_freq.device), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim), Llama's rotate-half layout
        self.cos, self.sin = angles.cos(), angles.sin()

    def prefix(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions 0..length-1 (the training path: no lookup, no host sync)."""
        if length > self.cos.size(0):
            self._build(length)
        if self.cos.device != self.inv_freq.device:
            self.cos, self.sin = self.cos.to(self.inv_freq.device), self.sin.to(self.inv_freq.device)
        return self.cos[:length], self.sin[:length]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos, sin broadcastable to (B, heads, T, head_dim)."""
        if int(positions.max()) >= self.cos.size(0):
            self._build(2 * int(positions.max()) + 1)
        if self.cos.device != positions.device:
            self.cos, self.sin = self.cos.to(positions.device), self.sin.to(positions.device)
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 2:  # per-row positions: (B, T, D) -> (B, 1, T, D)
            return cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


MATMUL_ATTENTION_MAX_T = 1024  # beyond this the T x T scores outweigh the CPU kernel's slowness


def fused_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused kernel for causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of q (B, H, T, D) over k, v (B, Hkv, T, D): the training and scoring path.

    On a GPU, and for long sequences anywhere, this is the fused kernel (it never stores the T x T
    scores). On a CPU at training lengths it is two batched matmuls and a softmax, with the causal
    mask and the 1/sqrt(D) scale folded into the first (`baddbmm`): PyTorch's CPU flash-attention
    kernel is slow in the backward pass, and the matmul form takes the default model's training
    step from 678 to 609 ms (`python -m benchmarks.step --compare attention`, benchmarks/NOTES.md
    has the runs). Under bf16 autocast the scores and their softmax are bf16 (the tuning runs
    scored the same). The scores cost B x H x T x T values of memory per layer, which is why long
    sequences keep the fused kernel.
    """
    B, H, T, D = q.shape
    if q.device.type != "cpu" or T > MATMUL_ATTENTION_MAX_T:
        return fused_causal_attention(q, k, v)
    if k.size(1) != H:  # grouped-query attention: each key/value head serves H / Hkv query heads
        k, v = k.repeat_interleave(H // k.size(1), dim=1), v.repeat_interleave(H // v.size(1), dim=1)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    mask = torch.zeros(T, T, dtype=q.dtype, device=q.device).masked_fill(future, float("-inf"))
    scores = torch.baddbmm(
        mask.expand(B * H, T, T), q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2), alpha=D**-0.5
    )
    return (torch.softmax(scores, dim=-1) @ v.reshape(B * H, T, D)).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        if cache is None:
            y = causal_attention(q, k, v)
        else:
            k, v = cache.update(self.layer, k, v)  # all cached keys/values so far, (B, Hkv, Tk, D)
            mask = cache.attn_mask
            causal = mask is None and T > 1
            gqa = self.n_kv_head != self.n_head
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None, seeds=(None, None)):
        """`seeds`: the two dropout masks' seeds when compiled on a CPU (model/dropout.py), else Nones."""
        drop = self.dropout if self.training else 0.0
        attn_seed, mlp_seed = seeds
        x = x + cheap_dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache), drop, attn_seed)
        return x + cheap_dropout(self.mlp(self.post_attention_layernorm(x)), drop, mlp_seed)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.context)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled down by depth, norms at 1."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=residual_std)
            else:
                nn.init.normal_(param, std=0.02)

    def set_dropout(self, dropout: float) -> None:
        """Change the training-time dropout (a run started from a checkpoint chooses its own)."""
        self.config.dropout = dropout
        for block in self.layers:
            block.dropout = dropout

    def num_parameters(self, include_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if include_embedding else total - self.embed_tokens.weight.numel()

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): `ModelConfig.flops_per_token`."""
        return self.config.flops_per_token()

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache=None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab), or the cross-entropy loss when targets are given.

        `reduction="none"` returns the per-token loss (B, T); targets of -1 are ignored.
        """
        B, T = idx.shape
        cos, sin = self.rotary.prefix(T) if cache is None else self.rotary(cache.positions)
        x = self.embed_tokens(idx)  # (B, T, C)
        if self.training and torch.is_autocast_enabled(x.device.type):  # train with a bf16 residual stream
            x = x.to(torch.get_autocast_dtype(x.device.type))  # (the module docstring)
        seeds = dropout_seeds(2 * len(self.layers), x.device) if self.training and self.config.dropout else None
        pairs = [(None, None)] * len(self.layers) if seeds is None else seeds.view(-1, 2)
        for block, pair in zip(self.layers, pairs, strict=True):
            x = block(x, cos, sin, cache, pair)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x).float()  # (B, T, vocab)
        logits = self.lm_head(x).float()
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction
        )
        return loss if reduction == "mean" else loss.view(B, T)
