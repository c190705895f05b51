"""Mixture-of-Depths `M` layers (Raposo et al. 2024, arXiv 2404.02258), beyond the SUBLLM paper.

An `M` layer is a transformer layer with a router r_t = w^T x_t (the S score layer, Linear(dim, 1)).
In training it runs on the top-k tokens of each row, k = ceil(mod_capacity * n), and adds its
residual update scaled by the router weight: z_t = x_t + g(r_t) f(x_t) for the chosen tokens,
z_t = x_t for the others - MoD's equation 1 with g(r) = r (`mod_weight = "raw"`), or g = sigmoid
(the default: in [0, 1] like S's weights, and the auxiliary BCE then pushes the weights of chosen
tokens toward 1 instead of inflating them - docs/RESULTS.md, issue 12, measures both; "raw" is
unbounded by MoD's definition), or g = clamp(r, 0, 1) (S's weight: with the identity start of an
uptraining, a score bias above 1, an `M` layer at capacity 1.0 is exactly its source layer). That is
SUBLLM's gather / upsample with the router value as the weight and no bypass, so an `M` layer is
parsed as a one-layer subsampling module and shares everything else with S: its own KV-cache level
(a token it skips never enters its cache), the per-row ragged handling, the eval-mode threshold
rule, the analysis.

Top-k over a sequence is not causal, so inference decides per token, by one of MoD's two methods
(`ModelConfig.mod_router`):
- "aux_loss": an auxiliary binary cross-entropy of sigmoid(r_t) against the top-k membership
  (labels without gradient) teaches the router itself to put chosen tokens above 0; inference keeps
  t iff r_t > theta.
- "predictor": a small MLP on a stop-gradient copy of the router's input learns the same labels
  (its loss never reaches the model); inference keeps t iff its logit > theta. The router value
  still scales the update.
theta is 0, or with `threshold = "calibrated"` the running top-k cut of the decision logits
(Subsample.track_cut). The auxiliary loss is weighted by `mod_aux_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from subllm.dtype import fp32_region
from subllm.model.subsample import Selection, Subsample, select_topk, selection_bce


@dataclass
class ModOptions:
    """An `M` layer's router: ModelConfig's `mod_router`, `mod_predictor_dim`, `mod_aux_loss` and
    `mod_weight`, each under its name without the prefix."""

    router: str = "aux_loss"
    predictor_dim: int = 64
    aux_loss: float = 0.1
    weight: str = "sigmoid"  # the update is scaled by sigmoid(r), r ("raw", MoD eq. 1) or clamp(r, 0, 1)

    def scale(self, r: Tensor) -> Tensor:
        if self.weight == "sigmoid":
            return torch.sigmoid(r)
        return r.clamp(0.0, 1.0) if self.weight == "clamp" else r


class Predictor(nn.Module):
    """MoD's auxiliary predictor: RMS-normalised, detached input -> Linear -> SiLU -> Linear -> logit."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, 1)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T) float32 logits; no gradient reaches x."""
        with fp32_region(x.device.type):
            xf = x.detach().float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.fc2(nn.functional.silu(self.fc1(xf))).squeeze(-1)


def route_topk(
    sub, x: Tensor, valid: Tensor | None, ratio: float | None = None, pin: Tensor | None = None
) -> Selection:
    """Training-mode routing of an `M` layer (`sub`: its Subsample): exact top-k per row by the
    router, weight = the router value at each chosen token (0 at invalid slots), the auxiliary loss
    (already weighted by mod_aux_loss) and the agreement of the inference rule with top-k."""
    r = sub.scores(x)  # (B, T) float32
    sel = select_topk(r, valid, sub.keep_ratio if ratio is None else ratio, False, pin=pin)
    w = sub.mod.scale(r).gather(1, sel.idx)
    if pin is not None:
        w = w.masked_fill(pin.gather(1, sel.idx), 1.0)
    sel.weight = w if sel.valid is None else w * sel.valid
    d = r if sub.predictor is None else sub.predictor(x)
    sel.scores = d
    sel.select_loss = sub.mod.aux_loss * selection_bce(d, sel.kept_mask, valid, 1.0)
    with torch.no_grad():
        real = torch.ones_like(sel.kept_mask) if valid is None else valid
        sel.agreement = ((sel.kept_mask == sub.keep(d)) & real).sum() / real.sum().clamp(min=1)
    if sub.theta is not None and torch.is_grad_enabled():  # training steps, not evaluations
        key = d.detach() if valid is None else d.detach().masked_fill(~valid, float("-inf"))
        sorted_d = sel.sorted_scores.detach() if sub.predictor is None else key.sort(1, descending=True)[0]
        sub.track_cut(sorted_d, sel.n_kept, sel.n_real)
    return sel


class ModRouter(Subsample):
    """The router of an `M` layer: the S score layer (its weight is the router w) with MoD's
    training rule (`route_topk`) and, with router "predictor", the predictor whose logit decides at
    inference. Everything else (threshold, calibration, the eval-mode rule) is Subsample's."""

    def __init__(self, dim: int, capacity: float, prob_schedule, mod: ModOptions, **kwargs):
        super().__init__(dim, capacity, prob_schedule, **kwargs)
        self.mod = mod
        self.predictor = Predictor(dim, mod.predictor_dim) if mod.router == "predictor" else None

    def decide(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Inference: w = the router value r (or sigmoid(r), `mod_weight`), d = r ("aux_loss") or the
        predictor's logit ("predictor"); keep t iff d_t > theta."""
        s = self.scores(x)
        return (s if self.predictor is None else self.predictor(x)), self.mod.scale(s)

    def train_select(
        self, x: Tensor, valid: Tensor | None, step, ratio: float, pin: Tensor | None
    ) -> Selection:
        return route_topk(self, x, valid, ratio, pin)
