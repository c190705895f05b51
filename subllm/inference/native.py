"""Native CPU kernels for decoding (issue 22): built from csrc/ on first use, torch's ops otherwise.

One kernel so far, `decode_attention(q, k, v, lens)`: the one-query attention of a decode step,
reading each row's first `lens[b]` cache slots in place (no slice, no mask) with the query heads of
one K/V head sharing every key and value read, fp32 arithmetic, fp32 or bf16 K/V
(csrc/decode_attention.cpp). torch's SDPA spends 100-400 us per layer on SmolLM2's one-query
attention at 512-2k keys on a 2-vCPU EPYC (7.6-8 GB/s); this kernel 40-210 us in fp32 and 35-130
in bf16 at one thread (docs/RESULTS.md).

The extension is compiled with torch's `cpp_extension` (g++ and ninja; ~10 s once per machine,
cached under $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) with instruction-set flags
for the CPU torch detects (`torch.backends.cpu.get_cpu_capability()`: AVX512 / AVX2 / default;
the capability is part of the extension's name, so a cache shared by different CPUs never loads
code built for another one). If the build fails, or SUBLLM_NATIVE=0, `available()` is False and
decoding uses SDPA - the reference the tests compare the kernel with.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

_CSRC = Path(__file__).parent / "csrc"
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}
_state: dict[str, object] = {}  # "ok": bool once a load was tried; "error": why it failed


def capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def load() -> bool:
    """Build (once per machine) and load the extension; -> whether its ops are registered. A
    failure warns once and leaves decoding on torch's kernels."""
    if "ok" in _state:
        return bool(_state["ok"])
    _state["ok"] = False
    if os.environ.get("SUBLLM_NATIVE", "1") == "0":
        _state["error"] = "disabled by SUBLLM_NATIVE=0"
        return False
    if hasattr(torch.ops, "subllm_native") and hasattr(torch.ops.subllm_native, "decode_attention"):
        _state["ok"] = True  # loaded by someone else in this process
        return True
    cap = capability()
    try:
        from torch.utils.cpp_extension import load as cpp_load

        cpp_load(
            name=f"subllm_native_{cap.lower()}",
            sources=[str(_CSRC / "decode_attention.cpp")],
            extra_cflags=["-O3", "-ffast-math", "-fopenmp", *_FLAGS.get(cap, [])],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a build error: fall back, say so once
        _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(
            f"subllm: native decode kernels unavailable ({_state['error']}); decoding with torch's SDPA",
            stacklevel=2,
        )
        return False
    _register_fake()
    _state["ok"] = True
    return True


def _register_fake() -> None:
    """Shapes for torch.compile (the compiled decode graphs call the kernel as one opaque op)."""

    @torch.library.register_fake("subllm_native::decode_attention")
    def _(q: Tensor, k: Tensor, v: Tensor, lens: Tensor) -> Tensor:
        return torch.empty_like(q)


def available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and load()


def status() -> str:
    """One line for banners and reports."""
    if not load():
        return f"torch SDPA ({_state.get('error', 'native kernels not loaded')})"
    return f"native ({capability()})"


def decode_attention(q: Tensor, k: Tensor, v: Tensor, lens: Tensor) -> Tensor:
    """q (B, H, 1, hd); k, v (B, Hkv, capacity, hd) cache buffers; lens (B,) int64, each row's
    number of valid slots (>= 1) -> (B, H, 1, hd). Needs `available()`."""
    return torch.ops.subllm_native.decode_attention(q, k, v, lens)


def attend_step(attn, q: Tensor, kb: Tensor, vb: Tensor, lens: Tensor | None, length: int, mask) -> Tensor:
    """A decode step's attention of one layer (`attn`: the block's Attention) over its cache
    buffers kb, vb (B, Hkv, capacity, hd): through the native kernel when `lens` (B,) is given,
    else through SDPA over the first `length` slots, masked by `mask` where rows differ."""
    if lens is not None:
        return attn.out(decode_attention(q, kb, vb, lens))
    return attn.attend(q, kb[:, :, :length], vb[:, :, :length], mask, is_causal=False)
