"""The table and plots of benchmarks/real_model_grid.sh (issue 20, item 4).

Reads a grid folder (one run folder per point, evals/ with each point's held-out losses, speed and
passkey) and writes table.md (FLOP ideal, held-out loss per register against the source, eval keep,
agreement, measured speed-ups, passkey accuracy per length with the needle's keep per S),
curves.png (in-run validation loss vs training tokens, every point) and frontier.png (mean loss
increase over the registers vs measured decode speed-up).

    python benchmarks/real_model_table.py runs/grid
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REGISTERS = ("val", "prose", "legal")


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _last_json_line(path: Path) -> dict | None:
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def passkey_by_length(path: Path) -> dict[int, tuple[float, list[float]]] | None:
    """{length: (accuracy over every depth, mean needle keep per S)} of a passkey eval, or None."""
    ev = _json(path)
    if ev is None:
        return None
    out = {}
    for n in sorted({r["length"] for r in ev["retrieval"]["results"]}):
        rows = [r for r in ev["retrieval"]["results"] if r["length"] == n]
        acc = sum(r["accuracy"] * r["answers"] for r in rows) / sum(r["answers"] for r in rows)
        keep = [sum(k) / len(rows) for k in zip(*(r["needle_keep"] for r in rows))]
        out[n] = (acc, keep)
    return out


def _passkey_cell(pk: dict | None) -> str:
    if not pk:
        return "-"
    acc = "/".join(f"{a:.2f}" for a, _ in pk.values())
    keep = [k for _, k in pk.values() if k]
    return acc + (f" (needle kept {'/'.join(f'{x:.2f}' for x in keep[-1])} at {max(pk)})" if keep else "")


def point_row(grid: Path, name: str, source: dict, measured: str | None = None) -> dict:
    """Everything the table says about one point; `measured`: the name its evaluations carry when
    they are not the point's own (NAME_recal: the point's weights, thresholds recalibrated)."""
    run = grid / name
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    start = next(r for r in records if r.get("kind") == "run")
    evals = [r for r in records if r.get("kind") == "eval"]
    model, cfg = start["model"], start["config"]
    ev_name = measured or name
    row = dict(
        name=ev_name, structure=model["structure"], keep=model["keep_ratio"], train_only=cfg.get("train_only")
    )
    row["mod_capacity"] = model["mod_capacity"] if "M" in model["structure"] else None
    row["tokens"] = evals[-1]["tokens"] if evals else 0
    row["curve"] = [] if measured else [(r["tokens"], r["val_loss"]) for r in evals]
    for reg in REGISTERS:
        ev = _json(grid / "evals" / f"{ev_name}_{reg}.json")
        row[reg] = ev["loss"]["loss"] if ev else None
        row[reg + "_rel"] = ev["loss"]["loss"] / source[reg] - 1 if ev else None
        if reg == "legal" and ev:
            row["eval_keep_legal"] = ev["loss"].get("keep_fractions")
        if reg == "val" and ev:
            sel = ev.get("selection") or {}
            row["eval_keep"] = ev["loss"].get("keep_fractions")
            row["agreement"] = sel.get("agreement")
    row["passkey"] = passkey_by_length(grid / "evals" / f"{ev_name}_passkey.json")
    bench = _last_json_line(grid / "evals" / f"{ev_name}_speed.log")
    res = bench["results"][0] if bench else {}
    for k in ("prefill_speedup", "prefill_ideal", "decode_speedup", "decode_ideal"):
        row[k] = res.get(k)
    return row


def _fmt(x, spec=".3f", missing="-"):
    return missing if x is None else format(x, spec)


def table(rows: list[dict], source: dict) -> str:
    head = ("| point | structure | r / capacity | trained | tokens | val | prose | legal | keep val; legal | "
            "agreement | prefill x (ideal) | decode x (ideal) | passkey 512/1k/2k/4k |")  # fmt: skip
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    losses = " | ".join(_fmt(source[r]) for r in REGISTERS)
    pk = _passkey_cell(source.get("passkey"))
    out.append(f"| source | all T | 1.0 | - | - | {losses} | - | - | - | - | {pk} |")
    for r in rows:
        cells = [f"{_fmt(r[g])} ({_fmt(100 * r[g + '_rel'] if r[g + '_rel'] is not None else None, '+.1f')}%)"
                 for g in REGISTERS]  # fmt: skip
        keep = f"capacity {r['mod_capacity']}" if r["mod_capacity"] else f"{r['keep']}"
        trained = "S, B only" if r["train_only"] else "all"
        ek = "; ".join(
            "/".join(f"{x:.2f}" for x in r.get(k) or []) or "-" for k in ("eval_keep", "eval_keep_legal")
        )
        ag = "/".join(f"{x:.2f}" for x in r.get("agreement") or []) or "-"
        sp = [f"{_fmt(r[a], '.2f')} ({_fmt(r[b], '.2f')})" for a, b in
              (("prefill_speedup", "prefill_ideal"), ("decode_speedup", "decode_ideal"))]  # fmt: skip
        first = f"| {r['name']} | `{r['structure']}` | {keep} | {trained} | {r['tokens']:,} | "
        out.append(
            first
            + " | ".join(cells)
            + f" | {ek} | {ag} | {sp[0]} | {sp[1]} | {_passkey_cell(r['passkey'])} |"
        )
    return "\n".join(out)


def plots(rows: list[dict], grid: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["curve"]:
            ax.plot([t / 1e3 for t, _ in r["curve"]], [v for _, v in r["curve"]], marker="o", label=r["name"])
    if rows and rows[0]["curve"]:
        ax.axhline(rows[0]["curve"][0][1], color="k", ls="--", lw=1, label="source (step 0)")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("in-run validation loss, eval mode (nats)")
    ax.set_title("SmolLM2-135M -> SUBLLM: loss vs tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(grid / "curves.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        rel = [r[g + "_rel"] for g in REGISTERS]
        if r["decode_speedup"] is None or None in rel:
            continue
        y = 100 * sum(rel) / len(rel)
        ax.scatter(r["decode_speedup"], y)
        ax.annotate(
            r["name"], (r["decode_speedup"], y), fontsize=8, xytext=(3, 3), textcoords="offset points"
        )
    ax.axhline(2, color="tab:red", ls="--", lw=1, label="2% target")
    ax.set_xlabel("measured decode speed-up over the source (2k context, batch 1, bf16)")
    ax.set_ylabel("held-out loss over the source, mean of 3 registers (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(grid / "frontier.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", type=Path)
    a = ap.parse_args()
    source = {}
    for reg in REGISTERS:
        ev = _json(a.grid / "evals" / f"source_{reg}.json")
        if ev is None:
            raise SystemExit(
                f"{a.grid}/evals/source_{reg}.json is missing: run benchmarks/real_model_grid.sh first"
            )
        source[reg] = ev["loss"]["loss"]
    source["passkey"] = passkey_by_length(a.grid / "evals" / "source_passkey.json")
    names = sorted(p.name for p in a.grid.iterdir() if (p / "metrics.jsonl").is_file())
    rows = []
    for n in names:
        rows.append(point_row(a.grid, n, source))
        if (a.grid / f"{n}_recal" / "config.json").is_file():
            rows.append(point_row(a.grid, n, source, measured=f"{n}_recal"))
    text = table(rows, source)
    (a.grid / "table.md").write_text(text + "\n")
    print(text)
    plots(rows, a.grid)
    print(f"wrote {a.grid}/table.md, curves.png, frontier.png")


if __name__ == "__main__":
    main()
