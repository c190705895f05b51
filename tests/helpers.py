"""Shared test helpers: tiny models whose scores give a real mix of kept and dropped tokens."""

import torch

from subllm import ModelConfig, SubLLM


def tiny_config(structure="TT(T(TT)T)T", keep_ratio=0.6, **kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=256)
    return ModelConfig(structure=structure, keep_ratio=keep_ratio, **{**base, **kw})


def tiny_model(structure="TT(T(TT)T)T", keep_ratio=0.6, score_scale=40.0, seed=0, **kw) -> SubLLM:
    """Random tiny model; score weights scaled up so scores are O(1) and about half are positive."""
    torch.manual_seed(seed)
    m = SubLLM(tiny_config(structure, keep_ratio, **kw))
    with torch.no_grad():
        for s in m.subsamples:
            s.score.weight.mul_(score_scale)
    return m.eval()
