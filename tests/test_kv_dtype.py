"""A bf16 KV cache under fp32 compute (`--kv-dtype bf16`, engine.cache_dtype): the cache really holds
bf16, decoding stays within bf16 rounding of the fp32 cache's logits (teacher-forced), compiled
equals eager with it, and generate takes the flag."""

import copy

import torch
from helpers import checkpoint_with_tokenizer, left_padded, tiny_preset_model

from subllm.inference.compiled_decode import compile_decode
from subllm.inference.engine import decode_step, new_cache, prefill

TOL = 0.005  # max |dlogit| against the fp32 cache; measured ~0.0011 on the model below


def _decode(model, lens, steps=10):
    """Teacher-forced: the same fed tokens whatever the logits (a greedy flip would change them)."""
    ids, mask = left_padded(lens)
    fed = torch.randint(3, 256, (steps, len(lens)), generator=torch.Generator().manual_seed(5))
    cache = new_cache(model, len(lens), chunk=8)
    with torch.no_grad():
        out = [prefill(model, ids, mask, cache)]
        for tokens in fed:
            out.append(decode_step(model, cache, tokens))
    return torch.stack(out), cache


def _bf16(model):
    half = copy.copy(model)  # shares the weights
    half.kv_dtype = torch.bfloat16
    return half


def test_bf16_kv_cache_decodes_within_rounding_of_fp32():
    """All-T: no selection to flip (with S modules a score near its threshold can flip on bf16
    rounding, and a flipped token changes the logits by far more than rounding: 0.55 measured)."""
    model = tiny_preset_model("TTTTT")
    ref, ref_cache = _decode(model, [12, 6])
    got, cache = _decode(_bf16(model), [12, 6])
    assert all(k.dtype == torch.bfloat16 for k in cache.k) and ref_cache.k[0].dtype == torch.float32
    assert cache.bytes_per_token() * 2 == ref_cache.bytes_per_token() and cache._len == ref_cache._len
    diff = (got - ref).abs().max()
    assert 0 < diff <= TOL


def test_compiled_equals_eager_with_a_bf16_kv_cache():
    half = _bf16(tiny_preset_model("TT(T(TT)T)T"))
    eager, eager_cache = _decode(half, [12, 6])
    compiled, compiled_cache = _decode(compile_decode(copy.copy(half)), [12, 6])
    assert compiled_cache._len == eager_cache._len
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


def test_generate_kv_dtype_flag(tmp_path, capsys):
    from subllm.cli import main

    checkpoint_with_tokenizer(tmp_path)
    base = ["generate", "--checkpoint", str(tmp_path), "--prompt", "the cat sat", "--max-new-tokens", "5"]
    assert main([*base, "--dtype", "fp32", "--kv-dtype", "bf16"]) == 0
    assert "bf16 KV cache" in capsys.readouterr().err
