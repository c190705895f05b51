"""Speed-up over LLaMA vs context length beside the FLOP ideal, from the JSON lines that
`subllm bench train` and `subllm bench infer` print last (several runs may be combined).

    python benchmarks/long_context_plot.py --train T1.txt T2.txt --infer I1.txt I2.txt \
        --out docs/long_context_speedup.png
"""

import argparse
import json


def last_json(path: str) -> dict:
    lines = [ln for ln in open(path, encoding="utf-8").read().splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"{path}: no JSON line (not the output of a subllm bench command)")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", nargs="*", default=[])
    ap.add_argument("--infer", nargs="*", default=[])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"training step": ({}, {}), "prefill": ({}, {}), "decode": ({}, {})}
    for path in a.train:
        for r in last_json(path)["results"]:
            series["training step"][0][r["T"]] = r["speedup"]
            series["training step"][1][r["T"]] = r["ideal_speedup"]
    for path in a.infer:
        for r in last_json(path)["results"]:
            if r["batch"] != 1:
                continue
            L = r["prompt_len"]
            series["prefill"][0][L], series["prefill"][1][L] = r["prefill_speedup"], r["prefill_ideal"]
            series["decode"][0][L], series["decode"][1][L] = r["decode_speedup"], r["decode_ideal"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (name, (got, ideal)), color in zip(series.items(), ("C0", "C1", "C2")):
        if not got:
            continue
        xs = sorted(got)
        ax.plot(xs, [got[x] for x in xs], "o-", color=color, label=f"{name}, measured")
        ax.plot(xs, [ideal[x] for x in xs], ":", color=color, label=f"{name}, FLOP ideal")
        print(name, {x: (got[x], ideal[x]) for x in xs})
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("SUBLLM speed-up over LLaMA")
    ax.set_title("subllm-small, batch 1: speed-up vs context (CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
