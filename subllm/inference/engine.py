"""Prefill and decode with a KVCache: the fast inference path of docs/method.md sections 3 and 6.

`prefill` runs a padded prompt batch (left or right padding, unequal lengths) once and fills every
layer's cache with exactly the tokens that reach it; `decode_step` feeds one new token per row.
The obviously-correct reference is the eval-mode full forward `model(ids, attention_mask)`, which
`generate(..., use_cache=False)` recomputes at every step; tests compare the two.

Prefill first compacts the batch: each row's real tokens move to the front (right padding), so
position = slot index at level 0 and every level is right-aligned, as the cache stores it. When rows
of a level hold different counts, attention runs row by row on exact lengths (no (B, L, L) mask,
no padded keys); the linear layers run batched.

RoPE scaling (subllm/model/rope.py) is applied through `rope_cos_sin` at the original positions of
every level. "dynamic" scaling depends on the sequence length: prefill uses each row's prompt
length (= the full forward of the prompt) and each decoded token the length it makes; keys already
cached keep the frequencies they were written with - exactly Hugging Face's cached decode. Past
the original length this differs from recomputing the full forward (which changes the hidden
states of every earlier token as the sequence grows - no KV cache can hold that).

Decode, per subsampling module S: the new token's score decides per row. Rows that drop it skip
every layer inside S and leave those caches untouched - U + B returns x exactly (method.md
section 3). Rows that keep it are index-selected and only they run the inner layers; when no row
keeps it, nothing runs. Attention for a subset of rows reads each row's cache through a view of
its exact length (no copy of the cache, no mask); the full batch reads one view, masked only when
row lengths differ. With `compile_decode(model)` (subllm/inference/compiled_decode.py) the runs of
layers between S modules run as compiled graphs when the step feeds every row of the cache. On a
CPU where the native kernels build, an fp32 step runs each run of layers as one native call instead
(subllm/inference/native_layers.py), for any rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from subllm.config import Sub
from subllm.errors import SubLLMError
from subllm.inference import native, native_layers
from subllm.inference.cache import KVCache
from subllm.inference.cache_rows import RowKVCache
from subllm.inference.prefill_attention import causal_attention
from subllm.inference.quantize import decode_kernels
from subllm.model.layers import rope_cos_sin
from subllm.model.rope import is_dynamic
from subllm.model.subllm import SubLLM
from subllm.model.subsample import gather_tokens, upsample_bypass

KV_DTYPES = ("same", "bf16")


def set_kv_dtype(model: SubLLM, name: str) -> SubLLM:
    """`--kv-dtype`: "same" (K/V in the activations' dtype) or "bf16" (K/V stored in bf16 whatever
    the activations: half the bytes a decode step reads at long contexts - SmolLM2 at 2k reads more
    K/V than int4 weights; attention still computes in fp32 in the native kernel, native.py).
    Kept K/V are rounded to bf16 (relative error <= 2^-9), so decoding then differs slightly from
    the full forward, as llama.cpp's default F16 cache does. -> the model."""
    if name not in KV_DTYPES:
        raise SubLLMError(f"--kv-dtype must be one of {', '.join(KV_DTYPES)}; got {name!r}")
    model.kv_dtype = torch.bfloat16 if name == "bf16" else None
    return model


def cache_dtype(model: SubLLM, device: torch.device) -> torch.dtype:
    """The dtype K and V will have: `set_kv_dtype`'s if set, else autocast's when it is on for this
    device, else the weights'."""
    if getattr(model, "kv_dtype", None) is not None:
        return model.kv_dtype
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.embed.weight.dtype


def new_cache(
    model: SubLLM,
    batch_size: int,
    device: torch.device | None = None,
    chunk: int = 256,
    packed: bool | None = None,
) -> KVCache:
    """An empty cache for `batch_size` rows. `packed`: each row stored apart, as long as it holds
    (cache_rows.py) - None (default) where it is the better layout: more than one row, the native
    decode kernels (which read rows apart in place) and no compiled decode graphs (which need one
    batch-wide buffer)."""
    device = device or model.embed.weight.device
    if packed is None:
        packed = batch_size > 1 and rows_apart(model, device)
    kind = RowKVCache if packed else KVCache
    return kind(model.config, batch_size, dtype=cache_dtype(model, device), device=device, chunk=chunk)


