"""RowKVCache: a KVCache whose rows are stored apart, each as long as it holds (issue 21).

KVCache keeps one buffer per layer for the whole batch, so every row of a level is as wide as the
level's longest row: in a batch whose rows keep very different numbers of tokens (a SUBLLM's S
decides per row) or whose prompts differ in length, the short rows' capacity is padding. Measured
before this file (docs/RESULTS.md, "KV cache"): a ragged batch of 4 at 1k allocated 0.957 of
LLaMA's K/V bytes against an ideal 0.750, batch 8 at 4k 0.999 against 0.752.

Here each (level, row) has its own buffer for all layers of that level: (2, layers of the level, 1,
Hkv, capacity, head_dim) - K and V, on huge pages where large enough (hugepages.py) - sized to the
row: exactly its length + `extra` at prefill, grown in `chunk` steps by copying that row alone.
So:
- allocated K/V = sum over rows and levels of each row's own capacity (the ideal plus at most the
  reserve and one growth chunk per row and level);
- `add_rows` adopts another RowKVCache's row buffers (no copy: admitting a request prefilled alone
  costs nothing however large the running batch), `keep_rows` drops rows (no copy either);
- decode reads each row in place: the native ops take one buffer per row of the step
  (`kernel_kv`; native.py decode_attention, csrc/decode_layers.cpp), torch's attention a view of
  each row (`row_kv`).
There is no batch-wide (B, Hkv, capacity, hd) tensor, so the paths that need one - the compiled
decode graphs and the one-call masked attention of a full batch without the native kernel
(engine.py) - take the per-row path or keep KVCache. Original positions stay one (B, width) tensor
per level (8 bytes per slot and level: not K/V). Everything else - lengths, snapshot / rewind,
append's scratch slots, chunked prefill's extend - is KVCache's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from subllm.errors import SubLLMError
from subllm.inference import hugepages
from subllm.inference.cache import KVCache, _fit


class RowKVCache(KVCache):
    """KVCache with one buffer per (level, row); see the module docstring. `capacity[level]` is the
    width of the level's positions (the widest row); `row_capacity(level, row)` a row's K/V slots."""

    packed = True

    def __init__(self, *args, **kwargs):  # KVCache's arguments
        super().__init__(*args, **kwargs)
        batch_size = self.batch_size
        self.k = self.v = None  # no batch-wide buffers: row_kv / kernel_kv
        self._where = {}  # layer -> (level, index among the level's layers)
        for level, layers in enumerate(self.level_layers):
            self._where.update({layer: (level, j) for j, layer in enumerate(layers)})
        # per level and row: [buffer (2, n, 1, Hkv, cap, hd) or None, K views, V views] and capacity
        self._rows: list[list[tuple[Tensor, list[Tensor], list[Tensor]] | None]] = [
            [None] * batch_size for _ in range(self.n_levels)
        ]
        self._cap = [[0] * batch_size for _ in range(self.n_levels)]

    # ---- storage -----------------------------------------------------------------------------
    def _new_row(self, level: int, cap: int) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        c, n = self.config, len(self.level_layers[level])
        shape = (2, n, 1, c.n_kv_heads, cap, c.head_dim)
        if self.device.type == "cpu":
            store = hugepages.zeros(shape, self.dtype)
        else:
            store = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return store, [store[0, j].detach() for j in range(n)], [store[1, j].detach() for j in range(n)]

    def row_capacity(self, level: int, row: int) -> int:
        return self._cap[level][row]

    def _room(self, level: int, rows, needs: list[int], exact: bool = False, width: int = 0) -> None:
        """Each row rows[i] gets room for needs[i] tokens (a new buffer of the next multiple of
        `chunk`, or exactly needs[i] with `exact`, holding the row's tokens so far); the level's
        positions become at least `width` and the widest row wide."""
        caps, got = self._cap[level], self._rows[level]
        wide = width
        for r, n in zip(rows, needs):
            if n <= caps[r]:
                continue
            cap = n if exact else -(-n // self.chunk) * self.chunk
            new = self._new_row(level, cap)
            held = self._len[level][r]
            if held:
                new[0][..., :held, :] = got[r][0][..., :held, :]
            got[r], caps[r] = new, cap
            wide = max(wide, cap)
        if wide > self.capacity[level]:  # positions as wide as the widest row
            grow = wide if exact else -(-wide // self.chunk) * self.chunk
            self.pos[level] = _fit(self.pos[level][:, None], grow)[:, 0]
            self.capacity[level] = grow

    def reserve(self, level: int, n: int, exact: bool = False) -> None:
        self._room(level, range(self.batch_size), [n] * self.batch_size, exact, n)

    def row_kv(self, layer: int, row: int) -> tuple[Tensor, Tensor]:
        level, j = self._where[layer]
        got = self._rows[level][row]
        if got is None:  # nothing reached this row's level yet
            c = self.config
            empty = torch.zeros(1, c.n_kv_heads, 0, c.head_dim, dtype=self.dtype, device=self.device)
            return empty, empty
        return got[1][j], got[2][j]

    def kernel_kv(self, layers: list[int], rows: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer, one buffer per row of the step (the native ops then read row 0 of each)."""
        ks, vs = [], []
        for layer in layers:
            level, j = self._where[layer]
            got = self._rows[level]
            ks += [got[r][1][j] for r in rows]
            vs += [got[r][2][j] for r in rows]
        return ks, vs

    def kernel_rows(self, rows: list[int]) -> list[int]:
        return [0] * len(rows)  # each row of the step reads its own buffer, of one row

    def capacity_nbytes(self) -> int:
        return sum(got[0].numel() * got[0].element_size() for lv in self._rows for got in lv if got)

    def allocated_nbytes(self) -> int:
        storages = {}
        for got in (got for lv in self._rows for got in lv if got):
            s = got[0].untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return sum(storages.values())

    # ---- writes ------------------------------------------------------------------------------
    def write_prefill(self, layer: int, k: Tensor, v: Tensor) -> None:
        """k, v (B, Hkv, L, hd) of a right-aligned level -> each row's first `length` slots."""
        level = self._where[layer][0]
        for b, n in enumerate(self._len[level]):
            if n:
                kb, vb = self.row_kv(layer, b)
                kb[0, :, :n] = k[b, :, :n]
                vb[0, :, :n] = v[b, :, :n]

    def write(self, layer: int, rows: list[int], slots: list[int], k: Tensor, v: Tensor) -> None:
        for i, (r, s) in enumerate(zip(rows, slots)):
            kb, vb = self.row_kv(layer, r)
            kb[0, :, s] = k[i, :, 0]
            vb[0, :, s] = v[i, :, 0]

    def write_extend(
        self, layer: int, rows: list[int], starts: list[int], counts: list[int], k: Tensor, v: Tensor
    ) -> None:
        for i, (r, s, n) in enumerate(zip(rows, starts, counts)):
            if n:
                kb, vb = self.row_kv(layer, r)
                kb[0, :, s : s + n] = k[i, :, :n]
                vb[0, :, s : s + n] = v[i, :, :n]

    # ---- rows --------------------------------------------------------------------------------
    def keep_rows(self, rows: list[int]) -> None:
        """Keep only batch rows `rows`, in that order; the others' buffers are dropped, nothing is
        copied (positions shrink to the kept rows' widest)."""
        rows = self._check_rows(rows)
        idx = torch.tensor(rows, device=self.device)
        for level in range(self.n_levels):
            self._rows[level] = [self._rows[level][r] for r in rows]
            self._cap[level] = [self._cap[level][r] for r in rows]
            self._len[level] = [self._len[level][r] for r in rows]
            width = max(self._cap[level])
            self.pos[level] = self.pos[level][:, :width].index_select(0, idx)
            self.capacity[level] = width
        self.batch_size = len(rows)

    def add_rows(self, other: KVCache) -> list[int]:
        """Append the rows of `other` (same config, dtype and device) after this cache's rows;
        -> their new row indexes. A RowKVCache's row buffers are adopted, not copied (`other` is
        then spent: do not write to it); a KVCache's rows are copied into buffers of their length."""
        if other.config != self.config or other.dtype != self.dtype or other.device != self.device:
            raise SubLLMError("add_rows needs a cache of the same model config, dtype and device")
        first = self.batch_size
        for level in range(self.n_levels):
            if other.packed:
                got, caps = list(other._rows[level]), list(other._cap[level])
            else:
                got, caps = [], []
                for b, n in enumerate(other._len[level]):
                    new = self._new_row(level, n) if n else None
                    for j, layer in enumerate(self.level_layers[level]):
                        if n:
                            new[1][j][0, :, :n] = other.k[layer][b, :, :n]
                            new[2][j][0, :, :n] = other.v[layer][b, :, :n]
                    got.append(new)
                    caps.append(n)
            self._rows[level] += got
            self._cap[level] += caps
            self._len[level] = self._len[level] + list(other._len[level])
            width = max(self.capacity[level], *caps)
            pos = [_fit(self.pos[level][:, None], width), _fit(other.pos[level][:, None], width)]
            self.pos[level] = torch.cat(pos)[:, 0]
            self.capacity[level] = width
        self.batch_size += other.batch_size
        return list(range(first, self.batch_size))

    def split(self) -> list[RowKVCache]:
        """One batch-1 RowKVCache per row, in order, each adopting that row's buffers (no copy;
        this cache is then spent) - e.g. prompts prefilled together that join a batch one by one."""
        out = []
        for r in range(self.batch_size):
            c = RowKVCache(self.config, 1, dtype=self.dtype, device=self.device, chunk=self.chunk)
            for level in range(self.n_levels):
                c._rows[level], c._cap[level] = [self._rows[level][r]], [self._cap[level][r]]
                c._len[level] = [self._len[level][r]]
                c.capacity[level] = self._cap[level][r]
                c.pos[level] = self.pos[level][r : r + 1, : c.capacity[level]].clone()
            out.append(c)
        return out
