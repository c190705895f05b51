"""int4 layers with a low-rank int8 correction (subllm/inference/int4_correction.py): the factors
against a truncated SVD, the corrected layer against its slow path (int4 grid + U D in fp32), a base
on its int4 grid giving back an uptrained weight, quantize_ / spec / CLI wiring and errors, and the
native runs of layers with corrections against the per-layer decode."""

import copy

import pytest
import torch
from helpers import checkpoint_with_tokenizer, greedy_decode, tiny_model
from torch import nn

from subllm import SubLLMError
from subllm.inference import int4_correction as C
from subllm.inference import native, native_layers
from subllm.inference.engine import new_cache
from subllm.inference.quantize import Int4Linear, apply_quantization, int4_codes, int4_dequantize, quantize_

needs_vnni = pytest.mark.skipif(not native.vnni_available(), reason="no AVX512-VNNI kernel on this CPU")


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_lowrank_factors_are_the_truncated_svd():
    torch.manual_seed(0)
    a = torch.randn(48, 5) @ torch.randn(5, 64)  # rank 5
    down, up = C.lowrank_factors(a, 5)
    assert down.shape == (5, 64) and up.shape == (48, 5)
    torch.testing.assert_close(up @ down, a, rtol=1e-4, atol=1e-4)
    r = torch.randn(48, 64)
    down, up = C.lowrank_factors(r, 8)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    torch.testing.assert_close(up @ down, (u[:, :8] * s[:8]) @ vh[:8], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1))  # balanced: sqrt(s) on each side
    assert C.lowrank_factors(torch.zeros(16, 32), 4) is None
    assert C.lowrank_factors(r, 1000)[0].shape == (48, 64)  # the rank is capped by the shape


def test_corrected_layer_against_its_slow_path_and_rank_lowers_the_error():
    torch.manual_seed(1)
    w = torch.randn(64, 96)
    lin = _linear(w)
    codes = int4_codes(w)
    resid = w - int4_dequantize(*codes)
    x = torch.randn(7, 96)
    errors = []
    for rank in (0, 8, 32, 64):
        q = Int4Linear.from_linear(lin, rank=rank)
        assert (q.down is None) == (rank == 0)
        slow_w = int4_dequantize(*codes)
        if rank:
            down, up = C.lowrank_factors(resid, rank)
            assert q.down.out_features == q.up.in_features == rank
            torch.testing.assert_close(q.down.dequantized(), down, rtol=0, atol=float(down.abs().max()) / 127)
            slow_w = slow_w + up @ down
        slow = x @ slow_w.T  # the int4 kernel: bf16 activations and scales, so bf16-level agreement
        torch.testing.assert_close(q(x), slow, rtol=2e-2, atol=2e-2 * float(slow.abs().mean()))
        errors.append(float((q(x) - x @ w.T).pow(2).mean()))
    assert errors[1] < errors[0] and errors[2] < errors[1] and errors[3] < 0.05 * errors[0]


def test_a_base_on_its_grid_gives_back_the_uptrained_weight():
    """A source on an int4 grid plus a rank-4 move: with the source as base the codes are the source's
    and the correction the move (up to int8 rounding of the factors); without it, the rounding of the
    moved weight loses most of the move."""
    torch.manual_seed(2)
    w0 = int4_dequantize(*int4_codes(torch.randn(64, 96)))
    move = 0.01 * torch.randn(64, 4) @ torch.randn(4, 96)
    x = torch.randn(16, 96)
    want = x @ (w0 + move).T
    with_base = Int4Linear.from_linear(_linear(w0 + move), rank=4, base=w0)
    plain = Int4Linear.from_linear(_linear(w0 + move), rank=4)
    err = [float((m(x) - want).pow(2).mean()) for m in (with_base, plain)]
    moved = float((x @ move.T).pow(2).mean())
    assert err[0] < 0.05 * moved and err[1] > 10 * err[0]  # (the kernel's bf16 activations: ~1% alone)
    assert Int4Linear.from_linear(_linear(w0), rank=4).down is None  # on its grid: nothing to correct
    with pytest.raises(SubLLMError, match="does not match"):
        Int4Linear.from_linear(_linear(w0), rank=4, base=w0[:, :64])


def test_quantize_with_a_base_model_and_errors():
    model = tiny_model("TT(TT)T", dim=128, n_heads=2, n_kv_heads=1)
    base = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.startswith("layers.")
            and type(m) is nn.Linear}  # fmt: skip
    with torch.no_grad():
        for m in model.layers.modules():
            if type(m) is nn.Linear:
                m.weight.add_(0.01 * torch.randn(m.weight.shape[0], 2) @ torch.randn(2, m.weight.shape[1]))
    q = quantize_(copy.deepcopy(model), "int4", head=False, int4_rank=32, int4_base=base)
    layer = q.layers[0].attn.wqkv
    assert isinstance(layer, Int4Linear) and layer.down is not None and q.int4_rank == 32
    with pytest.raises(SubLLMError, match="has no layer layers.0.attn.wqkv"):
        quantize_(copy.deepcopy(model), "int4", int4_rank=8, int4_base={})
    with pytest.raises(SubLLMError, match="apply to int4"):
        quantize_(copy.deepcopy(model), "int8", int4_rank=8)


