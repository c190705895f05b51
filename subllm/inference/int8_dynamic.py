"""int8 x int8 matmuls for decoding (issue 22): the "dynamic" kernel of `Int8Linear`.

Weight-only int8 (`_weight_int8pack_mm`, subllm/inference/quantize.py) converts every weight to
bf16 before multiplying and reaches ~4 GB/s on an AVX512 CPU; llama.cpp's Q8_0 multiplies int8
weights by int8 activations (VNNI dot products) at several times that. torch ships such a kernel
with its quantized ops: fbgemm's `quantized::linear_dynamic` quantizes the activations at run time
and multiplies int8 x int8 into int32 (measured for SmolLM2's 49,152 x 576 LM head at one row, one
thread, on the AMD EPYC of docs/RESULTS.md: 1.1-1.6 ms against 4.2 ms for the packed bf16 kernel).

Its activation quantization is per tensor (one range for all rows), which would make a row's
result depend on the other rows of its batch - a served request would not equal the same request
generated alone. So each row is first divided by its own max |x| (rows in [-1, 1], each reaching
+-1), and one extra row (+1, -1, 0, ...) pins the tensor's range to exactly [-1, 1] whatever the
batch: every row is quantized with the same fixed grid, i.e. per row, and the results are
multiplied back by each row's max. `reduce_range` (7-bit activations) is on as torch's default for
fbgemm: without VNNI, fbgemm sums pairs of u8 x s8 products in int16, which 8-bit activations can
overflow. One pass rounds each activation by up to half a grid step (step 2 / 127 of the row's max)
- too coarse for SmolLM2's LM head, whose input has outlier channels (top-1 agreement with fp32
fell from 0.92 to 0.79) - so every row goes in twice in the same call: rounded onto the grid by us
(which fbgemm then reproduces exactly), and its rounding residual scaled to [-1, 1]; the error left
is at most (step / 2)^2 = 6.2e-5 of the row's max, below bf16's 2^-9 = 2e-3. The int32 accumulation
is exact. fbgemm's packed copy of the weights is kept beside the int8 matrix that prefill casts.

The packed weights are fbgemm objects that torch.compile cannot trace, so the matmul is a custom
op (`subllm::int8_dynamic_mm`) that finds its layer's packed weights by a key: compiled decode
graphs call it as one opaque kernel. fbgemm exists on x86 builds of torch (AVX2 and up); where it
does not, `available()` is False and the kernel is never chosen.
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import torch
from torch import Tensor

_LAYERS: dict[int, weakref.ref] = {}  # key -> the packed weights' owner (`Int8Linear`)
_KEYS = itertools.count()


def available() -> bool:
    """Whether this build of torch has fbgemm's quantized linear (x86 CPUs with AVX2 or more)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def prepack(q: Tensor, scale: Tensor):
    """int8 weights q (out, in) with per-output-channel scales (out,) -> fbgemm's packed weights."""
    out = q.shape[0]
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; 2.13 is pinned
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(
            q.contiguous(), scale.double(), torch.zeros(out, dtype=torch.long), 0
        )
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            return torch.ops.quantized.linear_prepack(qw, None)
        finally:
            torch.backends.quantized.engine = engine


def register(layer) -> int:
    """A key under which `int8_dynamic_mm` finds `layer.dynamic_packed` (held weakly)."""
    key = next(_KEYS)
    _LAYERS[key] = weakref.ref(layer, lambda _ref, k=key: _LAYERS.pop(k, None))
    return key


STEP = 2.0 / 127  # fbgemm's activation grid once the range is pinned to [-1, 1] (7-bit)
LEVELS = 63  # the first pass uses levels -63..63: on that grid whatever its zero point


def matmul(x: Tensor, key: int) -> Tensor:
    """x (M, in) -> (M, out) fp32 through the packed int8 weights of layer `key`, in one kernel
    call (module docstring): rows x / max|x| rounded onto fbgemm's grid by us (so it reproduces
    them exactly), their rounding residuals (scaled to [-1, 1], quantized by fbgemm: at most one
    grid step off) and the pinning row; y = W hi * max|x| + W residual * max|x| * max|residual|.
    Ordinary torch ops around the opaque call, so that a compiled graph fuses them."""
    x = x.float()
    M = x.shape[0]
    tiny = torch.finfo(torch.float32).tiny
    amax = x.abs().amax(-1, keepdim=True).clamp_min(tiny)
    xn = x / amax
    hi = torch.round(xn / STEP).clamp(-LEVELS, LEVELS) * STEP
    res = xn - hi
    ramax = res.abs().amax(-1, keepdim=True).clamp_min(tiny)
    pin = torch.zeros_like(x[:1])
    pin[:, :2] = torch.tensor([1.0, -1.0])
    y = int8_dynamic_mm(torch.cat([hi, res / ramax, pin]), key)
    return y[:M] * amax + y[M : 2 * M] * (ramax * amax)


@torch.library.custom_op("subllm::int8_dynamic_mm", mutates_args=())
def int8_dynamic_mm(rows: Tensor, key: int) -> Tensor:
    """fbgemm's dynamic int8 linear of the prepared rows (`matmul`) by layer `key`'s weights."""
    layer = _LAYERS[key]()
    return torch.ops.quantized.linear_dynamic(rows.contiguous(), layer.dynamic_packed, True)


@int8_dynamic_mm.register_fake
def _(rows: Tensor, key: int) -> Tensor:
    return rows.new_empty(rows.shape[0], _LAYERS[key]().out_features)
