"""Benchmark plumbing shared by `subllm bench infer` and `subllm bench train`: warm-up then
interleaved repetitions (so drift and other load hit every variant alike), medians, a plain-text
table, the run's environment, and the ONE JSON line a benchmark prints last (docs/design.md).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from subllm.errors import SubLLMError


def sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device | str = "cpu"):
    """(seconds, fn()) with the device synchronised around the call."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleaved(
    fns: dict[str, Callable], reps: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Run every variant `warmup` times untimed, then `reps` rounds of one timed call each, the
    order alternating round by round (A B C, C B A, ...). -> (times per variant, last result)."""
    if reps < 1 or warmup < 0:
        raise SubLLMError("reps must be >= 1 and warmup >= 0")
    names = list(fns)
    last: dict[str, object] = {}
    for _ in range(warmup):
        for n in names:
            last[n] = fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            dt, last[n] = timed(fns[n], device)
            times[n].append(dt)
    return times, last


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def min_med_max(xs: list[float]) -> list[float]:
    """[min, median, max] of repeated timings: how docs/RESULTS.md reports them."""
    return [float(min(xs)), median(xs), float(max(xs))]


def spread(xs: list[float]) -> float:
    """(max - min) / median: how noisy a measurement was."""
    m = median(xs)
    return (max(xs) - min(xs)) / m if m > 0 else 0.0


def mean_sd(vals: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) - across seeds or runs."""
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def format_table(headers: list[str], rows: list[list]) -> str:
    """Right-aligned plain-text table; floats are expected to be pre-formatted strings."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def json_line(obj: dict) -> str:
    """One line of JSON (no newlines inside), the last line a benchmark prints."""
    return json.dumps(obj, separators=(",", ":"), default=str)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return (
            out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    env = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    try:
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def int_list(text: str) -> list[int]:
    """'1024,2k,8k' -> [1024, 2048, 8192] (for argparse)."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        try:
            v = int(part[:-1] if mult > 1 else part) * mult
        except ValueError:
            raise SubLLMError(f"expected a comma-separated list of integers, got {text!r}") from None
        if v <= 0:
            raise SubLLMError(f"values must be positive, got {text!r}")
        out.append(v)
    if not out:
        raise SubLLMError(f"empty list {text!r}")
    return out


def str_list(text: str, choices: tuple[str, ...]) -> list[str]:
    out = [p.strip() for p in str(text).split(",") if p.strip()]
    bad = [p for p in out if p not in choices]
    if bad or not out:
        raise SubLLMError(f"expected a comma-separated list of {', '.join(choices)}, got {text!r}")
    return out
