"""The keep-ratio sweep's table and plot (benchmarks/keep_ratio_sweep.sh), and its speed measurement.

    python benchmarks/keep_ratio_sweep.py runs/sweep --bench --ratios 0.8,0.64,0.5,0.4,0.3 --length 1024
    python benchmarks/keep_ratio_sweep.py runs/sweep --plot docs/keep_ratio_sweep.png

--bench: per r, full training steps of the sweep's model (random weights, AdamW, batch 2 x length,
bf16 autocast) against the same-size LLaMA, interleaved (subllm/bench/train.py bench_length) ->
OUT/speed.json. Otherwise: reads each run OUT/r<R> (summary.json: the final eval-mode validation
loss; retrieval.json: passkey / mqar at the window) and speed.json, prints a markdown table, and
plots validation loss, retrieval accuracy and speed-up against r.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STRUCTURE = "TTT(TT(TT)TTT)TT"


def bench(out: Path, ratios: list[float], length: int, reps: int) -> None:
    import torch

    from subllm.bench.train import bench_length
    from subllm.config import get_preset

    torch.set_num_threads(1)
    res = {}
    for r in ratios:
        cfg = get_preset("subllm-small").replace(structure=STRUCTURE, keep_ratio=[r, r], n_kv_heads=4)
        row = bench_length(cfg, length, 2, "bf16", reps, 1, torch.device("cpu"), 0)
        res[str(r)] = {k: row[k] for k in ("step_s", "step_s_min_med_max", "speedup", "ideal_speedup",
                                          "achieved_over_ideal", "memory_ratio")}  # fmt: skip
        print(f"r {r}: speed-up {row['speedup']:.3f}x (FLOP ideal {row['ideal_speedup']:.3f}x)", flush=True)
    rec = {"length": length, "batch_size": 2, "reps": reps, "torch": torch.__version__, "results": res}
    (out / "speed.json").write_text(json.dumps(rec, indent=1))


def acc(res: dict, task: str, key: str = "accuracy") -> float:
    rows = [r for r in res["retrieval"]["results"] if r["task"] == task]
    return sum(r.get(key, float("nan")) * r["answers"] for r in rows) / sum(r["answers"] for r in rows)


def report(out: Path, plot: str | None) -> None:
    speed = json.loads((out / "speed.json").read_text())["results"] if (out / "speed.json").is_file() else {}
    rows = []
    for run in sorted(out.glob("r*"), key=lambda p: -float(p.name[1:])):
        s = json.loads((run / "summary.json").read_text())
        ret = json.loads((run / "retrieval.json").read_text()) if (run / "retrieval.json").is_file() else None
        r = run.name[1:]
        sp = speed.get(r, {})
        rows.append(dict(r=float(r), loss=s["val_loss"], keep=s.get("keep_fractions_eval"),
                         passkey=acc(ret, "passkey") if ret else float("nan"),
                         mqar=acc(ret, "mqar") if ret else float("nan"),
                         tokens=acc(ret, "passkey", "token_accuracy") if ret else float("nan"),
                         mqar_tokens=acc(ret, "mqar", "token_accuracy") if ret else float("nan"),
                         needle=[x["needle_keep"] for x in ret["retrieval"]["results"]] if ret else [],
                         speedup=sp.get("speedup", float("nan")), ideal=sp.get("ideal_speedup", float("nan")),
                         train_s=s["train_s"]))  # fmt: skip
    ref = next((x["loss"] for x in rows if x["r"] == 0.64), None)
    print("| r | val loss | vs r=0.64 | eval keep S0/S1 | passkey | mqar | answer tokens passkey / mqar "
          "| speed-up (FLOP ideal) | train s |")  # fmt: skip
    print("|---:|---:|---:|---|---:|---:|---|---|---:|")
    for x in rows:
        rel = f"{100 * (x['loss'] / ref - 1):+.2f}%" if ref else "-"
        keep = "/".join(f"{k:.2f}" for k in x["keep"]) if x["keep"] else "-"
        ret = f"{100 * x['passkey']:.0f}% | {100 * x['mqar']:.0f}%"
        ret += f" | {100 * x['tokens']:.0f}% / {100 * x['mqar_tokens']:.0f}%"
        print(f"| {x['r']} | {x['loss']:.4f} | {rel} | {keep} | {ret} "
              f"| {x['speedup']:.3f}x ({x['ideal']:.3f}x) | {x['train_s']:.0f} |")  # fmt: skip
    if ref:
        ok = [x["r"] for x in rows if x["loss"] <= 1.01 * ref]
        print(f"\nlowest r with val loss within 1% of r = 0.64 ({ref:.4f} -> <= {1.01 * ref:.4f}): {min(ok)}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rs = [x["r"] for x in rows]
        fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
        ax[0].plot(rs, [x["loss"] for x in rows], "o-")
        if ref:
            ax[0].axhline(1.01 * ref, ls="--", c="gray", label="r=0.64 + 1%")
            ax[0].legend()
        ax[0].set(xlabel="keep ratio r (both S)", ylabel="eval-mode val loss (nats)", title="validation loss")
        ax[1].plot(rs, [100 * x["passkey"] for x in rows], "o-", label="passkey")
        ax[1].plot(rs, [100 * x["mqar"] for x in rows], "s-", label="mqar")
        ax[1].plot(rs, [100 * x["tokens"] for x in rows], "o--", label="passkey, answer tokens right")
        ax[1].plot(rs, [100 * x["mqar_tokens"] for x in rows], "s--", label="mqar, answer tokens right")
        ax[1].set(
            xlabel="keep ratio r", ylabel="accuracy (%)", title="retrieval at the window", ylim=(-5, 105)
        )
        ax[1].legend()
        ax[2].plot(rs, [x["speedup"] for x in rows], "o-", label="measured")
        ax[2].plot(rs, [x["ideal"] for x in rows], "--", c="gray", label="FLOP ideal")
        ax[2].set(xlabel="keep ratio r", ylabel="training speed-up vs LLaMA", title="training step speed-up")
        ax[2].legend()
        for a in ax:
            a.invert_xaxis()
            a.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"plot: {plot}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--bench", action="store_true", help="measure the speed-ups into OUT/speed.json")
    ap.add_argument("--ratios", default="0.8,0.64,0.5,0.4,0.3")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--plot", help="write the plot here (PNG)")
    a = ap.parse_args()
    if a.bench:
        bench(a.out, [float(x) for x in a.ratios.split(",")], a.length, a.reps)
    else:
        report(a.out, a.plot)


if __name__ == "__main__":
    main()
