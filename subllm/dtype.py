"""Which dtype a command computes in: `--dtype auto` (the default everywhere) -> bf16 autocast or fp32.

auto = bf16 on a CUDA device that supports bf16 and on a CPU with native bf16 (AVX512-BF16 or AMX
on x86; whatever oneDNN accepts elsewhere), else fp32 - except decoding on a CPU (generate, serve,
bench infer: `work="decode"`), which is fp32 there. Measured: on a CPU with AVX2 only, bf16
autocast matmuls run ~80x slower than fp32, so bf16 is no default there. fp16 is never used.
The hardware is probed once per process (`cpu_probe`, cached), through private torch calls that
may vanish: any failure reads as "no native bf16". Imports torch lazily (no cost at `--help`).
"""

from __future__ import annotations

import functools
import platform
import sys

from subllm.errors import SubLLMError

DTYPES = ("auto", "bf16", "fp32")
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def _try(fn, default):
    try:
        return fn()
    except Exception:  # private torch APIs: absent or failing means "unknown"
        return default


@functools.lru_cache(maxsize=1)
def cpu_probe() -> dict:
    """{"cpu_capability": torch's ATen CPU capability (AVX2, AVX512, ...), "cpu_native_bf16": bool}.
    On x86 oneDNN also reports bf16 on AVX512 without bf16 instructions (emulated), so the
    AVX512-BF16 / AMX flags decide there."""
    import torch

    capability = _try(lambda: str(torch.backends.cpu.get_cpu_capability()), "unknown")
    native = _try(lambda: bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), False)
    if native and platform.machine().lower() in _X86:
        flags = _try(
            lambda: torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported(), None
        )
        native = capability == "AVX512" if flags is None else bool(flags)
    return {"cpu_capability": capability, "cpu_native_bf16": native}


def cuda_bf16() -> bool:
    import torch

    return _try(lambda: torch.cuda.is_available() and bool(torch.cuda.is_bf16_supported()), False)


def describe_hardware() -> dict:
    """What the dtype choice rests on, for logs and results JSON (plus "cuda_bf16" with a GPU)."""
    import torch

    out = dict(cpu_probe())
    if _try(torch.cuda.is_available, False):
        out["cuda_bf16"] = cuda_bf16()
    return out


@functools.lru_cache(maxsize=1)
def _warn_slow_bf16(capability: str) -> None:
    print(
        f"warning: this CPU ({capability}) has no native bf16: bf16 matmuls run far slower than fp32 "
        "here; use --dtype auto or fp32",
        file=sys.stderr,
    )


WORK = ("train", "decode")


def resolve_dtype(name: str, device: str = "cpu", work: str = "train") -> str:
    """auto | bf16 | fp32 on `device` ("cpu", "cuda", "cuda:1", a torch.device) -> "bf16" or "fp32".
    `work`: "train" (training, evaluation: large matmuls) or "decode" (generation, serving, the
    inference benchmark). On a CPU, auto decodes in fp32 even where bf16 is native: a decode step
    multiplies a few rows by every weight, where autocast's per-step weight casts cost more than
    bf16 saves (measured in docs/RESULTS.md, issue 10). An explicit bf16 on a CPU without native bf16
    is kept, with one warning per process."""
    if name not in DTYPES:
        raise SubLLMError(f"--dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    if work not in WORK:
        raise ValueError(f"work must be one of {WORK}, got {work!r}")
    on_cuda = str(device).startswith("cuda")
    if name == "auto":
        if on_cuda:
            return "bf16" if cuda_bf16() else "fp32"
        return "bf16" if cpu_probe()["cpu_native_bf16"] and work == "train" else "fp32"
    if name == "bf16" and not on_cuda and not cpu_probe()["cpu_native_bf16"]:
        _warn_slow_bf16(cpu_probe()["cpu_capability"])
    return name


def dtype_record(name: str, device: str = "cpu", work: str = "train") -> dict:
    """The fields every results / metrics JSON carries: resolved and requested dtype, hardware."""
    return {"dtype": resolve_dtype(name, device, work), "dtype_requested": name, **describe_hardware()}


def dtype_line(name: str, device: str = "cpu", work: str = "train") -> str:
    """The resolved dtype with what it rests on, for a command's log: 'bf16 (auto; cpu AVX512,
    native bf16)'."""
    hw = describe_hardware()
    why = [name] if name == "auto" else []
    if str(device).startswith("cuda"):
        why.append("cuda bf16" if hw.get("cuda_bf16") else "cuda without bf16")
    why.append(f"cpu {hw['cpu_capability']}, {'native' if hw['cpu_native_bf16'] else 'no native'} bf16")
    if name == "auto" and work == "decode" and not str(device).startswith("cuda"):
        why.append("decoding on a CPU")
    return f"{resolve_dtype(name, device, work)} ({'; '.join(why)})"


_BF16_NAMES = ("bf16", "bfloat16")
_FP32_NAMES = ("fp32", "float32")


def autocast(dtype: str, device="cpu"):
    """THE autocast builder: 'bf16' (or 'bfloat16') -> torch.autocast to bfloat16 on `device`'s
    type; 'fp32' (or 'float32') -> a no-op context. Resolve 'auto' first (`resolve_dtype`)."""
    import contextlib

    import torch

    if dtype in _FP32_NAMES:
        return contextlib.nullcontext()
    if dtype in _BF16_NAMES:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise SubLLMError(f"unknown dtype {dtype!r} (bf16 or fp32)")


def fp32_region(device_type: str):
    """A region that computes in fp32 under any enclosing autocast (selection scores)."""
    import torch

    return torch.autocast(device_type, enabled=False)
