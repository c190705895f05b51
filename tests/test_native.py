"""The native decode-attention kernel (subllm/inference/native.py, csrc/decode_attention.cpp)
against SDPA over each row's exact slice - the obviously-correct path - for both code paths of
the kernel (the AVX-512 one for head_dim 32/64/128 and groups <= 4, the portable loops for the
rest), fp32 and bf16 K/V, ragged rows and more keys than one work block; then whole decodes with
and without it, and the fallback when the build fails."""

import pytest
import torch
import torch.nn.functional as F
from helpers import left_padded, tiny_model

from subllm.inference import native
from subllm.inference.engine import decode_step, new_cache, prefill, set_kv_dtype

needs_native = pytest.mark.skipif(not native.load(), reason="native kernels could not be built here")


def _reference(q, k, v, rows, lens):
    """SDPA, query row by query row, over the exact slice of the cache row it reads."""
    out = []
    for i, (r, n) in enumerate(zip(rows.tolist(), lens.tolist())):
        kb, vb = k[r : r + 1, :, :n].float(), v[r : r + 1, :, :n].float()
        out.append(F.scaled_dot_product_attention(q[i : i + 1].float(), kb, vb, enable_gqa=True))
    return torch.cat(out)


@needs_native
@pytest.mark.parametrize(
    "H, Hkv, D", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 1, 64), (4, 2, 8), (10, 2, 48)]
)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_sdpa_per_row(H, Hkv, D, kv_dtype):
    g = torch.Generator().manual_seed(H * 1000 + D)
    B, cap = 3, 600  # 500 keys: two blocks of 256 (a row's keys in two blocks), partials merged
    q = torch.randn(B, H, 1, D, generator=g)
    k = (torch.randn(B, Hkv, cap, D, generator=g) * 2).to(kv_dtype)
    v = torch.randn(B, Hkv, cap, D, generator=g).to(kv_dtype)
    k[:, :, 500:] = float("nan")  # slots past every row's length are never read
    rows, lens = torch.arange(B), torch.tensor([1, 257, 500])
    out = native.decode_attention(q, k, v, rows, lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, _reference(q, k, v, rows, lens), atol=2e-6, rtol=1e-5)
    out_bf16 = native.decode_attention(q.bfloat16(), k, v, rows, lens)  # bf16 queries: fp32 math
    assert out_bf16.dtype == torch.bfloat16
    ref_bf16 = _reference(q.bfloat16(), k, v, rows, lens)
    torch.testing.assert_close(out_bf16.float(), ref_bf16, atol=1e-2, rtol=1e-2)
    sub_rows, sub_lens = torch.tensor([2, 0]), torch.tensor([300, 1])  # a subset, out of order
    torch.testing.assert_close(
        native.decode_attention(q[:2], k, v, sub_rows, sub_lens),
        _reference(q[:2], k, v, sub_rows, sub_lens),
        atol=2e-6,
        rtol=1e-5,
    )


@needs_native
def test_long_rows_split_into_blocks_of_at_most_4096_keys():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 1, 64, generator=g)
    k = (torch.randn(2, 3, 9000, 64, generator=g) * 2).bfloat16()
    v = torch.randn(2, 3, 9000, 64, generator=g).bfloat16()
    rows, lens = torch.tensor([0, 1]), torch.tensor([8999, 700])  # blocks of 4,096: 3 and 1
    out = native.decode_attention(q, k, v, rows, lens)
    torch.testing.assert_close(out, _reference(q, k, v, rows, lens), atol=2e-6, rtol=1e-5)


@needs_native
def test_kernel_refuses_bad_input():
    q, k = torch.randn(1, 4, 1, 64), torch.randn(3, 2, 40, 64)
    rows, lens = torch.tensor([1]), torch.tensor([17])
    with pytest.raises(RuntimeError, match="lens out of range"):
        native.decode_attention(q, k, k, rows, torch.tensor([41]))
    with pytest.raises(RuntimeError, match="rows out of range"):
        native.decode_attention(q, k, k, torch.tensor([3]), lens)
    with pytest.raises(RuntimeError, match="q must be"):
        native.decode_attention(torch.randn(1, 4, 2, 64), k, k, rows, lens)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.decode_attention(q, k.double(), k.double(), rows, lens)


def _greedy(model, lens, steps=6, kv_dtype=torch.float32):
    ids, mask = left_padded(lens, vocab=model.config.vocab_size)
    cache = new_cache(model, len(lens), chunk=8)
    assert cache.dtype == kv_dtype
    with torch.no_grad():
        logits = [prefill(model, ids, mask, cache)]
        for i in range(steps):
            tokens = logits[-1].argmax(-1)
            if i == 2 and len(lens) > 1:  # a subset-rows step
                out = logits[-1].clone()
                out[1] = decode_step(model, cache, tokens[1:2], [1])[0]
                logits.append(out)
            else:
                logits.append(decode_step(model, cache, tokens))
    return torch.stack(logits)