def test_spec_round_trip_and_errors(tmp_path):
    model = tiny_model("TT", dim=128, n_heads=2, n_kv_heads=1)
    with torch.no_grad():  # the layers on their int4 grid, as SmolLM2's Q4_1 weights are
        for m in model.layers.modules():
            if type(m) is nn.Linear:
                m.weight.copy_(int4_dequantize(*int4_codes(m.weight)))
    checkpoint_with_tokenizer(tmp_path, model)
    assert C.spec("int8") == "int8" and C.spec("int4") == "int4"
    s = C.spec("int4", 64, tmp_path)
    assert s == f"int4:rank=64:base={tmp_path}" and C.parse_spec(s) == ("int4", 64, str(tmp_path))
    assert C.parse_spec("none") == ("none", 0, None)
    for bad, match in (
        (("int8", 8), "apply to --quantize int4"),
        (("int4", -1), ">= 0"),
        (("int4", 0, tmp_path), "needs --int4-rank > 0"),
        (("int4", 8, tmp_path / "nope"), "no checkpoint"),
    ):
        with pytest.raises(SubLLMError, match=match):
            C.spec(*bad)
    for bad in ("int4:rank=x", "int4:depth=3", "int8:rank=4"):
        with pytest.raises(SubLLMError, match="bad quantization spec"):
            C.parse_spec(bad)
    with torch.no_grad():  # an uptraining's move of one layer
        model.layers[1].ffn.w2.weight.add_(0.01 * torch.randn(128, 1) @ torch.randn(1, model.config.ffn_dim))
    with pytest.raises(SubLLMError, match="records no source"):
        apply_quantization(copy.deepcopy(model), "int4:rank=32:base=auto")
    model.config.extra["init_from"] = {"path": str(tmp_path / "gone"), "kind": "subllm"}
    with pytest.raises(SubLLMError, match="not a subllm checkpoint on this machine"):
        apply_quantization(copy.deepcopy(model), "int4:rank=32:base=auto")
    model.config.extra["init_from"] = {"path": str(tmp_path), "kind": "subllm"}  # as uptraining records it
    q = apply_quantization(model, C.spec("int4", 32, "auto"))
    assert q.layers[0].ffn.w13.down is None and q.layers[1].ffn.w2.down is not None  # only the moved one


def test_generate_cli_with_a_correction(tmp_path, capsys):
    from subllm.cli import main

    checkpoint_with_tokenizer(tmp_path)
    base = ["generate", "--checkpoint", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "3"]
    assert main([*base, "--dtype", "fp32", "--quantize", "int4", "--int4-rank", "32"]) == 0
    assert "with rank-32 corrections" in capsys.readouterr().err
    assert main([*base, "--quantize", "int8", "--int4-rank", "32"]) == 2  # a clear error, no traceback
    assert "apply to --quantize int4" in capsys.readouterr().err


@pytest.mark.skipif(not native.available("cpu"), reason="native kernels not built here")
@needs_vnni
def test_runs_of_layers_with_corrections_decode_as_the_per_layer_path(monkeypatch):
    model = tiny_model("TT(T(TT)T)T", dim=128, n_heads=2, n_kv_heads=1, seed=1)
    quantize_(model, "int4", head=False, int8_kernel="native", int4_rank=32)
    assert all(b.ffn.w2.down is not None for b in model.layers)
    calls = []
    real = native_layers.run
    monkeypatch.setattr(native_layers, "run", lambda m, r, *a: calls.append(tuple(r[0])) or real(m, r, *a))
    got, _ = greedy_decode(model, [11, 4], 8, subset_at=3)
    assert {(0, 1), (2,), (3, 4), (5,), (6,)} <= set(calls)  # the corrected layers ran natively
    model.native_layers = False
    n = len(calls)
    ref, _ = greedy_decode(model, [11, 4], 8, subset_at=3)
    assert len(calls) == n
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)  # activations rounded per group of 32
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    tensors, kinds = native_layers.layer_args(model.layers[0])  # a one-layer run
    bad = list(tensors)
    bad[2 + 3], bad[2 + 6] = bad[2 + 6], bad[2 + 3]  # Wqkv's D and U tiles swapped: refused up front
    cache = new_cache(model, 1)
    cache.reserve(0, 4)
    x, cs, one = torch.randn(1, 1, 128), torch.randn(1, 1, 64), torch.ones(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="correction's int8 tiles do not fit"):
        kv = (cache.k[:1], cache.v[:1])
        native_layers.run(model, ([0], native_layers.bind(bad, kinds)), x, cs, cs, one * 0, one * 0, one, *kv)
    for block in model.layers:  # a correction off its native kernel: the layer leaves the runs
        block.attn.wo.up.kernel = "cast"
    native_layers.runs(model, model.config.tree)
    assert native_layers.layer_args(model.layers[0]) is None
