"""Automatic prefix caching for `subllm serve` (issue 21 item 6): a prompt that starts with blocks of
tokens already prefilled reuses their per-level K/V instead of computing them again.

Why a prefix's cache is a property of the prefix alone: every S keeps token t iff its score
s_t > theta (docs/method.md section 3; theta a constant at inference, `keep_first` a position
rule), and s_t, like every layer's K/V at t, depends only on tokens <= t. So the tokens kept at
each level among the first n, their original positions and their K/V are the same whatever follows
(tests/test_serve_prefix.py checks it level by level against one pass over the whole prompt).

What is not a property of the prefix alone, and how the store is restricted to stay exact:
- The chunk boundaries of chunked prefill: a chunk's tokens attend in one call, so prefilling
  [0, 512) and then [512, 700) is not bit-identical to one pass over [0, 700) (float order), and a
  served prompt must equal its solo `generate(prefill_chunk=N)` (subllm/serve/prefill.py). Blocks
  are therefore exactly the prefill chunk: a hit resumes `prefill_chunks` at a chunk boundary, so
  every chunk after it is the same call as without the cache. With `--prefill-chunk 0` (one pass)
  the store is off.
- Dynamic RoPE scaling computes the frequencies of every prompt token from the whole prompt's
  length (as HF does), so K depends on what follows: the store is off for such checkpoints.

Storage: one entry per block, keyed by a hash chain (the block's tokens and its parent's key), that
holds only what the block added at each level - the kept tokens' original positions and K/V - so a
prefix of m blocks costs what its m blocks hold, not m snapshots. A lookup walks the chain from the
first block and stops at the first miss; it never takes the whole prompt (the last token must run
to give the logits). Least recently used entries are evicted first under a byte budget; a hit or an
insert touches the chain from its deepest block up to its first, so a parent is always more recent
than its children and eviction takes leaves first.
"""

from __future__ import annotations

import array
import collections
import hashlib
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from subllm.errors import SubLLMError
from subllm.inference.cache import KVCache
from subllm.inference.engine import new_cache, rows_apart

DEFAULT_PREFIX_CACHE_MB = 256  # `subllm serve --prefix-cache-mb`


@dataclass
class _Block:
    pos: list[Tensor]  # per level: (n_l,) original positions of the block's tokens at that level
    k: list[Tensor]  # per layer: (Hkv, n_level(layer), hd)
    v: list[Tensor]
    nbytes: int


class PrefixStore:
    """Blocks of `block` tokens -> their per-level K/V, at most `max_bytes` bytes held."""

    def __init__(self, block: int, max_bytes: int):
        if not isinstance(block, int) or block < 1 or max_bytes < 0:
            raise SubLLMError(f"prefix cache: need block >= 1 and budget >= 0, got {block}, {max_bytes}")
        self.block, self.max_bytes = block, max_bytes
        self.entries: collections.OrderedDict[bytes, _Block] = collections.OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.hit_tokens = self.inserts = self.evictions = 0
        self._lock = threading.Lock()  # counters are read by the HTTP side (/health, /metrics)

    def keys(self, prompt: list[int], n_blocks: int) -> list[bytes]:
        """The chain keys of the first `n_blocks` blocks of `prompt`."""
        out, h = [], b""
        for i in range(n_blocks):
            tokens = array.array("q", prompt[i * self.block : (i + 1) * self.block]).tobytes()
            h = hashlib.sha256(h + tokens).digest()
            out.append(h)
        return out

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # deepest first: the first block ends most recent
            if key in self.entries:
                self.entries.move_to_end(key)

    def lookup(self, model, prompt: list[int], cache_chunk: int) -> tuple[KVCache, int] | None:
        """The longest cached block prefix of `prompt` shorter than the prompt, as a new batch-1
        cache holding exactly those tokens (as chunked prefill leaves them), and its length in
        tokens; None (a miss) when not even the first block is cached."""
        keys = self.keys(prompt, (len(prompt) - 1) // self.block)
        chain = []
        for key in keys:
            blk = self.entries.get(key)
            if blk is None:
                break
            chain.append(blk)
        with self._lock:
            if not chain:
                self.misses += 1
                return None
            self.hits += 1
            self.hit_tokens += len(chain) * self.block
        self._touch(keys[: len(chain)])
        cache = new_cache(model, 1, chunk=cache_chunk, packed=rows_apart(model))
        for level in range(cache.n_levels):
            pos = torch.cat([b.pos[level] for b in chain])
            n = pos.shape[0]
            if not n:
                continue
            starts = cache.extend(level, [0], pos[None], [n])
            for layer in cache.level_layers[level]:
                k = torch.cat([b.k[layer] for b in chain], dim=1)[None]  # (1, Hkv, n, hd)
                v = torch.cat([b.v[layer] for b in chain], dim=1)[None]
                cache.write_extend(layer, [0], starts, [n], k, v)
        return cache, len(chain) * self.block

    def add(self, prompt: list[int], n_blocks: int, cache: KVCache, before: list[list[int]]) -> None:
        """Block `n_blocks - 1` of `prompt` has just been prefilled into `cache` (batch 1): keep
        what it added to each level since the per-level lengths `before` (`cache.snapshot()`)."""
        keys = self.keys(prompt, n_blocks)
        key = keys[-1]
        if key in self.entries or any(k not in self.entries for k in keys[:-1]):
            self._touch(keys)  # already held, or a parent was evicted meanwhile (unreachable)
            return
        pos, ks, vs = [], [None] * len(cache.layer_level), [None] * len(cache.layer_level)
        for level in range(cache.n_levels):
            a, b = before[level][0], cache.length(level, 0)
            pos.append(cache.pos[level][0, a:b].clone())
            for layer in cache.level_layers[level]:
                kb, vb = cache.row_kv(layer, 0)
                ks[layer], vs[layer] = kb[0, :, a:b].clone(), vb[0, :, a:b].clone()
        nbytes = sum(t.numel() * t.element_size() for t in (*pos, *ks, *vs))
        if nbytes > self.max_bytes:
            return
        parents = set(keys[:-1])
        with self._lock:
            while self.nbytes + nbytes > self.max_bytes:
                if next(iter(self.entries)) in parents:  # the budget cannot hold this whole chain
                    return
                _, old = self.entries.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1
            self.entries[key] = _Block(pos, ks, vs, nbytes)
            self.nbytes += nbytes
            self.inserts += 1
        self._touch(keys)

    def stats(self) -> dict:
        with self._lock:
            return {
                "block_tokens": self.block,
                "hits": self.hits,
                "misses": self.misses,
                "hit_tokens": self.hit_tokens,
                "blocks": len(self.entries),
                "bytes": self.nbytes,
                "max_bytes": self.max_bytes,
                "evictions": self.evictions,
            }
