"""`subllm info`: a preset's size, structure, keep ratios and ideal cost ratios vs its LLaMA."""

from __future__ import annotations

from subllm.config import PRESETS, get_preset


def add_arguments(p) -> None:
    p.add_argument("preset", nargs="?", default="subllm-small", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--seq-len", type=int, nargs="+", default=[1024, 2048, 4096, 8192])


def run(args) -> None:
    import torch

    from subllm.flops import flops, ideal_speedup, kv_cache_ratio, layer_fractions
    from subllm.model.subllm import SubLLM

    cfg = get_preset(args.preset)
    with torch.device("meta"):
        n = SubLLM(cfg).num_params()
    print(
        f"{args.preset}: {n / 1e6:.2f}M parameters, structure {cfg.structure}, keep ratios {cfg.keep_ratios}"
    )
    fr = layer_fractions(cfg)
    lin = sum(fr) / len(fr)
    attn = sum(f * f for f in fr) / len(fr)
    print(
        f"token-weighted linear work {lin:.1%} of LLaMA's, quadratic attention {attn:.1%}, "
        f"KV-cache entries {kv_cache_ratio(cfg):.1%}"
    )
    print(f"{'T':>7} {'prefill ideal':>14} {'decode ideal':>13} {'attention share (LLaMA)':>24}")
    for T in args.seq_len:
        f = flops(cfg.as_llama(), T)
        print(
            f"{T:>7} {ideal_speedup(cfg, T):>13.3f}x {ideal_speedup(cfg, T, mode='decode'):>12.3f}x "
            f"{f['attention'] / f['total']:>23.1%}"
        )
