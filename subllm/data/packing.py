"""Packing: tokenize a corpus once into memory-mapped token shards, and read them back in batches.

On disk (one folder per split):

    shard_00000.bin ...   raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    meta.json             dtype, token counts, shards, tokenizer path + fingerprint, source bytes

Every document is followed by `</s>` (the eos id), so documents are separated by eos in the stream.
`num_tokens` counts those separators too, and `source_bytes` is the total UTF-8 size of the documents,
so bits per byte = (mean loss in nats per token / ln 2) * num_tokens / source_bytes
(`meta["tokens_per_byte"]` holds num_tokens / source_bytes).

Batches are `x` LongTensors of shape (B, T) - non-overlapping windows of T tokens from one shard. There
are no separate labels: the model shifts internally (position t predicts x[:, t+1]), as HF causal LMs do
with `labels=input_ids`. `BatchSampler` visits all windows in a random order per epoch (from `seed` and
the epoch number only), splits every global batch of B * world_size windows across the DDP ranks (so
ranks see disjoint data), and exposes its position through `state_dict()` / `load_state_dict()`: a
resumed sampler yields exactly the batches the uninterrupted one would have. `val_batches` walks the
windows in order, deterministically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from subllm.data.corpus import Log
from subllm.errors import SubLLMError

META = "meta.json"
FORMAT = "subllm-shards-v1"
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")  # after a lone newline with non-space on both sides


def byte_level_splittable(backend) -> bool:
    """True when cutting a text at `_SAFE_CUT` cannot change its token ids: no normalizer, a ByteLevel
    pre-tokenizer with the GPT-2 regex and no prefix space, no whitespace-stripping added tokens.

    Why: no GPT-2 regex pattern matches across a newline and the non-space after it, and a lone
    newline between non-spaces is its own pre-token both inside the text and at the end of a piece
    (a newline run before a word is not: `\\n\\nThe` pre-tokenizes as `\\n`, `\\n`, `The`, but
    a piece ending in `\\n\\n` as `\\n\\n`). BPE never merges across pre-tokens."""
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    added = spec.get("added_tokens") or []
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and bool(pre.get("use_regex", True))
        and not pre.get("add_prefix_space", False)
        and not any(t.get("lstrip") or t.get("rstrip") for t in added)
    )


def split_for_encoding(text: str, chunk_chars: int) -> list[str]:
    """`text` cut at `_SAFE_CUT` into pieces of >= `chunk_chars` characters (the last may be shorter)."""
    pieces, pos = [], 0
    while len(text) - pos > chunk_chars:
        m = _SAFE_CUT.search(text, pos + chunk_chars)
        if m is None:
            break
        pieces.append(text[pos : m.start()])
        pos = m.start()
    pieces.append(text[pos:])
    return pieces


def pack_corpus(
    corpus: str | Path,
    tokenizer,
    out_dir: str | Path,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    docs_per_batch: int = 64,
    chunk_chars: int = 4096,
    tokenizer_path: str | Path | None = None,
    log: Log = print,
) -> dict:
    """Tokenize every document of `corpus` (anything `load_texts` reads) into shards in `out_dir`.

    `tokenizer` is a path (`load_tokenizer`) or a loaded fast tokenizer. Long documents are encoded in
    pieces of about `chunk_chars` characters where that provably gives the same ids as encoding them
    whole (see `byte_level_splittable`; ~1.7x faster); 0 disables it. `tokenizer_path` is recorded in
    the metadata when `tokenizer` is an object. Returns the metadata dict."""
    from subllm.data.texts import iter_documents
    from subllm.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    if isinstance(tokenizer, str | Path):
        tok, tokenizer_path = load_tokenizer(tokenizer), tokenizer
    else:
        tok = tokenizer
    eos = tok.eos_token_id
    if eos is None:
        raise SubLLMError("the tokenizer has no eos token, which packing uses as the document separator")
    vocab = len(tok)
    dtype = token_dtype(vocab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("shard_*.bin"), out / META]:
        stale.unlink(missing_ok=True)

    shards: list[dict] = []
    buf = np.empty(shard_tokens, dtype=dtype)
    fill = num_docs = source_bytes = 0
    backend = tok.backend_tokenizer
    splittable = chunk_chars > 0 and byte_level_splittable(backend)

    def flush() -> None:
        nonlocal fill
        if fill:
            name = f"shard_{len(shards):05d}.bin"
            buf[:fill].tofile(out / name)
            shards.append({"file": name, "num_tokens": int(fill)})
            fill = 0

    def write(ids: list[int]) -> None:
        nonlocal fill
        arr = np.asarray(ids, dtype=np.int64)
        while len(arr):
            take = min(len(arr), shard_tokens - fill)
            buf[fill : fill + take] = arr[:take]
            fill, arr = fill + take, arr[take:]
            if fill == shard_tokens:
                flush()

    def add(texts: list[str]) -> None:
        pieces: list[str] = []
        ends: list[int] = []  # index after each document's last piece
        for text in texts:
            pieces += split_for_encoding(text, chunk_chars) if splittable else [text]
            ends.append(len(pieces))
        encs = backend.encode_batch(pieces, add_special_tokens=False)
        start = 0
        for end in ends:
            write([i for enc in encs[start:end] for i in enc.ids] + [eos])
            start = end

    pending: list[str] = []
    for _, text in iter_documents(corpus, text_field):
        pending.append(text)
        num_docs += 1
        source_bytes += len(text.encode("utf-8"))
        if len(pending) == docs_per_batch:
            add(pending)
            pending = []
    add(pending)
    flush()
    num_tokens = sum(s["num_tokens"] for s in shards)
    meta = {
        "format": FORMAT,
        "dtype": dtype.name,
        "num_tokens": num_tokens,
        "num_docs": num_docs,
        "source_bytes": source_bytes,
        "tokens_per_byte": num_tokens / source_bytes,
        "eos_id": int(eos),
        "separator": "eos after every document",
        "shards": shards,
        "corpus": str(corpus),
        "tokenizer": {
            "path": str(Path(tokenizer_path).resolve()) if tokenizer_path else None,
            "sha256": tokenizer_fingerprint(tok),
            "vocab_size": vocab,
            "pad_id": tok.pad_token_id,
            "bos_id": tok.bos_token_id,
            "eos_id": int(eos),
        },
    }
    (out / (META + ".tmp")).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    (out / (META + ".tmp")).replace(out / META)
    log(
        f"  {out}: {num_docs} documents, {source_bytes / 1e6:.2f} MB text -> {num_tokens:,} tokens "
        f"({dtype.name}, {len(shards)} shard(s), {source_bytes / max(num_tokens, 1):.2f} bytes/token)"
    )
    return meta


class TokenShards:
    """Read-only memory maps of a packed split, plus its metadata."""

    def __init__(self, shard_dir: str | Path):
        self.dir = Path(shard_dir)
        path = self.dir / META
        if not path.is_file():
            raise SubLLMError(f"{self.dir} has no {META}: pack a corpus there with `subllm data pack`")
        try:
            self.meta = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SubLLMError(f"{path} is not valid JSON ({e})") from e
        if self.meta.get("format") != FORMAT:
            raise SubLLMError(f"{path}: unknown shard format {self.meta.get('format')!r}")
        dtype = np.dtype(self.meta["dtype"])
        self.shards: list[np.memmap] = []
        for s in self.meta["shards"]:
            file = self.dir / s["file"]
            expected = s["num_tokens"] * dtype.itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise SubLLMError(f"{file} is missing or truncated (expected {expected} bytes): re-run pack")
            self.shards.append(np.memmap(file, dtype=dtype, mode="r", shape=(s["num_tokens"],)))

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    def window_index(self, seq_len: int) -> np.ndarray:
        """Start offsets (cumulative) of each shard's windows: shard i owns windows [cum[i], cum[i+1])."""
        counts = [len(s) // seq_len for s in self.shards]
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def windows(self, ids: np.ndarray, seq_len: int, cum: np.ndarray) -> torch.Tensor:
        """Windows with global indices `ids` -> LongTensor (len(ids), seq_len)."""
        out = np.empty((len(ids), seq_len), dtype=np.int64)
        shard_of = np.searchsorted(cum, ids, side="right") - 1
        for row, (g, s) in enumerate(zip(ids.tolist(), shard_of.tolist())):
            start = (g - int(cum[s])) * seq_len
            out[row] = self.shards[s][start : start + seq_len]
        return torch.from_numpy(out)


def _check_split(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise SubLLMError(f"rank must be in [0, world_size): got rank {rank}, world_size {world_size}")


class BatchSampler:
    """Endless, deterministic training batches `x` (B, T) from a packed split (see the module docstring).

    Epoch e visits the shards' non-overlapping T-token windows in the order
    `np.random.default_rng([seed, e]).permutation(num_windows)`; each step takes the next
    B * world_size windows of that order and this rank keeps its B of them. Windows left over at the
    end of an epoch (fewer than one global batch) are skipped.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or seq_len < 1:
            raise SubLLMError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
        _check_split(rank, world_size)
        self.data = TokenShards(shard_dir)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, int(seed)
        self.rank, self.world_size = rank, world_size
        self._cum = self.data.window_index(seq_len)
        self.num_windows = int(self._cum[-1])
        self.global_batch = batch_size * world_size
        if self.num_windows < self.global_batch:
            raise SubLLMError(
                f"{shard_dir} holds {self.num_windows} windows of {seq_len} tokens, fewer than one global "
                f"batch ({batch_size} x {world_size} ranks): use more data or a smaller batch/seq_len"
            )
        self.epoch = 0
        self.consumed = 0  # windows of this epoch's order already handed out, over all ranks
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // self.global_batch

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
        return self._order

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.consumed + self.global_batch > self.num_windows:
            self.epoch, self.consumed, self._order = self.epoch + 1, 0, None
        start = self.consumed + self.rank * self.batch_size
        ids = self._epoch_order()[start : start + self.batch_size]
        self.consumed += self.global_batch
        return self.data.windows(ids, self.seq_len, self._cum)  # (B, T) int64

    def state_dict(self) -> dict:
        """The position (plus what must match to resume it); store it in the checkpoint."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "tokenizer_sha256": self.data.meta["tokenizer"]["sha256"],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`'s position. The global batch may change (e.g. another world size): the
        sampler continues from the same place in the same epoch order."""
        for key in ("seed", "seq_len", "num_windows", "tokenizer_sha256"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise SubLLMError(
                    f"cannot resume the data sampler: {key} is {mine} now "
                    f"but {state.get(key)} in the checkpoint"
                )
        self.epoch, self.consumed, self._order = int(state["epoch"]), int(state["consumed"]), None


def val_batches(
    shard_dir: str | Path,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Validation batches `x` (B, T) in order: window i holds tokens [i*T, (i+1)*T) of its shard; batch j
    holds windows [j*B, (j+1)*B), and rank r gets batches r, r + world_size, ... (at most `max_batches`
    of them). The last batch may be smaller than B unless `drop_last`."""
    if batch_size < 1 or seq_len < 1:
        raise SubLLMError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
    _check_split(rank, world_size)
    data = TokenShards(shard_dir)
    cum = data.window_index(seq_len)
    n = int(cum[-1])
    if n == 0:
        raise SubLLMError(f"{shard_dir} holds {data.num_tokens} tokens, fewer than one window of {seq_len}")
    yielded = 0
    for j, start in enumerate(range(0, n, batch_size)):
        if j % world_size != rank:
            continue
        if max_batches is not None and yielded >= max_batches:
            return
        ids = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        if drop_last and len(ids) < batch_size:
            return
        yield data.windows(ids, seq_len, cum)
        yielded += 1
