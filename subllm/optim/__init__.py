"""Optimizers and lr schedules: ScaledAdam + Eden, or AdamW + warmup-cosine (docs/method.md section 8).

`build_optimizer(model, name, lr, total_steps, ...)` returns `(optimizer, schedule)`. The trainer
drives both the same way whichever was chosen, once per optimizer update (after gradient
accumulation):

    for step in range(start_step, total_steps):  # step: updates already made, 0 for the first
        ...forward/backward, possibly accumulated...
        schedule.step(step, tokens_seen)          # sets every group's lr for this update;
        optimizer.step()                          # tokens_seen: tokens of all earlier updates
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_in_this_update

The lr is a pure function of (step, tokens_seen), so after resuming from
`optimizer.load_state_dict(...)` and `schedule.load_state_dict(...)` the next `schedule.step` is
exact. `schedule.get_last_lr()` lists each group's lr; `optimizer.param_groups[i]["name"]` names
the group. Gradient clipping is inside ScaledAdam (`optimizer.clip_stats()` reports it); for
AdamW the trainer clips as usual (torch.nn.utils.clip_grad_norm_).

Parameter groups: parameters of a module named `score` (the subsampling score Linear of S; any
dotted-name component but the last) train at 0.5x the lr
(ModelConfig.score_lr_scale; 0.5 is the paper's). Groups are named "main" and "score",
with "_decay" / "_no_decay" appended for AdamW; each carries its `lr_scale`. With AdamW, tensors
with fewer than 2 dimensions and anything with "norm" in its name get no weight decay; ScaledAdam
has no weight decay at all. Parameters with requires_grad=False are left out.

Defaults, stated rather than silent: lr 0.035 (ScaledAdam) or 3e-4 (AdamW, betas (0.9, 0.95));
warmup_steps = min(500, total_steps // 10) for both (icefall's 500 for runs of 5,000+
steps, shorter for short runs); Eden lr_batches 7500 and lr_tokens 1e9; cosine floor 0.1 x lr.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

from subllm.errors import SubLLMError
from subllm.optim.cosine import WarmupCosine
from subllm.optim.eden import Eden
from subllm.optim.scaled_adam import ScaledAdam
from subllm.optim.schedule import LRSchedule

__all__ = [
    "OPTIMIZERS",
    "SCORE_LR_SCALE",
    "Eden",
    "LRSchedule",
    "ScaledAdam",
    "WarmupCosine",
    "build_optimizer",
    "default_warmup_steps",
    "param_groups",
]

OPTIMIZERS = ("scaled_adam", "adamw")
DEFAULT_LR = {"scaled_adam": 0.035, "adamw": 3e-4}
SCORE_LR_SCALE = 0.5
ADAMW_BETAS = (0.9, 0.95)


def default_warmup_steps(total_steps: int) -> int:
    return min(500, total_steps // 10)


def _is_score(name: str) -> bool:
    return "score" in name.split(".")[:-1]


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "norm" in name.lower()


def param_groups(model: nn.Module, lr: float, weight_decay: float | None) -> list[dict]:
    """Trainable parameters split by lr scale (score or not) and, if weight_decay is given, decay.

    Each group carries `name`, `lr`, `lr_scale` and (with weight_decay) `weight_decay`; empty
    groups are dropped. Order is stable: main, then score; decayed before undecayed.
    """
    config = getattr(model, "config", None)
    score_scale = float(getattr(config, "score_lr_scale", SCORE_LR_SCALE))
    buckets: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = weight_decay is not None and not _no_decay(name, p)
        buckets.setdefault((_is_score(name), decay), []).append(p)
    groups = []
    for score in (False, True):
        for decay in (True, False):
            params = buckets.get((score, decay))
            if not params:
                continue
            scale = score_scale if score else 1.0
            label = "score" if score else "main"
            group = {"params": params, "lr": lr * scale, "lr_scale": scale}
            if weight_decay is not None:
                label += "_decay" if decay else "_no_decay"
                group["weight_decay"] = weight_decay if decay else 0.0
            group["name"] = label
            groups.append(group)
    if not groups:
        raise SubLLMError("build_optimizer: the model has no trainable parameters")
    return groups


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float | None,
    total_steps: int,
    warmup_steps: int | None = None,
    weight_decay: float = 0.1,
    tokens_per_step: int | None = None,
    lr_batches: float = 7500.0,
    lr_tokens: float = 1e9,
    min_lr_ratio: float = 0.1,
) -> tuple[Optimizer, LRSchedule]:
    """(optimizer, schedule) for `name` in OPTIMIZERS; see the module docstring for how to drive them.

    `lr=None` takes the optimizer's default. `weight_decay` and `min_lr_ratio` apply to AdamW only,
    `lr_batches`, `lr_tokens` and `tokens_per_step` (lets `schedule.step` omit tokens_seen) to Eden.
    """
    if name not in OPTIMIZERS:
        raise SubLLMError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if total_steps < 1:
        raise SubLLMError(f"build_optimizer: total_steps must be >= 1, got {total_steps}")
    lr = DEFAULT_LR[name] if lr is None else float(lr)
    if not lr > 0.0:
        raise SubLLMError(f"build_optimizer: lr must be > 0, got {lr}")
    warmup = default_warmup_steps(total_steps) if warmup_steps is None else int(warmup_steps)
    if not 0 <= warmup <= total_steps:
        raise SubLLMError(f"build_optimizer: need 0 <= warmup_steps <= total_steps, got {warmup}")

    if name == "scaled_adam":
        opt = ScaledAdam(param_groups(model, lr, None), lr=lr)
        sched = Eden(opt, lr_batches, lr_tokens, warmup_batches=warmup, tokens_per_step=tokens_per_step)
        return opt, sched
    groups = param_groups(model, lr, weight_decay)  # each group carries its own weight_decay
    opt = torch.optim.AdamW(groups, lr=lr, betas=ADAMW_BETAS, eps=1e-8, fused=False)
    return opt, WarmupCosine(opt, total_steps, warmup, min_lr_ratio)
