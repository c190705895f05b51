"""RowKVCache (subllm/inference/cache_rows.py): rows stored apart decode exactly as rows in one
buffer, allocate what they hold, and join / leave a batch without copies."""

import pytest
import torch
from helpers import left_padded, tiny_model, tiny_preset_model

from subllm.inference import native
from subllm.inference.cache import KVCache
from subllm.inference.cache_rows import RowKVCache
from subllm.inference.engine import decode_step, new_cache, prefill


def _decode(model, packed, lens, steps=10, chunk=8, extra=0):
    """Prefill left-padded prompts of `lens`, greedy-decode `steps` tokens; a subset step at 4."""
    ids, mask = left_padded(lens, vocab=model.config.vocab_size)
    cache = new_cache(model, len(lens), chunk=chunk, packed=packed)
    with torch.no_grad():
        out = [prefill(model, ids, mask, cache, extra=extra)]
        for i in range(steps):
            tokens = out[-1].argmax(-1)
            if i == 4:
                step = out[-1].clone()
                step[1:] = decode_step(model, cache, tokens[1:], list(range(1, len(lens))))
                out.append(step)
            else:
                out.append(decode_step(model, cache, tokens))
    return torch.stack(out), cache


def _kv_equal(a, b, tol=0.0):
    assert a.snapshot() == b.snapshot()
    for layer, level in enumerate(a.layer_level):
        for r, n in enumerate(a.snapshot()[level]):
            assert torch.equal(a.positions(level, r), b.positions(level, r))
            for x, y in zip(a.row_kv(layer, r), b.row_kv(layer, r)):
                if n:
                    assert (x[..., :n, :] - y[..., :n, :]).abs().max() <= tol


@pytest.mark.parametrize("path", ["native runs", "native attention", "torch attention"])
def test_rows_apart_decode_as_one_buffer(path, monkeypatch):
    """Logits and cache contents of a ragged batch (different prompt lengths, different keeps per
    row, a subset step, growth past the chunk) equal the one-buffer cache's, on each decode path."""
    model = tiny_preset_model()
    if path != "native runs":
        model.native_layers = False
    if path == "torch attention":
        monkeypatch.setattr(native, "available", lambda device: False)
    ref, ref_cache = _decode(model, False, [11, 4, 19, 7])
    got, cache = _decode(model, True, [11, 4, 19, 7])
    assert type(cache) is RowKVCache and type(ref_cache) is KVCache
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    _kv_equal(cache, ref_cache, tol=1e-5)
    fr = [len(set(cache.snapshot()[lv])) for lv in range(1, cache.n_levels)]
    assert all(f > 1 for f in fr)  # the inner levels are ragged


def test_head_dim_64_kernel_reads_rows_apart():
    """The AVX-512 attention path (head_dim 64) and bf16 K/V on rows stored apart."""
    if not native.available("cpu"):
        pytest.skip("native kernels not built here")
    model = tiny_model("TT(TT)T", dim=128, n_heads=2, n_kv_heads=1, seed=1)
    for kv in (torch.float32, torch.bfloat16):
        model.kv_dtype = kv
        ref, _ = _decode(model, False, [70, 9, 33])
        got, _ = _decode(model, True, [70, 9, 33])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_allocation_is_what_each_row_holds():
    """Prefill with `extra` reserves exactly each row's length + extra per level (a one-buffer
    cache: the longest row's, for every row); decoding past the reserve grows only that row, to a
    multiple of the chunk."""
    model = tiny_preset_model()
    _, cache = _decode(model, True, [11, 4, 19, 7], steps=0, extra=3)
    per_tok = cache.bytes_per_token()
    held = cache.snapshot()
    want = per_tok * sum(n + 3 for lv in cache.layer_level for n in held[lv])
    assert cache.allocated_nbytes() == cache.capacity_nbytes() == want
    _, dense = _decode(model, False, [11, 4, 19, 7], steps=0, extra=3)
    assert dense.allocated_nbytes() == per_tok * sum(4 * (max(held[lv]) + 3) for lv in dense.layer_level)
    assert dense.allocated_nbytes() > cache.allocated_nbytes()
    _, grown = _decode(model, True, [11, 4, 19, 7], steps=6, chunk=8, extra=3)
    for level, lens in enumerate(grown.snapshot()):
        for r, n in enumerate(lens):
            cap = grown.row_capacity(level, r)
            assert cap >= n and (cap == held[level][r] + 3 or cap % 8 == 0)
            assert cap < max(n, held[level][r] + 3) + 8


