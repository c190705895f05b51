"""Runs of layers in one native call (subllm/inference/native_layers.py, csrc/decode_layers.cpp)
against the per-layer eager decode, the reference: the same logits, greedy tokens and cache
contents through nested S modules, a ragged batch, a subset-rows step and a growing cache, for
dense fp32, int4 and int8 layers, fp32 and bf16 caches."""

import copy

import pytest
import torch
from helpers import greedy_decode, tiny_model

from subllm.inference import native, native_layers
from subllm.inference.engine import new_cache, set_kv_dtype
from subllm.inference.quantize import Int8Linear, quantize_

pytestmark = pytest.mark.skipif(not native.available("cpu"), reason="native kernels not built here")
needs_vnni = pytest.mark.skipif(not native.vnni_available(), reason="no AVX512-VNNI kernel on this CPU")


def _decode(model, lens, steps=8):
    return greedy_decode(model, lens, steps, subset_at=3 if len(lens) > 1 else None)


def _count_runs(monkeypatch) -> list:
    calls = []
    real = native_layers.run
    monkeypatch.setattr(native_layers, "run", lambda m, r, *a: calls.append(tuple(r[0])) or real(m, r, *a))
    return calls


def _native_int8(model):
    for block in model.layers:
        for lin in (block.attn.wqkv, block.attn.wo, block.ffn.w13, block.ffn.w2):
            lin.kernel = "native"
    return model


HD64 = dict(dim=128, n_heads=2, n_kv_heads=1, seed=1)  # head_dim 64: the attention's AVX-512 path


@pytest.mark.parametrize(
    "quant, kv, lens, kw",
    [
        ("none", "same", [11, 4], HD64),
        ("none", "bf16", [11, 4], HD64),
        ("none", "same", [11, 4], {}),  # the tiny preset's head_dim 16: the portable attention loops
        pytest.param("int4", "same", [11, 4], HD64, marks=needs_vnni),
        pytest.param("int4", "bf16", [11, 4], HD64, marks=needs_vnni),
        pytest.param("int8", "same", [11, 4], HD64, marks=needs_vnni),
    ],
)
def test_runs_of_layers_decode_as_the_per_layer_path(monkeypatch, quant, kv, lens, kw):
    model = tiny_model("TT(T(TT)T)T", **kw)
    if quant != "none":  # the head stays fp32: it is not part of a run and would only add rounding
        quantize_(model, quant, head=False)
    if quant == "int8":
        _native_int8(model)
    set_kv_dtype(model, kv)
    calls = _count_runs(monkeypatch)
    got, got_cache = _decode(model, lens)
    assert {(0, 1), (2,), (3, 4), (5,), (6,)} <= set(calls)  # every run of every level, fused
    model.native_layers = False
    n = len(calls)
    ref, ref_cache = _decode(model, lens)
    assert len(calls) == n  # the reference never took the fused path
    # dense: fp32 sums in another order (1e-5); int4 / int8: the kernels round activations per
    # group of 32, where a 1e-7 difference can move a value to the next step of the grid; a bf16
    # cache likewise: a K or V value 1e-7 from a rounding boundary is stored one bf16 step away by
    # one path (seen: 1e-4 in the logits after a few steps)
    tol = 1e-5 if quant == "none" and kv == "same" else 1e-3
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert got_cache._len == ref_cache._len
    rtol = 2**-7 if kv == "bf16" else tol  # a bf16 cache: the same value may round one bf16 step away
    for layer, level in enumerate(ref_cache.layer_level):
        for b, m in enumerate(ref_cache._len[level]):
            for a, c in zip(got_cache.row_kv(layer, b), ref_cache.row_kv(layer, b)):
                torch.testing.assert_close(a[0, :, :m], c[0, :, :m], rtol=rtol, atol=tol)


