"""Native CPU kernels for decoding (issue 22): built from csrc/ on first use, torch's ops otherwise.

- `decode_attention(q, k, v, rows, lens)`: the one-query attention of a decode step, query i
  reading cache row rows[i]'s (or its own buffer's) first lens[i] slots in place (no slice, no
  mask, no gather of a subset's rows), the query heads of one K/V head sharing every key and value
  read, fp32 arithmetic, fp32 or bf16 K/V (csrc/decode_attention.cpp). torch's SDPA spends 100-400 us per
  layer on SmolLM2's one-query attention at 512-2k keys on a 2-vCPU EPYC (7.6-8 GB/s); this kernel
  40-210 us in fp32 and 35-130 in bf16 at one thread.
- `int4_matmul` / `int8_matmul`: int4 or int8 weights in tiles of 16 output rows times int8
  activations (quantized per row and group of 32, as llama.cpp's Q8 blocks, in ACT_PASSES passes)
  with AVX512-VNNI dot products (csrc/vnni_matmul.cpp), for the few rows of a decode step;
  `int4_pack` / `int8_pack` write the tiles. SmolLM2's 120 int4 layers (66 MB) at one row, one
  thread: 4.5-4.8 ms against 9.0-9.2 ms through torch's int4 kernel (docs/RESULTS.md, "Native
  decode kernels"). Where the CPU lacks VNNI, `vnni_available()` is False and quantize.py keeps
  torch's kernels.
- `decode_layers` (csrc/decode_layers.cpp), `rms_norm`, `decode_decide` / `decode_bypass`
  (csrc/decode_select.cpp): a run of layers, the final norm, an S's decision and U + B of an fp32
  decode step, each one op (native_layers.py says where the engine takes them).

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
SOURCES = (
    "decode_attention.cpp",
    "vnni_matmul.cpp",
    "decode_layers.cpp",
    "decode_select.cpp",
    "prefill_attention.cpp",
    "dense_matmul.cpp",
)
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
    if hasattr(torch.ops, "subllm_native") and hasattr(torch.ops.subllm_native, "decode_layers"):
        _state["ok"] = True  # loaded by someone else in this process
        return True
    cap = capability()
    name = f"subllm_native_{cap.lower()}"
    try:
        from torch.utils.cpp_extension import load as cpp_load

        _clear_stale_lock(name)
        cpp_load(
            name=name,
            sources=[str(_CSRC / f) for f in SOURCES],
            # the header's checksum as a flag: the build is redone when native.h changes (torch's
            # versioning hashes the sources and flags, not the headers they include)
            extra_cflags=["-O3", "-ffast-math", "-fopenmp", f"-DSUBLLM_NATIVE_H={_header_crc()}"]
            + _FLAGS.get(cap, []),
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


def _header_crc() -> int:
    import zlib

    return zlib.crc32((_CSRC / "native.h").read_bytes())


STALE_LOCK_S = 600  # a build takes ~10-20 s; a lock this old was left by a killed build


def _clear_stale_lock(name: str) -> None:
    """torch's cpp_extension waits, without a timeout, for the lock file of a build another process
    runs; a build killed midway leaves it behind and every later load would hang. Remove one older
    than STALE_LOCK_S."""
    import time

    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            warnings.warn(f"subllm: removed a stale build lock {lock}", stacklevel=3)
    except FileNotFoundError:
        pass


def _register_fake() -> None:
    """Shapes for torch.compile (the compiled decode graphs call the kernel as one opaque op)."""

    @torch.library.register_fake("subllm_native::decode_attention")
    def _(q: Tensor, k: list[Tensor], v: list[Tensor], rows: Tensor, lens: Tensor) -> Tensor:
        return torch.empty_like(q)

    @torch.library.register_fake("subllm_native::prefill_attention")
    def _(q: Tensor, k: Tensor, v: Tensor, offset: int) -> Tensor:
        return torch.empty_like(q)

    @torch.library.register_fake("subllm_native::dense_matmul")
    def _(x: Tensor, w: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("subllm_native::int4_matmul")
    def _(x: Tensor, tiles: Tensor, d: Tensor, m: Tensor, passes: int) -> Tensor:
        return x.new_empty(x.shape[0], tiles.shape[0] * 16)

    @torch.library.register_fake("subllm_native::int8_matmul")
    def _(x: Tensor, tiles: Tensor, scale: Tensor, passes: int) -> Tensor:
        return x.new_empty(x.shape[0], tiles.shape[0] * 16)


# Activation passes of the quantized layers' decode kernels: 2 rounds each group twice (x onto
# max|x| / 127, then what is left onto a grid 254x finer; csrc/vnni_matmul.cpp). On SmolLM2 (128
# teacher-forced tokens against the fp32 forward, benchmarks/decode_precision.py): int4 max |dlogit|
# 1.79 -> 0.73, top-1 0.953 -> 0.961; int8 2.49 -> 1.64, 0.922 -> 0.938; decode 1-3% slower.
ACT_PASSES = 2
GROUP = 32  # inputs per activation scale (both kernels) and per int4 scale / offset (csrc/vnni_matmul.cpp)


def vnni_available() -> bool:
    """Whether the int4 / int8 decode kernels run here: the extension loaded and the CPU has
    AVX512-VNNI (checked by the kernels' own code at run time)."""
    return load() and bool(torch.ops.subllm_native.vnni_available())


def int4_pack(codes: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """int4 codes (out, in) in 0..15 with w = (c - 8) * scale + zero per group of 32 (quantize.py
    int4_codes) -> the kernel's layout: tiles (out / 16, in / 8, 64) uint8 - byte 4 j + i of a tile
    holds row j's codes for inputs i (low nibble) and i + 4 (high nibble) - and d = scale,
    m = zero - 8 * scale, both (out / 16, in / 32, 16) bf16 (csrc/vnni_matmul.cpp): 5 bits per
    weight in all, as in torch's int4 layout (fp32 scales would make it 6)."""
    N, K = codes.shape
    NB, G = N // 16, scale.shape[1]
    c = codes.to(torch.uint8).reshape(NB, 16, K // 8, 8).permute(0, 2, 1, 3)
    tiles = (c[..., :4] | (c[..., 4:] << 4)).reshape(NB, K // 8, 64).contiguous()

    def by_tile(t: Tensor) -> Tensor:
        return t.float().reshape(NB, 16, G).permute(0, 2, 1).to(torch.bfloat16).contiguous()

    return tiles, by_tile(scale), by_tile(zero - 8 * scale)


def int4_matmul(x: Tensor, tiles: Tensor, d: Tensor, m: Tensor, passes: int = 1) -> Tensor:
    """x (rows, in) -> (rows, out) through the VNNI kernel: x quantized to int8 per group of 32
    (its own scale per row and group), int4 x int8 dot products: w . (s q) for the rounded s q."""
    return torch.ops.subllm_native.int4_matmul(x, tiles, d, m, passes)


def int8_pack(q: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """int8 weights q (out, in) with one scale per row (quantize.py Int8Linear) -> the kernel's
    layout: tiles (out / 16, in / 4, 64) uint8 - byte 4 j + i is row j's weight for input i, plus
    128 (the kernel's unsigned operand) - and the scales as (out / 16, 16) fp32 (csrc/vnni_matmul.cpp):
    8 bits per weight and 4 bytes per row."""
    N, K = q.shape
    NB = N // 16
    tiles = (q.to(torch.int16) + 128).to(torch.uint8)
    tiles = tiles.reshape(NB, 16, K // 4, 4).permute(0, 2, 1, 3).reshape(NB, K // 4, 64).contiguous()
    return tiles, scale.float().reshape(NB, 16).contiguous()


def int8_matmul(x: Tensor, tiles: Tensor, scale: Tensor, passes: int = 1) -> Tensor:
    """x (rows, in) -> (rows, out): x quantized to int8 per group of 32 as in `int4_matmul`, int8 x
    int8 dot products, the row scales applied last."""
    return torch.ops.subllm_native.int8_matmul(x, tiles, scale, passes)


def dense_matmul(x: Tensor, w: Tensor) -> Tensor:
    """x (rows, in) fp32 -> x w^T (rows, out) for a contiguous fp32 w (out, in), each output summed in
    the same order for any number of rows (csrc/dense_matmul.cpp): a decode step's rows get the
    results they would get alone, which ATen's matmul does not promise (one row takes another kernel)."""
    return torch.ops.subllm_native.dense_matmul(x, w)


def vnni_fits(out_features: int, in_features: int) -> bool:
    """Whether a layer's shape fits the tiles: 16 output rows, groups of 32 inputs."""
    return out_features % 16 == 0 and in_features % GROUP == 0


def available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and load()


def status() -> str:
    """One line for banners and reports."""
    if not load():
        return f"torch SDPA ({_state.get('error', 'native kernels not loaded')})"
    return f"native ({capability()})"


def decode_attention(
    q: Tensor, k: Tensor | list[Tensor], v: Tensor | list[Tensor], rows: Tensor, lens: Tensor
) -> Tensor:
    """q (n, H, 1, hd); k, v (B, Hkv, capacity, hd) cache buffers - or lists of n buffers
    (1, Hkv, capacity_i, hd), query i reading the i-th (a cache whose rows are stored apart,
    cache_rows.py; rows then all 0); rows (n,) int64, the cache row each query reads; lens (n,)
    int64, that row's number of valid slots (>= 1) -> (n, H, 1, hd). Needs `available()`."""
    k = [k] if isinstance(k, Tensor) else list(k)
    v = [v] if isinstance(v, Tensor) else list(v)
    return torch.ops.subllm_native.decode_attention(q, k, v, rows, lens)


def bf16_available() -> bool:
    """Whether `prefill_attention` runs here: the extension loaded and the CPU has AVX512-BF16."""
    return load() and bool(torch.ops.subllm_native.bf16_available())


PREFILL_HEAD_DIMS = (32, 64, 128)


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, offset: int) -> Tensor:
    """Causal attention of a prompt (chunk) in bf16: q (B, H, Tq, hd), k, v (B, Hkv, Tk, hd), all
    bf16 with the last dim contiguous, hd in PREFILL_HEAD_DIMS; query t sees keys 0 .. offset + t
    -> (B, H, Tq, hd) bf16 (csrc/prefill_attention.cpp). Needs `bf16_available()`."""
    return torch.ops.subllm_native.prefill_attention(q, k, v, offset)
