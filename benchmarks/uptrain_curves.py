"""Uptraining recovery curves (issue 12, item 3): val loss vs training tokens for runs made with
`subllm train --init-from`, the tokens each needs to come within 1% of the LLaMA's loss, and a plot
("within" means from that evaluation on, at every later one).

    python benchmarks/uptrain_curves.py --reference runs/up/llama_cont runs/up/router runs/up/full \
        --plot docs/uptraining.png

The reference is the LLaMA continuing on the same tokens (`--init-from` the LLaMA itself, all-T);
its step-0 evaluation is the LLaMA's own loss at conversion. Two targets are reported: within 1% of
that fixed loss, and within 1% of the reference at the same token count. Prints a markdown table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from subllm.trainer.metrics import read_metrics


def load(run: Path) -> dict:
    recs = read_metrics(run / "metrics.jsonl")
    evals = {r["tokens"]: r for r in recs if r["kind"] == "eval"}
    steps = [r["step_s"] for r in recs if r["kind"] == "train" and r["step"] > 5]
    cfg = recs[0]["config"]
    return {
        "name": run.name,
        "curve": sorted((t, r["val_loss"]) for t, r in evals.items()),
        "last": evals[max(evals)],
        "median_step_s": statistics.median(steps) if steps else None,
        "train_only": cfg.get("train_only"),
        "structure": recs[0]["model"]["structure"],
    }


def first_within(curve, target_of) -> int | None:
    """Tokens at the first evaluation from which every later one is within 1% of the target."""
    found = None
    for t, loss in curve:
        if loss <= 1.01 * target_of(t):
            found = t if found is None else found
        else:
            found = None
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, type=Path, help="the LLaMA continuing (all-T) run")
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    ref = load(args.reference)
    ref_at = dict(ref["curve"])
    llama0 = ref_at[0]
    rows = []
    print(f"LLaMA's own val loss at conversion: {llama0:.4f} (1% band: {1.01 * llama0:.4f})\n")
    head = (
        "| run | structure | trains | val loss at 0 | at end | LLaMA cont. at end | tokens to 1% of LLaMA@0 "
    )
    print(head + "| tokens to 1% of LLaMA cont. | keep (eval) | agreement | median step s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---|---:|")
    for r in [ref] + [load(p) for p in args.runs]:
        c = r["curve"]
        fixed = first_within(c, lambda t: llama0)
        same = first_within(c, lambda t: ref_at.get(t, float("nan")))
        last = r["last"]
        keep = "/".join(f"{k:.2f}" for k in last.get("keep_fractions_eval", [])) or "-"
        agree = "/".join(f"{a:.3f}" for a in last.get("agreement", [])) or "-"
        row = {
            "run": r["name"],
            "structure": r["structure"],
            "train_only": r["train_only"],
            "loss0": c[0][1],
            "loss_end": c[-1][1],
            "tokens_end": c[-1][0],
            "tokens_to_1pct_llama0": fixed,
            "tokens_to_1pct_llama_cont": same,
            "keep": last.get("keep_fractions_eval"),
            "agreement": last.get("agreement"),
            "median_step_s": r["median_step_s"],
        }
        rows.append(row)
        trains = ",".join(r["train_only"]) if r["train_only"] else "all"
        print(
            f"| {r['name']} | `{r['structure']}` | {trains} | {c[0][1]:.4f} | {c[-1][1]:.4f} | "
            f"{ref_at.get(c[-1][0], float('nan')):.4f} | {fixed if fixed is not None else 'not reached'} | "
            f"{same if same is not None else 'not reached'} | {keep} | {agree} | {r['median_step_s']:.3f} |"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in [ref] + [load(p) for p in args.runs]:
            t, loss = zip(*r["curve"])
            label = (
                "LLaMA continuing" if r is ref else f"SUBLLM, trains {','.join(r['train_only'] or ['all'])}"
            )
            ax.plot([x / 1e3 for x in t], loss, marker="o", ms=3, label=label)
        ax.axhline(1.01 * llama0, color="grey", ls="--", lw=0.8, label="1% above the LLaMA at conversion")
        ax.set_xlabel("training tokens after conversion (thousands)")
        ax.set_ylabel("val loss (eval mode)")
        ax.set_title("Uptraining a 12-layer LLaMA into TTT(TT(TT)TTT)TT, keep 0.64")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
    print(json.dumps({"llama_loss_at_conversion": llama0, "runs": rows}))


if __name__ == "__main__":
    main()
