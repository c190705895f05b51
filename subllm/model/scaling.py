"""Schedules and gradient-only regularisers: ScheduledFloat, Balancer, limit_param_value.

Implements docs/method.md sections 4, 5 and 7, after icefall's Zipformer `scaling.py` (rewritten;
no k2). Unlike icefall, nothing here reads a hidden `batch_count` attribute: the training step is
passed explicitly, so a forgotten step cannot silently fall back to a default.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ScheduledFloat:
    """A float that is piecewise-linear in the training step, constant outside its points.

    `ScheduledFloat((0, 1.0), (8000, 0.25))(step)` falls linearly from 1.0 to 0.25, then stays.
    """

    def __init__(self, *points: tuple[float, float]):
        if not points:
            raise ValueError("ScheduledFloat needs at least one (step, value) point")
        self.points = sorted((float(s), float(v)) for s, v in points)

    def __call__(self, step: float) -> float:
        pts = self.points
        if step <= pts[0][0]:
            return pts[0][1]
        for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
            if step <= s1:
                return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
        return pts[-1][1]

    def at(self, step: Tensor) -> Tensor:
        """The value at a 0-d integer tensor `step`, as a float32 tensor on its device: the same
        piecewise-linear curve computed by tensor ops, so a compiled graph that reads the step from
        a buffer never sees a new Python constant (no recompilation from step to step)."""
        pts = self.points
        s = step.float()
        v = torch.full_like(s, pts[0][1])
        for (s0, v0), (s1, v1) in zip(pts, pts[1:]):  # telescoping: each segment adds its rise
            rise = ((s - s0) / (s1 - s0)).clamp(0.0, 1.0) if s1 > s0 else (s > s0).float()
            v = v + (v1 - v0) * rise
        return v

    def __repr__(self) -> str:
        return f"ScheduledFloat{tuple(self.points)}"


def _mean_limit(p: float) -> float:
    """Fraction positive p -> mean/stddev of a Gaussian with that fraction (crude inverse erf)."""
    return 0.8139535143 * math.atanh(2.0 * p - 1.0)


class _BalancerFn(torch.autograd.Function):
    """Forward identity; backward adds |grad| * g, g the rescaled gradient of a limit-violation loss.

    The loss measures how far the statistics of all (masked-in) elements of x, pooled, lie
    outside the limits: mean/stddev outside [mean_lim(min_pos), mean_lim(max_pos)] (i.e. the
    fraction positive outside [min_pos, max_pos]) and rms outside [1.2533*min_abs, 1.2533*max_abs]
    (i.e. the mean absolute value outside [min_abs, max_abs], for a Gaussian). Its gradient g is
    rescaled to RMS `grad_scale` and multiplied elementwise by |grad|, so the push is relative to
    the size of the real gradient at each element and vanishes when the limits are met.

    With a `gate` (a `GradSize`), the multiplier is instead the one number `gate.value(grad)`
    (beyond the paper; see `GradSize`).
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, mask: Tensor | None, limits: tuple, grad_scale: float, gate, box, on
    ) -> Tensor:
        m = mask if mask is not None else torch.ones_like(x, dtype=torch.bool)
        ctx.save_for_backward(x, m, on)
        ctx.limits, ctx.grad_scale, ctx.gate, ctx.box = limits, grad_scale, gate, box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, mask, on = ctx.saved_tensors
        g = limit_violation_grad(x.float(), mask, ctx.limits)
        n = mask.sum().clamp(min=1).float()
        g = g * (ctx.grad_scale / ((g * g).sum() / n).sqrt().clamp(min=1e-20))
        gf = grad.float()
        size = gf.abs() if ctx.gate is None else ctx.gate.value(gf)
        push = size * g * on.to(gf.dtype)  # applied with probability prob: `on` is a 0-d bool tensor
        if ctx.box is not None:  # for the logs: the push relative to the gradient (no host sync)
            ctx.box["push"] = (push.square().mean() / gf.square().mean().clamp(min=1e-30)).sqrt().detach()
        return (gf + push).to(grad.dtype), None, None, None, None, None, None


