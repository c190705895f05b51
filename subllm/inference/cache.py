"""KVCache: per-layer keys/values with per-level, per-row lengths and original positions.

docs/method.md sections 3 and 6. A *level* is one nesting depth of the structure string: level 0
holds the layers outside every bracket, level `i + 1` the layers directly inside subsampling
module `i`. All layers of one level see the same tokens, so they share one length per row and one
row of original positions per row.

Every level is stored compactly and right-aligned: row `b` of level `l` holds exactly
`lengths(l)[b]` tokens in slots `0 .. lengths(l)[b] - 1` - the tokens of that row that reached the
level, in causal order. Pad tokens, tokens that the row's S dropped and other rows' tokens are never
stored (the released code wrote padded duplicate indexes into inner caches, method.md section 10).
Slots past a row's length are unused capacity: they hold finite values (zeros or stale entries, so
that a masked slot contributes exactly 0 to attention) and are overwritten by the next append.

The K and V buffers of all layers of a level share one allocation, on 2 MiB huge pages on a CPU
(hugepages.py). Capacity grows in chunks of `chunk` slots (a copy of the level's buffers, amortised
over `chunk` appends); prefill with `extra` pre-allocates exactly prompt + extra slots per level instead.
Measured (subllm-small, 4k context, 128 decode steps, fp32, 1 thread, median of 5 interleaved
runs): preallocated 40.6 ms/token, chunk 256 31.0, chunk 64 26.0 - equal within the noise of a
shared 2-core machine, so growth (default chunk 256) is the default: it needs no maximum length
up front and inner levels never reserve room for tokens their S will drop.

`nbytes()` counts the K/V entries actually held - the quantity whose ratio to LLaMA's is the ideal
KV ratio of method.md section 1 - and `capacity_nbytes()` the bytes allocated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from subllm.config import ModelConfig, Sub
from subllm.errors import SubLLMError
from subllm.inference import hugepages


def layer_levels(tree: tuple) -> tuple[list[int], int]:
    """(level of each layer in flat index order, number of levels) for a parsed structure tree."""
    levels: dict[int, int] = {}
    n_levels = 1

    def walk(nodes: tuple, level: int) -> None:
        nonlocal n_levels
        for node in nodes:
            if isinstance(node, Sub):
                n_levels = max(n_levels, node.index + 2)
                walk(node.children, node.index + 1)
            else:
                levels[node] = level

    walk(tree, 0)
    return [levels[i] for i in range(len(levels))], n_levels


class KVCache:
    """Keys and values of every layer for a batch of `batch_size` rows (see the module docstring).

    Buffers: `k[layer]`, `v[layer]` of shape (B, Hkv, capacity(level), head_dim) and `pos[level]`
    of shape (B, capacity(level)) (original positions; -1 in unused slots). Code that must also
    work on a cache whose rows are stored apart (cache_rows.py, `packed`) reads K/V through
    `row_kv` and `kernel_kv`.
    """

    packed = False  # rows in one buffer per layer; cache_rows.RowKVCache stores each row apart

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        chunk: int = 256,
    ):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise SubLLMError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(chunk, int) or chunk <= 0:
            raise SubLLMError(f"chunk must be a positive integer, got {chunk!r}")
        self.config = config
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.chunk = chunk
        self.layer_level, self.n_levels = layer_levels(config.tree)
        self.level_layers = [
            [i for i, lv in enumerate(self.layer_level) if lv == level] for level in range(self.n_levels)
        ]
        # per-level per-row lengths as python ints: cheap per-step bookkeeping, no tensor ops
        self._len = [[0] * batch_size for _ in range(self.n_levels)]
        self.capacity = [0] * self.n_levels
        self.pos: list[Tensor] = [self._new_pos(0) for _ in range(self.n_levels)]
        shape = (batch_size, config.n_kv_heads, 0, config.head_dim)
        self.k: list[Tensor] = [torch.empty(shape, dtype=dtype, device=self.device) for _ in self.layer_level]
        self.v: list[Tensor] = [torch.empty(shape, dtype=dtype, device=self.device) for _ in self.layer_level]

    # ---- sizes -------------------------------------------------------------------------------
    def lengths(self, level: int) -> Tensor:
        """(B,) long: tokens held per row at `level`."""
        return torch.tensor(self._len[level], dtype=torch.long)

    def length(self, level: int, row: int) -> int:
        return self._len[level][row]

    def positions(self, level: int, row: int) -> Tensor:
        """Original positions (in the row's full sequence) of the tokens held by `row` at `level`."""
        return self.pos[level][row, : self._len[level][row]]

    def bytes_per_token(self) -> int:
        """K and V bytes of one token in one layer."""
        c = self.config
        return 2 * c.n_kv_heads * c.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def nbytes(self) -> int:
        """Bytes of the K/V entries held: sum over layers and rows of the tokens cached there."""
        per_level = [sum(lens) for lens in self._len]
        return self.bytes_per_token() * sum(per_level[lv] for lv in self.layer_level)

    def capacity_nbytes(self) -> int:
        """Bytes allocated for K/V (held entries plus unused capacity), from the tensors' shapes."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def allocated_nbytes(self) -> int:
        """Bytes of the storages behind the K/V tensors, each storage counted once, as torch
        reports them: a measurement of what is allocated, independent of this cache's own length
        and capacity bookkeeping (a view into a larger buffer counts the whole buffer)."""
        storages = {}
        for t in (*self.k, *self.v):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return sum(storages.values())

    def row_kv(self, layer: int, row: int) -> tuple[Tensor, Tensor]:
        """K and V buffers (1, Hkv, capacity, hd) of one row at `layer` (views; slots past the row's
        length are unused capacity)."""
        return self.k[layer][row : row + 1], self.v[layer][row : row + 1]

    def kernel_kv(self, layers: list[int], rows: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """The K and V buffers the native decode ops take for `layers` and the step's `rows`
        (native.py decode_attention): here one buffer per layer, indexed by `kernel_rows(rows)`."""
        return [self.k[i] for i in layers], [self.v[i] for i in layers]

    def kernel_rows(self, rows: list[int]) -> list[int]:
        """The row index of each of `rows` in the buffers `kernel_kv` gives (here: the row itself)."""
        return rows

    # ---- storage -----------------------------------------------------------------------------
    def _level_buffers(self, level: int, batch: int, cap: int) -> tuple[list[Tensor], list[Tensor]]:
        """Zeroed K and V buffers (batch, Hkv, cap, hd) for every layer of `level`, all in one
        allocation - on huge pages on a CPU (hugepages.py: a decode step streams all of them). Zeros,
        not empty: masked slots must be finite (0 * NaN = NaN)."""
        c, n = self.config, len(self.level_layers[level])
        shape = (2, n, batch, c.n_kv_heads, cap, c.head_dim)
        if self.device.type == "cpu":
            store = hugepages.zeros(shape, self.dtype)
        else:
            store = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # detached, not views: each behaves as its own tensor under autograd (a view made in
        # no_grad mode cannot take an in-place write that requires grad, as the HF path may do)
        return [store[0, i].detach() for i in range(n)], [store[1, i].detach() for i in range(n)]

    def _new_pos(self, cap: int) -> Tensor:
        return torch.full((self.batch_size, cap), -1, dtype=torch.long, device=self.device)

    def reserve(self, level: int, n: int, exact: bool = False) -> None:
        """Make room for `n` tokens per row at `level`: capacity becomes the next multiple of `chunk`
        (or exactly n with `exact`)."""
        if n <= self.capacity[level]:
            return
        cap = n if exact else -(-n // self.chunk) * self.chunk
        old = self.capacity[level]
        ks, vs = self._level_buffers(level, self.batch_size, cap)
        for i, k, v in zip(self.level_layers[level], ks, vs):
            if old:
                k[:, :, :old] = self.k[i]
                v[:, :, :old] = self.v[i]
            self.k[i], self.v[i] = k, v
        pos = self._new_pos(cap)
        pos[:, :old] = self.pos[level]
        self.pos[level] = pos
        self.capacity[level] = cap

    def _room(self, level: int, rows, needs: list[int], exact: bool = False, width: int = 0) -> None:
        """Make room for needs[i] tokens in row rows[i] at `level`, and `width` slots of positions
        (here the whole level becomes as wide as the largest of them)."""
        if needs or width:
            self.reserve(level, max([*needs, width]), exact)

    def start_level(self, level: int, pos: Tensor, lengths: list[int], extra: int = 0) -> None:
        """Prefill: `level` receives, for row b, the first lengths[b] of the tokens at original
        positions pos (B, L) (right-aligned, as the engine lays them out); `extra` slots are reserved
        on top for decoding. Any earlier content of the level is discarded."""
        L = pos.shape[1]
        self._room(level, range(self.batch_size), [max(n + extra, 1) for n in lengths], extra > 0, L + extra)
        self.pos[level][:, :L] = pos
        self.pos[level][:, L:] = -1
        for b, n in enumerate(lengths):
            self.pos[level][b, n:L] = -1
        self._len[level] = [int(n) for n in lengths]

    def write_prefill(self, layer: int, k: Tensor, v: Tensor) -> None:
        """k, v (B, Hkv, L, hd) of a right-aligned level -> slots 0 .. L - 1 of `layer`."""
        L = k.shape[2]
        self.k[layer][:, :, :L] = k
        self.v[layer][:, :, :L] = v

    def append(
        self, level: int, rows: list[int], positions: list[int], active: list[bool] | None = None
    ) -> list[int]:
        """Decode: one new token for each of `rows` at `level` (original positions given).
        Returns the slot of each new token; every layer of the level writes its K/V there.
        `active`: rows marked False get a scratch slot just past their length, which they do not
        keep (their length stays; the next append overwrites it) - a step that runs the whole batch
        through a level where only some rows' tokens belong (engine.py `_decode_sub`)."""
        lens = self._len[level]
        slots = [lens[r] for r in rows]
        self._room(level, rows, [s + 1 for s in slots])
        if len(rows) == 1:  # batch 1 (or one row of a level): a scalar store, no index tensors
            self.pos[level][rows[0], slots[0]] = positions[0]
        elif rows:
            r = torch.tensor(rows, device=self.device)
            self.pos[level][r, torch.tensor(slots, device=self.device)] = torch.tensor(
                positions, device=self.device
            )
        for i, (r, s) in enumerate(zip(rows, slots)):
            if active is None or active[i]:
                lens[r] = s + 1
        return slots

    def write(self, layer: int, rows: list[int], slots: list[int], k: Tensor, v: Tensor) -> None:
        """Decode: k, v (n, Hkv, 1, hd) of one new token for each of `rows`, into `slots`."""
        kb, vb = self.k[layer], self.v[layer]
        n = len(rows)
        if n == self.batch_size and min(slots) == max(slots) and rows == list(range(n)):
            s = slots[0]  # the common case (batch 1, equal lengths): a plain slice, no index tensors
            kb[:, :, s] = k[:, :, 0]
            vb[:, :, s] = v[:, :, 0]
            return
        r = torch.tensor(rows, device=self.device)
        s = torch.tensor(slots, device=self.device)
        kb[r, :, s] = k[:, :, 0].to(kb.dtype)  # an indexed store does not cast by itself
        vb[r, :, s] = v[:, :, 0].to(vb.dtype)

    def extend(self, level: int, rows: list[int], pos: Tensor, counts: list[int]) -> list[int]:
        """Chunked prefill: counts[i] new tokens for row rows[i] at `level`, at original positions
        pos[i, :counts[i]] (pos (n, c)). Returns each row's first new slot."""
        lens = self._len[level]
        starts = [lens[r] for r in rows]
        self._room(level, rows, [s + n for s, n in zip(starts, counts)])
        for i, (r, s, n) in enumerate(zip(rows, starts, counts)):
            if n:
                self.pos[level][r, s : s + n] = pos[i, :n]
                lens[r] = s + n
        return starts

    def write_extend(
        self, layer: int, rows: list[int], starts: list[int], counts: list[int], k: Tensor, v: Tensor
    ) -> None:
        """Chunked prefill: k, v (n, Hkv, c, hd); row rows[i]'s first counts[i] into slots starts[i]..."""
        for i, (r, s, n) in enumerate(zip(rows, starts, counts)):
            if n:
                self.k[layer][r, :, s : s + n] = k[i, :, :n]
                self.v[layer][r, :, s : s + n] = v[i, :, :n]

    # ---- bookkeeping -------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty every level (capacity is kept); prefill starts with this."""
        for level in range(self.n_levels):
            self._len[level] = [0] * self.batch_size
            self.pos[level].fill_(-1)

    def snapshot(self) -> list[list[int]]:
        """The per-level per-row lengths, for `rewind` (benchmarks decode the same steps again)."""
        return [list(lens) for lens in self._len]

    def rewind(self, snapshot: list[list[int]]) -> None:
        """Forget every token appended since `snapshot` (their slots become unused capacity)."""
        for level, lens in enumerate(snapshot):
            for b, n in enumerate(lens):
                if n > self._len[level][b]:
                    raise SubLLMError("rewind: the snapshot is longer than the cache")
                self.pos[level][b, n : self._len[level][b]] = -1
            self._len[level] = list(lens)

    # ---- rows (continuous batching, subllm/serve/batcher.py) --------------------------------
    def keep_rows(self, rows: list[int]) -> None:
        """Keep only batch rows `rows`, in that order (e.g. drop finished requests); the other rows'
        K/V is freed and each level's capacity shrinks to the kept rows' longest length, rounded up
        to `chunk` (never grows). Row r of the result is old row rows[r]."""
        rows = self._check_rows(rows)
        idx = torch.tensor(rows, device=self.device)
        for level in range(self.n_levels):
            lens = [self._len[level][r] for r in rows]
            cap = min(self.capacity[level], -(-max(lens) // self.chunk) * self.chunk)
            ks, vs = self._level_buffers(level, len(rows), cap)
            for i, k, v in zip(self.level_layers[level], ks, vs):  # slice first: copy only what is kept
                torch.index_select(self.k[i][:, :, :cap], 0, idx, out=k)
                torch.index_select(self.v[i][:, :, :cap], 0, idx, out=v)
                self.k[i], self.v[i] = k, v
            self.pos[level] = self.pos[level][:, :cap].index_select(0, idx)
            self.capacity[level] = cap
            self._len[level] = lens
        self.batch_size = len(rows)

    def _check_rows(self, rows: list[int]) -> list[int]:
        rows = [int(r) for r in rows]
        if not rows:
            raise SubLLMError("keep_rows needs at least one row (drop the whole cache instead)")
        if len(set(rows)) != len(rows) or not all(0 <= r < self.batch_size for r in rows):
            raise SubLLMError(f"rows must be distinct batch indexes below {self.batch_size}, got {rows}")
        return rows

    def add_rows(self, other: KVCache) -> list[int]:
        """Append the rows of `other` (same config, dtype and device; e.g. a request prefilled
        alone) after this cache's rows; -> their new row indexes. Per level, capacity becomes the
        larger of this cache's and what `other`'s rows hold (rounded up to `chunk`)."""
        if other.config != self.config or other.dtype != self.dtype or other.device != self.device:
            raise SubLLMError("add_rows needs a cache of the same model config, dtype and device")
        first = self.batch_size
        for level in range(self.n_levels):
            need = max(other._len[level])
            cap = max(self.capacity[level], -(-need // self.chunk) * self.chunk)
            ks, vs = self._level_buffers(level, first + other.batch_size, cap)
            for i, k, v in zip(self.level_layers[level], ks, vs):
                for new, mine, theirs in ((k, self.k[i], other.k[i]), (v, self.v[i], other.v[i])):
                    new[:first, :, : min(cap, mine.shape[2])] = mine[:, :, :cap]
                    new[first:, :, : min(cap, theirs.shape[2])] = theirs[:, :, :cap]
                self.k[i], self.v[i] = k, v
            pos = torch.cat([_fit(self.pos[level][:, None], cap), _fit(other.pos[level][:, None], cap)])
            self.pos[level] = pos[:, 0]
            self.capacity[level] = cap
            self._len[level] = self._len[level] + list(other._len[level])
        self.batch_size += other.batch_size
        return list(range(first, self.batch_size))

    def __repr__(self) -> str:
        lens = ", ".join(f"L{lv}={self._len[lv]}" for lv in range(self.n_levels))
        return (
            f"KVCache(batch={self.batch_size}, levels={self.n_levels}, {lens}, "
            f"held={self.nbytes()} B, allocated={self.capacity_nbytes()} B, dtype={self.dtype})"
        )


def _fit(t: Tensor, cap: int) -> Tensor:
    """t (B, H, S, hd) (or (B, 1, S) positions) with its slot dimension cut or padded to `cap`
    (zeros for K/V, -1 for positions: both the values of unused slots)."""
    S = t.shape[2]
    if S >= cap:
        return t[:, :, :cap]
    fill = -1 if t.dtype == torch.long else 0
    pad = t.new_full((*t.shape[:2], cap - S, *t.shape[3:]), fill)
    return torch.cat([t, pad], 2)
