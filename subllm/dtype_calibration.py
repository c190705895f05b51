"""`--dtype auto` by measurement: a short calibration per (machine, model shape, work), cached on disk.

The rule of subllm/dtype.py (bf16 where the hardware has it natively, except decoding on a CPU)
is a guess: which dtype is faster depends on the machine and on the model (issue 22: the demo model
decodes faster in fp32 on the project's Intel machine, llama-small at 2k faster in bf16). Where
more than one dtype is a candidate - a CPU with native bf16: fp32 and bf16; fp16 is never one on
a CPU - `choose_dtype` times a few steps of the work in each candidate, interleaved (fp32 bf16,
bf16 fp32, ...; the best round per dtype) after one untimed warm-up each, and takes the faster.

The answer is cached in a small JSON file under the key
- machine: torch's CPU capability, native bf16, os.cpu_count(), torch's intra-op threads, torch version;
- model shape: structure, keep ratios, dim, layers, heads, KV heads, ffn, vocab, tied embeddings,
  the dtypes the parameters are stored in and the weight quantization (an int8 model is another shape);
- work: "decode" (DECODE_STEPS decode steps after a PROMPT-token prompt, batch 1), "prefill" (one
  PREFILL-token prompt) or "train" (forward + backward of one (1, TRAIN_LEN) batch on a copy),
  with those sizes (an answer cached for other sizes is measured again);
and the choice is printed with what it rests on at every use. The file is
$SUBLLM_CACHE_DIR/dtype_calibration.json, else $XDG_CACHE_HOME/subllm/..., else
~/.cache/subllm/... - never inside the repository. SUBLLM_DTYPE_CALIBRATION=off turns the
measurement off; then, on a GPU, where only one dtype is a candidate, and when the measurement
fails, the rule decides (an unwritable cache file only costs the cache). Imports torch lazily.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from subllm import dtype as D
from subllm.dtype import autocast, dtype_line, resolve_dtype

WORKS = ("decode", "prefill", "train")
ENV_CACHE_DIR = "SUBLLM_CACHE_DIR"
ENV_SWITCH = "SUBLLM_DTYPE_CALIBRATION"
FILE_NAME = "dtype_calibration.json"
# decode is timed at a 512-token context: at 64 (the first setting) the two dtypes of llama-small
# timed within noise and auto picked bf16, 1.29x slower than fp32 at 512 (docs/RESULTS.md)
PROMPT, DECODE_STEPS, PREFILL, TRAIN_LEN, ROUNDS = 512, 8, 256, 128, 3


@dataclass
class Choice:
    dtype: str  # "bf16" | "fp32"
    source: str  # "measured" | "cached" | "rule"
    line: str  # for a command's log: the dtype and what it rests on
    seconds: dict = field(default_factory=dict)  # best seconds per candidate (measured or cached)
    key: dict = field(default_factory=dict)
    path: str | None = None

    def record(self) -> dict:
        """The fields a results JSON carries."""
        return {"dtype": self.dtype, "dtype_source": self.source, "dtype_seconds": self.seconds}


def cache_path() -> Path:
    base = os.environ.get(ENV_CACHE_DIR)
    if base:
        return Path(base) / FILE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "subllm" / FILE_NAME


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


def candidates(device: str = "cpu") -> list[str]:
    """The dtypes worth timing on this device: fp32, and bf16 only on a CPU with native bf16."""
    if str(device).startswith("cuda"):
        return []  # a GPU keeps the rule (bf16 where supported)
    return ["fp32", "bf16"] if D.cpu_probe()["cpu_native_bf16"] else ["fp32"]


def _decode_path() -> str:
    from subllm.inference import native_layers

    return native_layers.status("cpu")


def calibration_key(model, work: str) -> dict:
    import torch

    c = model.config
    stored = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    return {
        "machine": {
            **D.cpu_probe(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": {
            "structure": c.structure,
            "keep_ratios": list(c.keep_ratios),
            "dim": c.dim,
            "n_layers": c.n_layers,
            "n_heads": c.n_heads,
            "n_kv_heads": c.n_kv_heads,
            "ffn_dim": c.ffn_dim,
            "vocab_size": c.vocab_size,
            "tie_embeddings": c.tie_embeddings,
            "weights": sorted(stored),
            "quantization": getattr(model, "quantization", None),  # set by subllm/quantize.py
        },
        "work": work,
        "setting": _setting(work),
    }


def _setting(work: str) -> dict:
    """What is timed: a cached answer for another setting is measured again. For decode also the
    path (a native build is only loaded here, for decode): fp32 decode through the native runs of
    layers is ~2x faster than per-layer ops, so an answer measured before they ran is not theirs."""
    if work == "decode":
        return {"prompt": PROMPT, "steps": DECODE_STEPS, "path": _decode_path()}
    return {"prefill": {"prompt": PREFILL}, "train": {"tokens": TRAIN_LEN}}[work]


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def load_entries(path: Path) -> dict:
    """The cached entries {key text: entry}; a missing or unreadable file reads as empty."""
    try:
        data = json.loads(path.read_text())
        return dict(data["entries"]) if data.get("version") == 1 else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def save_entry(path: Path, key: dict, entry: dict) -> None:
    """Add one entry (write to a temporary file, then rename: readers never see half a file)."""
    entries = load_entries(path)
    entries[_key_text(key)] = {"key": key, **entry}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---- timing ---------------------------------------------------------------------------------------


def _runner(model, dtype: str, work: str, device: str):
    """A callable that runs one unit of `work` in `dtype` (built once: prompt, cache, model copy)."""
    import torch

    from subllm.inference.engine import decode_step, new_cache, prefill

    c = model.config
    g = torch.Generator().manual_seed(0)
    if work == "train":
        twin = copy.deepcopy(model).train()  # the caller's model, its grads and state stay untouched
        twin.set_step(model.step or 0)
        n = min(TRAIN_LEN, c.max_seq_len)
        ids = torch.randint(0, c.vocab_size, (1, n), generator=g).to(device)

        def train_step():
            with autocast(dtype, device):
                loss = twin(ids, labels=ids).loss
            loss.backward()
            twin.zero_grad(set_to_none=True)

        return train_step
    n = min(PREFILL if work == "prefill" else PROMPT, c.max_seq_len - DECODE_STEPS - 1)
    ids = torch.randint(0, c.vocab_size, (1, n), generator=g).to(device)
    if work == "prefill":

        def prefill_once():
            with torch.no_grad(), autocast(dtype, device):
                prefill(model, ids, None, new_cache(model, 1, torch.device(device)))

        return prefill_once
    with torch.no_grad(), autocast(dtype, device):
        cache = new_cache(model, 1, torch.device(device))
        prefill(model, ids, None, cache, extra=DECODE_STEPS)
    start = cache.snapshot()
    tokens = torch.randint(0, c.vocab_size, (DECODE_STEPS, 1), generator=g).to(device)

    def decode_steps():
        cache.rewind(start)
        with torch.no_grad(), autocast(dtype, device):
            for tok in tokens:
                decode_step(model, cache, tok)

    return decode_steps


def measure(model, dtypes: list[str], work: str, device: str = "cpu", rounds: int = ROUNDS) -> dict:
    """{dtype: best seconds of one unit of `work`}: one warm-up each, then `rounds` interleaved rounds.
    The model is in eval mode while this runs (train work runs on a copy) and keeps its mode."""
    was_training = model.training
    model.eval()
    try:
        runs = {d: _runner(model, d, work, device) for d in dtypes}
        for d in dtypes:
            runs[d]()
        best = {d: float("inf") for d in dtypes}
        for r in range(rounds):
            for d in dtypes if r % 2 == 0 else dtypes[::-1]:
                t0 = time.perf_counter()
                runs[d]()
                best[d] = min(best[d], time.perf_counter() - t0)
        return best
    finally:
        model.train(was_training)


# ---- the choice -----------------------------------------------------------------------------------


def _seconds_text(work: str, seconds: dict) -> str:
    return f"{work} " + ", ".join(f"{d} {1e3 * s:.2f} ms" for d, s in seconds.items())


def choose_dtype(name: str, model, work: str, device: str = "cpu", log=None) -> Choice:
    """--dtype `name` for `work` on `model` -> Choice. Only "auto" on a device with two candidates
    is measured (or read from the cache); everything else is subllm/dtype.py's rule. `log`
    (default: stderr) hears about a measurement and about a cache that could not be written."""
    if work not in WORKS:
        raise ValueError(f"work must be one of {WORKS}, got {work!r}")
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rule_work = "train" if work == "prefill" else work  # the rule knows large matmuls and decode

    def rule(why: str | None = None) -> Choice:
        line = dtype_line(name, device, rule_work)
        if why:
            line = f"{line[:-1]}; {why})"
        return Choice(resolve_dtype(name, device, rule_work), "rule", line)

    cands = candidates(device)
    if name != "auto" or len(cands) < 2:
        return rule()
    if not enabled():
        return rule(f"{ENV_SWITCH}=off")
    key, path = calibration_key(model, work), cache_path()
    entry = load_entries(path).get(_key_text(key))
    if entry and entry.get("dtype") in cands and isinstance(entry.get("seconds"), dict):
        sec = entry["seconds"]
        when = entry.get("date", "?")
        line = f"{entry['dtype']} (auto, measured {when}: {_seconds_text(work, sec)}; {path})"
        return Choice(entry["dtype"], "cached", line, sec, key, str(path))
    say(f"calibrating --dtype auto for {work}: timing {', '.join(cands)} (cached in {path}) ...")
    try:
        sec = measure(model, cands, work, device)
    except Exception as e:  # a failing measurement must not stop the command: the rule decides
        return rule(f"calibration failed: {type(e).__name__}: {e}")
    best = min(cands, key=lambda d: sec[d])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    rounded = {d: round(s, 6) for d, s in sec.items()}
    try:
        save_entry(path, key, {"dtype": best, "seconds": rounded, "date": date})
    except OSError as e:
        say(f"note: could not write the dtype calibration cache {path}: {e}")
    line = f"{best} (auto, measured now: {_seconds_text(work, rounded)}; {path})"
    return Choice(best, "measured", line, rounded, key, str(path))
