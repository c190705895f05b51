"""The LLaMA building blocks: RMSNorm, RoPE at explicit positions, GQA attention, SwiGLU, Block.

docs/method.md sections 1 and 6. Pre-norm, no biases; RoPE rotates the whole head with the
half-split (`rotate_half`) convention of Hugging Face Llama, at whatever positions it is given -
for a kept token inside a subsampling module that is its ORIGINAL position in the full sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from subllm.config import ModelConfig
from subllm.model import rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(
    positions: Tensor,
    head_dim: int,
    theta: float,
    scaling: dict | None = None,
    seq_len: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T), computed in fp32: the one
    place that turns positions into rotations. `scaling`: ModelConfig.rope_scaling (subllm/model/
    rope.py; yarn's attention factor multiplies cos and sin, as in HF); `seq_len` (B,): each row's
    full-sequence length, read only by "dynamic" scaling."""
    inv_freq, attention_factor = rope.inv_freq(head_dim, theta, scaling, seq_len, positions.device)
    if inv_freq.dim() == 2:  # dynamic: one set of frequencies per row
        freqs = positions.float()[..., None] * inv_freq[:, None, :]  # (B, T, head_dim/2)
    else:
        freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    if attention_factor == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, hd), cos/sin (B, T, hd) -> x rotated, in x's dtype."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention through SDPA. `qkv` and `attend` are separate so that a KV cache
    can sit between them (subllm/inference/cache.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv = cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, cfg.dim + 2 * kv, bias=False)  # fused q, k, v projections
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) -> q (B, H, T, hd), k and v (B, Hkv, T, hd); q and k rotated."""
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], -1)
        q = q.view(B, T, self.n_heads, hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        """q (B, H, Tq, hd), k/v (B, Hkv, Tk, hd), mask (B, 1, Tq, Tk) bool or None -> (B, Tq, C)."""
        gqa = self.n_kv_heads != self.n_heads
        if k.dtype != q.dtype:  # a cache kept in fewer bytes (engine.py set_kv_dtype)
            k, v = k.to(q.dtype), v.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        return self.out(o)

    def out(self, o: Tensor) -> Tensor:
        """Per-head outputs (B, H, T, hd) -> the output projection (B, T, C)."""
        B, _, T, _ = o.shape
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self.qkv(x, cos, sin)
        return self.attend(q, k, v, mask, is_causal=mask is None)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn_dim = cfg.ffn_dim
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # fused gate (w1) and up (w3)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.ffn_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm transformer layer (a `T` of the structure string)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.ffn(self.ffn_norm(x))
