"""ScaledAdam: Adam whose step is proportional to each tensor's size, which is learned separately.

Implements docs/method.md section 8 (the optimizer half; the schedule is in `eden.py`), after
icefall's Zipformer `optim.py`, rewritten without batching parameters of equal shape. Small
differences from icefall: clipping is over all param groups at once (icefall clips each group on
its own); a tensor below param_min_rms may still grow (icefall freezes its size both ways);
scalars are clamped after their step, and use the same "bias-correct v while the correction is
above 1%" rule as tensors (icefall always corrects them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from subllm.errors import SubLLMError

# Keys of the optimizer-wide clipping state. They live in the state of the first parameter of the
# first group, so that `state_dict()` saves them and `load_state_dict()` moves them to its device.
_CLIP_KEYS = ("clip_step", "clip_norms", "clip_threshold", "clip_count", "clip_last_scale")


class ScaledAdam(Optimizer):
    """Adam with parameter-scale-relative steps, a learned tensor scale, and median-based clipping.

    Think of every non-scalar tensor as p = exp(s) * q: a direction q and a log-scale s.

    * Direction. The usual Adam step g / (sqrt(v_hat) + eps) is multiplied by lr * max(RMS(p),
      param_min_rms), so each step changes p by about lr *relative to its own size*, whatever that
      size is. v_hat is v / (1 - beta2^t) while that denominator is below 0.99, else plain v.
      RMS(p) is refreshed every `size_update_period` steps, not every step.
    * Size. dL/ds = <p, g>. These are collected for `size_update_period` steps, and then s takes
      one Adam-like step of size lr * scalar_lr_scale on their sum (normalised by its own running
      second moment): p * scale_step goes into the momentum buffer below, so p ends up scaled by
      about (1 + scale_step). A tensor whose RMS is below param_min_rms is never shrunk further;
      the size step never asks for RMS(p) above param_max_rms, and pulls it back when above.
    * Momentum. Both updates are accumulated into one buffer: delta = beta1 * delta +
      (1 - beta1) * update, then p += delta. There is no beta1 bias correction, so the first
      steps are (1 - beta1) times smaller - deliberately gentle at the start.
    * Scalars (numel == 1, as in icefall; vectors count as tensors) take a plain Adam step with
      lr * scalar_lr_scale, no size scaling, and are clamped to [-scalar_max, scalar_max].
    * Clipping, over all groups together. Each step's norm is sqrt(sum_p |g_p|^2 RMS(p)^2) -
      the size of the update the gradient asks for - with scalar_lr_scale in place of RMS(p) for
      scalars. Gradients are scaled down to `clipping_scale` x the median of the recent norms when
      they exceed it. As in icefall, the threshold is (re)computed at steps 10, 20 and 40 (doubled
      then, over the norms seen so far, since early norms change fast) and then every
      `clipping_update_period` steps over the last that-many norms; before step 10 nothing is
      clipped. After that a non-finite norm zeroes the step's gradient; a non-finite median
      raises RuntimeError.
      `clip_stats()` reports the threshold, the number of clipped steps and the last factor.
      The clipping settings are read from the first param group.

    `lr` is read from each param group on every step, so groups may have different rates (the
    SUBLLM score layers train at 0.5x) and a scheduler may change them. There is no weight decay.
    Parameters without a gradient are skipped. The step never synchronises with the device except
    when the clipping threshold is refreshed.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.035,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        scalar_lr_scale: float = 0.1,
        param_min_rms: float = 1e-5,
        param_max_rms: float = 3.0,
        scalar_max: float = 10.0,
        size_update_period: int = 4,
        clipping_scale: float | None = 2.0,
        clipping_update_period: int = 100,
    ):
        if not lr >= 0.0:
            raise SubLLMError(f"ScaledAdam: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise SubLLMError(f"ScaledAdam: betas must lie in [0, 1), got {betas}")
        if not 0.0 < param_min_rms < param_max_rms:
            raise SubLLMError(
                f"ScaledAdam: need 0 < param_min_rms < param_max_rms, got {param_min_rms}, {param_max_rms}"
            )
        if size_update_period < 1 or clipping_update_period < 1:
            raise SubLLMError("ScaledAdam: size_update_period and clipping_update_period must be >= 1")
        if clipping_scale is not None and not clipping_scale > 0.0:
            raise SubLLMError(f"ScaledAdam: clipping_scale must be > 0 or None, got {clipping_scale}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            scalar_lr_scale=scalar_lr_scale,
            param_min_rms=param_min_rms,
            param_max_rms=param_max_rms,
            scalar_max=scalar_max,
            size_update_period=size_update_period,
            clipping_scale=clipping_scale,
            clipping_update_period=clipping_update_period,
        )
        super().__init__(params, defaults)

    # ---- state -------------------------------------------------------------------------------

    def _clip_state(self) -> dict[str, Any]:
        """The optimizer-wide clipping state, created on first use (see _CLIP_KEYS)."""
        group = self.param_groups[0]
        state = self.state[group["params"][0]]
        if "clip_step" not in state:
            period = group["clipping_update_period"]
            dev = group["params"][0].device
            state["clip_step"] = 0
            state["clip_norms"] = torch.zeros(period, dtype=torch.float32, device=dev)
            state["clip_threshold"] = torch.full((), math.inf, dtype=torch.float32, device=dev)
            state["clip_count"] = torch.zeros((), dtype=torch.float32, device=dev)
            state["clip_last_scale"] = torch.ones((), dtype=torch.float32, device=dev)
        return state

    @staticmethod
    def _init_param_state(group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = 0
        state["delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p.numel() > 1:
            state["param_rms"] = _rms(p)
            state["scale_grads"] = torch.zeros(group["size_update_period"], dtype=p.dtype, device=p.device)
            state["scale_exp_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its parameter's dtype; keep counters in fp32.
        state = self.state[self.param_groups[0]["params"][0]]
        for key in _CLIP_KEYS[1:]:
            if key in state:
                state[key] = state[key].float()

    def clip_stats(self) -> dict[str, float]:
        """Clipping threshold (inf until set), number of steps clipped so far, last clip factor."""
        state = self._clip_state()
        return {
            "clip_threshold": float(state["clip_threshold"]),
            "clipped_steps": int(state["clip_count"]),
            "last_clip_scale": float(state["clip_last_scale"]),
        }

    # ---- step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not work:
            return loss
        for group, p in work:
            if p.grad.is_sparse:
                raise RuntimeError("ScaledAdam does not support sparse gradients")
            if "exp_avg_sq" not in self.state[p]:
                self._init_param_state(group, p, self.state[p])

        clip = self._clip_factor(work)
        for group, p in work:
            grad = _local(p.grad)
            if clip is not None:
                grad = torch.where(clip > 0, grad * clip.to(grad.dtype), 0.0)
            state = self.state[p]
            if p.numel() == 1:
                self._scalar_step(group, _local(p), grad, state)
            else:
                self._tensor_step(group, p, grad, state, clip)
            state["step"] += 1
        return loss

    def _clip_factor(self, work: list[tuple[dict[str, Any], Tensor]]) -> Tensor | None:
        """Record this step's gradient norm; return the factor (<= 1) to scale gradients by, or None."""
        first = self.param_groups[0]
        scale, period = first["clipping_scale"], first["clipping_update_period"]
        if scale is None:
            return None
        cs = self._clip_state()
        step = cs["clip_step"]
        cs["clip_step"] = step + 1

        terms = []
        for group, p in work:
            weight = self.state[p]["param_rms"] if p.numel() > 1 else group["scalar_lr_scale"]
            terms.append(_sum(p.grad.float().square()) * weight**2)
        norm = torch.stack(terms).sum().sqrt()
        cs["clip_norms"][step % period] = norm

        early = [s for s in (10, 20, 40) if s < period]
        if step in early or (step > 0 and step % period == 0):
            seen = cs["clip_norms"][: min(step + 1, period)]
            median = seen.median()
            if not math.isfinite(float(median)):
                raise RuntimeError("ScaledAdam: the median recent gradient norm is not finite")
            cs["clip_threshold"].fill_(scale * float(median) * (2.0 if step in early else 1.0))
        if step < (early[0] if early else period):
            return None  # no threshold yet

        factor = (cs["clip_threshold"] / (norm + 1e-20)).clamp(max=1.0).nan_to_num(nan=0.0)
        cs["clip_count"] += (factor < 1.0).float()
        cs["clip_last_scale"].copy_(factor)
        return factor

    @staticmethod
    def _corrected(exp_avg_sq: Tensor, beta2: float, step: int) -> Tensor:
        """v_hat: the second moment, bias-corrected while the correction is still > 1%."""
        correction = 1.0 - beta2 ** (step + 1)
        return exp_avg_sq / correction if correction < 0.99 else exp_avg_sq

    def _scalar_step(self, group: dict[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"] * group["scalar_lr_scale"]
        v = _local(state["exp_avg_sq"]).mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = self._corrected(v, beta2, state["step"]).sqrt().add_(group["eps"])
        delta = _local(state["delta"]).mul_(beta1)
        delta.addcdiv_(grad, denom, value=-lr * (1.0 - beta1))
        p.add_(delta).clamp_(-group["scalar_max"], group["scalar_max"])

    def _tensor_step(
        self, group: dict[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], clip: Tensor | None
    ) -> None:
        """`p` is the whole parameter (a DTensor under FSDP2), `grad` this rank's clipped part of it."""
        beta1, beta2 = group["betas"]
        step, period = state["step"], group["size_update_period"]
        p_local = _local(p)
        delta = _local(state["delta"]).mul_(beta1)

        p_dot_g = _sum(p.detach() * p.grad)  # <p, g> over the whole tensor, then clipped like g
        state["scale_grads"][step % period] = (
            p_dot_g if clip is None else torch.where(clip > 0, p_dot_g * clip, 0.0)
        )
        if step % period == period - 1:
            state["param_rms"].copy_(_rms(p))
            if step > 0:
                delta.add_(p_local * self._scale_step(group, state, step), alpha=1.0 - beta1)

        v = _local(state["exp_avg_sq"]).mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = self._corrected(v, beta2, step).sqrt().add_(group["eps"])
        size = state["param_rms"].clamp(min=group["param_min_rms"])
        delta.add_(grad / denom * (size * (-group["lr"] * (1.0 - beta1))))
        p_local.add_(delta)

    @staticmethod
    def _scale_step(group: dict[str, Any], state: dict[str, Any], step: int) -> Tensor:
        """Relative change of p's size, from the last `size_update_period` values of <p, g>.

        An Adam step on the log-scale s, whose gradient is <p, g>: the period's summed gradient
        over the root of a running mean of squared per-step gradients (its beta2 raised to the
        period, bias-corrected), times lr * scalar_lr_scale. Returns a 0-d tensor.
        """
        beta2 = group["betas"][1]
        grads = state["scale_grads"]
        period = grads.shape[0]
        beta2_p = beta2**period
        sq = state["scale_exp_avg_sq"].mul_(beta2_p).add_((grads**2).mean(), alpha=1.0 - beta2_p)
        correction = 1.0 - beta2_p ** ((step + 1) // period)
        size_lr = group["lr"] * group["scalar_lr_scale"]
        scale_step = grads.sum() * (-size_lr * math.sqrt(correction)) / (sq.sqrt() + group["eps"])

        rms = state["param_rms"]
        scale_step = torch.where(rms < group["param_min_rms"], scale_step.clamp(min=0.0), scale_step)
        return torch.minimum(scale_step, (group["param_max_rms"] - rms) / rms)


# Under FSDP2 parameters, gradients and the state made by zeros_like(p) are DTensors, each rank
# holding a shard. Elementwise maths runs on the local shards; the few reductions (RMS, <p, g>,
# gradient norms) run on the DTensors, which all-reduce them, so every rank sees the same numbers.


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach the DTensor); else t."""
    return t.to_local() if hasattr(t, "to_local") else t


def _sum(t: Tensor) -> Tensor:
    """Sum of all entries as a plain 0-d tensor, all-reduced if t is a DTensor."""
    total = t.sum()
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def _rms(p: Tensor) -> Tensor:
    """Root-mean-square of all entries, as a plain 0-d tensor."""
    return (_sum(p.detach().square()) / p.numel()).sqrt()
