"""Causal attention of a prompt or a prompt's chunk: the native bf16 kernel where it runs, SDPA else.

A bf16 prefill (`--prefill-dtype bf16`, `--dtype bf16`) spent a third of its time in torch's CPU
flash attention at 1,024 tokens on an AVX512-BF16 CPU (~48 GFLOP/s against ~250 for its matmuls);
csrc/prefill_attention.cpp computes the same with AVX512-BF16 dot products (docs/RESULTS.md,
"Prefill attention with AVX512-BF16 dot products"). It is taken when q is bf16 on a CPU that has
AVX512-BF16, the head dim is one the kernel has tiles for, no gradient is asked for and
`model.native_prefill` is not False (benchmarks A/B it); fp32 prefills and every other case keep
SDPA, the reference the tests compare the kernel with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from subllm.inference import native
from subllm.model.layers import Attention


def native_ok(model: nn.Module, q: Tensor) -> bool:
    return (
        getattr(model, "native_prefill", True)
        and q.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and q.shape[-1] in native.PREFILL_HEAD_DIMS
        and not (torch.is_grad_enabled() and q.requires_grad)
        and native.bf16_available()
    )


def causal_attention(
    model: nn.Module, attn: Attention, q: Tensor, k: Tensor, v: Tensor, offset: int = 0
) -> Tensor:
    """q (B, H, Tq, hd), k, v (B, Hkv, offset + Tq, hd): query t sees keys 0 .. offset + t (the
    first `offset` keys are an earlier chunk's, from the cache) -> attn's output (B, Tq, C)."""
    Tq = q.shape[2]
    if native_ok(model, q):
        if k.dtype != q.dtype:  # a cache kept in another dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
        return attn.out(native.prefill_attention(q, k, v, offset))
    mask = None
    if offset:
        idx = torch.arange(offset + Tq, device=q.device)
        mask = (idx <= offset + torch.arange(Tq, device=q.device)[:, None])[None, None]
    return attn.attend(q, k, v, mask, mask is None)


def status(device: torch.device | str = "cpu") -> str:
    """One line for reports: which kernel a bf16 prefill's attention takes here."""
    if torch.device(device).type == "cpu" and native.bf16_available():
        return "native AVX512-BF16 (bf16 prefills; fp32 ones: torch SDPA)"
    return "torch SDPA"
