"""The learning-rate schedule interface shared by Eden and warmup-cosine (docs/method.md section 8).

A schedule is a pure function of (optimizer step, tokens seen): `step(step, tokens_seen)` sets
every param group's lr to its base lr times `factor(step, tokens_seen)`. Because nothing
accumulates, resuming needs only the base lrs, and calling `step` twice with the same arguments
is harmless.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from subllm.errors import SubLLMError


class LRSchedule:
    """Base class: per-group base lrs times a shared factor. Subclasses define `factor`.

    Each group's base lr is its `initial_lr` (torch's convention, saved with the optimizer),
    else its `base_lr`, else its current `lr`; it is then stored as `initial_lr`. Groups built
    with different lrs (e.g. the 0.5x score layers) therefore keep their ratio throughout.
    The constructor applies the factor for step 0, so the optimizer is ready before any `step`.
    """

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group.get("base_lr", group["lr"]))
        self.base_lrs = [float(group["initial_lr"]) for group in optimizer.param_groups]
        self.last_step = 0
        self.last_tokens = 0
        self._apply()

    def factor(self, step: int, tokens_seen: int) -> float:
        raise NotImplementedError

    def step(self, step: int, tokens_seen: int | None = None) -> None:
        """Set the lrs for optimizer update number `step` (0 for the first update).

        Call once per optimizer step, before `optimizer.step()`; `tokens_seen` counts the training
        tokens of all earlier updates.
        """
        if step < 0:
            raise SubLLMError(f"{type(self).__name__}.step: step must be >= 0, got {step}")
        self.last_step = int(step)
        self.last_tokens = int(self._tokens(step, tokens_seen))
        self._apply()

    def _tokens(self, step: int, tokens_seen: int | None) -> int:
        return 0 if tokens_seen is None else tokens_seen

    def _apply(self) -> None:
        f = self.factor(self.last_step, self.last_tokens)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def rescale(self, ratio: float) -> None:
        """Multiply every group's base lr by `ratio` (a resumed run given a new --lr); the groups
        keep their ratios (e.g. the 0.5x score layers)."""
        if not ratio > 0:
            raise SubLLMError(f"{type(self).__name__}.rescale: ratio must be > 0, got {ratio}")
        self.base_lrs = [b * ratio for b in self.base_lrs]
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The lr of every param group, as last set."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Progress and base lrs. Hyperparameters come from the constructor, not the checkpoint."""
        return {"base_lrs": list(self.base_lrs), "last_step": self.last_step, "last_tokens": self.last_tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["base_lrs"]) != len(self.optimizer.param_groups):
            raise SubLLMError(
                f"{type(self).__name__}: checkpoint has {len(state_dict['base_lrs'])} param groups, "
                f"the optimizer {len(self.optimizer.param_groups)}"
            )
        self.base_lrs = [float(x) for x in state_dict["base_lrs"]]
        self.last_step = int(state_dict["last_step"])
        self.last_tokens = int(state_dict["last_tokens"])
        self._apply()
