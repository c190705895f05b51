"""ScaledAdam, Eden, warmup-cosine and build_optimizer (docs/method.md section 8). CPU, seconds."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from subllm.errors import SubLLMError
from subllm.optim import Eden, ScaledAdam, WarmupCosine, build_optimizer

B1, B2, EPS = 0.9, 0.98, 1e-8


def _step_with(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def reference_tensor_steps(p0, grads, lr, slr=0.1, min_rms=1e-5, max_rms=3.0, period=4):
    """Slow, plain-float restatement of method.md section 8 for one non-scalar tensor, no clipping."""
    n = len(p0)
    p, delta, v = list(p0), [0.0] * n, [0.0] * n
    rms = math.sqrt(sum(x * x for x in p) / n)
    period_grads, s_sq = [], 0.0
    for t, g in enumerate(grads):
        delta = [B1 * d for d in delta]
        period_grads.append(sum(pi * gi for pi, gi in zip(p, g)))
        if t % period == period - 1:
            rms = math.sqrt(sum(x * x for x in p) / n)
            if t > 0:
                bp = B2**period
                s_sq = bp * s_sq + (1 - bp) * sum(x * x for x in period_grads) / period
                corr = 1 - bp ** ((t + 1) // period)
                step = -lr * slr * math.sqrt(corr) * sum(period_grads) / (math.sqrt(s_sq) + EPS)
                if rms < min_rms:
                    step = max(step, 0.0)
                step = min(step, (max_rms - rms) / rms)
                delta = [d + (1 - B1) * pi * step for d, pi in zip(delta, p)]
            period_grads = []
        v = [B2 * vi + (1 - B2) * gi * gi for vi, gi in zip(v, g)]
        corr2 = 1 - B2 ** (t + 1)
        v_hat = [vi / corr2 if corr2 < 0.99 else vi for vi in v]
        size = max(rms, min_rms)
        step_dir = [gi / (math.sqrt(vh) + EPS) for gi, vh in zip(g, v_hat)]
        delta = [d + (1 - B1) * (-lr * size * u) for d, u in zip(delta, step_dir)]
        p = [pi + d for pi, d in zip(p, delta)]
    return p


# ---- ScaledAdam ------------------------------------------------------------------------------


def test_first_two_steps_match_hand_computed():
    lr = 0.035
    p0 = torch.tensor([[0.5, -1.0, 2.0], [0.25, 0.0, -0.75]], dtype=torch.float64)
    g1 = torch.tensor([[0.1, -0.2, 0.3], [-0.4, 0.5, 1e-3]], dtype=torch.float64)
    g2 = torch.tensor([[-0.3, 0.1, 0.2], [0.2, -0.6, 0.05]], dtype=torch.float64)
    p = nn.Parameter(p0.clone())
    opt = ScaledAdam([p], lr=lr, clipping_scale=None)
    rms0 = p0.pow(2).mean().sqrt()

    _step_with(opt, [p], [g1])
    d1 = -lr * (1 - B1) * rms0 * g1 / (g1.abs() + EPS)  # v_hat = g1^2 after bias correction
    torch.testing.assert_close(p.detach(), p0 + d1, rtol=0, atol=1e-14)

    _step_with(opt, [p], [g2])
    v_hat = (B2 * (1 - B2) * g1**2 + (1 - B2) * g2**2) / (1 - B2**2)
    d2 = B1 * d1 - lr * (1 - B1) * rms0 * g2 / (v_hat.sqrt() + EPS)  # RMS not refreshed before step 4
    torch.testing.assert_close(p.detach(), p0 + d1 + d2, rtol=0, atol=1e-14)


def test_matches_slow_reference_through_size_updates():
    torch.manual_seed(0)
    p0 = torch.randn(12, dtype=torch.float64) * 0.3
    # 240 steps: many size updates, and the bias correction of v switches off at step 228.
    grads = [torch.randn(12, dtype=torch.float64) + 0.5 * p0 for _ in range(240)]
    p = nn.Parameter(p0.clone())
    opt = ScaledAdam([p], lr=0.05, clipping_scale=None)
    for g in grads:
        _step_with(opt, [p], [g])
    expected = reference_tensor_steps(p0.tolist(), [g.tolist() for g in grads], lr=0.05)
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_scalar_lr_scale_and_clamp():
    lr = 0.035
    s = nn.Parameter(torch.tensor([0.0]))
    opt = ScaledAdam([s], lr=lr)
    _step_with(opt, [s], [torch.tensor([2.0])])
    expected = -lr * 0.1 * (1 - B1) * 2.0 / (2.0 + EPS)
    assert s.item() == pytest.approx(expected, rel=1e-6)

    s = nn.Parameter(torch.tensor(9.99))  # 0-d counts as a scalar too
    opt = ScaledAdam([s], lr=1.0, scalar_max=10.0)
    for _ in range(50):
        _step_with(opt, [s], [torch.tensor(-1.0)])
        assert s.item() <= 10.0
    assert s.item() == 10.0


def _rms_after(grad_sign: float, scalar_lr_scale: float, rms: float = 1.0, steps: int = 8, **kw) -> float:
    torch.manual_seed(1)
    w = torch.randn(16, 16)
    p = nn.Parameter(w / w.pow(2).mean().sqrt() * rms)
    opt = ScaledAdam([p], lr=0.02, scalar_lr_scale=scalar_lr_scale, clipping_scale=None, **kw)
    for _ in range(steps):
        _step_with(opt, [p], [grad_sign * p.detach()])  # loss = sign * |p|^2 / 2: wants p smaller/larger
    return p.detach().pow(2).mean().sqrt().item()


def test_size_update_moves_scale_in_the_right_direction():
    # scalar_lr_scale=0 turns the size update off for tensors, isolating its effect.
    assert _rms_after(+1.0, 0.1) < _rms_after(+1.0, 0.0)  # loss grows with scale: shrink
    assert _rms_after(-1.0, 0.1) > _rms_after(-1.0, 0.0)  # loss falls with scale: grow
    # Above param_max_rms the size step pulls the tensor back (and applies even when size_lr is 0).
    assert _rms_after(-1.0, 0.1, param_max_rms=1.0) < _rms_after(-1.0, 0.1)
    # Below param_min_rms the size step may grow the tensor but not shrink it.
    tiny = dict(rms=1e-6, param_min_rms=1e-5)
    assert _rms_after(+1.0, 0.1, **tiny) == _rms_after(+1.0, 0.0, **tiny)
    assert _rms_after(-1.0, 0.1, **tiny) > _rms_after(-1.0, 0.0, **tiny)


def test_clipping_kicks_in_for_an_outlier_after_normal_history():
    torch.manual_seed(2)
    p = nn.Parameter(torch.randn(8, 8))
    opt = ScaledAdam([p], lr=1e-4)
    _step_with(opt, [p], [1000.0 * torch.randn(8, 8)])  # no threshold yet: step 0 is never clipped
    assert opt.clip_stats()["clipped_steps"] == 0
    for _ in range(29):  # thresholds set at steps 10 and 20
        _step_with(opt, [p], [torch.randn(8, 8)])
    stats = opt.clip_stats()
    assert math.isfinite(stats["clip_threshold"]) and stats["clipped_steps"] == 0
    assert stats["last_clip_scale"] == 1.0

    before = p.detach().clone()
    delta_before = opt.state[p]["delta"].clone()
    outlier = 100.0 * torch.randn(8, 8)
    rms = opt.state[p]["param_rms"]
    norm = (outlier.norm() * rms).item()
    _step_with(opt, [p], [outlier])
    stats = opt.clip_stats()
    assert stats["clipped_steps"] == 1
    assert stats["last_clip_scale"] == pytest.approx(stats["clip_threshold"] / norm, rel=1e-5)
    assert stats["last_clip_scale"] < 0.1
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), before)
    assert opt.state[p]["delta"].abs().max() < delta_before.abs().max() + 1e-3  # one bounded step

    bad = torch.randn(8, 8)
    bad[0, 0] = math.inf
    _step_with(opt, [p], [bad])  # a non-finite gradient is dropped, not applied
    assert torch.isfinite(p).all() and opt.clip_stats()["last_clip_scale"] == 0.0


def test_clipping_threshold_is_scale_times_median():
    torch.manual_seed(6)
    p = nn.Parameter(torch.randn(8, 8))
    opt = ScaledAdam([p], lr=1e-3, clipping_scale=2.0, clipping_update_period=100)
    norms = []
    for step in range(101):
        g = torch.randn(8, 8) * (1.0 + step / 50)
        norms.append((g.norm() * opt.state[p].get("param_rms", p.detach().pow(2).mean().sqrt())).item())
        _step_with(opt, [p], [g])
        if step == 10:  # first estimate: over the 11 norms so far, doubled
            median = torch.tensor(norms).median().item()
            assert opt.clip_stats()["clip_threshold"] == pytest.approx(4.0 * median)
    # at step 100: over the last 100 norms, not doubled
    assert opt.clip_stats()["clip_threshold"] == pytest.approx(2.0 * torch.tensor(norms[1:]).median().item())


def test_param_groups_have_their_own_lr():
    p_full = nn.Parameter(torch.ones(4, 4))
    p_half = nn.Parameter(torch.ones(4, 4))
    groups = [{"params": [p_full]}, {"params": [p_half], "lr": 0.0175}]
    opt = ScaledAdam(groups, lr=0.035, clipping_scale=None)
    g = torch.linspace(-1, 1, 16).reshape(4, 4)
    _step_with(opt, [p_full, p_half], [g, g])
    torch.testing.assert_close(p_half.detach() - 1, 0.5 * (p_full.detach() - 1))


def test_params_without_grad_are_skipped():
    a, b = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3, 3))
    opt = ScaledAdam([a, b])
    a.grad = torch.ones(3, 3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3, 3)) and not torch.equal(a.detach(), torch.ones(3, 3))


def test_bf16_autocast_training_step():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    opt, sched = build_optimizer(model, "scaled_adam", None, total_steps=20)
    x = torch.randn(32, 8)
    for step in range(12):
        sched.step(step, step * 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


# ---- schedules -------------------------------------------------------------------------------


def _opt(lr: float = 1.0, groups: int = 1) -> torch.optim.Optimizer:
    """SGD over dummy parameters; group i has lr / (i + 1)."""
    groups_ = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr / (i + 1)} for i in range(groups)]
    return torch.optim.SGD(groups_)


def test_eden_closed_form():
    sched = Eden(_opt(0.04))
    assert sched.get_last_lr() == [pytest.approx(0.04 * 0.5)]  # step 0: warm-up starts at 0.5
    sched.step(250, 0)
    assert sched.get_last_lr()[0] == pytest.approx(0.04 * 0.75 * (1 + (250 / 7500) ** 2) ** -0.25)
    sched.step(7500, int(1e9))  # both factors are 2^-1/4
    assert sched.get_last_lr()[0] == pytest.approx(0.04 / math.sqrt(2))
    sched.step(500, 3 * 10**9)
    expected = 0.04 * (1 + (500 / 7500) ** 2) ** -0.25 * (1 + 9) ** -0.25
    assert sched.get_last_lr()[0] == pytest.approx(expected)
    sched.step_batch(7500)
    assert sched.last_tokens == 3 * 10**9
    assert sched.get_last_lr()[0] == pytest.approx(0.04 * 2**-0.25 * 10**-0.25)


def test_eden_keeps_group_ratios_and_needs_tokens():
    sched = Eden(_opt(0.04, groups=2))
    sched.step(1000, 10**6)
    a, b = sched.get_last_lr()
    assert b == pytest.approx(0.5 * a)
    with pytest.raises(SubLLMError):
        sched.step(1001)
    sched = Eden(_opt(0.04), tokens_per_step=1000)
    sched.step(7500)
    assert sched.last_tokens == 7_500_000


def test_cosine_values():
    sched = WarmupCosine(_opt(1.0), total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 55: 0.55, 100: 0.1, 500: 0.1}
    for step, value in expected.items():
        sched.step(step, 0)
        assert sched.get_last_lr()[0] == pytest.approx(value), step


def test_schedule_state_round_trip():
    opt = _opt(0.04)
    sched = Eden(opt)
    sched.step(123, 456_789)
    state = copy.deepcopy(sched.state_dict())
    opt2 = _opt(0.04)
    sched2 = Eden(opt2)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    sched.step(124, 500_000)
    sched2.step(124, 500_000)
    assert sched2.get_last_lr() == sched.get_last_lr()


# ---- build_optimizer -------------------------------------------------------------------------


class _Sub(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x)) * torch.sigmoid(self.score(x)) * self.gain


class _Toy(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.layers = nn.ModuleList([_Sub(dim)])
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.layers[0](x))


def test_score_group_gets_half_lr_and_adamw_decay_rules():
    model = _Toy()
    opt, sched = build_optimizer(model, "scaled_adam", lr=0.03, total_steps=10_000)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"main", "score"}
    assert by_name["score"]["params"] == [model.layers[0].score.weight]
    assert by_name["score"]["lr"] == pytest.approx(0.5 * by_name["main"]["lr"])
    sched.step(3000, 10**8)
    main, score = sched.get_last_lr()
    assert score == pytest.approx(0.5 * main)

    opt, sched = build_optimizer(model, "adamw", lr=None, total_steps=100)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["main_decay"]["lr"] == pytest.approx(3e-4 * sched.factor(0, 0))
    assert by_name["score_decay"]["lr"] == pytest.approx(0.5 * by_name["main_decay"]["lr"])
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    sub = model.layers[0]
    assert decayed == {id(sub.proj.weight), id(model.head.weight), id(sub.score.weight)}
    assert not opt.param_groups[0]["fused"]


def test_unknown_optimizer_name():
    with pytest.raises(SubLLMError, match="scaled_adam, adamw"):
        build_optimizer(_Toy(), "sgd", None, total_steps=10)


@pytest.mark.parametrize("name", ["scaled_adam", "adamw"])
def test_toy_regression_converges(name):
    torch.manual_seed(4)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.3
    model = nn.Linear(8, 1)
    lr = None if name == "scaled_adam" else 3e-2
    opt, sched = build_optimizer(model, name, lr, total_steps=300, weight_decay=0.0)
    losses = []
    for step in range(300):
        sched.step(step, step * 256)
        loss = (model(x) - y).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def _run(model, opt, sched, start, steps):
    torch.manual_seed(100 + start)
    for step in range(start, start + steps):
        sched.step(step, step * 16)
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["scaled_adam", "adamw"])
def test_state_dict_round_trip_gives_identical_steps(name):
    torch.manual_seed(5)
    model = _Toy()
    opt, sched = build_optimizer(model, name, None, total_steps=40)
    _run(model, opt, sched, 0, 13)  # past a clipping-threshold refresh and three size updates
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    expected = _run(model, opt, sched, 13, 9)

    buf.seek(0)
    ckpt = torch.load(buf)
    model2 = _Toy()
    model2.load_state_dict(ckpt["model"])
    opt2, sched2 = build_optimizer(model2, name, None, total_steps=40)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    got = _run(model2, opt2, sched2, 13, 9)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    if name == "scaled_adam":
        assert opt2.clip_stats() == opt.clip_stats()


def test_fsdp2_sharded_params_match_plain():
    """Under FSDP2 (DTensor params, here one rank) the optimizer gives the same steps as on plain tensors."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(7)
        plain = _Toy()
        plain.layers[0].gain = nn.Parameter(torch.tensor([0.5]))  # FSDP2 cannot shard 0-d parameters
        sharded = copy.deepcopy(plain)
        fully_shard(sharded)
        results = []
        for model in (plain, sharded):
            opt, sched = build_optimizer(model, "scaled_adam", None, total_steps=40)
            _run(model, opt, sched, 0, 13)
            results.append(
                {k: getattr(v, "full_tensor", lambda v=v: v)() for k, v in model.state_dict().items()}
            )
        for key, value in results[0].items():
            torch.testing.assert_close(results[1][key], value, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()
