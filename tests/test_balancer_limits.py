"""The Balancer's mean-absolute-value limits [1, 4] (docs/method.md section 4), tested on values.

With the fraction of positive scores inside its limits, only the rms term acts, and the
Balancer's new gradient has a closed form: below rms_lim(1) = 1.2533, the loss is
log(rms_lim / rms), whose gradient is proportional to -s; rescaled to RMS grad_scale it is
g = -grad_scale * s / rms(s), and the gradient becomes grad + |grad| * g. Above rms_lim(4) the
sign flips; in between, nothing changes. Scores just inside and just outside each limit pin the
limits to 2%: [0.5, 8] (or any other pair) fails here, and so does another grad_scale.
"""

import math

import pytest
import torch

from subllm.config import SELECTION_RECIPES
from subllm.model.scaling import ScheduledFloat, balance
from subllm.model.subsample import SelectOptions, Subsample

RMS_PER_ABS = 1.25331413732  # rms of a Gaussian with mean |s| = 1
MEAN_LIM = 0.8139535143 * math.atanh(2 * 0.64 - 1)  # mu / sigma of a Gaussian 64% positive


def scores(mean_abs: float, n: int = 4000, direct: bool = False) -> torch.Tensor:
    """Scores with rms = 1.2533 * mean_abs and the fraction positive exactly at r = 0.64: as
    mu/sigma (the paper's Gaussian reading) or counted (`direct`)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    if direct:  # 64% positive, counted
        z = z.abs() * torch.where(torch.arange(n) < 0.64 * n, 1.0, -1.0).double()
    else:  # standardised exactly, then shifted: mu / sigma = MEAN_LIM
        z = (z - z.mean()) / z.std(unbiased=False) + MEAN_LIM
    s = z * (RMS_PER_ABS * mean_abs / z.pow(2).mean().sqrt())
    return s.float()


def expected_grad(s: torch.Tensor, grad: torch.Tensor, side: int, grad_scale: float = 0.04) -> torch.Tensor:
    """side -1: below the minimum (push |s| up), +1: above the maximum (push down), 0: inside."""
    rms = s.double().pow(2).mean().sqrt()
    g = side * grad_scale * s.double() / rms
    return (grad.double() + grad.double().abs() * g).float()


CASES = [(0.98, -1), (1.02, 0), (2.0, 0), (3.95, 0), (4.05, 1), (0.6, -1), (7.0, 1)]


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("mean_abs, side", CASES)
def test_balance_abs_limits_values(mean_abs, side, direct):
    s = scores(mean_abs, direct=direct).requires_grad_(True)
    grad = torch.randn(s.shape, generator=torch.Generator().manual_seed(1))
    balance(s, 0.64, None, prob=1.0, direct=direct).backward(grad)
    want = expected_grad(s.detach(), grad, side)
    assert torch.allclose(s.grad, want, rtol=1e-4, atol=1e-7), (mean_abs, (s.grad - want).abs().max())
    if side:
        assert (s.grad - grad).abs().max() > 1e-3  # the push is there, not a rounding


@pytest.mark.parametrize("mean_abs, side", [(0.98, -1), (1.02, 0), (3.95, 0), (4.05, 1)])
def test_subsample_applies_the_limits(mean_abs, side):
    """The same values through S itself (paper rule, step 0: Balancer always on): the call site
    uses the [1, 4] limits and grad_scale 0.04."""
    s = scores(mean_abs, n=1000)
    sub = Subsample(
        8, 0.64, ScheduledFloat((0, 1.0), (8000, 0.25)), 0.04, SelectOptions.of(SELECTION_RECIPES["paper"])
    ).train()
    with torch.no_grad():
        sub.score.weight.zero_()
        sub.score.weight[0, 0] = 1.0  # score = x[..., 0]
    x = torch.zeros(1, 1000, 8)
    x[0, :, 0] = s
    x.requires_grad_(True)
    sel = sub(x, None, step=0)
    grad = torch.randn(1, 1000, generator=torch.Generator().manual_seed(2))
    sel.scores.backward(grad)
    want = expected_grad(s, grad[0], side)
    assert torch.allclose(x.grad[0, :, 0], want, rtol=1e-4, atol=1e-7)
