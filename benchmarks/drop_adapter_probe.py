"""Would a cheap map for the dropped tokens buy back a trained SUBLLM's loss? (issue 20, a probe)

A token that an S drops leaves it unchanged (docs/method.md section 5): its own prediction comes from
its state before the S - the "skipped layers" part of benchmarks/loss_decomposition.py. FlexiDepth
(arXiv 2503.23798) gives skipped tokens a light adapter instead. This probe adds z += A_s(rmsnorm(x))
to the tokens S_s dropped (A_s: (dim + 1) x dim, ~0.3 M parameters per S, ~0.1 of a layer's work per
dropped token) on a trained checkpoint, without touching the model code (one instance's `_subsample`
is wrapped), in two ways:

- `fit`: A_s by ridge regression on the update z - x that every token gets at S_s when every token
  runs every layer (decompose's plain mode) on calibration text - training-free;
- `train`: the checkpoint frozen, A_s from zero trained by KL(source || student) on the training
  text, AdamW at --lr.

    python benchmarks/drop_adapter_probe.py STUDENT SOURCE TRAIN_TEXT REGISTER [REGISTER ...] \
        [--mode fit|train] [--steps 40] [--lr 1e-3] [--threads 2]

Prints the source's and the student's loss per register with and without the map (8,192 tokens per
register, windows of 512 as loss_decomposition.py).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from subllm.data.tokenizer import load_tokenizer_for
from subllm.evals.decompose import forward_mode, mean_loss
from subllm.evals.scoring import autocast_context
from subllm.evals.suite import text_windows
from subllm.evals.tasks import read_texts
from subllm.model.subllm import load_model


def features(x: torch.Tensor) -> torch.Tensor:
    """rmsnorm(x) with a constant 1 appended (the map's bias)."""
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return torch.cat([x, torch.ones_like(x[..., :1])], -1)


def wrap(model, maps: list[torch.Tensor], state: dict) -> None:
    """model._subsample adds features(x) @ maps[s] to the dropped tokens (state['on']), or records
    (features(x), z - x) of every token (state['record'])."""
    orig = model._subsample

    def sub(node, x, level, sels):
        z = orig(node, x, level, sels)
        if state.get("record") is not None:
            state["record"][node.index].append((features(x).flatten(0, 1), (z - x).float().flatten(0, 1)))
        if state.get("on"):
            sel = sels[node.index]
            w = torch.ones_like(sel.weight) if sel.valid is None else sel.valid.float()
            kept = torch.zeros(x.shape[:2], device=x.device).scatter_add(1, sel.idx, w) > 0
            z = z + ((features(x) @ maps[node.index]) * (~kept)[..., None]).to(z.dtype)
        return z

    model._subsample = sub


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("student")
    ap.add_argument("source")
    ap.add_argument("train_text")
    ap.add_argument("registers", nargs="+")
    ap.add_argument("--mode", choices=("fit", "train"), default="train")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ridge", type=float, default=1e-2, help="fit: ridge weight per calibration token")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    student, source = load_model(a.student), load_model(a.source)
    for p in list(student.parameters()) + list(source.parameters()):
        p.requires_grad_(False)
    tok = load_tokenizer_for(a.student)
    ac = lambda: autocast_context("bfloat16", torch.device("cpu"))  # noqa: E731
    n_s, d = student.config.n_subsamples, student.config.dim
    maps = [torch.zeros(d + 1, d, requires_grad=a.mode == "train") for _ in range(n_s)]
    state: dict = {}
    wrap(student, maps, state)
    texts = read_texts(a.train_text)
    random.Random(0).shuffle(texts)
    evals = {r: text_windows(student, tok, read_texts(r), 512, 4, 8192) for r in a.registers}
    with torch.no_grad(), ac():
        before = {r: (mean_loss(source, ws), mean_loss(student, ws)) for r, ws in evals.items()}
    t0 = time.time()
    if a.mode == "fit":
        state["record"] = {i: [] for i in range(n_s)}
        with torch.no_grad(), ac(), forward_mode(student, "plain"):
            for ids in text_windows(student, tok, texts, 512, 4, 16384):
                student(ids)
        for i in range(n_s):
            X = torch.cat([f for f, _ in state["record"][i]])
            Y = torch.cat([y for _, y in state["record"][i]])
            W = torch.linalg.solve(X.T @ X + a.ridge * X.shape[0] * torch.eye(d + 1), X.T @ Y)
            r2 = 1 - (Y - X @ W).pow(2).sum() / (Y - Y.mean(0)).pow(2).sum()
            print(f"S{i}: ridge fit on {X.shape[0]:,} tokens, R^2 {float(r2):.3f}")
            maps[i].copy_(W)
        state["record"] = None
    else:
        state["on"] = True
        opt = torch.optim.AdamW(maps, lr=a.lr, weight_decay=0.0)
        for step, ids in enumerate(text_windows(student, tok, texts, 512, 4, 4 * 512 * a.steps)):
            with ac():
                with torch.no_grad():
                    q = F.log_softmax(source(ids).logits.float(), -1)
                p = F.log_softmax(student(ids).logits.float(), -1)
                kl = F.kl_div(p, q, log_target=True, reduction="batchmean") / ids.shape[1]
            opt.zero_grad()
            kl.backward()
            opt.step()
            if step % 10 == 0:
                print(f"step {step}: KL {kl.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    state["on"] = True
    print(f"{a.mode}: {time.time() - t0:.0f} s")
    with torch.no_grad(), ac():
        for r, ws in evals.items():
            src, base = before[r]
            new = mean_loss(student, ws)
            print(
                f"{r}: source {src:.4f}, student {base:.4f} ({(base / src - 1) * 100:+.1f}%), "
                f"with the map {new:.4f} ({(new / src - 1) * 100:+.1f}%)",
                flush=True,
            )


if __name__ == "__main__":
    main()
