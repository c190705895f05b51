"""Scores are computed in fp32 under bf16 autocast (docs/method.md sections 2-3: the top-k and the
s > theta decisions must not depend on bf16 rounding), in training, prefill and cached decode."""

import pytest
import torch
from helpers import tiny_model

from subllm.inference.engine import decode_step, new_cache, prefill
from subllm.model.subsample import ScoreLinear


def _fp32_scores(sub, x):
    """The obviously-correct slow path: fp64 arithmetic on the fp32 input, rounded to fp32."""
    xd = x.double()
    if sub.score.norm:
        xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + sub.score.eps)
    return (xd @ sub.score.weight.detach().double()[0]).float()


def _rel_err(s, want) -> float:
    return float(((s.detach() - want).abs() / (1 + want.abs())).max())


@pytest.mark.parametrize("norm", [False, True])
def test_scores_fp32_under_autocast(norm):
    torch.manual_seed(0)
    model = tiny_model(score_norm=norm)
    sub = model.subsamples[0]
    x = torch.randn(2, 64, 32) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = sub.scores(x)
        bf16 = ScoreLinear.forward(sub.score, x.bfloat16()).float()[..., 0]  # what bf16 would give
    assert s.dtype == torch.float32
    want = _fp32_scores(sub, x)
    assert _rel_err(s, want) < 5e-5  # fp32 rounding (bf16: ~1e-2)
    assert _rel_err(bf16, want) > 1e-3  # what the bf16 Linear gave: the decisions' inputs moved


def _capture_inputs(model):
    seen = []
    for sub in model.subsamples:
        sub.register_forward_pre_hook(lambda m, a: seen.append((m, a[0].detach())))
    return seen


@pytest.mark.parametrize("training", [True, False])
def test_model_selection_uses_fp32_scores_under_autocast(training):
    model = tiny_model().train(training)
    model.set_step(0)
    seen = _capture_inputs(model)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sels = model(ids, return_selections=True).selections
    assert len(seen) == 2
    for (sub, x), sel in zip(seen, sels):
        assert _rel_err(sel.scores, _fp32_scores(sub, x.float())) < 5e-5


@torch.no_grad()
def test_cached_decode_scores_fp32_under_autocast():
    model = tiny_model().eval()
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    calls = []
    real = type(model.subsamples[0]).scores

    def spy(self, x):
        s = real(self, x)
        calls.append((s.dtype, _rel_err(s, _fp32_scores(self, x.float()))))
        return s

    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = new_cache(model, 1)
        prefill(model, ids, None, cache)
        type(model.subsamples[0]).scores = spy
        try:
            decode_step(model, cache, torch.tensor([5]))
        finally:
            type(model.subsamples[0]).scores = real
    assert calls and all(d == torch.float32 and err < 5e-5 for d, err in calls)