def test_an_ineligible_layer_ends_a_run_and_decodes_per_layer(monkeypatch):
    """A layer the native op cannot hold (here an int8 layer on the cast kernel) splits the level's
    run in two and runs through the eager path; the logits stay those of the eager decode."""
    model = tiny_model("TTTT", dim=128, n_heads=2, n_kv_heads=1)
    model.layers[1].attn.wo = Int8Linear.from_linear(model.layers[1].attn.wo)  # kernel "cast"
    runs = native_layers.runs(model, model.config.tree)
    assert [r[0] for r in runs.values()] == [[0], [2, 3]]
    calls = _count_runs(monkeypatch)
    got, _ = _decode(model, [7, 3])
    assert set(calls) == {(0,), (2, 3)}
    model.native_layers = False
    ref, _ = _decode(model, [7, 3])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bf16_activations_or_autocast_take_the_per_layer_path(monkeypatch):
    model = tiny_model("TT(TT)T", dim=128, n_heads=2, n_kv_heads=1)
    calls = _count_runs(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _decode(model, [6], steps=2)
    assert not calls
    assert not native_layers.usable(model.to(torch.bfloat16), torch.zeros(1, 1, 128, dtype=torch.bfloat16))


def test_the_op_refuses_bad_input():
    model = tiny_model("TT", dim=128, n_heads=2, n_kv_heads=1)
    run_args = native_layers.runs(model, model.config.tree)[0]
    cache = new_cache(model, 1)
    cache.reserve(0, 4)
    x, cs = torch.randn(1, 1, 128), torch.randn(1, 1, 64)
    one = torch.ones(1, dtype=torch.long)
    args = (cs, cs, one * 0, one * 0, one, cache.k[:2], cache.v[:2])
    native_layers.run(model, run_args, x, *args)  # fine
    with pytest.raises(RuntimeError, match="x must be"):
        native_layers.run(model, run_args, x.double(), *args)
    with pytest.raises(RuntimeError, match="out of the cache's range"):
        native_layers.run(model, run_args, x, cs, cs, one * 0, one * 10**6, one, cache.k[:2], cache.v[:2])
    with pytest.raises(RuntimeError, match="one k and one v cache"):
        native_layers.run(model, run_args, x, cs, cs, one * 0, one * 0, one, cache.k[:1], cache.v[:1])


def test_a_replaced_weight_or_native_copy_is_picked_up(monkeypatch):
    """The runs are kept on the model between steps; a weight or a quantized layer's native copy
    replaced after decoding (module attribute, model.to() rebuilding buffers) is used, not the
    one kept."""
    model = tiny_model("TTT", **HD64)
    _decode(model, [6], steps=2)  # builds and keeps the runs
    w2 = model.layers[1].ffn.w2
    w2.weight = torch.nn.Parameter(torch.randn_like(w2.weight))
    got, _ = _decode(model, [6], steps=2)
    model.native_layers = False
    ref, _ = _decode(model, [6], steps=2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    model.native_layers = True
    attn = copy.deepcopy(model.layers[2].attn)  # a whole module replaced, the old one freed
    with torch.no_grad():
        attn.wo.weight.mul_(-1)
    model.layers[2].attn = attn
    got, _ = _decode(model, [6], steps=2)
    model.native_layers = False
    torch.testing.assert_close(got, _decode(model, [6], steps=2)[0], rtol=1e-5, atol=1e-5)
    if native.vnni_available():
        model.native_layers = True
        _native_int8(quantize_(model, "int8", head=False))
        _decode(model, [6], steps=2)
        model.to(torch.bfloat16).to(torch.float32)  # new buffer objects for every native copy
        got, _ = _decode(model, [6], steps=2)
        model.native_layers = False
        torch.testing.assert_close(got, _decode(model, [6], steps=2)[0], rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_runs_are_checked_once_per_cache_and_read_weights_live():
    """Within one cache the kept runs are not checked again (native_layers.runs), but they pass the
    modules' own tensors: a weight changed in place between two steps is used at the next step."""
    from subllm.inference.engine import decode_step, prefill

    def steps(native_on: bool) -> torch.Tensor:
        model = tiny_model("TTT", **HD64)
        model.native_layers = native_on
        cache = new_cache(model, 1)
        prefill(model, torch.tensor([[5, 6, 7, 8]]), None, cache)
        decode_step(model, cache, torch.tensor([9]))
        model.layers[1].ffn.w2.weight.mul_(-1)
        return decode_step(model, cache, torch.tensor([10]))

    torch.testing.assert_close(steps(True), steps(False), rtol=1e-5, atol=1e-5)


def test_a_refused_run_leaves_the_cache_as_it_was():
    model = tiny_model("TT", dim=128, n_heads=2, n_kv_heads=1)
    run_args = native_layers.runs(model, model.config.tree)[0]
    cache = new_cache(model, 1)
    cache.reserve(0, 4)
    before = [t.clone() for t in cache.k[:2]]
    one = torch.ones(1, dtype=torch.long)
    x, cs = torch.randn(1, 1, 128), torch.randn(1, 1, 64)
    with pytest.raises(RuntimeError, match="lens out of the cache's range"):
        native_layers.run(model, run_args, x, cs, cs, one * 0, one * 0, one * 10**6, cache.k[:2], cache.v[:2])
    assert all(torch.equal(a, b) for a, b in zip(cache.k[:2], before))


def test_final_norm_native_equals_the_module_and_falls_back():
    """decode_step's final RMSNorm through the native op where the step is native, the module
    otherwise (grad mode, autocast); the op refuses a weight of the wrong size."""
    model = tiny_model(**HD64).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, model.config.dim) * 3
    with torch.no_grad():
        ref = model.norm(x)
        out = native_layers.final_norm(model, x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert native_layers.usable(model, x) is False
    assert not native_layers.usable(model, x)  # grad mode: the module
    torch.testing.assert_close(native_layers.final_norm(model, x), ref)
    with pytest.raises(RuntimeError, match="rms_norm: the weight must be"):
        torch.ops.subllm_native.rms_norm(x, torch.ones(5), 1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(score_norm=True, threshold="calibrated"),
        dict(score_norm=False, threshold="zero"),
        dict(score_norm=True, score_bias=0.25, keep_first=3),
    ],
)
def test_native_select_and_bypass_equal_the_modules(kw):
    """S's decision (score layer, clamp) and U + B in one native op each (csrc/decode_select.cpp)
    against Subsample.decide and the engine's formula; then a whole decode through nested S's with
    those ops against the eager reference (model.native_layers = False): same logits, same keeps."""
    model = tiny_model("TT(T(TT)T)T", **HD64, **kw)
    sub = model.subsamples[0]
    with torch.no_grad():
        if sub.theta is not None:
            sub.threshold.fill_(0.3)
        x = torch.randn(5, 1, model.config.dim) * 2
        d, w = native_layers.decide(sub, x)
        ref_d, ref_w = sub.decide(x)
        torch.testing.assert_close(d, ref_d, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-5)
        assert w.min() >= 0 and w.max() <= 1 and (w == 0).any()  # the clamp does bite
        h = torch.randn_like(x)
        scale = model.bypasses[0].scale.uniform_(0.2, 1.0)
        torch.testing.assert_close(native_layers.bypass(x, h, w, scale), x + (w[..., None] * (h - x)) * scale)
    lens = [11, 2]  # row 1 decodes positions 2, 3, ...: keep_first pins its first step
    got, got_cache = _decode(model, lens)
    model.native_layers = False
    ref, ref_cache = _decode(model, lens)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got_cache._len == ref_cache._len
    assert 0 < sum(got_cache._len[1]) < sum(got_cache._len[0])  # S kept some tokens, not all


def test_a_router_of_another_kind_keeps_its_own_decide():
    """native_layers.decide takes plain S modules only: an `M` router (MoD) returns None, so the
    engine calls its own decide."""
    model = tiny_model("TMTT", **HD64)
    x = torch.randn(2, 1, model.config.dim)
    assert native_layers.decide(model.subsamples[0], x) is None
