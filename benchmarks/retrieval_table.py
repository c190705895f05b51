"""Markdown tables of the retrieval protocol (benchmarks/retrieval_protocol.sh) from its `subllm eval
--out` JSON files: accuracy by method and length (passkey averaged over depths, mqar), passkey by
depth, and SUBLLM's needle-keep share per S.

    python benchmarks/retrieval_table.py runs/retrieval/eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = [
    ("plain", "(a) plain RoPE"),
    ("yarn", "(b) YaRN, factor = length / W, no training"),
    ("pose", "(c) PoSE training (target 4096)"),
    ("yarn_ft", "(d) YaRN x4 + 50-step fine-tune at 1024"),
]


def load(folder: Path, model: str, method: str) -> dict:
    """{(task, length, depth): row} for one model and method (YaRN: one file per length)."""
    files = [folder / f"{model}_{method}.json"]
    if method == "yarn":
        files = [folder / f"{model}_plain.json"] + sorted(folder.glob(f"{model}_yarn_[0-9]*.json"))
    rows = {}
    for f in files:
        if not f.is_file():
            continue
        for r in json.loads(f.read_text())["retrieval"]["results"]:
            if method == "yarn" and f.name.endswith("_plain.json") and r["length"] != 256:
                continue  # factor 1 = plain RoPE at the training window only
            rows[(r["task"], r["length"], r["depth"])] = r
    return rows


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def pct(x) -> str:
    return "-" if x != x else f"{100 * x:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    folder = ap.parse_args().folder
    data = {(m, k): load(folder, m, k) for m in ("subllm", "llama") for k, _ in METHODS}
    lengths = sorted({k[1] for d in data.values() for k in d})
    depths = sorted({k[2] for d in data.values() for k in d if k[2] is not None})

    def acc(model, method, task, n, depth="all", key="accuracy"):
        rows = [r for (t, ln, d), r in data[(model, method)].items() if t == task and ln == n]
        if depth != "all":
            rows = [r for r in rows if r["depth"] == depth]
        if not rows or key not in rows[0]:
            return float("nan")
        return sum(r[key] * r["answers"] for r in rows) / sum(r["answers"] for r in rows)

    print("Accuracy (%), SUBLLM / LLaMA; passkey over all depths, mqar over all pairs:\n")
    print("| method | task | " + " | ".join(str(n) for n in lengths) + " |")
    print("|---|---|" + "---:|" * len(lengths))
    for key, label in METHODS:
        for task in ("passkey", "mqar"):
            cells = [
                f"{pct(acc('subllm', key, task, n))} / {pct(acc('llama', key, task, n))}" for n in lengths
            ]
            print(f"| {label} | {task} | " + " | ".join(cells) + " |")

    print("\nAnswer tokens predicted right (%, teacher-forced; chance ~10% a digit), SUBLLM / LLaMA:\n")
    print("| method | task | " + " | ".join(str(n) for n in lengths) + " |")
    print("|---|---|" + "---:|" * len(lengths))
    for key, label in METHODS:
        for task in ("passkey", "mqar"):
            cells = [
                f"{pct(acc('subllm', key, task, n, key='token_accuracy'))} / "
                f"{pct(acc('llama', key, task, n, key='token_accuracy'))}"
                for n in lengths
            ]
            print(f"| {label} | {task} | " + " | ".join(cells) + " |")

    print("\nPasskey accuracy (%) by depth, SUBLLM / LLaMA:\n")
    print("| method | depth | " + " | ".join(str(n) for n in lengths) + " |")
    print("|---|---|" + "---:|" * len(lengths))
    for key, label in METHODS:
        for d in depths:
            cells = [
                f"{pct(acc('subllm', key, 'passkey', n, d))} / {pct(acc('llama', key, 'passkey', n, d))}"
                for n in lengths
            ]
            print(f"| {label} | {d} | " + " | ".join(cells) + " |")

    print("\nSUBLLM needle keep: share of needle tokens that reached the layers inside S0 / S1 (%):\n")
    print("| method | task | depth | " + " | ".join(str(n) for n in lengths) + " |")
    print("|---|---|---|" + "---:|" * len(lengths))
    for key, label in METHODS:
        for task, ds in (("passkey", depths), ("mqar", [None])):
            for d in ds:
                cells = []
                for n in lengths:
                    r = data[("subllm", key)].get((task, n, d))
                    cells.append("-" if r is None else " / ".join(pct(x) for x in r["needle_keep"]))
                print(f"| {label} | {task} | {'-' if d is None else d} | " + " | ".join(cells) + " |")

    print(
        "\nSUBLLM passkey examples by outcome: count, and mean needle keep S0 / S1 (%) of those examples:\n"
    )
    print("| method | length | retrieved: n, keep | missed: n, keep | missed, needle cut by S0 / S1 |")
    print("|---|---:|---|---|---|")
    for key, label in METHODS:
        for n in lengths:
            ex = [e for (t, ln, _), r in data[("subllm", key)].items() if t == "passkey" and ln == n
                  for e in r.get("examples", [])]  # fmt: skip
            if not ex:
                continue
            hit = [e["needle_keep"] for e in ex if e["retrieved"] == e["of"]]
            miss = [e["needle_keep"] for e in ex if e["retrieved"] < e["of"]]

            def keep(group):
                if not group:
                    return "-"
                return " / ".join(pct(mean(k[i] for k in group)) for i in range(len(group[0])))

            dropped = [sum(1 for k in miss if k[i] < 1.0) for i in range(len(ex[0]["needle_keep"]))]
            print(f"| {label} | {n} | {len(hit)}, {keep(hit)} | {len(miss)}, {keep(miss)} | "
                  + " / ".join(str(x) for x in dropped) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
