"""Eden: the learning-rate schedule paired with ScaledAdam (docs/method.md section 8).

    lr = base_lr * ((b^2 + B^2) / B^2)^-1/4 * ((e^2 + E^2) / E^2)^-1/4 * warm(b)

b counts optimizer steps and e counts training tokens (icefall counts epochs; the LM recipe counts
tokens). The lr is flat while b << B and e << E and then decays like b^-1/2 and e^-1/2.
warm(b) rises linearly from `warmup_start` at b = 0 to 1 at b = warmup_batches, then stays 1.
"""

from __future__ import annotations

from torch.optim import Optimizer

from subllm.errors import SubLLMError
from subllm.optim.schedule import LRSchedule


class Eden(LRSchedule):
    """Call `step(step, tokens_seen)` once per optimizer step, before `optimizer.step()`.

    If `tokens_per_step` is given, `tokens_seen` may be omitted and is taken as
    step * tokens_per_step; otherwise omitting it is an error (no silent zero).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_batches: float = 7500.0,
        lr_tokens: float = 1e9,
        warmup_batches: float = 500.0,
        warmup_start: float = 0.5,
        tokens_per_step: int | None = None,
    ):
        if lr_batches <= 0 or lr_tokens <= 0 or warmup_batches < 0:
            raise SubLLMError(
                f"Eden: need lr_batches > 0, lr_tokens > 0, warmup_batches >= 0; got "
                f"{lr_batches}, {lr_tokens}, {warmup_batches}"
            )
        self.lr_batches = float(lr_batches)
        self.lr_tokens = float(lr_tokens)
        self.warmup_batches = float(warmup_batches)
        self.warmup_start = float(warmup_start)
        self.tokens_per_step = tokens_per_step
        super().__init__(optimizer)

    def factor(self, step: int, tokens_seen: int) -> float:
        b, e = float(step), float(tokens_seen)
        B, E = self.lr_batches, self.lr_tokens
        decay = ((b * b + B * B) / (B * B)) ** -0.25 * ((e * e + E * E) / (E * E)) ** -0.25
        if b >= self.warmup_batches:
            warm = 1.0
        else:
            warm = self.warmup_start + (1.0 - self.warmup_start) * b / self.warmup_batches
        return decay * warm

    def _tokens(self, step: int, tokens_seen: int | None) -> int:
        if tokens_seen is not None:
            return tokens_seen
        if self.tokens_per_step is None:
            raise SubLLMError("Eden.step needs tokens_seen (or construct Eden with tokens_per_step)")
        return step * self.tokens_per_step

    def step_batch(self, batch: int) -> None:
        """icefall-style: move to step `batch`, keeping the token count."""
        self.step(batch, self.last_tokens)

    def step_tokens(self, tokens: int) -> None:
        """icefall's `step_epoch`, counting tokens: move to `tokens`, keeping the step."""
        self.step(self.last_step, tokens)
