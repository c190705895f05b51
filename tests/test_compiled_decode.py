"""The compiled decode step (subllm/inference/compiled_decode.py) against the eager one, which is the
reference: same logits (inductor may reorder float sums: 1e-5), same greedy tokens, same per-level
cache lengths and contents, through nested S modules, ragged batches (the masked graph), a growing
cache (capacity changes mid-decode) and a subset-rows step (eager) between compiled ones."""

import copy

import pytest
import torch
from helpers import greedy_decode, tiny_preset_model

from subllm import SubLLMError
from subllm.config import parse_structure
from subllm.inference import int8_dynamic, native
from subllm.inference.compiled_decode import compile_decode, segments
from subllm.inference.engine import set_kv_dtype


def test_segments_are_the_runs_between_subsampling_modules():
    assert segments(parse_structure("TTTT")) == [(0, 1, 2, 3)]
    assert segments(parse_structure("TT(T(TT)T)T")) == [(0, 1), (2,), (3, 4), (5,), (6,)]


def _count_segment_calls(model) -> dict:
    calls: dict[int, int] = {}
    for first, (layers, fn) in list(model.compiled_decode.by_first.items()):

        def counted(*args, _fn=fn, _first=first):
            calls[_first] = calls.get(_first, 0) + 1
            return _fn(*args)

        model.compiled_decode.by_first[first] = (layers, counted)
    return calls


@pytest.mark.parametrize(
    "structure, lens, whole, kv",
    [("TT(T(TT)T)T", [11, 5], False, "same"), ("TT(T(TT)T)T", [11, 5], True, "same"),
     ("TT(T(TT)T)T", [9], False, "same"), ("TTT", [7], False, "same"),
     ("TT(T(TT)T)T", [11, 5], False, "bf16")],
)  # fmt: skip
def test_compiled_decode_equals_eager(structure, lens, whole, kv):
    """whole: the compiled model runs inner levels for the whole batch (the CUDA default: its
    compiled segments then serve the inner levels too), against the eager subset path. kv: the
    cache's dtype (engine.py set_kv_dtype)."""
    model = set_kv_dtype(tiny_preset_model(structure), kv)
    model.decode_subset = True
    model.native_layers = False  # the per-layer paths (the fused one: test_native_layers.py)
    compiled = compile_decode(copy.copy(model))  # shares the modules; only the copy is compiled
    compiled.decode_subset = not whole
    steps, subset = 12, (4 if len(lens) > 1 else None)
    ref, ref_cache = greedy_decode(model, lens, steps, subset)
    calls = _count_segment_calls(compiled)
    got, got_cache = greedy_decode(compiled, lens, steps, subset)
    assert sum(calls.values()) >= steps  # the compiled graphs ran (one call per segment reached)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert got_cache._len == ref_cache._len  # the same tokens reached every level
    for level, lens_l in enumerate(ref_cache._len):
        for b in range(len(lens_l)):
            assert torch.equal(got_cache.positions(level, b), ref_cache.positions(level, b))
    for layer, level in enumerate(ref_cache.layer_level):
        for b, n in enumerate(ref_cache._len[level]):
            for a, c in zip(got_cache.row_kv(layer, b), ref_cache.row_kv(layer, b)):  # either layout
                torch.testing.assert_close(a[0, :, :n], c[0, :, :n], rtol=1e-5, atol=1e-5)


def test_compile_decode_needs_eval_mode():
    model = tiny_preset_model("TTT").train()
    with pytest.raises(SubLLMError, match="eval mode"):
        compile_decode(model)


def test_generate_and_serve_compile_flag(tmp_path, capsys):
    from helpers import checkpoint_with_tokenizer

    from subllm.cli import main
    from subllm.cli.serve import load_server

    checkpoint_with_tokenizer(tmp_path)
    base = ["generate", "--checkpoint", str(tmp_path), "--prompt", "the cat sat", "--max-new-tokens", "6"]
    assert main([*base, "--dtype", "fp32"]) == 0
    eager = capsys.readouterr()
    assert main([*base, "--dtype", "fp32", "--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out and "compiled decode" in compiled.err
    batcher, _ = load_server(tmp_path, 2, 2, "fp32", "tiny", compile=True)
    assert batcher.model.compiled_decode is not None


needs_vnni = pytest.mark.skipif(not native.vnni_available(), reason="no VNNI")


@pytest.mark.parametrize(
    "kind, int8_kernel, rank",
    [
        pytest.param(
            "int8", "dynamic", 0, marks=pytest.mark.skipif(not int8_dynamic.available(), reason="no fbgemm")
        ),
        pytest.param("int4", "auto", 0, marks=needs_vnni),
        pytest.param("int4", "auto", 32, marks=needs_vnni),  # + low-rank corrections (int4_correction.py)
    ],
)
def test_compiled_decode_with_int8_activation_kernels_equals_eager(kind, int8_kernel, rank):
    """The dynamic int8 x int8 kernel and the native VNNI kernels (int4 layers; int8 layers of a
    shape int4 cannot hold, and the head) are opaque custom ops inside the compiled graphs:
    compiled == eager on a quantized model, ragged batch. Tolerance: inductor's fused ops give the
    kernels inputs 1e-7 away from eager's; the dynamic kernel's fine grid keeps that at 1e-4, the
    native kernels round activations to int8 per group of 32, twice (native.ACT_PASSES), where 1e-7
    can move a value to the next step of the finer grid (max|x| / 127 / 254)."""
    from subllm.inference.quantize import Int8Linear, quantize_

    model = quantize_(tiny_preset_model("TT(TT)T"), kind, int8_kernel=int8_kernel, int4_rank=rank)
    assert any(getattr(m, "down", None) is not None for m in model.modules()) == bool(rank)
    if rank:  # the native kernel where it fits, not one timing picks: the packed one rounds its outputs
        for m in model.modules():  # to bf16, where inputs 1e-7 apart can land a bf16 step apart
            if isinstance(m, Int8Linear) and native.vnni_fits(m.out_features, m.in_features):
                m.kernel = "native"
    model.native_layers = False
    assert kind == "int8" or (model.int4_kernel == "native" and model.int4_fallback)
    compiled = compile_decode(copy.copy(model))
    ref, _ = greedy_decode(model, [9, 4], 6)
    calls = _count_segment_calls(compiled)
    got, _ = greedy_decode(compiled, [9, 4], 6)
    assert sum(calls.values()) >= 6
    tol = 1e-4 if kind == "int8" else 1e-3
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
