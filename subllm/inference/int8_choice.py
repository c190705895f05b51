"""Which kernel the int8 layers of a quantized model decode through (quantize.py): timed, since the
fastest depends on the CPU, and a default must not assume a fast machine."""

from __future__ import annotations

import time

import torch

from subllm.errors import SubLLMError


def best_times(fns: dict, reps: int = 7) -> dict[str, float]:
    """Best of `reps` seconds per function, timed round by round (each function once per round,
    after one warm-up each), so that load which comes and goes on a shared machine hits all alike:
    timed one after the other, the head of a SmolLM2 SUBLLM once chose "dynamic" (2.3 ms per token)
    over "native" (1.5 ms) on a loaded machine."""
    for f in fns.values():
        f()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


# a decode kernel unless it times this many times slower than "cast" (quantize.py's docstring)
PACKED_MARGIN = 1.5
# "native" unless it times this much slower than the fastest: native int8 layers also run inside the
# native runs of layers (native_layers.py: one call per run of layers), which a one-layer timing
# cannot show (SmolLM2 int8, one thread: 10.3 ms per token fused vs 13.8 compiled, docs/RESULTS.md)
NATIVE_MARGIN = 1.25


def choose_int8_kernel(layer) -> str:
    """The kernel `layer` (and every int8 layer of its model) should decode through: the fastest of
    "packed", "dynamic" and "native" (those that run on this build / CPU; "native" within
    NATIVE_MARGIN of the fastest), unless it takes more than PACKED_MARGIN times the cast kernel's
    time; the best of 7 interleaved rounds each at one row, after a warm-up."""
    x = torch.randn(1, layer.in_features)
    kernel, fns = layer.kernel, {}
    for name in ("packed", "dynamic", "native"):
        try:
            layer.kernel = name  # builds the kernel's weights, or refuses where it cannot run
            fns[name] = getattr(layer, f"forward_{name}")
        except (RuntimeError, SubLLMError):  # the kernel is missing for this build / CPU
            pass
    layer.kernel = kernel
    if not fns:
        return "cast"
    fns["cast"] = layer.forward_cast
    with torch.no_grad():
        times = best_times({name: (lambda f=f: f(x)) for name, f in fns.items()})
    cast = times.pop("cast")
    best = min(times, key=times.get)
    if "native" in times and times["native"] <= NATIVE_MARGIN * times[best]:
        best = "native"
    return best if times[best] < PACKED_MARGIN * cast else "cast"