@needs_native
@pytest.mark.parametrize("head_dim_64", [False, True])
def test_decode_with_the_kernel_equals_decode_with_sdpa(monkeypatch, head_dim_64):
    kw = dict(dim=128, n_heads=2, n_kv_heads=1) if head_dim_64 else {}
    model = tiny_model("TT(T(TT)T)T", **kw)
    model.native_layers = False  # the kernel called per layer (runs of layers: test_native_layers.py)
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(1) or real(*a))
    with_kernel = _greedy(model, [11, 4])
    assert calls, "the decode never reached the native kernel"
    monkeypatch.setattr(native, "available", lambda device: False)
    torch.testing.assert_close(with_kernel, _greedy(model, [11, 4]), atol=1e-5, rtol=1e-5)


@needs_native
def test_a_bf16_cache_decodes_as_sdpa_over_the_same_rounded_values(monkeypatch):
    """bf16 K/V: the kernel reads them widened; SDPA (the fallback) casts them to the query's fp32
    - the same numbers, so the two decodes agree to fp32 rounding; both stay near an fp32 cache."""
    model = tiny_model("TT(T(TT)T)T", dim=128, n_heads=2, n_kv_heads=1)
    fp32_cache = _greedy(model, [11, 4])
    set_kv_dtype(model, "bf16")
    with_kernel = _greedy(model, [11, 4], kv_dtype=torch.bfloat16)
    monkeypatch.setattr(native, "available", lambda device: False)
    torch.testing.assert_close(
        with_kernel, _greedy(model, [11, 4], kv_dtype=torch.bfloat16), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(with_kernel, fp32_cache, atol=0.05, rtol=0.05)
    assert not torch.equal(with_kernel, fp32_cache)  # rounded, not silently kept in fp32
    with pytest.raises(Exception, match="kv-dtype must be one of"):
        set_kv_dtype(model, "fp16")


def test_a_failed_build_falls_back_to_sdpa_with_one_warning(monkeypatch):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native.torch.ops, "subllm_native", None, raising=False)

    def no_compiler(**kw):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp, "load", no_compiler)
    with pytest.warns(UserWarning, match="native decode kernels unavailable.*Ninja is required"):
        assert not native.load()
    assert not native.available("cpu") and "torch SDPA" in native.status()
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SUBLLM_NATIVE", "0")
    assert not native.load() and "SUBLLM_NATIVE=0" in native.status()


needs_int4 = pytest.mark.skipif(not native.vnni_available(), reason="no AVX512-VNNI kernel on this CPU")


