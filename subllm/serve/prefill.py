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

`together` > 1 (`subllm serve --prefill-batch N`): whole prompts of one pass that wait next to each
other in the queue and fit in the step's budget together are prefilled as one left-padded batch of
up to N rows, whose cache is then split into each request's own (cache_rows.py `split`: no copy;
only where rows are stored apart). On a CPU a batch of short prompts costs much less than its rows
one at a time (SmolLM2's SUBLLM, bf16, one thread: 16 x 64 tokens 1.56x, 8 x 128 1.15x, 4 x 512
0.95x; benchmarks/prefill_together.py, docs/RESULTS.md). The price is exactness: a batched
prefill's matmuls may round differently from a batch-1 one, so outputs equal the solo `generate()`
only to float rounding (measured on this project's EPYC: bf16 prefill bit-identical, fp32 logits
within 4e-5). Off by default (N = 1).
"""

from __future__ import annotations

import collections
import itertools
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


def prefill_together(model, group: list, cache_chunk: int, prefill_dtype: str | None) -> torch.Tensor:
    """Prefill the prompts of `group` (Prefill objects of one pass, not started) as one
    left-padded batch; each gets its own batch-1 cache, all its prompt in. -> logits (n, V)."""
    lens = [len(p.req.prompt) for p in group]
    L = max(lens)
    ids = torch.zeros(len(group), L, dtype=torch.long)
    mask = torch.zeros(len(group), L, dtype=torch.long)
    for i, (p, n) in enumerate(zip(group, lens)):
        ids[i, L - n :], mask[i, L - n :] = torch.tensor(p.req.prompt), 1
    cache = new_cache(model, len(group), chunk=cache_chunk, packed=True)
    with prefill_autocast(prefill_dtype, ids.device):
        logits = prefill(model, ids, mask, cache)
    for p, c, n in zip(group, cache.split(), lens):
        p.cache, p.done_tokens = c, n
    return logits


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
    def fresh_one_pass(self) -> bool:
        """A prompt that runs in one pass and has not started (it may join a batched prefill)."""
        return self._chunk is None and self.done_tokens == 0

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
        prefill_dtype: str | None = None, together: int = 1,
    ):  # fmt: skip
        self.model, self.chunk, self.cache_chunk, self.store = model, chunk, cache_chunk, store
        self.prefill_dtype = prefill_dtype
        self.together = together if rows_apart(model) else 1  # the split needs rows stored apart
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
        grouping = self.together > 1
        while self.items:
            p = self.items[0]
            if p.req.cancelled:
                self.items.popleft()
                dropped(p.req, None)
                continue
            group = [p]
            try:
                n = p.next_tokens  # the first time: the prefix store lookup
                if used and used + n > budget:
                    break
                if grouping and p.fresh_one_pass:
                    group = self._group(p, budget - used)
                if len(group) > 1:
                    logits = prefill_together(self.model, group, self.cache_chunk, self.prefill_dtype)
                else:
                    logits = p.run()
            except Exception as e:
                if len(group) > 1:  # which row failed is unknown: the rest of the round one at a time
                    grouping = False
                    continue
                self.items.popleft()
                dropped(p.req, e)
                continue
            if len(group) > 1:
                for i, q in enumerate(group):
                    self.items.popleft()
                    used += len(q.req.prompt)
                    joined(q.req, q.cache, logits[i : i + 1].float())
                continue
            used += n
            if logits is not None:
                self.items.popleft()
                joined(p.req, p.cache, logits.float())
        return used

    def _group(self, first: Prefill, budget: float) -> list[Prefill]:
        """`first` and the fresh one-pass prompts right behind it in the queue, up to `together`
        and `budget` prompt tokens in all (first come first served: the first that cannot join
        ends the group)."""
        group, total = [first], first.next_tokens
        for p in itertools.islice(self.items, 1, None):
            if len(group) == self.together or p.req.cancelled or not p.fresh_one_pass:
                break
            n = p.next_tokens
            if total + n > budget:
                break
            group.append(p)
            total += n
        return group
