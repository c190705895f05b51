"""S, U, B and the schedules in isolation (docs/method.md sections 2-5, 7)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
