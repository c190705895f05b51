"""Seeing the selection (issue 9): per S, what the inference rule keeps, how often it agrees with
the training rule, and what the scores look like.

- keep_eval: kept / real tokens under the inference rule (keep t iff s_t > theta; theta = 0 is the
  paper's rule, docs/method.md section 3), pooled over rows;
- keep_train: the same under training top-k (ceil(r n) per row, section 2);
- agreement: share of real tokens where top-k membership equals (s > theta), from a train-mode
  forward (its inner S sees what top-k kept, as in training);
- score_p05 / score_p50 / score_p95 and saturated (share of scores <= 0 or >= 1, where
  clamp(s, 0, 1) passes no gradient) of the eval-mode scores;
- threshold: theta of a calibrated S (0 for the paper's rule);
- balancer_push: rms of the Balancer's added gradient over rms of the gradient it was added to,
  at the last training backward (None before any; written by scaling.balance).

`SelectionMeter` accumulates both passes; `measure_selection(model, windows)` runs them on token
windows of any text (used by `subllm eval`, `subllm analyze` and the demo). The train-mode pass
runs under no_grad from a fixed seed with the RNG state restored, and the training step does not
change a forward's values (schedules act on gradients only), so it works on any checkpoint.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

QUANTILES = {"score_p05": 0.05, "score_p50": 0.5, "score_p95": 0.95}
SEED = 1234
MAX_SCORES = 200_000  # per S, scores kept for the quantiles (a uniform subsample beyond)


class SelectionMeter:
    def __init__(self, n_subs: int):
        self.n = n_subs
        self.eval_kept = [0.0] * n_subs
        self.eval_real = [0.0] * n_subs
        self.train_kept = [0.0] * n_subs
        self.train_real = [0.0] * n_subs
        self.agree = [0.0] * n_subs
        self.scores: list[list[Tensor]] = [[] for _ in range(n_subs)]

    def add_eval(self, selections) -> None:
        for i, sel in enumerate(selections):
            if sel is None:
                continue
            self.eval_kept[i] += float(sel.n_kept.sum())
            self.eval_real[i] += float(sel.n_real.sum())
            s = sel.scores.detach().float()
            self.scores[i].append((s if sel.real is None else s[sel.real]).flatten().cpu())

    def add_train(self, selections) -> None:
        for i, sel in enumerate(selections):
            if sel is None:
                continue
            real = float(sel.n_real.sum())
            self.train_kept[i] += float(sel.n_kept.sum())
            self.train_real[i] += real
            self.agree[i] += float(sel.agreement) * real

    def sums(self) -> list[float]:
        """The additive state, for an all-reduce across ranks (scores stay per rank)."""
        return self.eval_kept + self.eval_real + self.train_kept + self.train_real + self.agree

    def load_sums(self, v: list[float]) -> None:
        n = self.n
        self.eval_kept, self.eval_real = list(v[:n]), list(v[n : 2 * n])
        self.train_kept, self.train_real = list(v[2 * n : 3 * n]), list(v[3 * n : 4 * n])
        self.agree = list(v[4 * n :])

    def result(self, model=None) -> dict:
        def ratio(a, b):
            return [x / y if y else float("nan") for x, y in zip(a, b)]

        out = {"keep_eval": ratio(self.eval_kept, self.eval_real)}
        if any(self.train_real):
            out["keep_train"] = ratio(self.train_kept, self.train_real)
            out["agreement"] = ratio(self.agree, self.train_real)
        for key in (*QUANTILES, "saturated"):
            out[key] = []
        for chunks in self.scores:
            s = torch.cat(chunks) if chunks else torch.zeros(0)
            if s.numel() > MAX_SCORES:
                s = s[torch.linspace(0, s.numel() - 1, MAX_SCORES).long()]
            for key, q in QUANTILES.items():
                out[key].append(float(s.quantile(q)) if s.numel() else float("nan"))
            sat = float(((s <= 0) | (s >= 1)).float().mean()) if s.numel() else float("nan")
            out["saturated"].append(sat)
        if model is not None:
            out["threshold"] = [float(m.theta) if m.theta is not None else 0.0 for m in model.subsamples]
            pushes = [m.last_push for m in model.subsamples]
            if any(p is not None for p in pushes):
                out["balancer_push"] = [float(p) if p is not None else float("nan") for p in pushes]
        return out


@torch.no_grad()
def train_mode_pass(model, run) -> None:
    """Call `run()` with `model` in train mode from a fixed seed, restoring the RNG, mode and step."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training, old_step = model.training, model.step
    try:
        torch.manual_seed(SEED)
        model.train()
        # a model that carries no step (loaded from a checkpoint) is measured at the end of its
        # keep-ratio anneal, i.e. against top-k at its final keep ratio (the rest of the schedules
        # act on gradients only)
        model.set_step(old_step if old_step is not None else model.config.keep_anneal_steps)
        run()  # under no_grad: a calibrated theta does not move (subsample.Subsample.forward)
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        model.train(was_training)
        model.step = old_step


