"""Training metrics: one JSON object per line (metrics.jsonl) and loss-curve plots.

Records carry a `kind`: "run" (the resolved configuration, once per start or resume), "train"
(per logged step: loss, lr, tokens, tokens/s, wall-clock) and "eval" (validation loss in eval
mode, bits per byte, eval-mode keep fractions, train-mode loss on the same data and the leak gap,
train/infer selection agreement). matplotlib is imported lazily, with the Agg backend.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"
SELECTION_PNG = "selection.png"


def read_metrics(path: Path | str) -> list[dict]:
    """All complete records of a metrics file (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class MetricsWriter:
    """Append-only JSONL writer; a no-op on ranks other than 0 (`enabled=False`).

    `resume_step`: on resume, records of steps after the checkpoint (logged by the crashed run
    but about to be redone) are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path | str, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self._f = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            kept = [
                r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step or r["kind"] == "run"
            ]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(record, default=_jsonable) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _finite(v) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def plot_run(records: list[dict], path: Path | str, title: str = "") -> Path:
    """Train loss (per step) and validation loss (eval mode, and train mode = the leak) vs tokens."""
    plt = _pyplot()
    train = [r for r in records if r.get("kind") == "train" and _finite(r.get("loss"))]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train")
    for key, label, style in (
        ("val_loss", "val (eval mode)", "o-"),
        ("val_loss_train_mode", "val (train mode)", "s--"),
    ):
        pts = [(r["tokens"], r[key]) for r in evals if _finite(r.get(key))]
        if pts:
            ax.plot(*zip(*pts), style, ms=3, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, path)


def plot_comparison(runs: dict[str, list[dict]], path: Path | str, title: str = "") -> Path:
    """Validation loss (eval mode) of several runs vs training tokens and vs wall-clock seconds."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, records in runs.items():
        pts = [r for r in records if r.get("kind") == "eval" and _finite(r.get("val_loss"))]
        if not pts:
            continue
        a.plot([r["tokens"] for r in pts], [r["val_loss"] for r in pts], "o-", ms=3, label=name)
        b.plot([r["elapsed_s"] for r in pts], [r["val_loss"] for r in pts], "o-", ms=3, label=name)
    a.set_xlabel("training tokens")
    b.set_xlabel("training wall-clock (s, evaluation excluded)")
    a.set_ylabel("validation loss (nats / token, eval mode)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "validation loss")
    return _save(fig, plt, path)


def plot_selection(records: list[dict], path: Path | str, ratios: list[float], title: str = ""):
    """Per S along the run (eval records): eval-mode keep vs r, train/infer agreement, score
    quantiles p5/p50/p95 with theta, and the saturated share with the Balancer's push.
    None when the run has no selection records (a LLaMA)."""
    evals = [(r["step"], _selection_of(r)) for r in records if r.get("kind") == "eval"]
    evals = [(s, sel) for s, sel in evals if sel]
    if not evals:
        return None
    plt = _pyplot()
    steps = [s for s, _ in evals]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (keep, agree), (score, sat) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(ratios):
        c = colors[i % len(colors)]

        def series(key, i=i):
            return [sel[key][i] if key in sel and i < len(sel[key]) else float("nan") for _, sel in evals]

        keep.plot(steps, series("keep_eval"), "o-", ms=3, c=c, label=f"S{i} eval (s > theta)")
        keep.axhline(r, c=c, ls=":", lw=1)
        agree.plot(steps, series("agreement"), "o-", ms=3, c=c, label=f"S{i}")
        score.fill_between(steps, series("score_p05"), series("score_p95"), color=c, alpha=0.15)
        score.plot(steps, series("score_p50"), "o-", ms=3, c=c, label=f"S{i} p50 (band p5-p95)")
        score.plot(steps, series("threshold"), ":", c=c)
        sat.plot(steps, series("saturated"), "o-", ms=3, c=c, label=f"S{i} saturated")
        if any("balancer_push" in sel for _, sel in evals):
            sat.plot(steps, series("balancer_push"), "x--", ms=4, c=c, label=f"S{i} Balancer push")
    keep.set_ylabel("keep fraction (dotted: r)")
    agree.set_ylabel("agreement with top-k")
    agree.axhline(0.97, c="k", ls=":", lw=1)
    score.set_ylabel("score (dotted: theta)")
    score.axhline(0.0, c="k", lw=0.8)
    score.axhline(1.0, c="k", lw=0.8, ls=":")
    sat.set_ylabel("share / ratio")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("training step")
    fig.suptitle(title or "selection")
    return _save(fig, plt, path)


def _selection_of(record: dict) -> dict | None:
    """An eval record's selection statistics (runs logged before they existed: keep and agreement)."""
    if record.get("selection"):
        return record["selection"]
    if "keep_fractions_eval" in record:
        return {"keep_eval": record["keep_fractions_eval"], "agreement": record.get("agreement", [])}
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
