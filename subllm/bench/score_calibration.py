"""Score calibration for `subllm bench infer` on random weights (no checkpoint): the score
layers are set so that the realised keep fraction over a benchmark's tokens equals each S's
configured ratio r (`calibrate_scores`), since untrained scores keep an arbitrary share."""

from __future__ import annotations

import torch

from subllm.config import iter_subs, keep_count
from subllm.errors import SubLLMError
from subllm.model.subllm import SubLLM


class _Stop(Exception):
    pass


def _input_of(model: SubLLM, index: int, ids: torch.Tensor) -> torch.Tensor:
    """The real tokens entering S `index`, (N, C): the forward is cut short right there."""
    seen = {}

    def hook(_mod, args):
        seen["x"], seen["valid"] = args[0], args[1]
        raise _Stop

    h = model.subsamples[index].register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
    except _Stop:
        pass
    finally:
        h.remove()
    x, valid = seen["x"].float(), seen["valid"]
    return x.flatten(0, 1) if valid is None else x[valid]


def _trend_directions(X: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """Orthonormal directions along which x drifts with the position in the sequence (the
    prefix-average components of attention): least-squares fit of X on (1, log(1 + t), t / n)."""
    n = X.shape[0] // rows if X.shape[0] % rows == 0 else X.shape[0]
    t = torch.arange(X.shape[0], dtype=torch.float32, device=X.device) % n
    P = torch.stack([torch.ones_like(t), torch.log1p(t), t / n], 1)
    W = torch.linalg.lstsq(P, X).solution[1:]  # (2, C): the trend part, the constant excluded
    q, _ = torch.linalg.qr(W.T)  # (C, 2) orthonormal
    return list(q.T)


def calibrate_scores(model: SubLLM, ids: torch.Tensor, seed: int) -> list[dict]:
    """Set every score weight so that exactly ceil(r * N) of the N real tokens entering S in the
    full-forward batch `ids` (all rows pooled) get a positive score. The benchmark passes its
    prompt followed by the tokens it will decode (teacher-forced, so decode sees the same x).

    Method: a random unit direction u, made orthogonal to the directions along which x drifts with
    the position (otherwise early tokens are kept far more than late ones, and decode at the end
    of a long prompt keeps ~0.45 instead of r), and d = the least-squares solution of X d = 1 over
    the inputs X of S (a direction along which every token's projection is close to 1 - it stands
    in for the bias the score layer lacks). Score s = a (u.x - tau d.x); when every d.x > 0,
    s > 0 iff u.x / d.x > tau, so tau is set between the k-th and (k+1)-th largest ratios (exact);
    otherwise tau is bisected. a scales the scores to standard deviation 2. S modules are
    calibrated in structure order, each on the tokens its enclosing S kept. Calibrating on a
    separate random sequence does not transfer with random weights (the near-constant component
    of x is context-specific), hence the benchmark's own tokens.
    """
    g = torch.Generator().manual_seed(seed)
    report = []
    for sub in iter_subs(model.tree):
        if getattr(model.subsamples[sub.index], "predictor", None) is not None:
            raise SubLLMError(
                "calibrating the scores of an untrained model sets the router, not an `M` layer's "
                "predictor: benchmark mod_router='aux_loss' (the layers' cost is the same)"
            )
        X = _input_of(model, sub.index, ids)  # (N, C)
        N, C = X.shape
        r = model.config.keep_ratios[sub.index]
        k = keep_count(N, r)
        u = torch.randn(C, generator=g).to(X.device)
        for w in _trend_directions(X, ids.shape[0]):  # no drift of the score along the sequence
            u = u - (u @ w) * w
        u = u / u.norm()
        d = torch.linalg.lstsq(X, torch.ones(N, 1, device=X.device)).solution[:, 0]
        a, c = X @ u, X @ d
        exact = bool((c > 0).all())
        if exact:
            t = (a / c).sort(descending=True).values
            tau = float(t[k - 1] + t[k]) / 2 if k < N else float(t[-1]) - 1.0
        else:  # bisection on the kept count
            lo, hi = float(a.min() / c.abs().max()) - 10, float(a.max() / c.abs().min().clamp(min=1e-6)) + 10
            for _ in range(100):
                tau = (lo + hi) / 2
                lo, hi = (tau, hi) if int(((a - tau * c) > 0).sum()) > k else (lo, tau)
        s = a - tau * c
        scale = 2.0 / float(s.std())
        with torch.no_grad():
            model.subsamples[sub.index].score.weight.copy_((scale * (u - tau * d))[None])
        r2 = 1 - float(((c - 1) ** 2).sum()) / N
        report.append(
            dict(sub=sub.index, tokens=N, target=r, kept=int((s > 0).sum()), exact=exact, fit_r2=round(r2, 4))
        )
    return report