def rows_apart(model: SubLLM, device: torch.device | str | None = None) -> bool:
    """Whether caches of several rows store each row apart on `device` (default: the model's; see
    new_cache): the native kernels are there and no compiled decode graphs are. A batch-1 cache that
    will join others (serving) asks for it explicitly."""
    device = device or model.embed.weight.device
    return native.available(device) and getattr(model, "compiled_decode", None) is None


def _check_eval(model: SubLLM) -> None:
    if model.training:
        raise SubLLMError("cached inference needs the model in eval mode (call model.eval())")


# ---- prefill ----------------------------------------------------------------------------------
@dataclass
class _Level:
    pos: Tensor  # (B, L) original positions
    lengths: list[int]  # real tokens per row (the first lengths[b] slots of row b)
    valid: Tensor | None  # (B, L) bool, None when every row holds L tokens
    cos: Tensor  # (B, L, head_dim)
    sin: Tensor
    seq_len: Tensor | None = None  # (B,) full-sequence length per row (dynamic RoPE scaling only)


def level_inputs(model: SubLLM, pos: Tensor, lengths: list[int], seq_len: Tensor | None = None) -> _Level:
    """What every layer of one level shares in prefill: positions, lengths, validity, RoPE."""
    L = pos.shape[1]
    valid = None
    if any(n != L for n in lengths):
        valid = torch.arange(L, device=pos.device) < torch.tensor(lengths, device=pos.device)[:, None]
    c = model.config
    cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, c.rope_scaling, seq_len)
    return _Level(pos, lengths, valid, cos, sin, seq_len)


def compact(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, list[int]]:
    """Move each row's real tokens to the front: (ids (B, L) right-padded, real length per row)."""
    B, T = input_ids.shape
    if attention_mask is None or bool(attention_mask.bool().all()):
        return input_ids, [T] * B
    valid = attention_mask.bool()
    n = valid.sum(1)
    L = int(n.max())
    order = torch.sort(valid.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :L]
    return input_ids.gather(1, order), n.tolist()


def check_prefill_inputs(model: SubLLM, input_ids: Tensor, cache: KVCache) -> None:
    _check_eval(model)
    if input_ids.dim() != 2 or input_ids.shape[0] != cache.batch_size:
        raise SubLLMError(f"input_ids must be (batch={cache.batch_size}, time), got {tuple(input_ids.shape)}")


def prefill(
    model: SubLLM,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cache: KVCache,
    extra: int = 0,
) -> Tensor:
    """Run the prompt (B, T) through `model`, fill `cache`; -> logits (B, V) at each row's last real
    token. `extra` slots per level are reserved for decoding (0: grow in chunks as needed).
    The same prompt a bounded number of tokens at a time: subllm/inference/chunked_prefill.py."""
    check_prefill_inputs(model, input_ids, cache)
    ids, lengths = compact(input_ids, attention_mask)
    if min(lengths) == 0:
        raise SubLLMError("every row needs at least one real (attention_mask = 1) token")
    B, L = ids.shape
    pos = torch.arange(L, device=ids.device).expand(B, L)
    cache.reset()  # levels that no token reaches stay empty
    cache.start_level(0, pos, lengths, extra)
    seq_len = torch.tensor(lengths, device=ids.device) if is_dynamic(model.config.rope_scaling) else None
    x = model.embed(ids)  # (B, L, C)
    x = _prefill_nodes(model, cache, model.tree, x, level_inputs(model, pos, lengths, seq_len), extra)
    last = x[torch.arange(B, device=x.device), torch.tensor(lengths, device=x.device) - 1]  # (B, C)
    with decode_kernels():  # one row per sequence, as a decode step's: the same kernel alone or batched
        return model.head(model.norm(last))


def _prefill_nodes(model: SubLLM, cache: KVCache, nodes: tuple, x: Tensor, lvl: _Level, extra: int) -> Tensor:
    for node in nodes:
        if isinstance(node, Sub):
            x = _prefill_sub(model, cache, node, x, lvl, extra)
        else:
            x = prefill_layer(model, cache, node, x, lvl)
    return x


