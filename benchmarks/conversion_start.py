"""A real LLaMA converted to SUBLLM, before any training (issue 20, item 2): the loss at each keep
ratio for each way of initialising the score layers, on one text.

    python benchmarks/conversion_start.py --source runs/smol_llama --text /usr/share/common-licenses \
        --structure 'TTTTTT(TTTTTT(TTTTTT)TTTTTT)TTTTTT' --ratios 1.0,0.9,0.8,0.64,0.5

Every start is the identity start (config.identity_start: scores 1.05 + a small part, bypass 1.0), so
at keep ratio 1.0 each equals the source; they differ in the small part of the score, which decides
the ranking:
- uniform: the identity start's random weights (a random ranking);
- update: w fitted (least squares on the RMS-normalised input of each S) to the log-norm of the
  update the layers inside that S make to each token in the source - tokens the inner layers
  change least are dropped first;
- attention: w fitted to the log of the attention each token receives from the first layer inside
  that S in the source (averaged over heads and queries).
Two losses per setting: "train" is the training-mode forward (global top-k of ceil(r n) tokens per
S, what uptraining starts from); "causal" is the inference rule with each S's threshold set to the
(1 - r) quantile of its scores on this text (what serving would see without any training).
Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from subllm.config import identity_start, iter_subs, parse_structure
from subllm.data.tokenizer import load_tokenizer_for
from subllm.evals.analysis import attention_probs
from subllm.evals.selection import token_windows
from subllm.model.subllm import SubLLM, load_model

SCALE = 0.01  # the fitted part's size: scores stay in 1.05 +- ~0.05, so keep 1.0 is still the identity


def windows_of(text_path: Path, tok, seq_len: int, n_windows: int, eos: int) -> torch.Tensor:
    files = sorted(text_path.glob("*")) if text_path.is_dir() else [text_path]
    ids: list[int] = []
    for f in files:
        ids += tok(f.read_text(errors="replace"), add_special_tokens=False)["input_ids"] + [eos]
    return torch.cat(token_windows(ids, seq_len, 1)[:n_windows])  # (N, T)


def sub_spans(structure: str) -> list[tuple[int, int]]:
    """Per S in structure order: (index of its first inner layer, index after its last)."""
    spans = []
    for sub in iter_subs(parse_structure(structure)):
        layers = list(_layers(sub.children))
        spans.append((min(layers), max(layers) + 1))
    return spans


def _layers(nodes):
    for n in nodes:
        if isinstance(n, int):
            yield n
        else:
            yield from _layers(n.children)


@torch.no_grad()
def importance_targets(source: SubLLM, ids: torch.Tensor, spans) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per S: (RMS-normalised inputs (N*T, C), {"update": ..., "attention": ...} targets (N*T,))."""
    pos = torch.arange(ids.shape[1]).expand(ids.shape)
    level = source.make_level(pos, None)
    hs = [source.embed(ids)]
    for block in source.layers:
        hs.append(block(hs[-1], level.cos, level.sin, level.mask))
    out = []
    for a, b in spans:
        x = hs[a].float()
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        update = (hs[b].float() - x).norm(dim=-1).clamp(min=1e-6).log()
        att = []
        for row in range(ids.shape[0]):
            probs, allowed = attention_probs(source.layers[a], hs[a][row : row + 1], level.cos[row : row + 1],
                                             level.sin[row : row + 1], None)  # fmt: skip
            att.append(probs[0].mean(0).sum(0) / allowed.sum(0).clamp(min=1))
        out.append(
            (xn.flatten(0, 1), {"update": update.flatten(), "attention": torch.stack(att).log().flatten()})
        )
    return out


def fit(xn: torch.Tensor, y: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """w minimising |xn w - standardised y|^2 + ridge |w|^2, scaled to SCALE standard deviation."""
    y = (y - y.mean()) / y.std().clamp(min=1e-6)
    a = xn.T @ xn + ridge * len(y) * torch.eye(xn.shape[1])
    w = torch.linalg.solve(a, xn.T @ y)
    return w * SCALE / (xn @ w).std().clamp(min=1e-9)


@torch.no_grad()
def losses(model: SubLLM, ids: torch.Tensor, ratio: float) -> dict:
    labels = ids
    model.train().set_step(0)
    train = float(model(ids, labels=labels).lm_loss)
    model.eval()
    for s in model.subsamples:  # causal rule: thresholds at the (1 - r) quantile, S by S
        s.threshold.fill_(-math.inf)
    for i, s in enumerate(model.subsamples):
        sels = model(ids, return_selections=True).selections
        scores = sels[i].scores[sels[i].real] if sels[i].real is not None else sels[i].scores.flatten()
        s.threshold.fill_(float(torch.quantile(scores.float(), 1.0 - ratio)) if ratio < 1 else -math.inf)
    out = model(ids, labels=labels)
    return {
        "train": train,
        "causal": float(out.lm_loss),
        "causal_keep": [round(float(k), 3) for k in out.keep_fractions],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="an all-T model folder (subllm convert --from-hf-llama)")
    p.add_argument("--text", required=True, type=Path)
    p.add_argument("--structure", default="TTTTTT(TTTTTT(TTTTTT)TTTTTT)TTTTTT")
    p.add_argument("--ratios", default="1.0,0.9,0.8,0.64,0.5")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--fit-windows", type=int, default=2, help="windows of the text the fits use (the first)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    source = load_model(args.source)
    tok = load_tokenizer_for(args.source)
    ids = windows_of(
        args.text, tok, args.seq_len, args.windows + args.fit_windows, source.config.eos_token_id
    )
    fit_ids, ids = ids[: args.fit_windows], ids[args.fit_windows :]
    with torch.no_grad():
        base = float(source(ids, labels=ids).lm_loss)
    spans = sub_spans(args.structure)
    targets = importance_targets(source, fit_ids, spans)
    rows = []
    for start in ("uniform", "update", "attention"):
        for r in [float(x) for x in args.ratios.split(",")]:
            torch.manual_seed(0)
            cfg = identity_start(source.config.replace(structure=args.structure, keep_ratio=r))
            model = SubLLM(cfg)
            model.load_state_dict(source.state_dict(), strict=False)
            if start != "uniform":
                with torch.no_grad():
                    for s, (xn, ys) in zip(model.subsamples, targets):
                        s.score.weight.copy_(fit(xn, ys[start])[None])
            res = losses(model, ids, r)
            rows.append({"start": start, "ratio": r, **res})
            print(f"{start:9s} r={r:.2f}  train-mode {res['train']:.4f}  causal {res['causal']:.4f} "
                  f"(keep {res['causal_keep']})  source {base:.4f}", flush=True)  # fmt: skip
    print(json.dumps({"source_loss": base, "tokens": ids.numel(), "structure": args.structure, "rows": rows}))


if __name__ == "__main__":
    main()