def violation_loss(x: Tensor, mask: Tensor, limits: tuple) -> Tensor:
    """The Balancer's limit-violation loss of float32 scores `x` over `mask` (reference form: its
    autograd gradient is what `limit_violation_grad` computes in closed form)."""
    lo_m, hi_m, lo_r, hi_r, direct = limits
    m = mask.float()
    n = m.sum().clamp(min=1.0)
    u = (x * x * m).sum() / n
    mu = (x * m).sum() / n
    rms = u.clamp(min=1e-20).sqrt()
    if direct is None:
        ms = mu / (u - mu * mu).clamp(min=1e-20).sqrt()
        frac_term = (ms - ms.clamp(lo_m, hi_m)).abs()
    else:  # the counted fraction positive (no gradient) picks the direction; mean(x) carries it
        frac = ((x.detach() > 0) & mask).sum() / n
        frac_term = ((frac > direct[1]).float() - (frac < direct[0]).float()) * mu
    return frac_term + (rms.clamp(lo_r, hi_r) / rms).log().abs()


def limit_violation_grad(x: Tensor, mask: Tensor, limits: tuple) -> Tensor:
    """d violation_loss / d x, written out (no torch.autograd.grad inside a backward: that breaks a
    compiled graph). With n real elements, u = mean x^2, mu = mean x, sigma^2 = u - mu^2:
    rms term: +-x / (n u) outside [lo_r, hi_r] (sign: + above, - below); Gaussian fraction term:
    +-(1 - mu (x - mu) / sigma^2) / (n sigma) when mu / sigma lies outside its limits; counted
    fraction term: +-1 / n. Zero at masked-out elements."""
    lo_m, hi_m, lo_r, hi_r, direct = limits
    m = mask.float()
    n = m.sum().clamp(min=1.0)
    u = (x * x * m).sum() / n
    mu = (x * m).sum() / n
    u_ok = (u > 1e-20).float()  # below the clamp the loss is flat
    rms = u.clamp(min=1e-20).sqrt()
    r_dir = (rms > hi_r).float() - (rms < lo_r).float()
    g = (r_dir * u_ok / (n * u.clamp(min=1e-20))) * x
    if direct is None:
        var = u - mu * mu
        sigma = var.clamp(min=1e-20).sqrt()
        ms = mu / sigma
        f_dir = (ms > hi_m).float() - (ms < lo_m).float()
        var_ok = (var > 1e-20).float()
        g = g + (f_dir / (n * sigma)) * (1.0 - var_ok * mu * (x - mu) / sigma.square())
    else:
        frac = ((x > 0) & mask).sum() / n
        g = g + ((frac > direct[1]).float() - (frac < direct[0]).float()) / n
    return g * m


def balance(
    x: Tensor,
    keep_ratio: float,
    mask: Tensor | None,
    prob: float | Tensor,
    pos_margin: float = 0.05,
    min_abs: float = 1.0,
    max_abs: float = 4.0,
    grad_scale: float = 0.04,
    gate: GradSize | None = None,
    direct: bool = False,
    box: dict | None = None,
) -> Tensor:
    """Apply the score Balancer (method.md section 4) with probability `prob` (a float or a 0-d
    tensor, e.g. a schedule's `at(step)`; one draw of the torch RNG on x's device per call).

    Statistics are taken over the elements where `mask` is True (real tokens), or all if None.
    `gate`: see `GradSize` (None = the paper's elementwise |grad|).
    `direct` (beyond the paper): the fraction of positive scores is counted, not read from
    mean/stddev through a Gaussian (which misreads the bimodal scores the subtraction trick
    makes); when it lies outside [r - margin, r + margin] the push is a uniform shift of all
    scores toward the limits (the gradient of +-mean(s)), rescaled with the rms term as usual.
    `box`: a dict that receives "push", rms(push) / rms(grad) of the last backward (for logs).
    """
    if not isinstance(prob, Tensor) and prob <= 0.0:
        return x
    on = torch.rand((), device=x.device) < prob  # decided by a tensor on x's device: no host sync
    lo_p = min(max(keep_ratio - pos_margin, 0.001), 0.999)
    hi_p = min(max(keep_ratio + pos_margin, 0.001), 0.999)
    limits = (
        _mean_limit(lo_p),
        _mean_limit(hi_p),
        1.25331413732 * min_abs,
        1.25331413732 * max_abs,
        (lo_p, hi_p) if direct else None,
    )
    return _BalancerFn.apply(x, mask, limits, grad_scale, gate, box, on)


