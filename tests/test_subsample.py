"""S, U, B and the schedules in isolation (docs/method.md sections 2-5, 7)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from subllm.config import SELECTION_RECIPES
from subllm.model.scaling import ScheduledFloat, balance, limit_param_value
from subllm.model.subsample import (
    Bypass,
    gather_tokens,
    select_threshold,
    select_topk,
    upsample,
    upsample_bypass,
)


def test_upsample_all_kept_weight_one_gives_h():
    x, h = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    idx = torch.arange(5).expand(2, 5)
    assert torch.equal(upsample(x, h, idx, torch.ones(2, 5)), h)


def test_bypass_nothing_kept_gives_x():
    x = torch.randn(2, 5, 3)
    byp = Bypass(3, ScheduledFloat((0, 0.9)))
    y = upsample(x, torch.randn(2, 0, 3), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0))
    assert torch.equal(y, x)
    assert torch.equal(byp.eval()(x, y), x)


def test_upsample_bypass_fused_equals_reference():
    x, h = torch.randn(3, 9, 4), torch.randn(3, 4, 4)
    idx = torch.stack([torch.randperm(9)[:4].sort().values for _ in range(3)])
    w, b = torch.rand(3, 4), torch.rand(4)
    ref = x + b * (upsample(x, h, idx, w) - x)
    got = upsample_bypass(x, gather_tokens(x, idx), h, idx, w, b)
    assert torch.allclose(got, ref, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 20), st.data())
def test_gather_upsample_roundtrip(B, T, data):
    """Upsampling the gathered tokens themselves (h = x[idx]) changes nothing, whatever w; and
    with w = 1 the kept positions hold h exactly while the others keep x."""
    x = torch.randn(B, T, 3)
    K = data.draw(st.integers(0, T))
    idx = torch.stack([torch.randperm(T)[:K].sort().values for _ in range(B)])
    xg = gather_tokens(x, idx)
    w = torch.rand(B, K)
    assert torch.allclose(upsample(x, xg, idx, w), x, atol=1e-6)
    h = torch.randn(B, K, 3)
    y = upsample(x, h, idx, torch.ones(B, K))
    assert torch.equal(gather_tokens(y, idx), h)
    kept = torch.zeros(B, T, dtype=torch.bool).scatter(1, idx, True)
    assert torch.equal(y[~kept], x[~kept])


def test_threshold_selection_ragged():
    s = torch.tensor([[0.5, -1.0, 2.0, 0.1], [-0.5, -1.0, 3.0, -0.2]])
    sel = select_threshold(s, None)
    assert sel.n_kept.tolist() == [3, 1]
    assert sel.idx[0].tolist() == [0, 2, 3] and sel.idx[1, 0].item() == 2
    assert sel.valid.tolist() == [[True, True, True], [True, False, False]]
    assert torch.allclose(sel.weight, torch.tensor([[0.5, 1.0, 0.1], [1.0, 0.0, 0.0]]))


def test_topk_subtraction_weights_by_hand():
    s = torch.tensor([[0.9, 0.2, 0.5, 1.5, -0.3, 0.4]], requires_grad=True)
    sel = select_topk(s, None, 0.5, flip=False)  # k = 3: kept 1.5, 0.9, 0.5; next block 0.4, 0.2, -0.3
    assert sel.idx.tolist() == [[0, 2, 3]]
    # in score order: 1->clamp(1.5)=1 - 0.4, clamp(0.9) - 0.2, clamp(0.5) - 0; then re-sorted by position
    assert torch.allclose(sel.weight, torch.tensor([[0.9 - 0.2, 0.5 - 0.0, 1.0 - 0.4]]))
    sel.weight.sum().backward()
    # kept scores inside (0, 1) are pushed up, their discarded partners inside (0, 1) pushed down
    assert s.grad.tolist() == [[1.0, -1.0, 1.0, 0.0, 0.0, -1.0]]
    flipped = select_topk(s.detach(), None, 0.5, flip=True)  # pairs 1.5<->-0.3, 0.9<->0.2, 0.5<->0.4
    assert torch.allclose(flipped.weight, torch.tensor([[0.9 - 0.2, 0.5 - 0.4, 1.0 - 0.0]]))


def _pairs_reference(s0, valid, ratio, flip):
    """Per row: [(kept position, partner position or None)] in score order, by hand."""
    out = []
    for b in range(s0.shape[0]):
        n = int(valid[b].sum()) if valid is not None else s0.shape[1]
        order = sorted(range(n), key=lambda t: -float(s0[b, t]))
        k = math.ceil(ratio * n - 1e-9)
        src = [k + (k - 1 - i if flip else i) for i in range(k)]
        out.append([(order[i], order[j] if j < n else None) for i, j in zip(range(k), src)])
    return out


@pytest.mark.parametrize("padded", [False, True])
def test_subtraction_variants_weights_and_gradients(padded):
    """SelectOptions.subtraction: "value" (the paper), "grad" and "straight" keep the same set;
    "grad" and "straight" weigh a kept token clamp(s, 0, 1) (the inference weight); "grad" has the
    paper's gradient, "straight" the pairwise gradient +c / -c even where the clamps saturate.
    Both select_topk branches (even and ragged) against a by-hand pairing."""
    torch.manual_seed(0)
    s0 = torch.rand(3, 11) * 1.8 - 0.4  # some scores saturate (> 1 or < 0)
    valid = torch.arange(11)[None, :] < torch.tensor([[11], [8], [5]]) if padded else None
    out = {}
    for mode in ("value", "grad", "straight"):
        s = s0.clone().requires_grad_(True)
        sel = select_topk(s, valid, 0.6, flip=True, subtraction=mode)
        c = torch.randn(sel.weight.shape, generator=torch.Generator().manual_seed(1))
        (sel.weight * c).sum().backward()
        out[mode] = sel, s.grad, c
    (paper, g_paper, c), (grad_only, g_grad, _), (straight, g_straight, _) = out.values()
    assert torch.equal(paper.idx, grad_only.idx) and torch.equal(paper.idx, straight.idx)
    ok = torch.ones_like(paper.weight, dtype=torch.bool) if paper.valid is None else paper.valid
    expected = (s0.gather(1, paper.idx).clamp(0, 1) * ok).detach()
    assert torch.allclose(grad_only.weight, expected) and torch.allclose(straight.weight, expected)
    assert not torch.allclose(paper.weight, expected)  # the paper's values differ: the test can fail
    assert torch.equal(g_paper, g_grad)
    ref = torch.zeros_like(s0)
    for b, pairs in enumerate(_pairs_reference(s0, valid, 0.6, flip=True)):
        slot = {int(p): i for i, p in enumerate(paper.idx[b]) if ok[b, i]}
        for kept, partner in pairs:
            ref[b, kept] += c[b, slot[kept]]
            if partner is not None:
                ref[b, partner] -= c[b, slot[kept]]
    assert torch.allclose(g_straight, ref)
    assert not torch.allclose(g_grad, ref)  # saturated scores: only "straight" passes their gradient


def test_topk_short_sequence_pads_block_with_zeros():
    s = torch.tensor([[0.8, 0.3, 0.6]])
    sel = select_topk(s, None, 0.9, flip=False)  # k = 3, no discarded block at all
    assert torch.allclose(sel.weight, torch.tensor([[0.8, 0.3, 0.6]]))


def test_scheduled_float():
    f = ScheduledFloat((0, 1.0), (8000, 0.25))
    assert f(0) == 1.0 and f(8000) == 0.25 and f(100000) == 0.25 and f(-5) == 1.0
    assert math.isclose(f(4000), 0.625)
    g = ScheduledFloat((0, 0.9), (20000, 0.2))
    assert math.isclose(g(10000), 0.55)


def test_balancer_forward_identity_and_direction():
    torch.manual_seed(0)
    for target, shift in [(0.64, -2.0), (0.64, 2.0)]:  # too few positive / too many positive
        s = (torch.randn(4000) + shift).requires_grad_(True)
        out = balance(s, target, None, prob=1.0)
        assert torch.equal(out, s)
        grad = 1e-3 * (torch.arange(4000) % 2 * 2 - 1).float()  # a task gradient with exactly zero mean
        out.backward(grad)
        # descent moves s by -grad: the mean moves toward the target's fraction positive
        mean_move = -s.grad.mean()
        assert (mean_move > 0) if shift < 0 else (mean_move < 0)
    s = torch.randn(100).requires_grad_(True)
    g = torch.randn(100)
    balance(s, 0.5, None, prob=0.0).backward(g)
    assert torch.equal(s.grad, g)  # not applied: gradient untouched


def test_balancer_inside_limits_changes_nothing():
    s = (torch.randn(20000) * 2.0 + 0.8 * 2.0 * 0.36).requires_grad_(True)  # ~64% positive, |s| ~1.8
    frac = (s > 0).float().mean().item()
    assert 0.6 < frac < 0.68
    g = torch.randn(20000)
    balance(s, 0.64, None, prob=1.0).backward(g)
    assert torch.allclose(s.grad, g)


def _balancer_reference(s, mask, grad, r, direct, grad_scale=0.04):
    """docs/method.md section 4, slowly, in float64, on the real scores only: l = the fraction term
    (|mu/sigma - clamp(mu/sigma, mean_lim(r - 0.05), mean_lim(r + 0.05))|, or with `direct` the
    counted fraction's sign times mean(s)) + |log(clamp(rms, 1.2533, 4 * 1.2533) / rms)|;
    g = dl/ds rescaled to RMS grad_scale over the real scores; new gradient grad + |grad| * g at
    real scores, grad unchanged at pads."""
    real = s.double()[mask].clone().requires_grad_(True)
    mu, u = real.mean(), real.pow(2).mean()
    sigma, rms = (u - mu * mu).sqrt(), u.sqrt()
    lo, hi = r - 0.05, r + 0.05
    if direct:
        frac = float((real > 0).double().mean())
        frac_term = ((frac > hi) - (frac < lo)) * mu
    else:
        lim_lo, lim_hi = (0.8139535143 * math.atanh(2 * p - 1) for p in (lo, hi))
        frac_term = (mu / sigma - (mu / sigma).clamp(lim_lo, lim_hi)).abs()
    rms_term = (rms.clamp(1.25331413732, 4 * 1.25331413732) / rms).log().abs()
    (g,) = torch.autograd.grad(frac_term + rms_term, real)
    want = grad.double().clone()
    if g.abs().max() > 0:
        g = g * grad_scale / g.pow(2).mean().sqrt()
        want[mask] = want[mask] + want[mask].abs() * g
    return want


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize(
    "mean, std, pushed",
    [(0.6, 0.3, True), (-6.0, 2.0, True), (2.0, 2.0, True), (0.18, 0.5, True), (0.64, 2.0, False)],
)  # too positive and too small; too negative and too large; only too positive; only too small; inside
def test_balancer_backward_equals_a_slow_reference_with_pads(mean, std, pushed, direct):
    """The whole backward of `balance` (statistics, rescaling, |grad| gate) on a padded batch whose
    pads would move every statistic (+10, and half a row) against the reference written out above."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(3, 40, generator=gen) * std + mean
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, :20] = False
    mask[2, :5] = False
    s[~mask] = 10.0
    grad = torch.randn(3, 40, generator=gen) * 1e-2
    x = s.clone().requires_grad_(True)
    balance(x, 0.64, mask, prob=1.0, direct=direct).backward(grad)
    want = _balancer_reference(s, mask, grad, 0.64, direct)
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=1e-9)
    assert ((x.grad - grad).abs().max() > 1e-4) == pushed


