"""Linear warmup then cosine decay: the schedule paired with AdamW (docs/method.md section 8).

    factor(s) = (s + 1) / W                                 for s < W
              = m + (1 - m) * (1 + cos(pi * min(1, (s - W) / (T - W)))) / 2   otherwise

with W = warmup_steps, T = total_steps, m = min_lr_ratio: the lr reaches base_lr at the last
warmup step, falls to min_lr_ratio * base_lr at step T and stays there.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from subllm.errors import SubLLMError
from subllm.optim.schedule import LRSchedule


class WarmupCosine(LRSchedule):
    """Call `step(step, tokens_seen)` once per optimizer step, before `optimizer.step()`.

    `tokens_seen` is accepted for a uniform interface and ignored.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1):
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps or not 0.0 <= min_lr_ratio <= 1.0:
            raise SubLLMError(
                f"WarmupCosine: need total_steps >= 1, 0 <= warmup_steps <= total_steps and "
                f"0 <= min_lr_ratio <= 1; got {total_steps}, {warmup_steps}, {min_lr_ratio}"
            )
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        super().__init__(optimizer)

    def factor(self, step: int, tokens_seen: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        m = self.min_lr_ratio
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))
