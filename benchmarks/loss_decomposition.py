"""Where a converted SUBLLM's held-out loss goes, against its source (issue 20; subllm/evals/decompose.py):
lost context, skipped layers and moved weights, and the gap by the layers each token ran through.

    python benchmarks/loss_decomposition.py STUDENT SOURCE REGISTER [REGISTER ...] \
        [--max-tokens 8192] [--seq-len 512] [--dtype bfloat16] [--threads 2] [--out FILE.json]

    python benchmarks/loss_decomposition.py plot OUT.png A.json [B.json ...]   # the parts as stacked bars

REGISTER: a .txt file or a folder of them (e.g. runs/mix90/registers/val). Non-overlapping windows of
--seq-len tokens as in training (an even spread over the files when they hold more than --max-tokens),
batch 4 - not the rolling windows of `subllm eval --tasks loss`, so the source's numbers differ from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from subllm.data.tokenizer import load_tokenizer_for
from subllm.evals.decompose import decompose
from subllm.evals.scoring import autocast_context
from subllm.evals.suite import text_windows
from subllm.evals.tasks import read_texts
from subllm.model.subllm import load_model


def table(name: str, res: dict) -> str:
    lo = res["loss"]
    src = lo["source"]
    rel = {k: f"{v:.3f} ({(v / src - 1) * 100:+.1f}%)" for k, v in lo.items() if k != "source"}
    lines = [
        f"{name}: {res['tokens']:,} tokens; source {src:.3f}, student {rel['as_trained']}, "
        f"context restored {rel['context']}, plain {rel['plain']}",
        "  gap in nats/token (share of the source's loss): "
        + ", ".join(f"{k} {v:+.3f} ({res['relative'][k] * 100:+.1f}%)" for k, v in res["parts"].items()),
        "  | layers run | share of tokens | student | source | gap per token | part of the gap |",
        "  |---|---|---|---|---|---|",
    ]
    for r in res["by_layers"]:
        lines.append(
            f"  | {r['layers']} | {r['share']:.3f} | {r['student']:.3f} | {r['source']:.3f} | "
            f"{r['gap_per_token']:+.3f} | {r['gap_share']:+.3f} |"
        )
    return "\n".join(lines)


def plot(out: str, files: list[str]) -> None:
    """Per register, one stacked bar per JSON (a run of this script with --out): the three parts of the
    gap in % of the source's loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d["args"]["student"]).name, d) for d in (json.loads(Path(f).read_text()) for f in files)]
    regs = list(runs[0][1]["results"])
    parts = list(runs[0][1]["results"][regs[0]]["parts"])
    colors = {"weights moved": "tab:gray", "skipped layers": "tab:orange", "lost context": "tab:blue"}
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(regs) * len(runs), 4.5))
    width = 0.8 / len(runs)
    for j, (name, data) in enumerate(runs):
        for i, reg in enumerate(regs):
            res = data["results"].get(reg)
            if res is None:
                continue
            x, bottom = i + (j - (len(runs) - 1) / 2) * width, 0.0
            for part in reversed(parts):  # weights moved at the bottom
                v = 100 * res["relative"][part]
                ax.bar(
                    x,
                    v,
                    width * 0.9,
                    bottom=bottom,
                    color=colors.get(part),
                    label=part if (i, j) == (0, 0) else None,
                )
                bottom += v
            ax.annotate(name, (x, bottom), ha="center", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.axhline(2, color="tab:red", ls="--", lw=1, label="2% target")
    ax.set_xticks(range(len(regs)), [Path(r).name for r in regs])
    ax.set_ylabel("held-out loss above the source (% of the source's)")
    ax.set_title("Where the loss goes: moved weights, skipped layers, lost context")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "plot":
        return plot(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("student")
    ap.add_argument("source")
    ap.add_argument("registers", nargs="+")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    student, source = load_model(a.student).eval(), load_model(a.source).eval()
    tok = load_tokenizer_for(a.student)
    results = {}
    for reg in a.registers:
        windows = text_windows(student, tok, read_texts(reg), a.seq_len, 4, a.max_tokens)
        res = decompose(student, source, windows, lambda: autocast_context(a.dtype, torch.device("cpu")))
        results[reg] = res
        print(table(Path(reg).name, res), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
