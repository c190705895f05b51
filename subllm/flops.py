"""FLOP arithmetic for a structure: the ideal cost ratios SUBLLM is measured against.

docs/method.md section 1. A layer at a nesting level sees the fraction f of the tokens that every
enclosing S kept (f = product of their keep fractions). Per layer, with d = dim:
  linear    = 2 * (d * (d + 2 * kv_dim) + d * d + 3 * d * ffn) per token it sees
  attention = 2 * 2 * d per (query, key) pair: causal prefill over n tokens has n (n + 1) / 2
              pairs; one decode step at context L has L * f keys at that level.
The head (2 * d * vocab per token) always runs on every token; the embedding lookup is free.
"""

from __future__ import annotations

from subllm.config import ModelConfig, Sub


def linear_flops_per_token(cfg: ModelConfig) -> int:
    """2 * (weights of one layer): qkv, output projection, SwiGLU (gate, up, down)."""
    d, kv = cfg.dim, cfg.n_kv_heads * cfg.head_dim
    return 2 * (d * (d + 2 * kv) + d * d + 3 * d * cfg.ffn_dim)


def layer_fractions(cfg: ModelConfig, fractions: list[float] | None = None) -> list[float]:
    """Fraction of the full sequence each layer sees, in layer order."""
    fr = cfg.keep_ratios if fractions is None else list(fractions)
    out: list[float] = []

    def walk(nodes, f):
        for n in nodes:
            if isinstance(n, Sub):
                walk(n.children, f * fr[n.index])
            else:
                out.append(f)

    walk(cfg.tree, 1.0)
    return out


def flops(cfg: ModelConfig, T: int, fractions: list[float] | None = None, mode: str = "prefill") -> dict:
    """Forward FLOPs: for a whole sequence of T tokens ("prefill", training costs ~3x this) or for
    one new token at context length T ("decode"). Returns linear, attention, head and total."""
    d, lin = cfg.dim, linear_flops_per_token(cfg)
    linear = attention = 0.0
    for f in layer_fractions(cfg, fractions):
        n = T * f
        if mode == "prefill":
            linear += n * lin
            attention += 4 * d * n * (n + 1) / 2
        elif mode == "decode":
            linear += f * lin  # the new token reaches this layer with probability f
            attention += f * 4 * d * n
        else:
            raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}")
    head = 2 * d * cfg.vocab_size * (T if mode == "prefill" else 1)
    return dict(linear=linear, attention=attention, head=head, total=linear + attention + head)


def ideal_speedup(
    cfg: ModelConfig, T: int, fractions: list[float] | None = None, mode: str = "prefill"
) -> float:
    """FLOPs of the same-size LLaMA over FLOPs of this SUBLLM: the best possible speed-up."""
    return flops(cfg.as_llama(), T, mode=mode)["total"] / flops(cfg, T, fractions, mode)["total"]


def kv_cache_ratio(cfg: ModelConfig, fractions: list[float] | None = None) -> float:
    """KV-cache entries relative to LLaMA: mean over layers of the fraction each layer caches."""
    fr = layer_fractions(cfg, fractions)
    return sum(fr) / len(fr)
