"""The training step, counted by the model itself, for training loops that never call `set_step`
(transformers.Trainer): docs/method.md section 7.

The Balancer and bypass schedules are functions of the optimizer step, and a generic loop does
not tell the model which step it is on. `StepCounter` observes it: on the model's first training
forward it registers a torch optimizer step post-hook (`torch.optim.optimizer.
register_optimizer_step_post_hook`, called after every `Optimizer.step()` in the process, fused
kernels included) that counts the steps of optimizers holding any of the model's parameters.
Forwards between two steps - gradient-accumulation micro-batches - share one step; a step that
is skipped (e.g. an inf gradient under a grad scaler never calls the inner `step()`) is not
counted. The hook holds the model weakly: once the model is gone it does nothing.

A loop that calls `set_step(step)` takes over (explicit mode). A stale step cannot pass silently:
if an optimizer step touched the model since the last `set_step`, the next training forward raises.
"""

from __future__ import annotations

import weakref

from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from subllm.errors import SubLLMError


class StepCounter:
    """`step()` gives the step of a training forward; `on_step` runs after each optimizer step."""

    def __init__(self):
        self.updates = 0  # optimizer steps over the model's parameters seen by the hook
        self.base: int | None = None  # the step at the reference point (None: not yet read)
        self.ref = 0  # `updates` at the reference point
        self.explicit = False
        self._handle = None

    def __getstate__(self) -> dict:
        """A copy (deepcopy or pickle of the model) counts for itself: it re-registers its own hook
        on its first training forward instead of sharing the original's."""
        return {**self.__dict__, "_handle": None}

    @property
    def current(self) -> int:
        return (self.base or 0) + self.updates - self.ref

    def attach(self, module: nn.Module, on_step) -> None:
        """Start counting the optimizer steps over `module`'s parameters (idempotent);
        `on_step(module, step)` is called after each with the new count."""
        if self._handle is not None:
            return
        ref = weakref.ref(module)

        def hook(optimizer, args, kwargs):
            m = ref()
            if m is None:  # the model is gone: a no-op (removing a hook while torch iterates the
                return  # hooks of this very step would raise)
            ours = {id(p) for p in m.parameters()}
            if any(id(p) in ours for g in optimizer.param_groups for p in g["params"]):
                self.updates += 1
                on_step(m, self.current)

        self._handle = register_optimizer_step_post_hook(hook)

    def reset(self, base: int) -> None:
        """Automatic mode from step `base` (e.g. restored from a checkpoint)."""
        self.base, self.ref, self.explicit = base, self.updates, False

    def set(self, step: int) -> None:
        self.base, self.ref, self.explicit = step, self.updates, True

    def step(self) -> int:
        if self.explicit and self.updates != self.ref:
            raise SubLLMError(
                f"an optimizer step updated the model since set_step({self.base}) but the step was not "
                "advanced: call set_step(step) before the forwards of every optimizer step, or never call "
                "it and the model counts optimizer steps itself"
            )
        return self.current


__all__ = ["StepCounter"]