def test_limit_param_value_flips_outward_gradients():
    x = torch.tensor([0.1, 0.5, 1.2], requires_grad=True)
    torch.manual_seed(0)
    while True:  # applied with probability 0.6: draw until applied
        y = limit_param_value(x, 0.2, 1.0, prob=0.6)
        if y.grad_fn is not None:
            break
    y.backward(torch.tensor([1.0, 1.0, -1.0]))  # would push 0.1 down, 1.2 up
    assert x.grad.tolist() == [-1.0, 1.0, 1.0]
    assert limit_param_value(x, 0.2, 1.0, training=False) is x


@pytest.mark.parametrize("step, lo", [(0, 0.9), (10000, 0.55), (30000, 0.2)])
def test_bypass_limit_uses_schedule(step, lo):
    byp = Bypass(2, ScheduledFloat((0, 0.9), (20000, 0.2))).train()
    with torch.no_grad():
        byp.scale.copy_(torch.tensor([lo - 0.05, lo + 0.05]))
    torch.manual_seed(1)
    hits = 0
    for _ in range(20):
        byp.scale.grad = None
        byp.scale_value(step).backward(torch.tensor([1.0, 1.0]))
        hits += byp.scale.grad[0].item() < 0
        assert byp.scale.grad[1].item() == 1.0  # inside the limits: never flipped
    assert 5 <= hits <= 19  # flipped with probability 0.6 below the minimum


