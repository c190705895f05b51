"""Prompts admitted a bounded amount at a time, between the batcher's decode steps (issue 21 item 6),
so that a long prompt does not stall the streams already running.

Each admitted request fills its own batch-1 cache (it joins the running batch when its prompt is
done). A prompt of at most `chunk` tokens runs in one pass - `engine.prefill`, as `generate()`
runs it; a longer one runs `chunk` tokens per step through `prefill_chunks`, the steps of
`prefill_chunked`, as `generate(..., prefill_chunk=chunk)` runs it. The chunk boundaries are
always multiples of `chunk` from the prompt's start, never cut by what else is waiting, so each
request's logits - and so its tokens - equal that solo call's exactly.

`PrefillQueue.round` runs the prompt work of one batcher step: pieces (a whole short prompt, or the
next chunk of a long one) in arrival order while they fit in `chunk` tokens together - always at
least one piece, so every step makes progress and no step runs more than `chunk` prompt tokens
(the first piece aside, which is at most `chunk` itself). `chunk` None: every prompt in one pass at
once, as before chunking (a long prompt then stalls every stream while it runs).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch

from subllm.inference.cache import KVCache
from subllm.inference.chunked_prefill import prefill_chunks
from subllm.inference.engine import new_cache, prefill

DEFAULT_PREFILL_CHUNK = 512  # `subllm serve --prefill-chunk`


def solo_prefill_chunk(prompt_len: int, chunk: int | None) -> int | None:
    """The `prefill_chunk` of the solo `generate()` call that a served prompt equals."""
    return chunk if chunk is not None and prompt_len > chunk else None


class Prefill:
    """One request's prompt on its way into its own batch-1 cache."""

    def __init__(self, model, req, chunk: int | None, cache_chunk: int):
        self.req = req
        self.cache: KVCache = new_cache(model, 1, chunk=cache_chunk)
        self.done_tokens = 0
        self._model, self._n = model, len(req.prompt)
        self._chunk = solo_prefill_chunk(self._n, chunk)
        self._steps = None

    @property
    def next_tokens(self) -> int:
        """Prompt tokens the next `run` processes."""
        left = self._n - self.done_tokens
        return left if self._chunk is None else min(self._chunk, left)

    def run(self) -> torch.Tensor | None:
        """Process the next piece; -> the logits (1, V) at the prompt's last token once it is all
        in the cache, else None."""
        ids = torch.tensor([self.req.prompt])
        n = self.next_tokens
        if self._chunk is None:
            out = prefill(self._model, ids, None, self.cache)
        else:
            if self._steps is None:
                self._steps = prefill_chunks(self._model, ids, None, self.cache, self._chunk)
            out = next(self._steps)
        self.done_tokens += n
        return out


class PrefillQueue:
    """Admitted requests whose prompts are not yet all in their cache, first come first served."""

    def __init__(self, model, chunk: int | None, cache_chunk: int):
        self.model, self.chunk, self.cache_chunk = model, chunk, cache_chunk
        self.items: collections.deque[Prefill] = collections.deque()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, req) -> None:
        self.items.append(Prefill(self.model, req, self.chunk, self.cache_chunk))

    def requests(self) -> list:
        return [p.req for p in self.items]

    def clear(self) -> None:
        self.items.clear()

    def round(
        self,
        joined: Callable[[object, KVCache, torch.Tensor], None],
        dropped: Callable[[object, Exception | None], None],
    ) -> int:
        """One step's prompt work (see the module docstring). A finished prompt is handed to
        `joined(req, cache, logits)`; a cancelled request (`dropped(req, None)`) or one whose
        prefill raised (`dropped(req, error)`) leaves. -> prompt tokens processed."""
        used = 0
        budget = float("inf") if self.chunk is None else self.chunk
        while self.items:
            p = self.items[0]
            if p.req.cancelled:
                self.items.popleft()
                dropped(p.req, None)
                continue
            n = p.next_tokens
            if used and used + n > budget:
                break
            try:
                logits = p.run()
            except Exception as e:
                self.items.popleft()
                dropped(p.req, e)
                continue
            used += n
            if logits is not None:
                self.items.popleft()
                joined(p.req, p.cache, logits.float())
        return used
