"""FLOP arithmetic for a structure: the ideal cost ratios SUBLLM is measured against.

docs/method.md section 1. A layer at a nesting level sees the fraction f of the tokens that every
enclosing S kept (f = product of their keep fractions). Per layer, with d = dim:
  linear    = 2 * (d * (d + 2 * kv_dim) + d * d + 3 * d * ffn) per token it sees
  attention = 2 * 2 * d per (query, key) pair: causal prefill over n tokens has n (n + 1) / 2
              pairs; one decode step at context L has L * f keys at that level.
The head (2 * d * vocab per token) always runs on every token; the embedding lookup is free.

`flops_between` and `keep_counts` do the same arithmetic on the realised per-level per-row lengths
of a KVCache (cache.snapshot()) instead of keep ratios: what a prefill or a run of decode steps
actually cost, and what each S actually kept (used by `subllm bench infer` and `generate --stats`).
"""

from __future__ import annotations

from subllm.config import ModelConfig, Sub
from subllm.inference.cache import layer_levels


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


# ---- realised costs from per-level per-row lengths (KVCache.snapshot()) -----------------------


def sub_parents(tree: tuple) -> dict[int, int]:
    """S index -> the level whose tokens enter it (0 = outside every bracket)."""
    out: dict[int, int] = {}

    def walk(nodes, level):
        for n in nodes:
            if isinstance(n, Sub):
                out[n.index] = level
                walk(n.children, n.index + 1)

    walk(tree, 0)
    return out


def flops_between(cfg: ModelConfig, before: list[list[int]], after: list[list[int]], head_tokens: int) -> int:
    """FLOPs to take the caches from per-level per-row lengths `before` to `after` (prefill:
    before = 0), computing `head_tokens` logits. A token appended at length j attends to j keys.
    Per layer and row, 2 * params FLOPs per token (linear) plus 4 * dim per (query, key) pair; the
    LM head 2 * dim * vocab per logit; S scores (2 * dim per token entering) and U + B (4 * dim per
    kept token); the embedding is a lookup (0 FLOPs)."""
    layer_level, _ = layer_levels(cfg.tree)
    lin, d = linear_flops_per_token(cfg), cfg.dim
    total = 0
    for lv in layer_level:
        for b0, b1 in zip(before[lv], after[lv]):
            total += (b1 - b0) * lin + 4 * d * (b1 * (b1 + 1) - b0 * (b0 + 1)) // 2
    for i, parent in sub_parents(cfg.tree).items():
        entered = sum(after[parent]) - sum(before[parent])
        kept = sum(after[i + 1]) - sum(before[i + 1])
        total += 2 * d * entered + 4 * d * kept  # score; U + B
    return total + head_tokens * 2 * d * cfg.vocab_size


def keep_counts(cfg: ModelConfig, before: list[list[int]], after: list[list[int]]) -> list[tuple[int, int]]:
    """(kept, entered) per S in structure order, rows pooled, for the tokens appended between the
    per-level lengths `before` and `after`: entered = tokens that reached the level S reads,
    kept = tokens that reached the level inside S."""
    out = []
    for i, parent in sorted(sub_parents(cfg.tree).items()):
        entered = sum(after[parent]) - sum(before[parent])
        out.append((sum(after[i + 1]) - sum(before[i + 1]), entered))
    return out


def keep_fractions(cfg: ModelConfig, before: list[list[int]], after: list[list[int]]) -> list[float]:
    """kept / entered per S (`keep_counts`); NaN where no token entered."""
    return [k / n if n else float("nan") for k, n in keep_counts(cfg, before, after)]


def decode_ideal_speedup(cfg: ModelConfig, before: list[list[int]], after: list[list[int]]) -> float:
    """FLOPs of the same-size LLaMA over FLOPs of this SUBLLM for the decode steps that took the
    cache from `before` to `after` (one logit per token decoded). LLaMA holds every token at its one
    level, i.e. SUBLLM's level 0."""
    n_dec = sum(after[0]) - sum(before[0])
    llama = flops_between(cfg.as_llama(), before[:1], after[:1], n_dec)
    return llama / flops_between(cfg, before, after, n_dec)