def _saturated_step(gate):
    """Scores all below 0 (every weight clamps to 0): one backward through Balancer + top-k."""
    torch.manual_seed(0)
    s = (torch.randn(4, 50) * 0.1 - 2.0).requires_grad_(True)
    out = balance(s, 0.64, None, prob=1.0, gate=gate)
    sel = select_topk(out, None, 0.64, flip=False)
    w = sel.weight if gate is None else gate.tap(sel.weight, sel.valid)
    (w * torch.linspace(-1.0, 1.0, w.numel()).view_as(w)).sum().backward()
    return s.grad


def test_balancer_weight_gate_moves_saturated_scores():
    """The paper's Balancer scales its push by |grad| per score, which is 0 when clamp(s, 0, 1)
    saturates: S stays off for good. The "weight" gate scales it by mean |dL/dw| instead."""
    from subllm.model.scaling import GradSize

    assert torch.equal(_saturated_step(None), torch.zeros(4, 50))
    g = _saturated_step(GradSize())
    assert bool((g != 0).all())
    assert -g.mean() > 0  # descent raises the scores toward 64% positive
    # nothing tapped (e.g. no weight needed a gradient): falls back to the elementwise |grad|
    s = torch.randn(100).requires_grad_(True)
    grad = torch.randn(100)
    balance(s, 0.5, None, prob=1.0, gate=GradSize()).backward(grad)
    s2 = s.detach().clone().requires_grad_(True)
    balance(s2, 0.5, None, prob=1.0).backward(grad)
    assert torch.equal(s.grad, s2.grad)


