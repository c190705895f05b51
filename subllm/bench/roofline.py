"""The memory limit of a decode step: this machine's streaming bandwidth, measured in the process,
and the bytes a decoded token reads (issue 22 item 4).

A decode step multiplies a few rows by every weight it passes, so its physical limit is bytes read /
memory bandwidth. `decode_bytes` counts, from the cache's per-level lengths before and after each
step (KVCache.snapshot()):
- weights: every tensor (parameters and buffers, at their stored dtype: under bf16 autocast fp32
  weights are still read at 4 bytes, then cast) of each layer whose level at least one row reached
  in that step - once per step, shared by the rows of the batch; the same for each S module
  (score layer, threshold) and its bypass when the level it sits at was reached; the final norm
  and the whole LM head every step; one embedding row per decoded token;
- K/V: for each row that reached a level, every layer there reads the row's cached keys and values
  including the new token (its length after the append), at the cache's dtype. Exact lengths: a
  padded batch whose rows differ reads masked slots too; they are not counted.
bytes per token = total / decoded tokens. At the realised keep of SUBLLM, an inner layer is read
only in the steps where some row kept the token.

`measure_bandwidth` is the best of N timed sums over one fp32 buffer larger than the last-level
cache (twice the L3 size read from sysfs or lscpu, at least 256 MiB, at most 2 GiB), at torch's
current thread count: DRAM bandwidth, not L3; the buffer on huge pages, as decode's weights and
K/V are (inference/hugepages.py; before 2026-12-05 it was ordinary memory, which in this project's
VMs streams ~40% slower - fractions measured then are against that lower roofline). The roofline
fraction = bytes per token x tokens/s / bandwidth; a model whose step fits in L3 can exceed 1 (it
streams from cache, faster than DRAM).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from subllm.config import Sub
from subllm.inference.cache import layer_levels

MIB = 1 << 20


# ---- bandwidth ------------------------------------------------------------------------------------


def _parse_size(text: str) -> int | None:
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)(i?B)?", text, re.IGNORECASE)
    if not m:
        return None
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def l3_bytes() -> int | None:
    """The L3 size: the larger of sysfs (cpu0's level-3 cache, one instance) and lscpu's total
    (all instances); None when neither says."""
    found = []
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (d / "level").read_text().strip() == "3":
                size = _parse_size((d / "size").read_text())
                if size:
                    found.append(size)
        except OSError:
            pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.strip().startswith("L3 cache:"):
                size = _parse_size(line.split(":", 1)[1])
                if size:
                    found.append(size)
    except (OSError, subprocess.SubprocessError):
        pass
    return max(found) if found else None


def buffer_bytes(l3: int | None) -> int:
    return min(max(2 * (l3 or 0), 256 * MIB), 2048 * MIB)


def _best_sum_time(buf, reps: int) -> float:
    buf.sum()  # pages touched before timing
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(reps: int = 5, nbytes: int | None = None) -> dict:
    """Streaming-read bandwidth: best of `reps` timed `buf.sum()` over an fp32 buffer of `nbytes`
    (default `buffer_bytes(l3_bytes())`), after one untimed pass, the buffer on huge pages where
    Linux gives them (inference/hugepages.py: where decode keeps its weights and K/V; in a VM,
    4 KiB pages stream far slower) - the roofline is what this machine can stream. The same sum
    over ordinary (4 KiB-page) memory is reported beside it. -> {"bytes_per_s", "bytes_per_s_4k", ...}."""
    import torch

    from subllm.inference import hugepages

    l3 = l3_bytes()
    n = nbytes or buffer_bytes(l3)
    huge = hugepages.zeros((n // 4,), torch.float32).fill_(1.0)
    plain = torch.empty(n // 4, dtype=torch.float32).fill_(1.0)
    best, best_4k = float("inf"), float("inf")
    for _ in range(2):  # interleaved: the machine's speed drifts
        best = min(best, _best_sum_time(huge, reps))
        best_4k = min(best_4k, _best_sum_time(plain, reps))
    del huge, plain
    return {
        "bytes_per_s": n / best,
        "bytes_per_s_4k": n / best_4k,
        "huge_pages": hugepages.available(),
        "buffer_bytes": n,
        "l3_bytes": l3,
        "reps": reps,
        "best_s": best,
        "threads": torch.get_num_threads(),
    }


# ---- bytes per decoded token ----------------------------------------------------------------------


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers at their stored dtypes; a submodule that defines
    `decode_nbytes()` counts what its decode kernel reads instead (Int8Linear keeps its scales in
    fp32 and in bf16 and reads one of them)."""
    total = 0
    for m in module.modules():
        if hasattr(m, "decode_nbytes"):
            total += m.decode_nbytes()
        else:
            own = (*m.parameters(recurse=False), *m.buffers(recurse=False))
            total += sum(t.numel() * t.element_size() for t in own)
    return total


def _sub_levels(tree: tuple, level: int = 0) -> dict[int, int]:
    """{S index: the level the S sits at (the level whose tokens it scores)}."""
    out = {}
    for node in tree:
        if isinstance(node, Sub):
            out[node.index] = level
            out.update(_sub_levels(node.children, node.index + 1))
    return out


def decode_bytes(model, snapshots: list[list[list[int]]], kv_entry_bytes: int) -> dict:
    """Bytes read by the decode steps between consecutive `snapshots` (per-level per-row lengths,
    KVCache.snapshot(), before the first step and after each). `kv_entry_bytes`: K and V of one
    token in one layer (KVCache.bytes_per_token()). -> {"weights", "kv", "tokens", "per_token"}."""
    cfg = model.config
    layer_level, n_levels = layer_levels(cfg.tree)
    level_weights = [0] * n_levels
    for i, lv in enumerate(layer_level):
        level_weights[lv] += module_bytes(model.layers[i])
    for s, lv in _sub_levels(cfg.tree).items():
        level_weights[lv] += module_bytes(model.subsamples[s]) + module_bytes(model.bypasses[s])
    layers_at = [layer_level.count(lv) for lv in range(n_levels)]
    every_step = module_bytes(model.norm) + module_bytes(model.head)  # a tied head: the whole matrix
    row_bytes = model.embed.weight.shape[1] * model.embed.weight.element_size()
    weights = kv = tokens = 0
    for before, after in zip(snapshots, snapshots[1:]):
        new = sum(a - b for a, b in zip(after[0], before[0]))
        if not new:
            continue
        tokens += new
        weights += every_step + new * row_bytes
        for lv in range(n_levels):
            grown = [a for a, b in zip(after[lv], before[lv]) if a > b]
            if grown:
                weights += level_weights[lv]
                kv += layers_at[lv] * kv_entry_bytes * sum(grown)
    total = weights + kv
    return {"weights": weights, "kv": kv, "tokens": tokens, "per_token": total / tokens if tokens else 0.0}
