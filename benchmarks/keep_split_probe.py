"""After training: a nested SUBLLM's drop budget moved between its S, by threshold alone (issue 20).

Each S's inference threshold is set, outer S first, to the score quantile that keeps the given share of
the tokens reaching it on calibration text; then the held-out loss and the realised keep per S on each
register, with the average number of layers a token runs through (the FLOP ideal's numerator). No
weight changes: this asks whether the same trained model does better with its budget split otherwise.

    python benchmarks/keep_split_probe.py CHECKPOINT --calibrate data/mix/train \
        --registers runs/mix90/registers/{val,prose,legal} --splits 0.64/0.64,0.75/0.34,0.55/1 [--threads 2]

A split is one keep ratio per S in structure order (each of the tokens that reach that S; 1 = keep all).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from subllm.data.tokenizer import load_tokenizer_for
from subllm.evals.decompose import layers_run
from subllm.evals.scoring import autocast_context
from subllm.evals.suite import text_windows
from subllm.evals.tasks import read_texts
from subllm.model.subllm import load_model


def autocast():
    return autocast_context("bfloat16", torch.device("cpu"))


@torch.no_grad()
def level_scores(model, windows, i: int) -> torch.Tensor:
    """The scores S i gives the real tokens that reach it, over `windows` (eval mode)."""
    out = []
    for w in windows:
        with autocast():
            sel = model(w, return_selections=True).selections[i]
        out.append((sel.scores if sel.real is None else sel.scores[sel.real]).flatten().float())
    return torch.cat(out)


def set_split(model, windows, split: list[float]) -> None:
    subs = model.subsamples
    for s in subs:
        s.threshold.fill_(-1e9)
    for i, r in enumerate(split):  # structure order: an enclosing S comes before the S inside it
        if r < 1:
            subs[i].threshold.fill_(float(torch.quantile(level_scores(model, windows, i), 1 - r)))


@torch.no_grad()
def measure(model, windows) -> tuple[float, list[float], float]:
    nll = n = layers = 0.0
    keep = torch.zeros(model.config.n_subsamples)
    for w in windows:
        with autocast():
            out = model(w, return_selections=True)
        lg = out.logits[:, :-1].float()
        nll += float(F.cross_entropy(lg.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        n += lg.shape[0] * lg.shape[1]
        keep += out.keep_fractions.float()
        layers += float(layers_run(model, out.selections, w.shape[1]).float().mean())
    return nll / n, (keep / len(windows)).tolist(), layers / len(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--source", help="the source LLaMA: also print its loss per register")
    ap.add_argument("--calibrate", required=True, help="text file or folder the quantiles come from")
    ap.add_argument("--registers", nargs="+", required=True)
    ap.add_argument("--splits", required=True, help="e.g. 0.64/0.64,0.75/0.34 (one ratio per S)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per register (and 2x for calibration)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.checkpoint).eval()
    if not model.subsamples or any(getattr(s, "threshold", None) is None for s in model.subsamples):
        raise SystemExit("the checkpoint needs S modules with calibrated thresholds (threshold=calibrated)")
    tok = load_tokenizer_for(a.checkpoint)
    cal = text_windows(model, tok, read_texts(a.calibrate), 512, 4, 2 * a.tokens)
    regs = {Path(r).name: text_windows(model, tok, read_texts(r), 512, 4, a.tokens) for r in a.registers}
    if a.source:
        src = load_model(a.source).eval()
        print("source: " + "; ".join(f"{r} {measure(src, ws)[0]:.3f}" for r, ws in regs.items()), flush=True)
    trained = [s.threshold.clone() for s in model.subsamples]
    for spec in ["as trained"] + a.splits.split(","):
        if spec == "as trained":
            for s, t in zip(model.subsamples, trained):
                s.threshold.copy_(t)
        else:
            split = [float(x) for x in spec.split("/")]
            if len(split) != model.config.n_subsamples:
                raise SystemExit(f"split {spec}: give {model.config.n_subsamples} ratios, one per S")
            set_split(model, cal, split)
        cells = []
        for r, ws in regs.items():
            loss, keep, layers = measure(model, ws)
            cells.append(f"{r} {loss:.3f} keep {'/'.join(f'{k:.2f}' for k in keep)} layers {layers:.2f}")
        print(f"{spec}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