@torch.no_grad()
def measure_selection(model, windows: list[Tensor], autocast=None) -> dict:
    """Selection statistics of `model` over token windows (each (B, T), unpadded), plus the
    next-token loss in both modes: loss_eval (the inference rule), loss_train (top-k) and their
    difference leak_gap."""
    ctx = autocast or contextlib.nullcontext
    meter = SelectionMeter(model.config.n_subsamples)
    if not meter.n:
        return {}
    nll = [0.0, 0.0]
    n_pred = sum(x.shape[0] * (x.shape[1] - 1) for x in windows)
    was_training = model.training
    model.eval()
    for x in windows:
        with ctx():
            out = model(x, labels=x, return_selections=True)
        meter.add_eval(out.selections)
        nll[0] += float(out.lm_loss) * x.shape[0] * (x.shape[1] - 1)

    def run():
        for x in windows:
            with ctx():
                out = model(x, labels=x, return_selections=True)
            meter.add_train(out.selections)
            nll[1] += float(out.lm_loss) * x.shape[0] * (x.shape[1] - 1)

    train_mode_pass(model, run)
    model.train(was_training)
    res = meter.result(model)
    res["loss_eval"], res["loss_train"] = nll[0] / n_pred, nll[1] / n_pred
    res["leak_gap"] = res["loss_eval"] - res["loss_train"]
    return res


def recalibrate(model, windows: list[Tensor], autocast=None) -> list[tuple[float, float]]:
    """Set every calibrated S's theta to the mean top-k cut of a training-mode pass over `windows`
    (per row, the midpoint of the k-th and (k+1)-th highest score, as the running calibration
    takes it, `Subsample.track_cut`), averaged over every row instead of an exponential average
    that lags a keep ratio or scores still moving at the end of training. Nothing else changes
    (weights, step, RNG). Returns (old, new) theta per calibrated S."""
    from subllm.errors import SubLLMError

    subs = [m for m in model.subsamples if m.theta is not None]
    if not subs:
        raise SubLLMError("this model has no calibrated threshold (threshold 'zero': keep iff s > 0)")
    ctx = autocast or contextlib.nullcontext
    flags = [p.requires_grad for p in model.parameters()]

    def run():
        with torch.enable_grad():  # the calibration runs on training steps only; nothing needs grad
            for x in windows:
                with ctx():
                    model(x)

    try:
        for m in subs:
            m.cut_log = []
        for p in model.parameters():
            p.requires_grad_(False)
        train_mode_pass(model, run)
        logs = [m.cut_log for m in subs]
    finally:
        for m in subs:
            m.cut_log = None
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    out = []
    for m, log in zip(subs, logs):
        n = sum(c for _, c in log)
        old = float(m.theta)
        if n:
            m.theta.fill_(sum(v for v, _ in log) / n)
        out.append((old, float(m.theta)))
    return out


@contextlib.contextmanager
def paper_threshold(model):
    """Temporarily evaluate a calibrated model with the paper's rule (theta = 0 in every S)."""
    saved = [m.theta.clone() if m.theta is not None else None for m in model.subsamples]
    try:
        for m in model.subsamples:
            if m.theta is not None:
                m.theta.zero_()
        yield model
    finally:
        for m, t in zip(model.subsamples, saved):
            if t is not None:
                m.theta.copy_(t)


def format_selection(res: dict, ratios: list[float] | None = None, names: list[str] | None = None) -> str:
    """One line per S (`names`: config.module_names, e.g. M1 for an `M` layer's router): keep (eval
    vs train), agreement, score quantiles, saturation, theta."""
    lines = []
    for i, keep in enumerate(res.get("keep_eval", [])):
        line = f"{names[i] if names else f'S{i}'}: keep {keep:.3f}"
        if ratios:
            line += f" (r {ratios[i]:.2f})"
        if "agreement" in res:
            line += f", agreement with top-k {res['agreement'][i]:.3f}"
        q = "/".join(f"{res[k][i]:+.2f}" for k in QUANTILES)
        line += f", score p5/p50/p95 {q}, saturated {res['saturated'][i]:.2f}"
        if res.get("threshold") and res["threshold"][i]:
            line += f", theta {res['threshold'][i]:+.3f}"
        lines.append(line)
    return "\n".join(lines)


def token_windows(
    ids: list[int], seq_len: int, batch_size: int, max_windows: int | None = None
) -> list[Tensor]:
    """Consecutive, non-overlapping windows of `seq_len` tokens, batched (B, T): the training view
    of a text. The tail shorter than a window is dropped; so is a text shorter than one window."""
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    t = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return list(t.split(batch_size)) if n else []