def prefill_layer(model: SubLLM, cache: KVCache, layer: int, x: Tensor, lvl: _Level) -> Tensor:
    block = model.layers[layer]
    q, k, v = block.attn.qkv(block.attn_norm(x), lvl.cos, lvl.sin)  # (B, H, L, hd), (B, Hkv, L, hd)
    cache.write_prefill(layer, k, v)
    if lvl.valid is None:
        a = causal_attention(model, block.attn, q, k, v)
    else:  # ragged rows: exact lengths row by row; slots past a row's length stay 0 (weight 0 later)
        a = torch.zeros_like(x)
        for b, n in enumerate(lvl.lengths):
            if n:
                a[b, :n] = causal_attention(
                    model, block.attn, q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
                )[0]
    x = x + a
    return x + block.ffn(block.ffn_norm(x))


def _prefill_sub(model: SubLLM, cache: KVCache, node: Sub, x: Tensor, lvl: _Level, extra: int) -> Tensor:
    sel = model.subsamples[node.index](x, lvl.valid, None, pos=lvl.pos)  # eval mode: score > theta
    kept = sel.n_kept.tolist()
    inner_pos = lvl.pos.gather(1, sel.idx)  # (B, K) original positions of the kept tokens
    cache.start_level(node.index + 1, inner_pos, kept, extra)
    if sel.k == 0:  # no row keeps anything: U returns x, B gives x + b (x - x) = x
        return x
    xg = gather_tokens(x, sel.idx)  # (B, K, C)
    h = _prefill_nodes(
        model, cache, node.children, xg, level_inputs(model, inner_pos, kept, lvl.seq_len), extra
    )
    return upsample_bypass(x, xg, h, sel.idx, sel.weight, model.bypasses[node.index].scale)


# ---- decode -----------------------------------------------------------------------------------
def decode_step(model: SubLLM, cache: KVCache, tokens: Tensor, rows: list[int] | None = None) -> Tensor:
    """One new token per row: tokens (n,) for batch rows `rows` (default: all, in order).
    -> logits (n, V). Rows not listed are untouched (e.g. rows that already finished)."""
    _check_eval(model)
    rows = list(range(cache.batch_size)) if rows is None else [int(r) for r in rows]
    if any(a >= b for a, b in zip(rows, rows[1:])) or (
        rows and not 0 <= rows[0] <= rows[-1] < cache.batch_size
    ):
        raise SubLLMError(f"rows must be increasing batch indexes below {cache.batch_size}, got {rows}")
    if tokens.shape != (len(rows),):
        raise SubLLMError(f"tokens must have shape ({len(rows)},), got {tuple(tokens.shape)}")
    if not rows:
        return model.embed.weight.new_zeros(0, model.config.vocab_size)
    positions = [cache.length(0, r) for r in rows]  # level 0 holds every real token: next position
    cos, sin = decode_cos_sin(model, positions, tokens.device)
    with decode_kernels():  # quantized layers: their decode kernel (subllm/inference/quantize.py)
        x = model.embed(tokens)[:, None]  # (n, 1, C)
        x = _decode_level(model, cache, model.tree, 0, x, rows, positions, cos, sin)
        return native_layers.head(model, native_layers.final_norm(model, x[:, 0]))