def test_join_and_leave_without_copies():
    """add_rows adopts a RowKVCache's buffers and keep_rows drops rows: the kept buffers are the
    same memory; a one-buffer cache's rows are copied in at their length."""
    model = tiny_preset_model()
    with torch.no_grad():
        a = new_cache(model, 1, packed=True)
        prefill(model, torch.tensor([list(range(3, 20))]), None, a)
        b = new_cache(model, 1, packed=True)
        prefill(model, torch.tensor([list(range(5, 14))]), None, b)
        c = new_cache(model, 1, packed=False)
        prefill(model, torch.tensor([list(range(7, 30))]), None, c)
    ptr = {name: x.row_kv(0, 0)[0].data_ptr() for name, x in (("a", a), ("b", b))}
    assert a.add_rows(b) == [1] and a.add_rows(c) == [2]
    assert a.row_kv(0, 0)[0].data_ptr() == ptr["a"] and a.row_kv(0, 1)[0].data_ptr() == ptr["b"]
    for level in range(a.n_levels):
        assert a.row_capacity(level, 2) == c.length(level, 0)
        for layer in a.level_layers[level]:
            n = c.length(level, 0)
            assert torch.equal(a.row_kv(layer, 2)[0][0, :, :n], c.k[layer][0, :, :n])
    a.keep_rows([2, 1])
    assert a.row_kv(0, 1)[0].data_ptr() == ptr["b"] and a.batch_size == 2
    assert a.snapshot() == [[x[0], y[0]] for x, y in zip(c.snapshot(), b.snapshot())]
    assert a.allocated_nbytes() == a.capacity_nbytes()
    with torch.no_grad():  # and they decode on
        decode_step(model, a, torch.tensor([4, 5]))


def test_rewind_and_reset_keep_the_rows():
    model = tiny_preset_model()
    got, cache = _decode(model, True, [11, 4, 19], steps=3)
    snap = cache.snapshot()
    with torch.no_grad():
        first = decode_step(model, cache, torch.tensor([5, 6, 7]))
        cache.rewind(snap)
        again = decode_step(model, cache, torch.tensor([5, 6, 7]))
    assert torch.equal(first, again)
    cache.reset()
    assert cache.nbytes() == 0 and cache.capacity_nbytes() > 0


def test_the_kernel_reads_one_buffer_per_row_as_rows_of_one():
    """native.decode_attention over n buffers (1, Hkv, cap_i, D) equals it over one (n, ...)
    buffer, fp32 and bf16; a row index other than 0 into a one-row buffer is refused."""
    if not native.available("cpu"):
        pytest.skip("native kernels not built here")
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([70, 3, 129])
    q = torch.randn(3, 4, 1, 64, generator=g)
    k, v = torch.randn(2, 3, 2, 140, 64, generator=g)
    for dt in (torch.float32, torch.bfloat16):
        kd, vd = k.to(dt), v.to(dt)
        ref = native.decode_attention(q, kd, vd, torch.arange(3), lens)
        ks = [kd[i : i + 1, :, : int(n) + 5].clone() for i, n in enumerate(lens)]  # own capacities
        vs = [vd[i : i + 1, :, : int(n) + 5].clone() for i, n in enumerate(lens)]
        got = native.decode_attention(q, ks, vs, torch.zeros(3, dtype=torch.long), lens)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="rows out of range"):
        native.decode_attention(q, ks, vs, torch.tensor([0, 1, 0]), lens)
    with pytest.raises(RuntimeError, match="one per query row"):
        native.decode_attention(q, ks[:2], vs[:2], torch.zeros(3, dtype=torch.long), lens)