def test_score_norm_is_scale_invariant_and_plain_is_linear():
    from subllm.model.subsample import ScoreLinear

    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    plain, normed = ScoreLinear(16), ScoreLinear(16, norm=True)
    normed.weight.data.copy_(plain.weight.data)
    assert torch.allclose(plain(3.0 * x), 3.0 * plain(x), atol=1e-6)
    assert torch.allclose(normed(3.0 * x), normed(x), atol=1e-5)
    assert torch.allclose(normed(x), plain(x / x.pow(2).mean(-1, keepdim=True).sqrt()), atol=1e-5)


def test_bypass_off_is_plain_upsampling():
    byp = Bypass(3, ScheduledFloat((0, 0.9)), enabled=False).train()
    x, y = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    assert torch.allclose(byp(x, y, step=0), y, atol=1e-6) and not list(byp.parameters())


def test_calibrated_threshold_is_the_running_mean_of_the_topk_cut():
    """theta after n training forwards: the plain mean of the first 1/(1 - momentum) = 4 batch cuts,
    then an exponential average at rate 1 - momentum. A batch's cut, written out per row: the
    midpoint of the k-th and (k+1)-th highest real score (the k-th when every real token is kept),
    averaged over the rows."""
    from subllm.model.subsample import SelectOptions, Subsample

    torch.manual_seed(0)
    opts = SelectOptions.of(
        {**SELECTION_RECIPES["paper"], "threshold": "calibrated", "threshold_momentum": 0.75}
    )
    sub = Subsample(8, 0.5, ScheduledFloat((0, 1.0)), options=opts).train()
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, :4] = False  # 6 real tokens, k = 3
    valid[2, :9] = False  # 1 real token, kept: the cut is its own score
    got, cuts = [], []
    for _ in range(9):
        x = torch.randn(3, 10, 8)
        sub(x, valid, step=0)
        got.append(float(sub.threshold))
        s = sub.scores(x)
        row_cuts = []
        for b in range(3):
            real = sorted(s[b, valid[b]].tolist(), reverse=True)
            k = math.ceil(0.5 * len(real))
            row_cuts.append((real[k - 1] + real[k]) / 2 if k < len(real) else real[k - 1])
        cuts.append(sum(row_cuts) / 3)
    want, theta = [], 0.0
    for n, cut in enumerate(cuts, 1):
        theta = sum(cuts[:n]) / n if n <= 4 else 0.75 * theta + 0.25 * cut
        want.append(theta)
    assert got == pytest.approx(want, abs=1e-6)
    assert int(sub.threshold_updates) == 9