class GradSize:
    """The size of the Balancer's push on the scores, read from a downstream gradient (beyond the paper).

    icefall's Balancer scales its push by |grad| elementwise. On the scores of S that gradient is
    exactly zero wherever clamp(s, 0, 1) saturates (s <= 0 or s >= 1), so once every score has left
    (0, 1) - all kept tokens at 1 and all discarded ones too, or everything below 0 - neither the
    task nor the Balancer can move them and S stays off. Here the push is instead scaled by
    mean |dL/dw| over the kept slots, w the upsampling weights of section 2: the loss's sensitivity
    to how much of the inner path each kept token takes, which does not vanish under saturation.
    `tap(weight)` records it in the backward pass; the Balancer's backward (which autograd runs
    later, the scores being upstream of the weights) reads it. Where nothing was tapped (no slot
    kept) it falls back to the elementwise |grad|.
    """

    def __init__(self):
        self._size: Tensor | None = None

    def tap(self, weight: Tensor, valid: Tensor | None) -> Tensor:
        if not weight.requires_grad:
            return weight
        return _TapGradSize.apply(weight, valid, self)

    def value(self, grad: Tensor) -> Tensor:
        return grad.abs() if self._size is None else self._size


class _TapGradSize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, valid: Tensor | None, box: GradSize) -> Tensor:
        ctx.save_for_backward(valid if valid is not None else torch.ones_like(w, dtype=torch.bool))
        ctx.box = box
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (valid,) = ctx.saved_tensors
        m = valid.float()
        ctx.box._size = (grad.float().abs() * m).sum() / m.sum().clamp(min=1.0)
        return grad, None, None


class _LimitParamValue(torch.autograd.Function):
    """Forward identity; backward flips the sign of gradients that would push x further outside
    [lo, hi] (a soft limit that still lets other gradients act, unlike a clamp)."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: Tensor, hi: Tensor, on: Tensor) -> Tensor:
        ctx.save_for_backward(x, lo, hi, on)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, lo, hi, on = ctx.saved_tensors
        # gradient descent moves x by -grad: grad > 0 below the minimum would push x further down
        flip = (((grad > 0) & (x < lo)) | ((grad < 0) & (x > hi))) & on
        return torch.where(flip, -grad, grad), None, None, None


def limit_param_value(
    x: Tensor, lo: float | Tensor, hi: float | Tensor, prob: float = 0.6, training: bool = True
) -> Tensor:
    """Hold a parameter in [lo, hi] by gradient sign flips, applied with probability `prob`.
    `lo`/`hi` may be 0-d tensors (a schedule's `at(step)`): nothing then leaves the device."""
    if not isinstance(lo, Tensor) and not isinstance(hi, Tensor) and lo > hi:
        raise ValueError(f"limit_param_value: lo {lo} > hi {hi}")
    if not training:
        return x
    on = torch.rand((), device=x.device) < prob  # applied with probability prob, decided on x's device
    lo, hi = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (lo, hi))
    return _LimitParamValue.apply(x, lo, hi, on)
