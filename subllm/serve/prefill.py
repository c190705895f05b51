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
from subllm.inference.engine import new_cache, prefill, rows_apart
from subllm.inference.generation import prefill_autocast
from subllm.serve.prefix_cache import PrefixStore

DEFAULT_PREFILL_CHUNK = 512  # `subllm serve --prefill-chunk`


def solo_prefill_chunk(prompt_len: int, chunk: int | None) -> int | None:
    """The `prefill_chunk` of the solo `generate()` call that a served prompt equals."""
    return chunk if chunk is not None and prompt_len > chunk else None


class Prefill:
    """One request's prompt on its way into its own batch-1 cache. With a prefix store (its blocks
    are the prefill chunk, subllm/serve/prefix_cache.py) a chunked prompt starts from its longest
    cached block prefix - looked up when its prompt work begins, not at admission, so that a
    request queued behind another with the same prefix finds what that one stored - and stores
    each full block it prefills."""

    def __init__(
        self, model, req, chunk: int | None, cache_chunk: int, store: PrefixStore | None = None,
        prefill_dtype: str | None = None,
    ):  # fmt: skip
        self.req, self._prefill_dtype = req, prefill_dtype
        self.cache: KVCache | None = None
        self.done_tokens = 0
        self.reused_tokens = 0  # prompt tokens taken from the prefix store
        self._model, self._n, self._cache_chunk = model, len(req.prompt), cache_chunk
        self._chunk = solo_prefill_chunk(self._n, chunk)
        self._store = store if self._chunk is not None else None  # one-pass prompts: no blocks
        self._steps = None
        self._mark: list[list[int]] = []  # per-level lengths at the last block boundary

    def _begin(self) -> None:
        store = self._store
        hit = None if store is None else store.lookup(self._model, self.req.prompt, self._cache_chunk)
        if hit is None:
            self.cache = new_cache(self._model, 1, chunk=self._cache_chunk, packed=rows_apart(self._model))
        else:
            self.cache, self.done_tokens = hit
            self.reused_tokens = self.done_tokens
        self._mark = self.cache.snapshot()

    @property
    def next_tokens(self) -> int:
        """Prompt tokens the next `run` processes."""
        if self.cache is None:
            self._begin()
        left = self._n - self.done_tokens
        return left if self._chunk is None else min(self._chunk, left)

    def run(self) -> torch.Tensor | None:
        """Process the next piece; -> the logits (1, V) at the prompt's last token once it is all
        in the cache, else None."""
        ids = torch.tensor([self.req.prompt])
        n = self.next_tokens  # the cache is made here, outside the prefill's dtype region
        with prefill_autocast(self._prefill_dtype, ids.device):
            if self._chunk is None:
                out = prefill(self._model, ids, None, self.cache)
            else:
                if self._steps is None:
                    self._steps = prefill_chunks(
                        self._model, ids, None, self.cache, self._chunk, start=self.done_tokens
                    )
                out = next(self._steps)
        self.done_tokens += n
        if self._store is not None and self.done_tokens % self._chunk == 0:  # a full block is in
            self._store.add(self.req.prompt, self.done_tokens // self._chunk, self.cache, self._mark)
            self._mark = self.cache.snapshot()
        return out


class PrefillQueue:
    """Admitted requests whose prompts are not yet all in their cache, first come first served."""

    def __init__(
        self, model, chunk: int | None, cache_chunk: int, store: PrefixStore | None = None,
        prefill_dtype: str | None = None,
    ):  # fmt: skip
        self.model, self.chunk, self.cache_chunk, self.store = model, chunk, cache_chunk, store
        self.prefill_dtype = prefill_dtype
        self.items: collections.deque[Prefill] = collections.deque()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, req) -> None:
        p = Prefill(self.model, req, self.chunk, self.cache_chunk, self.store, self.prefill_dtype)
        self.items.append(p)

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
            try:
                n = p.next_tokens  # the first time: the prefix store lookup
                if used and used + n > budget:
                    break
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
