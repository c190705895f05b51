"""Chunked prefill: a long prompt runs through the model `chunk` tokens at a time, so that peak
memory is bounded by the chunk (activations, attention scores of chunk x context), not by the
prompt; only the KV cache grows with the prompt. The result equals `engine.prefill`.

Each chunk extends every level of the cache (subllm/inference/cache.py `extend`): the chunk's tokens attend
to the row's cached keys plus the earlier tokens of the chunk. Selection needs no look-ahead: the
inference rule keeps token t iff its score > theta (docs/method.md section 3), and its score depends
only on tokens <= t, so each chunk decides its own tokens exactly as one pass over the prompt does;
the tokens an S keeps go on to the levels inside it with their original positions, and only those.
The pieces are the engine's: `compact`, `level_inputs`, the Subsample's eval-mode selection,
`gather_tokens` / `upsample_bypass` and the Block's own qkv / attend / FFN.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from subllm.config import Sub
from subllm.errors import SubLLMError
from subllm.inference.cache import KVCache
from subllm.inference.engine import check_prefill_inputs, compact, level_inputs, prefill
from subllm.inference.prefill_attention import causal_attention
from subllm.inference.quantize import decode_kernels
from subllm.model.rope import is_dynamic
from subllm.model.subllm import SubLLM
from subllm.model.subsample import gather_tokens, upsample_bypass


def prefill_chunked(
    model: SubLLM,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cache: KVCache,
    chunk: int,
    extra: int = 0,
) -> Tensor:
    """As `engine.prefill` (same arguments and result: logits (B, V) at each row's last real
    token), `chunk` prompt tokens per row at a time."""
    *_, logits = prefill_chunks(model, input_ids, attention_mask, cache, chunk, extra)
    return logits


def prefill_chunks(
    model: SubLLM,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cache: KVCache,
    chunk: int,
    extra: int = 0,
    start: int = 0,
) -> Iterator[Tensor | None]:
    """`prefill_chunked` one chunk per step: yields None after every chunk but the last, then the
    logits (B, V). Between steps the caller may run other work on other caches (the serving
    batcher decodes its running rows), under the same no_grad / autocast.

    `start` > 0: `cache` already holds the first `start` tokens of every row (at every level, as
    this function leaves them after those tokens - a prefix cache hit, subllm/serve/prefix_cache.py);
    the chunks then begin at `start`. Every row must be longer than `start`. The result equals
    starting from 0 when the chunk boundaries are the same, i.e. `start` a multiple of `chunk`."""
    check_prefill_inputs(model, input_ids, cache)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise SubLLMError(f"prefill chunk must be a positive integer, got {chunk!r}")
    ids, lengths = compact(input_ids, attention_mask)
    if min(lengths) == 0:
        raise SubLLMError("every row needs at least one real (attention_mask = 1) token")
    B, L = ids.shape
    dev = ids.device
    if start:
        if min(lengths) <= start or any(cache.length(0, b) != start for b in range(B)):
            raise SubLLMError(f"start={start}: the cache must hold exactly that many tokens of longer rows")
    else:
        cache.reset()
    cache.reserve(0, L + extra, exact=extra > 0)  # level 0 holds every prompt token: its size at once
    seq_len = torch.tensor(lengths, device=dev) if is_dynamic(model.config.rope_scaling) else None
    last: list[Tensor | None] = [None] * B
    for s in range(start, L, chunk):
        rows = [b for b in range(B) if lengths[b] > s]
        counts = [min(chunk, lengths[b] - s) for b in rows]
        c = max(counts)
        idx = torch.tensor(rows, device=dev)
        pos = (s + torch.arange(c, device=dev)).expand(len(rows), c)  # level 0: position = slot
        x = model.embed(ids[idx, s : s + c])  # (n, c, C)
        sl = None if seq_len is None else seq_len[idx]
        x = _extend(model, cache, model.tree, 0, x, rows, pos, counts, sl)
        for i, (b, n) in enumerate(zip(rows, counts)):
            if s + n == lengths[b]:
                last[b] = x[i, n - 1]
        if s + chunk < L:
            yield None
    with decode_kernels():  # the last tokens' logits: as engine.prefill's (not held across the yield)
        logits = model.head(model.norm(torch.stack(last)))
    yield logits


def _extend(
    model: SubLLM,
    cache: KVCache,
    nodes: tuple,
    level: int,
    x: Tensor,
    rows: list[int],
    pos: Tensor,
    counts: list[int],
    seq_len: Tensor | None,
) -> Tensor:
    """x (n, c, C): the new tokens of batch rows `rows` at `level` (row i: its first counts[i]
    slots, original positions pos (n, c)) -> their outputs, the cache extended at every layer."""
    starts = cache.extend(level, rows, pos, counts)
    lvl = level_inputs(model, pos, counts, seq_len)
    for node in nodes:
        if isinstance(node, Sub):
            x = _extend_sub(model, cache, node, x, rows, lvl, seq_len)
        else:
            x = _extend_layer(model, cache, node, x, rows, starts, counts, lvl)
    return x


def _extend_layer(model, cache, layer: int, x, rows, starts, counts, lvl) -> Tensor:
    block = model.layers[layer]
    q, k, v = block.attn.qkv(block.attn_norm(x), lvl.cos, lvl.sin)  # (n, H, c, hd), (n, Hkv, c, hd)
    cache.write_extend(layer, rows, starts, counts, k, v)
    a = torch.zeros_like(x)
    for i, (r, s, n) in enumerate(zip(rows, starts, counts)):
        if not n:
            continue
        kb, vb = cache.row_kv(layer, r)
        # query j (slot s + j) sees slots 0 .. s + j
        a[i, :n] = causal_attention(
            model, block.attn, q[i : i + 1, :, :n], kb[:, :, : s + n], vb[:, :, : s + n], s
        )[0]
    x = x + a
    return x + block.ffn(block.ffn_norm(x))


def _extend_sub(model, cache, node: Sub, x, rows, lvl, seq_len) -> Tensor:
    sel = model.subsamples[node.index](x, lvl.valid, None, pos=lvl.pos)  # eval mode, per token
    kept = sel.n_kept.tolist()
    if sel.k == 0:  # no row keeps a token of this chunk: U returns x, B gives x + b (x - x) = x
        return x
    inner_pos = lvl.pos.gather(1, sel.idx)  # (n, K) original positions of the kept tokens
    xg = gather_tokens(x, sel.idx)  # (n, K, C)
    h = _extend(model, cache, node.children, node.index + 1, xg, rows, inner_pos, kept, seq_len)
    return upsample_bypass(x, xg, h, sel.idx, sel.weight, model.bypasses[node.index].scale)


def prefill_any(
    model: SubLLM,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cache: KVCache,
    extra: int = 0,
    chunk: int | None = None,
) -> Tensor:
    """`prefill` (chunk None) or `prefill_chunked` (`chunk` prompt tokens per row at a time)."""
    if chunk is None:
        return prefill(model, input_ids, attention_mask, cache, extra)
    return prefill_chunked(model, input_ids, attention_mask, cache, chunk, extra)


__all__ = ["prefill_chunked", "prefill_chunks", "prefill_any"]
