"""Subsampling S (training top-k with the subtraction trick | inference threshold), upsampling U
and bypass B: docs/method.md sections 2, 3 and 5.

A selection is a batch of index rows `idx` (B, K) into the level's sequence, ascending (causal
order kept), with a weight per kept token. Rows may keep different counts (padding, or the
inference threshold): then K is the largest count and slots past a row's count are "invalid" -
they carry weight 0 and point at distinct unused positions, so gathering them is harmless and
scattering them back adds exactly zero. Nothing here loops over rows or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from subllm.config import SELECTION_RECIPES, keep_count
from subllm.dtype import fp32_region
from subllm.model.scaling import GradSize, ScheduledFloat, balance, limit_param_value


@dataclass
class Selection:
    idx: Tensor  # (B, K) long: kept positions in this level's sequence, ascending per row
    weight: Tensor  # (B, K) float32 in [0, 1]; 0 at invalid slots
    valid: Tensor | None  # (B, K) bool, None when every row keeps exactly K tokens
    n_kept: Tensor  # (B,) long
    n_real: Tensor  # (B,) long: real tokens that competed
    scores: Tensor  # (B, T) float32 scores at this level
    agreement: Tensor | None = None  # training only: share of real tokens where top-k == (score > theta)
    kept_mask: Tensor | None = None  # training only: (B, T) bool top-k membership (no gradient)
    real: Tensor | None = None  # (B, T) bool: which scores belong to real tokens (None = all)
    sorted_scores: Tensor | None = None  # training only: (B, T) scores sorted descending, pads -inf
    select_loss: Tensor | None = None  # training only, when enabled: the auxiliary BCE (scalar)

    @property
    def k(self) -> int:
        return self.idx.shape[1]


def _keep_counts(n: Tensor, ratio: float) -> Tensor:
    """ceil(ratio * n) per row, robust to float error (matches config.keep_count)."""
    return torch.minimum(n, torch.ceil(n.double() * ratio - 1e-9).long())


SUBTRACTIONS = ("value", "grad", "straight")


def _pair_weights(u, s, sorted_s, order, K, partner, subtraction: str) -> Tensor:
    """The kept slots' weights in score order (select_topk): u = clamp(sorted scores, 0, 1),
    `partner(t)` the discarded partner of each kept slot in a (B, T) score-ordered tensor."""
    if subtraction == "value":
        return u[:, :K] - partner(u)
    if subtraction == "grad":
        d = partner(u)
        return u[:, :K] - (d - d.detach())
    if subtraction != "straight":
        raise ValueError(f"subtraction must be one of {SUBTRACTIONS}, got {subtraction!r}")
    raw = torch.where(sorted_s.isfinite(), s.gather(1, order), 0.0)  # pins (+inf) and pads (-inf): 0
    top, d = raw[:, :K], partner(raw)
    return u[:, :K].detach() + (top - top.detach()) - (d - d.detach())


def select_topk(
    s: Tensor,
    valid: Tensor | None,
    ratio: float,
    flip: bool,
    theta: Tensor | None = None,
    pin: Tensor | None = None,
    subtraction: str = "value",
) -> Selection:
    """Training-mode selection: global top-k of the real tokens, k = ceil(ratio * n_real).

    The subtraction trick: the i-th kept token (in score order) gets weight
    clamp(s_(i), 0, 1) - clamp(s_(k+i), 0, 1), pairing it with the i-th token of the block just
    below the cut (the block reversed when `flip`). The weight is in [0, 1]; its gradient raises
    kept scores and lowers the scores just below the cut (only inside (0, 1)), which drives kept
    scores to >= 1 and discarded ones to <= 0, so that the causal inference rule `score > 0`
    learns to agree with top-k. Top-k itself has no gradient; it flows only through the weights.
    `theta`: the inference threshold the agreement is measured against (None = 0, the paper).
    `pin` (B, T) bool: tokens kept whatever their score, with weight 1 (`pin_mask`).
    `subtraction` (SelectOptions.subtraction): "value" is the above; "grad" subtracts the partner
    in the gradient only, so the weight's value is clamp(s_(i), 0, 1), the inference weight;
    "straight" also passes the gradient through both clamps (straight-through), so saturated
    scores (>= 1 or <= 0) still learn which tokens the loss wants kept.
    """
    B, T = s.shape
    key = s if pin is None else s.masked_fill(pin, float("inf"))
    key = key if valid is None else key.masked_fill(~valid, float("-inf"))
    sorted_s, order = key.sort(dim=1, descending=True)
    u = sorted_s.clamp(0.0, 1.0)  # pads (-inf) become 0
    flip = torch.as_tensor(flip, device=s.device)  # a 0-d bool tensor: the decision stays on device
    if valid is None:  # unpadded: the count comes from the shape, no host sync
        K = keep_count(T, ratio)
        n_real = torch.full((B,), T, dtype=torch.long, device=s.device)
        k_row = torch.full((B,), K, dtype=torch.long, device=s.device)
        ragged = False
    else:  # padded: one host sync per S for the ragged count
        n_real = valid.sum(1)
        k_row = _keep_counts(n_real, ratio)
        k_min, K = torch.stack([k_row.min(), k_row.max()]).tolist()
        ragged = k_min != K
    top = order[:, :K]
    if not ragged:

        def partner(t: Tensor) -> Tensor:  # the block just below the cut, zero-padded, maybe reversed
            d = t[:, K : 2 * K]
            d = torch.nn.functional.pad(d, (0, K - d.shape[1])) if d.shape[1] < K else d
            return torch.where(flip, d.flip(1), d)

        w_sorted = _pair_weights(u, s, sorted_s, order, K, partner, subtraction)
        idx, asc = top.sort(dim=1)
        slot_valid = None
    else:
        j = torch.arange(K, device=s.device)
        kr = k_row[:, None]
        slot_ok = j < kr  # (B, K)
        src = kr + torch.where(flip, kr - 1 - j, j)
        src_ok = slot_ok & (src < T)

        def partner(t: Tensor) -> Tensor:
            return t.gather(1, src.clamp(0, T - 1)) * src_ok

        w_sorted = _pair_weights(u, s, sorted_s, order, K, partner, subtraction) * slot_ok
        asc = torch.where(slot_ok, top, T + j).argsort(dim=1)
        idx = top.gather(1, asc)
        slot_valid = slot_ok  # valid slots sort first, so slot i stays valid iff i < k_row
    weight = w_sorted.gather(1, asc)
    if pin is not None:
        weight = weight.masked_fill(pin.gather(1, idx), 1.0)
    with torch.no_grad():
        kept = torch.zeros(B, T, dtype=torch.bool, device=s.device)
        kept.scatter_(1, idx, True if slot_valid is None else slot_valid)
        real = torch.ones_like(kept) if valid is None else valid
        above = s > 0 if theta is None else s > theta
        above = above if pin is None else above | pin
        agree = ((kept == above) & real).sum() / real.sum().clamp(min=1)
    return Selection(
        idx, weight, slot_valid, k_row, n_real, s, agree, kept, real=valid, sorted_scores=sorted_s
    )


def select_threshold(
    s: Tensor,
    valid: Tensor | None,
    theta: Tensor | None = None,
    weight: Tensor | None = None,
    pin: Tensor | None = None,
) -> Selection:
    """Inference-mode selection: keep token t iff s_t > theta (and t is real; theta = 0 when None,
    the paper); weight clamp(s_t, 0, 1), as in training, or `weight` (B, T) where given (an `M`
    layer's router weight, subllm/model/mod.py).

    Causal by construction: whether t is kept depends on t's own score (and position, `pin`) only.
    `pin` (B, T) bool: tokens kept whatever their score, with weight 1 (`pin_mask`).
    `subtraction` (SelectOptions.subtraction): "value" is the above; "grad" subtracts the partner
    in the gradient only, so the weight's value is clamp(s_(i), 0, 1), the inference weight;
    "straight" also passes the gradient through both clamps (straight-through), so saturated
    scores (>= 1 or <= 0) still learn which tokens the loss wants kept.
    """
    above = s > 0 if theta is None else s > theta
    if pin is not None:
        above = above | pin
        weight = (s.clamp(0.0, 1.0) if weight is None else weight).masked_fill(pin, 1.0)
    keep = above if valid is None else above & valid
    n_kept = keep.sum(1)
    n_real = torch.full_like(n_kept, s.shape[1]) if valid is None else valid.sum(1)
    K = int(n_kept.max())
    # a stable descending sort of the keep mask puts kept positions first, in ascending order
    idx = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :K]
    weight = (s.clamp(0.0, 1.0) if weight is None else weight).gather(1, idx)
    slot_valid = None
    if bool((n_kept != K).any()):
        slot_valid = torch.arange(K, device=s.device) < n_kept[:, None]
        weight = weight * slot_valid
    return Selection(idx, weight, slot_valid, n_kept, n_real, s, real=valid)


BALANCER_GATES = ("grad", "weight")
THRESHOLDS = ("zero", "calibrated")


class ScoreLinear(nn.Linear):
    """The score layer: s = w^T x (the paper), or with `norm`, s = w^T (x / rms(x)) (beyond the
    paper), which makes the score's scale independent of the residual stream's.

    Subclasses Linear so that `.weight` and the checkpoint key `score.weight` stay as they are.
    """

    def __init__(self, dim: int, norm: bool = False, eps: float = 1e-6, bias: bool = False):
        super().__init__(dim, 1, bias=bias)
        self.norm, self.eps = norm, eps

    def forward(self, x: Tensor) -> Tensor:
        if self.norm:
            xf = x.float()
            x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return super().forward(x)


@dataclass
class SelectOptions:
    """How S learns to select at inference what it selects in training (ModelConfig fields of the
    same names; no defaults of its own: ModelConfig holds them, SELECTION_RECIPES["paper"] is the
    paper's rule, docs/method.md sections 2-4).

    - `balancer_gate`: "grad" scales the Balancer's push by |grad| of each score (the paper);
      "weight" by mean |dL/dw| over the kept slots (scaling.GradSize).
    - `balancer_fraction`: "gaussian" reads the fraction of positive scores from mean/std as if
      they were Gaussian (the paper); "direct" counts it (scaling.balance).
    - `select_loss`: weight of an auxiliary loss, the binary cross-entropy of sigmoid(s / tau)
      against the top-k membership (labels without gradient) - Mixture-of-Depths' causal
      "auxiliary loss" route; it pulls kept scores above 0 and dropped ones below 0, so that the
      inference rule s > 0 keeps what top-k keeps. 0 = off (the paper). `select_loss_detach`:
      the auxiliary loss scores a detached copy of the input, so it trains the score layer only
      and never pushes on the representations below S.
    - `threshold`: "zero" keeps t iff s_t > 0 at inference (the paper); "calibrated" keeps iff
      s_t > theta, theta a buffer that tracks the top-k cut during training (a running mean of the
      midpoint between the k-th and (k+1)-th score of each row; 1/n-averaged over the first
      1/(1 - momentum) updates, then exponential; only forwards with gradients enabled update it,
      so evaluating never moves it). Training itself is untouched (theta only
      follows), and the inference weight stays clamp(s, 0, 1) as in training. (Feeding theta back
      into training - Balancer, weights and loss on s - theta - was tried first: theta then chases
      a cut that runs away from it, and S1 ended keeping 3% in eval mode.)
    - `subtraction`: "value" subtracts the discarded partner's clamp(s) from a kept token's weight
      (the paper); "grad" only in the gradient, so the weight's value is clamp(s, 0, 1) as at
      inference - for uptraining from an identity start, where every score is >= 1 and "value"
      gives the paired kept tokens weight 0; "straight" as "grad" with the gradient passed
      straight through the clamps: saturated scores, which an identity start has everywhere, get
      no gradient from the loss otherwise (only the auxiliary loss, which reinforces whatever
      ranking there is).
    """

    balancer_gate: str
    balancer_fraction: str
    select_loss: float
    select_loss_tau: float
    select_loss_detach: bool
    threshold: str
    threshold_momentum: float
    subtraction: str

    @classmethod
    def of(cls, source) -> SelectOptions:
        """The fields of `source` (a ModelConfig, or a dict such as SELECTION_RECIPES["paper"])."""
        get = source.get if isinstance(source, dict) else lambda k: getattr(source, k)
        return cls(**{f.name: get(f.name) for f in fields(cls)})


class Subsample(nn.Module):
    """S: a learned score per token (Linear(dim, 1), no bias) and the selection rule of the mode."""

    def __init__(
        self,
        dim: int,
        keep_ratio: float,
        prob_schedule: ScheduledFloat,
        grad_scale: float = 0.04,
        options: SelectOptions | None = None,
        score_norm: bool = False,
        score_bias: bool = False,
        keep_first: int = 0,
    ):
        super().__init__()
        self.keep_first = keep_first
        opts = options or SelectOptions.of(SELECTION_RECIPES["paper"])
        if opts.balancer_gate not in BALANCER_GATES:
            raise ValueError(f"balancer_gate must be one of {BALANCER_GATES}, got {opts.balancer_gate!r}")
        if opts.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {opts.threshold!r}")
        self.keep_ratio = keep_ratio
        self.balancer_prob = prob_schedule
        self.grad_scale = grad_scale
        self.options = opts
        self.score = ScoreLinear(dim, score_norm, bias=score_bias)
        self.push_box: dict = {}  # the Balancer's last relative push (selection.py reads it)
        self.cut_log: list | None = None  # set: track_cut collects cuts instead (evals/selection.py)
        if opts.threshold == "calibrated":
            self.register_buffer("threshold", torch.zeros(()))
            self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    @property
    def last_push(self) -> Tensor | None:
        return self.push_box.get("push")

    @property
    def theta(self) -> Tensor | None:
        """The inference threshold (None = 0, the paper's rule)."""
        return getattr(self, "threshold", None)

    def scores(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T) float32 scores, computed in fp32 under any autocast: top-k and s > theta
        never depend on bf16 rounding."""
        with fp32_region(x.device.type):
            return self.score(x.float()).squeeze(-1)

    def keep(self, s: Tensor) -> Tensor:
        """The inference rule on decision scores: s > theta (s > 0 for the paper's rule)."""
        return s > 0 if self.theta is None else s > self.theta

    def decide(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Inference: (decision scores d, weights w), both (B, T) float32 - keep t iff d_t > theta,
        with weight w_t. S: d = s, w = clamp(s, 0, 1) (an `M` layer's router: subllm/model/mod.py)."""
        s = self.scores(x)
        return s, s.clamp(0.0, 1.0)

    def pin_mask(self, pos: Tensor | None) -> Tensor | None:
        """Which tokens this S keeps whatever their score: original positions < keep_first (the
        first tokens of a sequence, which a pretrained LLaMA uses as attention sinks), else None."""
        return None if pos is None or not self.keep_first else pos < self.keep_first

    def forward(
        self,
        x: Tensor,
        valid: Tensor | None,
        step: Tensor | int | None,
        ratio: float | None = None,
        pos: Tensor | None = None,
    ) -> Selection:
        """`step`: the training step (an int, or a 0-d tensor as SubLLM passes it: no recompiles);
        `ratio`: the training keep ratio at this step (None = keep_ratio; annealing passes it);
        `pos` (B, T): each token's original position (for `keep_first`)."""
        ratio = self.keep_ratio if ratio is None else ratio
        pin = self.pin_mask(pos)
        if not self.training:
            d, w = self.decide(x)
            return select_threshold(d, valid, self.theta, w, pin)
        return self.train_select(x, valid, step, ratio, pin)

    def train_select(
        self, x: Tensor, valid: Tensor | None, step, ratio: float, pin: Tensor | None, shard=None
    ) -> Selection:
        """Training mode: the Balancer, exact top-k with the subtraction trick, the auxiliary loss
        and the threshold's calibration (an `M` router overrides this, subllm/model/mod.py).

        `shard` (sequence parallelism, subllm/seqpar/): x holds this rank's tokens only;
        `shard.scores(s)` returns the whole level's scores (B, T) in level order, the same on every
        rank, so that everything below is exactly one process's selection; `shard.weights(w)`
        marks the weights, whose gradient each rank only has for its own kept tokens (summed over
        ranks in backward). None = one process."""
        opts = self.options
        s = self.scores(x)  # (B, T)
        s_aux = None
        if opts.select_loss > 0 and opts.select_loss_detach:
            s_aux = self.scores(x.detach())
        if shard is not None:
            s = shard.scores(s)
            s_aux = None if s_aux is None else shard.scores(s_aux)
        gate = GradSize() if opts.balancer_gate == "weight" else None
        prob = self.balancer_prob.at(torch.as_tensor(step, device=x.device))
        box = None if torch.compiler.is_compiling() else self.push_box  # a dict cannot enter a graph
        s = balance(
            s, ratio, valid, prob, grad_scale=self.grad_scale, gate=gate,
            direct=opts.balancer_fraction == "direct", box=box,
        )  # fmt: skip
        flip = torch.rand((), device=x.device) < 0.5  # a tensor: no host sync
        sel = select_topk(s, valid, ratio, flip, self.theta, pin, opts.subtraction)
        if gate is not None:
            sel.weight = gate.tap(sel.weight, sel.valid)
        if shard is not None:  # in backward: summed over ranks before the tap and the Balancer read it
            sel.weight = shard.weights(sel.weight)
        if opts.select_loss > 0:
            s_aux = s if s_aux is None else s_aux
            sel.select_loss = selection_bce(s_aux, sel.kept_mask, valid, opts.select_loss_tau)
        if self.theta is not None and torch.is_grad_enabled():  # training steps, not evaluations
            self.track_cut(sel.sorted_scores.detach(), sel.n_kept, sel.n_real)
        return sel

    @torch.no_grad()
    def track_cut(self, top: Tensor, k: Tensor, n_real: Tensor) -> None:
        """Move theta toward this batch's top-k cut: per row, the midpoint of the k-th and
        (k+1)-th highest real score (the k-th itself when every real token is kept); `top` is the
        row's scores sorted descending, as select_topk already sorted them."""
        kth = top.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0]
        nxt = top.gather(1, k.clamp(max=top.shape[1] - 1)[:, None])[:, 0]
        cut = torch.where(k < n_real, (kth + nxt) / 2, kth)
        ok = (k > 0) & torch.isfinite(cut)  # a row whose only kept tokens are pinned has no cut
        if self.cut_log is not None:  # a recalibration pass: the rows' cuts, theta unchanged
            self.cut_log.append((float(torch.where(ok, cut, 0.0).sum()), int(ok.sum())))
            return
        cut = torch.where(ok, cut, 0.0).sum() / ok.sum().clamp(min=1)
        self.threshold_updates += 1
        rate = max(1.0 - self.options.threshold_momentum, 0.0)
        a = torch.clamp(1.0 / self.threshold_updates.float(), min=rate)
        self.threshold += a * (cut - self.threshold)


def selection_bce(s: Tensor, kept: Tensor, valid: Tensor | None, tau: float) -> Tensor:
    """Mean over real tokens of BCE(sigmoid(s / tau), kept) - labels carry no gradient."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(s / tau, kept.float(), reduction="none")
    if valid is None:
        return bce.mean()
    m = valid.float()
    return (bce * m).sum() / m.sum().clamp(min=1.0)


class Bypass(nn.Module):
    """B: z = x + b * (y - x), b a per-channel vector (init 0.5) held in [scale_min(step), 1]
    in training by gradient sign flips (prob 0.6 per forward), not by a clamp.

    `enabled=False` is the ablation without a bypass: b is a constant buffer of ones, z = y.
    """

    def __init__(self, dim: int, min_schedule: ScheduledFloat, enabled: bool = True, init: float = 0.5):
        super().__init__()
        self.scale_min = min_schedule
        self.enabled = enabled
        if enabled:
            self.scale = nn.Parameter(torch.full((dim,), float(init)))
        else:
            self.register_buffer("scale", torch.ones(dim))

    def scale_value(self, step: Tensor | int | None) -> Tensor:
        if not (self.training and self.enabled):
            return self.scale
        lo = self.scale_min.at(torch.as_tensor(step, device=self.scale.device))
        return limit_param_value(self.scale, lo, 1.0, prob=0.6, training=True)

    def forward(self, x: Tensor, y: Tensor, step: Tensor | int | None = None) -> Tensor:
        return x + self.scale_value(step) * (y - x)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, T, C), idx (B, K) -> (B, K, C)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def upsample(x: Tensor, h: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """U (reference form): y[idx_i] = w_i h_i + (1 - w_i) x[idx_i]; y[j] = x[j] elsewhere."""
    xg = gather_tokens(x, idx)
    w = weight[..., None].to(h.dtype)
    return x.scatter(1, idx[..., None].expand_as(h), w * h + (1 - w) * xg)


def upsample_bypass(x: Tensor, xg: Tensor, h: Tensor, idx: Tensor, weight: Tensor, b: Tensor) -> Tensor:
    """U then B fused: z = x + b * (U(x, h) - x) = x + scatter_add(b * w * (h - x[idx])).

    One scatter-add, no full-length temporaries besides the output; invalid slots add zero.
    """
    delta = (weight[..., None] * (h - xg)) * b
    return x.scatter_add(1, idx[..., None].expand_as(delta), delta.to(x.dtype))
