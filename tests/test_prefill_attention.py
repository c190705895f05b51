"""The bf16 prefill-attention kernel (csrc/prefill_attention.cpp) against SDPA - fp32 SDPA with an
explicit mask as the obviously-correct reference, bf16 SDPA as the error a bf16 kernel may have -
then the dispatcher that picks it (subllm/inference/prefill_attention.py) and whole bf16 prefills,
one pass and chunked, with and without it."""

import pytest
import torch
import torch.nn.functional as F
from helpers import left_padded, tiny_config

from subllm import SubLLM
from subllm.inference import native
from subllm.inference import prefill_attention as pa
from subllm.inference.chunked_prefill import prefill_chunked
from subllm.inference.engine import new_cache, prefill
from subllm.model.layers import Attention

needs_bf16 = pytest.mark.skipif(not native.bf16_available(), reason="no AVX512-BF16 native kernel here")


def _masked_sdpa(q, k, v, offset):
    Tq, Tk = q.shape[2], k.shape[2]
    mask = torch.arange(Tk) <= (offset + torch.arange(Tq))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _inputs(B, H, Hkv, Tq, Tk, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=g).bfloat16().transpose(1, 2)  # as Attention.qkv makes it
    k = (torch.randn(B, Hkv, Tk, D, generator=g) * 2).bfloat16()
    v = torch.randn(B, Hkv, Tk, D, generator=g).bfloat16()
    return q, k, v


@needs_bf16
@pytest.mark.parametrize(
    "B, H, Hkv, Tq, Tk, D",
    [
        (1, 9, 3, 200, 200, 64),  # SmolLM2's heads; key blocks of 64 with a partial last one
        (2, 4, 4, 37, 37, 32),  # no grouping, B > 1
        (1, 8, 2, 70, 70, 128),
        (1, 6, 1, 33, 33, 64),  # 6 query heads per K/V head: row tiles across positions
        (2, 9, 3, 40, 140, 64),  # a later chunk: 100 cached keys before the 40 queries
        (1, 4, 2, 1, 65, 32),  # one query after 64 cached keys
    ],
)
def test_kernel_equals_masked_sdpa(B, H, Hkv, Tq, Tk, D):
    q, k, v = _inputs(B, H, Hkv, Tq, Tk, D, seed=Tq * 7 + D)
    offset = Tk - Tq
    v[..., offset + Tq // 2 :, :] += 100.0  # a query reading a key past its own would be far off
    out = native.prefill_attention(q, k, v, offset)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    ref = _masked_sdpa(q.float(), k.float(), v.float(), offset)
    bf16_err = (_masked_sdpa(q, k, v, offset).float() - ref).abs().max().item()
    err = (out.float() - ref).abs()
    assert err.max().item() <= 2 * bf16_err + 1e-3, (err.max().item(), bf16_err)
    torch.testing.assert_close(out.float(), ref, atol=0.5, rtol=1e-2)  # the +100 values, relative


@needs_bf16
def test_kernel_refuses_what_it_cannot_do():
    q, k, v = _inputs(1, 4, 2, 8, 8, 32, seed=0)
    with pytest.raises(RuntimeError, match="bf16"):
        native.prefill_attention(q.float(), k, v, 0)
    with pytest.raises(RuntimeError, match="head dim"):
        native.prefill_attention(q[..., :16], k[..., :16], v[..., :16], 0)
    with pytest.raises(RuntimeError, match="past"):
        native.prefill_attention(q, k, v, 1)


class _Model(torch.nn.Module):
    native_prefill = True


@pytest.mark.parametrize("offset", [0, 24])
def test_dispatcher_paths_agree(offset, monkeypatch):
    """bf16 inputs take the kernel (where it runs) and match SDPA's path; fp32 inputs, a model with
    native_prefill = False and inputs that need a gradient never reach the kernel."""
    attn = Attention(tiny_config(dim=128, n_heads=4, n_kv_heads=2)).bfloat16()  # head dim 32
    q, k, v = _inputs(1, 4, 2, 40, 40 + offset, 32, seed=offset)
    model, off = _Model(), _Model()
    off.native_prefill = False
    with torch.no_grad():
        sdpa = pa.causal_attention(off, attn, q, k, v, offset)
        got = pa.causal_attention(model, attn, q, k, v, offset)
    assert got.shape == (1, 40, 128)
    torch.testing.assert_close(got.float(), sdpa.float(), atol=3e-2, rtol=3e-2)

    def refuse(*a):
        raise AssertionError("the native kernel was called")

    monkeypatch.setattr(native, "prefill_attention", refuse)
    with torch.no_grad():
        pa.causal_attention(off, attn, q, k, v, offset)
        attn32 = Attention(tiny_config(dim=128, n_heads=4, n_kv_heads=2))
        pa.causal_attention(model, attn32, q.float(), k.float(), v.float(), offset)
    pa.causal_attention(model, attn, q.detach().requires_grad_(), k, v, offset)


@needs_bf16
@pytest.mark.parametrize("structure", ["TTT", "T(T(T))T"])
def test_bf16_prefill_with_and_without_the_kernel(structure):
    """Prefills under bf16 autocast (`--prefill-dtype bf16`; head dim 32): one-pass and chunked ones
    with the kernel give the logits of the SDPA path (bf16 rounding apart), the chunked one those of
    the one pass."""
    torch.manual_seed(0)
    model = SubLLM(tiny_config(structure, dim=64, n_heads=2, n_kv_heads=1, keep_ratio=0.7)).eval()
    ids, mask = left_padded([50, 33], vocab=97)
    logits = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for use in (False, True):
            model.native_prefill = use
            logits[use] = prefill(model, ids, mask, new_cache(model, 2)).float()
        chunked = prefill_chunked(model, ids, mask, new_cache(model, 2), 16).float()
    scale = logits[False].abs().max().item()
    assert (logits[True] - logits[False]).abs().max().item() < 0.05 * scale
    assert (chunked - logits[True]).abs().max().item() < 0.05 * scale
