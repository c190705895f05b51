"""One completion request as the batcher holds it (subllm/serve/batcher.py): its generation
settings, its progress (tokens, text sent, sampling state) and the errors that refuse it."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from subllm.errors import SubLLMError
from subllm.inference.generation import TextDeltas
from subllm.serve.logprobs import LogprobRecord


class QueueFull(SubLLMError):
    """The waiting queue holds --max-queue requests (HTTP 429)."""


class Unavailable(SubLLMError):
    """The server is shutting down (HTTP 503)."""


@dataclass(frozen=True)
class Settings:
    """Generation settings of one request, with `generate()`'s meaning (stop: strings that end
    the text, not included; ignore_eos: generate as if eos_token_id=None)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # with each token, the log-probabilities of this many alternatives
    echo: bool = False  # the prompt comes back before the completion (and its logprobs with them)


_ids = itertools.count()


class Request:
    """One completion in flight. `cancel()` may be called from any thread (client gone)."""

    def __init__(
        self,
        prompt: list[int],
        settings: Settings,
        sink: Callable[[str, object], None],
        prompt_text: str | None = None,
    ):
        self.id = next(_ids)
        self.prompt, self.settings, self.sink = list(prompt), settings, sink
        self.prompt_text = prompt_text  # as the client sent it (echo); None: decoded from the ids
        self.cancelled = False
        self.tokens: list[int] = []
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None
        self.sent = ""  # text sent so far (deltas concatenated)
        self.before: list[list[int]] | None = None  # per-level lengths after prefill (metrics)
        self.gen: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # (1, V) bool, for the repetition penalty
        self._deltas: TextDeltas | None = None
        self.record: LogprobRecord | None = None  # with settings.logprobs

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None
