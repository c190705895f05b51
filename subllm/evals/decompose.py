"""Where a converted SUBLLM's held-out loss goes, against the LLaMA it came from (issue 20).

The gap between a student (a SUBLLM uptrained from a LLaMA) and its source splits into three parts,
each measured by running the student's own weights in a different mode of its S modules:

- "as_trained": the model as it is (the inference rule decides what each S keeps);
- "context": the same tokens kept with the same weights w and bypass scales b, but the layers inside
  every S see every token of the enclosing level as context (dropped tokens are still not updated):
  as_trained - context = what the inner layers lose by not seeing the dropped tokens;
- "plain": every token through every layer with w = b = 1 - a LLaMA with the student's weights:
  context - plain = what the dropped tokens lose by skipping layers (and the blend of w, b);
  plain - source = what training moved in the weights themselves.

Each mode wraps the S modules of one model instance for the duration of a `with` block (their
selections are widened to every token, with w = 0 where the inference rule dropped one), so nothing
in the model code knows about this analysis. The as_trained loss is also split by the number of
layers each token ran through.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from subllm.config import Sub
from subllm.errors import SubLLMError

MODES = ("as_trained", "context", "plain")


def _widened(sel, valid, plain: bool):
    """A selection over every token of the level: the kept tokens' weights where they were kept and
    0 elsewhere (context), or 1 everywhere (plain); invalid slots keep weight 0."""
    B, T = sel.scores.shape
    idx = torch.arange(T, device=sel.idx.device).expand(B, T)
    if plain:
        weight = torch.ones(B, T, device=sel.weight.device)
    else:
        kept_w = sel.weight if sel.valid is None else sel.weight.masked_fill(~sel.valid, 0.0)
        weight = torch.zeros(B, T, device=sel.weight.device).scatter_add(1, sel.idx, kept_w)
    n = torch.full((B,), T, device=sel.idx.device) if valid is None else valid.sum(1)
    if valid is not None:
        weight = weight.masked_fill(~valid, 0.0)
    return dataclasses.replace(sel, idx=idx, weight=weight, valid=valid, n_kept=n)


@contextlib.contextmanager
def forward_mode(model, mode: str):
    """Inside the block, `model` computes in `mode` (see the module docstring); restored after."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if any(model.config.mod_flags):
        raise SubLLMError("the loss decomposition is for S modules; this model has Mixture-of-Depths layers")
    if mode == "as_trained":
        yield model
        return
    plain = mode == "plain"
    patched = []
    for s in model.subsamples:
        inner = s.forward

        def fwd(x, valid, *args, _inner=inner, **kw):
            return _widened(_inner(x, valid, *args, **kw), valid, plain)

        s.forward = fwd
        patched.append(s)
    if plain:
        for b in model.bypasses:
            b.scale_value = lambda step, _b=b: torch.ones_like(_b.scale)
            patched.append(b)
    try:
        yield model
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("scale_value", None)


def layers_run(model, selections, T: int) -> torch.Tensor:
    """(B, T) long: how many layers each token of an eval forward of unpadded rows ran through."""
    from subllm.evals.retrieval import reached

    masks = reached(model, selections, T)
    B = selections[0].idx.shape[0] if selections else 1
    out = torch.zeros(B, T, dtype=torch.long)

    def walk(nodes, sub_index):
        for node in nodes:
            if isinstance(node, Sub):
                walk(node.children, node.index)
            elif sub_index is None:
                out.add_(1)
            else:
                out.add_(masks[sub_index].long())

    walk(model.config.tree, None)
    return out


def token_losses(model, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(B, T - 1) float32 next-token losses of an eval forward and its selections."""
    out = model(ids, return_selections=model.config.n_subsamples > 0)
    logits = out.logits[:, :-1].float()
    nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return nll.view(ids.shape[0], -1), out.selections or []


@torch.no_grad()
def mean_loss(model, windows: list) -> float:
    """Mean next-token loss per token of an eval forward over `windows` (unpadded (B, T) id tensors)."""
    total = sum(float(token_losses(model, w)[0].sum()) for w in windows)
    return total / sum(w[:, 1:].numel() for w in windows)


@torch.no_grad()
def decompose(student, source, windows: list, autocast=None) -> dict:
    """Mean loss per token of the source and of the student in each mode over `windows` (unpadded
    (B, T) id tensors), and the as_trained loss split by the layers each token ran through."""
    ctx = autocast or contextlib.nullcontext
    sums = {"source": 0.0, **dict.fromkeys(MODES, 0.0)}
    by_layers: dict[int, list[float]] = {}  # layers run -> [tokens, student nll, source nll]
    n = 0
    for ids in windows:
        with ctx():
            ref, _ = token_losses(source, ids)
            for mode in MODES:
                with forward_mode(student, mode):
                    nll, sels = token_losses(student, ids)
                sums[mode] += float(nll.sum())
                if mode == "as_trained":
                    depth = layers_run(student, sels, ids.shape[1]).expand(ids.shape[0], -1)[:, :-1]
                    for d in depth.unique().tolist():
                        m = depth == d
                        row = by_layers.setdefault(int(d), [0, 0.0, 0.0])
                        row[0] += int(m.sum())
                        row[1] += float(nll[m].sum())
                        row[2] += float(ref[m].sum())
        sums["source"] += float(ref.sum())
        n += ref.numel()
    loss = {k: v / n for k, v in sums.items()}
    src = loss["source"]
    parts = {
        "lost context": loss["as_trained"] - loss["context"],
        "skipped layers": loss["context"] - loss["plain"],
        "weights moved": loss["plain"] - src,
    }
    rows = [
        {
            "layers": d,
            "share": c / n,
            "student": a / c,
            "source": b / c,
            "gap_per_token": (a - b) / c,
            "gap_share": (a - b) / n,
        }
        for d, (c, a, b) in sorted(by_layers.items())
    ]
    return {
        "tokens": n,
        "loss": loss,
        "parts": parts,
        "by_layers": rows,
        "relative": {k: v / src for k, v in parts.items()},
    }
