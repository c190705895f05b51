"""The kept path of decode (issue 10 item 5): SUBLLM decoding tokens that every S keeps, against the
same-size LLaMA and the FLOP ideal of the realised cache lengths.

The prompt is prefilled with each S's threshold at the median of its scores (about half of the
prompt reaches each inner level); then every threshold is set to -inf, so every generated token
runs every layer, as when a trained model keeps nearly all of its generated tokens. Decode time is
then LLaMA's plus the per-token work of S, U and B on a kept token; the ideal (flops_between on the
cache lengths) counts the inner layers' shorter attention. Also counts the ATen ops of one decode
step of each model (load-independent evidence of the per-token overhead).

    OMP_NUM_THREADS=1 python benchmarks/kept_decode.py [--context 4096 --batch 1 --steps 32 --reps 7]
"""

import argparse
import statistics
import time

import torch

from subllm.config import get_preset
from subllm.flops import flops_between
from subllm.inference.engine import decode_step, new_cache, prefill
from subllm.model.subllm import SubLLM


def op_count(model, cache, tok) -> int:
    from torch.profiler import profile

    with profile() as p:
        decode_step(model, cache, tok)
    return sum(e.count for e in p.key_averages())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="subllm-small")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = get_preset(a.preset)
    sub, llama = SubLLM(cfg).eval(), SubLLM(cfg.as_llama()).eval()
    llama.load_state_dict(sub.state_dict(), strict=False)
    B, T, D = a.batch, a.context, a.steps
    ids = torch.randint(3, cfg.vocab_size, (B, T))
    dec = torch.randint(3, cfg.vocab_size, (D, B))
    with torch.no_grad():
        sels = sub(ids, return_selections=True).selections
        for s, sel in zip(sub.subsamples, sels):
            if s.theta is None:
                raise SystemExit("needs a calibrated-threshold preset (the default selection)")
            s.threshold.fill_(float(sel.scores.median()))
        caches = {}
        for name, m in (("subllm", sub), ("llama", llama)):
            caches[name] = new_cache(m, B)
            prefill(m, ids, None, caches[name], extra=D + 1)
        snap = {n: c.snapshot() for n, c in caches.items()}
        for s in sub.subsamples:
            s.threshold.fill_(float("-inf"))  # every generated token is kept
        times = {"subllm": [], "llama": []}
        models = {"subllm": sub, "llama": llama}
        for r in range(a.reps):
            for name in ("subllm", "llama") if r % 2 else ("llama", "subllm"):
                caches[name].rewind(snap[name])
                t0 = time.perf_counter()
                for tok in dec:
                    decode_step(models[name], caches[name], tok)
                times[name].append(time.perf_counter() - t0)
        ends = {n: c.snapshot() for n, c in caches.items()}
        ops = {n: op_count(models[n], caches[n], dec[0]) for n in models}
    fl = {n: flops_between(models[n].config, snap[n], ends[n], D * B) for n in models}
    ideal = fl["llama"] / fl["subllm"]
    med = {n: statistics.median(t) for n, t in times.items()}
    best = {n: min(t) for n, t in times.items()}
    keep = [sum(snap["subllm"][lv + 1]) / sum(snap["subllm"][0]) for lv in range(len(sub.subsamples))]
    print(
        f"{a.preset} B {B} context {T}, {D} kept decode steps, {torch.get_num_threads()} thread(s); prompt "
        f"reaching each inner level {', '.join(f'{k:.3f}' for k in keep)}; decoded tokens kept: all"
    )
    print(
        f"ms/token median (min): LLaMA {1e3 * med['llama'] / D:.2f} ({1e3 * best['llama'] / D:.2f}), "
        f"SUBLLM {1e3 * med['subllm'] / D:.2f} ({1e3 * best['subllm'] / D:.2f})"
    )
    sp, sp_min = med["llama"] / med["subllm"], best["llama"] / best["subllm"]
    print(
        f"speed-up {sp:.3f}x (min-based {sp_min:.3f}x), FLOP ideal {ideal:.3f}x -> {sp / ideal:.1%} of ideal "
        f"({sp_min / ideal:.1%} min-based); ATen ops per decode step: SUBLLM {ops['subllm']}, "
        f"LLaMA {ops['llama']} (+{ops['subllm'] - ops['llama']})"
    )


if __name__ == "__main__":
    main()
