"""`subllm bench selection`: how well trained SUBLLMs select at inference what they selected in
training (issue 9), over a set of run folders, grouped and averaged over seeds.

    subllm bench selection --runs 'runs/ablate/*' --text data/corpus/val --unseen data/extra/val

For every run (a model folder with its tokenizer) and every text set: the next-token loss with the
inference rule (eval mode) and with training top-k (train mode), and per S the eval-mode keep and
the agreement with top-k - once with the model's own rule and, for a model with a calibrated
threshold, once more with the paper's rule (theta = 0). Calibration does not change training
(subsample.SelectOptions), so one run gives both rows. Texts are cut into non-overlapping windows
of the training length (the run's train_config.json, else --seq-len). Runs are grouped by name
with a trailing `_s<seed>` removed; each group reports mean +- sd over its runs. LLaMA runs (no S)
report the loss only. A table, then ONE JSON line.
"""

from __future__ import annotations

import glob
import json
import re
import statistics
import sys
from pathlib import Path

from subllm.bench.common import mean_sd
from subllm.errors import SubLLMError


def add_selection_arguments(sub) -> None:
    p = sub.add_parser("selection", help="trained runs: keep, agreement, leak gap, loss by group")
    p.add_argument("--runs", required=True, help="run folders: a glob or comma-separated list")
    p.add_argument("--text", default="data/corpus/val", help="validation text: file or folder of .txt")
    p.add_argument("--unseen", default=None, help="text the runs never saw (file or folder of .txt)")
    p.add_argument(
        "--unseen-prefixes", default="austen_,brown_,kjv_", help="in a folder --unseen, only these"
    )
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens per text set (default 32768)")
    p.add_argument("--seq-len", type=int, default=256, help="window when a run has no train_config.json")
    p.add_argument("--batch-size", type=int, default=8)


def _files(spec: str, prefixes: tuple[str, ...] = ()) -> list[Path]:
    p = Path(spec)
    if p.is_file():
        return [p]
    files = sorted(f for f in p.glob("*.txt") if not prefixes or f.name.startswith(prefixes))
    if not files:
        raise SubLLMError(
            f"no text in {spec}" + (f" starting with {', '.join(prefixes)}" if prefixes else "")
        )
    return files


def _runs(spec: str) -> list[Path]:
    parts = [s for s in spec.split(",") if s]
    found = sorted({Path(m) for s in parts for m in (glob.glob(s) or [s])})
    runs = [r for r in found if (r / "config.json").is_file()]
    if not runs:
        raise SubLLMError(f"--runs {spec!r}: no model folder (config.json) found")
    return runs


def group_name(run: Path) -> str:
    return re.sub(r"_s\d+$", "", run.name)


def measure_run(
    run: Path, texts: dict[str, list[Path]], seq_len: int, batch_size: int, max_tokens: int
) -> dict:
    from subllm.data.tokenizer import load_tokenizer
    from subllm.evals.selection import paper_threshold
    from subllm.evals.suite import text_selection
    from subllm.model.subllm import SubLLM

    cfg_file = run / "train_config.json"
    if cfg_file.is_file():
        seq_len = json.loads(cfg_file.read_text()).get("seq_len", seq_len)
    model = SubLLM.from_pretrained(run).eval()
    tok = load_tokenizer(run)
    out: dict = {"run": str(run), "structure": model.config.structure, "selection": model.config.selection}
    calibrated = any(m.theta is not None for m in model.subsamples)
    for name, files in texts.items():
        docs = [f.read_text("utf-8", errors="replace") for f in files]
        if not model.config.n_subsamples:
            out[name] = {"loss_eval": _loss_only(model, tok, docs, seq_len, batch_size, max_tokens)}
            continue
        out[name] = text_selection(model, tok, docs, seq_len, batch_size, "float32", max_tokens)
        if calibrated:
            with paper_threshold(model):
                out[name + " (theta=0)"] = text_selection(
                    model, tok, docs, seq_len, batch_size, "float32", max_tokens
                )
    return out


def _loss_only(model, tok, docs, seq_len, batch_size, max_tokens) -> float:
    """The next-token loss on the very windows `text_selection` measures SUBLLMs on."""
    import torch

    from subllm.evals.suite import text_windows

    windows = text_windows(model, tok, docs, seq_len, batch_size, max_tokens)
    nll = n = 0.0
    with torch.no_grad():
        for x in windows:
            k = x.shape[0] * (x.shape[1] - 1)
            nll += float(model(x, labels=x).lm_loss) * k
            n += k
    return nll / n


def _mean_sd(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return "{:.4f} +- {:.4f}".format(*mean_sd(vals))


def summarize(results: list[dict]) -> list[dict]:
    """One row per (group, text set): mean +- sd of loss, leak gap, keep error and agreement per S."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(group_name(Path(r["run"])), []).append(r)
    rows = []
    for g, rs in groups.items():
        for key in [k for k in rs[0] if isinstance(rs[0][k], dict)]:
            res = [r[key] for r in rs]
            row = {
                "group": g,
                "text": key,
                "runs": len(rs),
                "loss_eval": _mean_sd([x["loss_eval"] for x in res]),
            }
            if "keep_eval" in res[0]:
                n_s = len(res[0]["keep_eval"])
                row["leak_gap"] = _mean_sd([x["leak_gap"] for x in res])
                row["keep_eval"] = "/".join(
                    f"{statistics.mean(x['keep_eval'][i] for x in res):.3f}" for i in range(n_s)
                )
                row["agreement"] = " / ".join(_mean_sd([x["agreement"][i] for x in res]) for i in range(n_s))
            rows.append(row)
    return rows


def run_selection(args) -> int:
    texts = {"val": _files(args.text)}
    if args.unseen:
        texts["unseen"] = _files(args.unseen, tuple(p for p in args.unseen_prefixes.split(",") if p))
    results = []
    for run in _runs(args.runs):
        print(f"measuring {run} ...", file=sys.stderr, flush=True)
        results.append(measure_run(run, texts, args.seq_len, args.batch_size, args.max_tokens))
    rows = summarize(results)
    cols = ("group", "text", "runs", "loss_eval", "leak_gap", "keep_eval", "agreement")
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
    from subllm.bench.common import json_line

    print(json_line({"bench": "selection", "texts": {k: [str(f) for f in v] for k, v in texts.items()},
                     "rows": rows, "runs": results}))  # fmt: skip
    return 0