def decode_cos_sin(model: SubLLM, positions: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """RoPE's cos, sin (n, 1, head_dim) for one new token per row at `positions`: rows of a table of
    rope_cos_sin over 0 .. N - 1 kept on the model (grown by doubling), the same values as computing
    them per step (elementwise ops; tested) in 1-2 ops instead of ~8 (~0.12 ms of a 5 ms SmolLM2
    token). "dynamic" scaling depends on each row's length: computed per step."""
    c = model.config
    if is_dynamic(c.rope_scaling):  # HF's cached decode: the new token at its own length's frequencies
        pos = torch.tensor(positions, device=device)[:, None]
        return rope_cos_sin(pos, c.head_dim, c.rope_theta, c.rope_scaling, pos[:, 0] + 1)
    key = (c.head_dim, c.rope_theta, repr(c.rope_scaling), device)
    need = max(positions) + 1
    got = model.__dict__.get("_rope_table")
    if got is None or got[0] != key or got[1].shape[0] < need:
        n = max(need, 1024, 2 * (got[1].shape[0] if got is not None and got[0] == key else 0))
        every = torch.arange(n, device=device)[None]
        cos, sin = rope_cos_sin(every, c.head_dim, c.rope_theta, c.rope_scaling)
        got = model.__dict__["_rope_table"] = (key, cos[0], sin[0])
    if len(positions) == 1:  # a view: no index tensor
        p = positions[0]
        return got[1][p : p + 1, None], got[2][p : p + 1, None]
    idx = torch.tensor(positions, device=device)
    return got[1][idx][:, None], got[2][idx][:, None]


def _decode_level(
    model: SubLLM,
    cache: KVCache,
    nodes: tuple,
    level: int,
    x: Tensor,
    rows: list[int],
    positions: list[int],
    cos: Tensor,
    sin: Tensor,
    active: list[bool] | None = None,
) -> Tensor:
    """`active` (host bools, one per row): the rows whose token belongs to this level; the others run
    through it on a scratch slot that their caches do not keep, their outputs discarded (_decode_sub)."""
    slots = cache.append(level, rows, positions, active)
    lens = [s + 1 for s in slots]
    full = len(rows) == cache.batch_size  # rows are then 0..B-1 in order (subsets keep batch order)
    mask = rows_t = lens_t = None
    if native.available(x.device):  # the native kernel: each row reads its own cache row and length
        rows_t = torch.tensor(cache.kernel_rows(rows), device=x.device)
        lens_t = torch.tensor(lens, device=x.device)
    elif full and not cache.packed and min(lens) != max(lens):
        L = max(lens)
        mask = (torch.arange(L, device=x.device) < torch.tensor(lens, device=x.device)[:, None])[
            :, None, None
        ]
    # runs of layers in one native call (native_layers.py), else compiled segments (compiled_decode.py)
    fused = {}
    if lens_t is not None and native_layers.usable(model, x):
        fused = native_layers.runs(model, nodes, cache)
    compiled = getattr(model, "compiled_decode", None) if full and not cache.packed else None
    if compiled is not None:  # room past the new token: the graphs never see capacity == length
        cache.reserve(level, max(lens) + 1)
    if compiled is not None or fused:
        slot_t = torch.tensor(slots, device=x.device)
    done: set[int] = set()  # layers a fused run or a compiled segment ran
    for node in nodes:
        if isinstance(node, Sub):
            x = _decode_sub(model, cache, node, x, rows, positions, cos, sin, active)
            continue
        if node in done:
            continue
        if node in fused:
            run_args = fused[node]
            ks, vs = cache.kernel_kv(run_args[0], rows)
            x = native_layers.run(model, run_args, x, cos, sin, rows_t, slot_t, lens_t, ks, vs)
            done.update(run_args[0])
            continue
        if compiled is not None and node in compiled.by_first:
            layers, segment = compiled.by_first[node]
            ks, vs = [cache.k[i] for i in layers], [cache.v[i] for i in layers]
            x = segment(x, cos, sin, slot_t, max(lens), mask, lens_t, ks, vs)
            done.update(layers)
            continue
        block = model.layers[node]
        q, k, v = block.attn.qkv(block.attn_norm(x), cos, sin)  # (n, H, 1, hd), (n, Hkv, 1, hd)
        cache.write(node, rows, slots, k, v)
        if lens_t is not None:  # all rows of the step in one call, the full batch or a subset
            kb, vb = cache.kernel_kv([node], rows)
            a = block.attn.out(native.decode_attention(q, kb, vb, rows_t, lens_t))
        elif full and not cache.packed:  # one view of the whole batch (masked only when lengths differ)
            L = max(lens)
            a = block.attn.attend(q, cache.k[node][:, :, :L], cache.v[node][:, :, :L], mask, is_causal=False)
        else:  # a subset, or rows stored apart: each row reads a view of exactly its own length
            kvs = [cache.row_kv(node, r) for r in rows]
            a = torch.cat(
                [
                    block.attn.attend(q[i : i + 1], kb[:, :, :n], vb[:, :, :n], None, False)
                    for i, ((kb, vb), n) in enumerate(zip(kvs, lens))
                ]
            )
        x = x + a
        x = x + block.ffn(block.ffn_norm(x))
    return x


def _subset_path(model: SubLLM, x: Tensor) -> bool:
    subset = getattr(model, "decode_subset", None)
    return x.device.type != "cuda" if subset is None else bool(subset)


def _decode_sub(
    model: SubLLM,
    cache: KVCache,
    node: Sub,
    x: Tensor,
    rows: list[int],
    positions: list[int],
    cos: Tensor,
    sin: Tensor,
    active: list[bool] | None = None,
) -> Tensor:
    """S, the inner level, U + B for one new token per row. When the whole batch is here and only
    some rows keep their token, the inner level runs either on those rows only (the subset path:
    attention one call per row, each on a view of its own length) or on every row (`active` marks
    the kept ones: the others write a scratch slot their caches do not keep, and their outputs are
    dropped): one attention call per layer and the compiled segments, at the price of the dropped
    rows' compute and K/V reads. `model.decode_subset`: True / False picks one; None (default) =
    the subset path on a CPU, where it measured faster (docs/RESULTS.md, "Whole-batch inner levels"),
    the whole batch on CUDA, where per-row calls are kernel launches (chosen by that reasoning; not
    yet timed on a GPU)."""
    sub = model.subsamples[node.index]
    fast = native_layers.decide(sub, x) if native_layers.usable(model, x) else None
    if fast is not None:  # the score layer and clamp in one op, s > theta on the host's copy
        d, w = fast
        theta = sub.theta
        theta = 0.0 if theta is None else float(theta)  # fp32 values: the same comparison as sub.keep
        keep = [v > theta for v in d[:, 0].tolist()]
    else:
        d, w = sub.decide(x)  # (n, 1) each: decision and eval-mode weight
        keep = sub.keep(d[:, 0]).tolist()  # the one host sync of this S
    if sub.keep_first and min(positions) < sub.keep_first:  # host ints: no tensor work per token
        pin = [p < sub.keep_first for p in positions]
        keep = [k or p for k, p in zip(keep, pin)]
        w = w.masked_fill(torch.tensor(pin, device=x.device)[:, None], 1.0)
    if active is not None:  # a row whose token left at an outer level cannot keep it here
        keep = [k and a for k, a in zip(keep, active)]
    kept = [i for i, k in enumerate(keep) if k]
    if not kept:  # every row drops the token: nothing runs, U + B returns x exactly
        return x
    if len(kept) == len(rows):
        xk, sub_rows, sub_pos, ck, sk, act = x, rows, positions, cos, sin, None
    elif len(rows) == cache.batch_size and not _subset_path(model, x):  # whole batch, `keep` marks
        xk, sub_rows, sub_pos, ck, sk, act = x, rows, positions, cos, sin, keep
    else:
        idx = torch.tensor(kept, device=x.device)
        xk, ck, sk, w = x.index_select(0, idx), cos.index_select(0, idx), sin.index_select(0, idx), w[idx]
        sub_rows, sub_pos, act = [rows[i] for i in kept], [positions[i] for i in kept], None
    h = _decode_level(model, cache, node.children, node.index + 1, xk, sub_rows, sub_pos, ck, sk, act)
    scale = model.bypasses[node.index].scale
    if fast is not None and scale.dtype == torch.float32:
        out = native_layers.bypass(xk, h, w, scale)
    else:
        delta = (w[..., None] * (h - xk)) * scale  # as upsample_bypass
        out = xk + delta.to(x.dtype)
    if len(kept) == len(rows):
        return out
    if act is not None:  # the whole batch ran: dropped rows keep x unchanged
        return torch.where(torch.tensor(keep, device=x.device)[:, None, None], out, x)
    return x.index_copy(0, idx, out)  # dropped rows: x unchanged