def _rounded(x):
    """x (M, K) as the native kernels see it, in float64: rounded to int8 per group of 32 with the
    group's own scale max|x| / 127 (an all-zero group stays zero)."""
    M, K = x.shape
    xg = x.double().reshape(M, K // 32, 32)
    s = xg.abs().amax(-1, keepdim=True) / 127
    return (torch.round(xg / torch.where(s > 0, s, torch.ones_like(s))) * s).reshape(M, K)


def _int4_weights(codes, scale, zero):
    """The weights the kernel multiplies by: codes * d + m with d = scale and m = zero - 8 scale
    rounded to bf16 (its storage), in float64."""
    d, m = scale.bfloat16().double(), (zero - 8 * scale).bfloat16().double()
    N, K = codes.shape
    c = codes.double().reshape(N, K // 32, 32)
    return (c * d[..., None] + m[..., None]).reshape(N, K)


def _int4_reference(x, codes, scale, zero):
    """The kernel's arithmetic in float64: its weights times the rounded activations."""
    return _rounded(x) @ _int4_weights(codes, scale, zero).T


def _check_two_passes(matmul, x, packed, w):
    """passes=2: the activations within max|x_g| / 127 / 254 / 2 of x (the second pass rounds the
    first one's remainder onto a 254x finer grid), so each output within that times sum |w| (plus
    fp32 rounding) of x @ w^T; a row alone equals the row in the batch."""
    y2 = matmul(x, *packed, passes=2)
    M, K = x.shape
    step = x.double().reshape(M, K // 32, 32).abs().amax(-1) / 127 / 254  # (rows, groups)
    w = w.double()
    bound = torch.einsum("rg,ng->rn", step / 2, w.abs().reshape(w.shape[0], K // 32, 32).sum(-1))
    exact = x.double() @ w.T
    assert ((y2.double() - exact).abs() <= bound + 1e-5 * exact.abs().max()).all()
    assert torch.equal(matmul(x[-1:], *packed, passes=2), y2[-1:])


@needs_int4
@pytest.mark.parametrize("N, K, M", [(16, 32, 1), (48, 96, 3), (64, 64, 6), (32, 576, 9)])
def test_int4_kernel_equals_its_arithmetic_in_float64(N, K, M):
    from subllm.inference.quantize import int4_codes

    g = torch.Generator().manual_seed(N + K + M)
    codes, scale, zero = int4_codes(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g) * torch.linspace(0.1, 10, K)  # groups of very different ranges
    x[0, :32] = 0  # an all-zero group
    packed = native.int4_pack(codes, scale, zero)
    y = native.int4_matmul(x, *packed)
    ref = _int4_reference(x, codes, scale, zero)
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    for r in range(M):  # a row computes the same alone as in the batch (per-row activation scales)
        assert torch.equal(native.int4_matmul(x[r : r + 1], *packed), y[r : r + 1])
    _check_two_passes(native.int4_matmul, x, packed, _int4_weights(codes, scale, zero))
    with pytest.raises(RuntimeError, match="int4_matmul: "):  # a width that does not match
        native.int4_matmul(x[:, :-32], *packed)


@needs_int4
def test_int4_layers_decode_through_the_kernel_and_prefill_through_torch(monkeypatch):
    from subllm.inference.quantize import Int4Linear, decode_kernels, int4_codes

    codes, scale, zero = int4_codes(torch.randn(48, 64))
    layer = Int4Linear(codes, scale, zero)
    calls = []
    real = native.int4_matmul
    monkeypatch.setattr(native, "int4_matmul", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 64)
    prefill_out = layer(x)
    assert not calls
    with decode_kernels():
        decode_out = layer(x)
    assert calls and decode_out.shape == prefill_out.shape == (2, 3, 48)
    # against x @ w^T exactly (w: the kernel's weights): each activation is off by at most half its
    # group's step s / 2, so output n is off by at most sum_g s[g] / 2 * sum_k |w[n, k]| (k in g)
    w = _int4_weights(codes, scale, zero)
    step = x.reshape(6, 2, 32).double().abs().amax(-1) / 127  # (rows, groups)
    bound = torch.einsum("rg,ng->rn", step / 2, w.abs().reshape(48, 2, 32).sum(-1))
    exact = x.reshape(6, 64).double() @ w.T
    err = (decode_out.reshape(6, 48).double() - exact).abs()
    assert (err <= bound * 1.001 + 1e-5).all() and err.max() > 0
    assert layer.decode_nbytes() == 48 * 64 // 2 + 2 * 48 * 2 * 2  # the kernel's tiles + bf16 d, m


@needs_int4
@pytest.mark.parametrize("N, K, M", [(16, 32, 1), (48, 96, 5), (32, 576, 4)])
def test_int8_kernel_equals_its_arithmetic_in_float64(N, K, M):
    from subllm.inference.quantize import Int8Linear, decode_kernels

    g = torch.Generator().manual_seed(N + K + M)
    layer = Int8Linear.from_linear(torch.nn.Linear(K, N, bias=False))
    x = torch.randn(M, K, generator=g) * torch.linspace(0.1, 10, K)
    x[-1, -32:] = 0  # an all-zero group
    y = native.int8_matmul(x, *native.int8_pack(layer.q, layer.scale))
    ref = _rounded(x) @ layer.dequantized().double().T
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    _check_two_passes(native.int8_matmul, x, native.int8_pack(layer.q, layer.scale), layer.dequantized())
    layer.kernel = "native"
    assert layer.decode_nbytes() == N * K + N * 4  # the tiles and the fp32 row scales
    with decode_kernels():
        want = native.int8_matmul(x, *native.int8_pack(layer.q, layer.scale), passes=native.ACT_PASSES)
        assert torch.equal(layer(x[None])[0], want)  # the layer's decode path is this kernel
    with pytest.raises(Exception, match="native int8 kernel needs"):
        Int8Linear.from_linear(torch.nn.Linear(40, 16, bias=False)).kernel = "native"


@needs_int4
def test_int8_kernel_is_exact_at_the_extremes_of_weights_and_activations():
    """Weights at +-127 and activations all of one sign (each group's codes summing to +-127 * 32):
    the largest products, sums and activation offsets the kernel meets; the unsigned weights
    (q + 128) and the offset -128 * sum(q) must still give exactly w . (s q)."""
    from subllm.inference.quantize import Int8Linear

    q = torch.full((32, 64), 127, dtype=torch.int8)
    q[1::2] = -127
    q[:, 32:] = -q[:, 32:]
    q[5, :7] = 0
    layer = Int8Linear(q, torch.rand(32) + 0.5)
    x = torch.ones(3, 64)
    x[1] = -2.0
    x[2, 32:] = -0.25
    for passes in (1, 2):
        y = native.int8_matmul(x, *native.int8_pack(layer.q, layer.scale), passes=passes)
        ref = x.double() @ layer.dequantized().double().T  # x is exact on its grid: no rounding
        torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A build killed midway leaves torch's lock file, on which every later load would wait forever."""
    import os

    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "_get_build_directory", lambda name, verbose: str(tmp_path))
    lock = tmp_path / "lock"
    lock.touch()
    native._clear_stale_lock("x")
    assert lock.exists()  # a build may be running
    old = lock.stat().st_mtime - native.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale build lock"):
        native._clear_stale_lock("x")
    assert not lock.exists()
