"""Distillation from a frozen teacher (issue 20): `subllm train --distill-from DIR`.

The student (the model being trained, typically a SUBLLM converted from DIR) learns
    loss = (1 - w) * LM + w * t^2 * KL(teacher_t || student_t) (+ S's auxiliary selection loss)
with w = --distill-weight, t = --distill-temperature, KL over the next-token distributions at
temperature t, averaged over the same positions as the LM loss (t^2 keeps the KL's gradient at the
LM's scale, Hinton et al. 2015). The teacher is frozen (no gradients, no optimizer state), in eval
mode, and runs under no_grad and the same autocast as the student.

Both models return their final hidden states (`SubLLM.forward(return_hidden=True)`); the logits are
formed `chunk` positions at a time and each chunk's gradient (of the hidden states and the head weight)
is formed right away from its softmax (`_HeadLoss`), so at most one chunk of logits per model exists at
once instead of two (B, T, V) tensors - at a 49k vocabulary these dominate the memory of a small model's
step - and no chunk's logits are made twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from subllm.errors import SubLLMError

CHUNK = 256  # positions per logits chunk


def load_teacher(path, student_config, device: str):
    """The frozen teacher at `path` (a model or run folder), checked against the student."""
    from subllm.model.subllm import load_model

    teacher = load_model(path, device)
    if teacher.config.vocab_size != student_config.vocab_size:
        raise SubLLMError(
            f"--distill-from {path}: vocabulary {teacher.config.vocab_size} differs from the student's "
            f"{student_config.vocab_size} (distillation compares next-token distributions)"
        )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _lowered(t: Tensor) -> Tensor:
    """`t` in the autocast dtype of its device when autocast is on there (cast once, not per chunk)."""
    kind = t.device.type
    return t.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else t


class _HeadLoss(torch.autograd.Function):
    """a * mean CE + b * mean KL from final hidden states, chunk by chunk, with the gradients of h and the
    head weight formed in forward: each chunk's logits are made once and their softmax turned into the
    gradient right away, instead of checkpointing the chunk and recomputing its logits in backward.

    For one row with student logits z, teacher logits u, temperature t, label y (s = softmax(z / t),
    q = softmax(u / t)):  CE = logsumexp(z) - z_y,  KL = sum q (log q - z / t) + logsumexp(z / t),
    dCE/dz = softmax(z) - onehot(y),  dKL/dz = (s - q) / t."""

    @staticmethod
    def forward(ctx, h, w, th, tw, y, temperature: float, a: float, b: float, rows: int):
        ok = y != -100
        n = ok.sum().clamp(min=1).to(torch.float32)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w_c, tw_c = _lowered(w), _lowered(tw)
        grad_h = torch.empty_like(h) if need_h else None  # every row is written below
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        ce_sum = kl_sum = h.new_zeros((), dtype=torch.float32)
        inv_t = 1.0 / temperature
        for i in range(0, h.shape[0], rows):
            hc, yc, okc = h[i : i + rows], y[i : i + rows], ok[i : i + rows]
            z = F.linear(hc, w_c).float()  # (r, V)
            u = F.linear(th[i : i + rows], tw_c).float()
            log_q = torch.log_softmax(u.mul_(inv_t) if temperature != 1.0 else u, dim=-1)
            q = log_q.exp()
            zt = z * inv_t if temperature != 1.0 else z
            lse_t = torch.logsumexp(zt, dim=-1)
            kl = (q * (log_q - zt)).sum(-1) + lse_t
            lse = torch.logsumexp(z, dim=-1) if temperature != 1.0 else lse_t
            yc0 = yc.clamp(min=0).unsqueeze(1)
            ce = lse - z.gather(1, yc0).squeeze(1)
            ce_sum = ce_sum + torch.where(okc, ce, 0.0).sum()  # no boolean indexing: no device sync
            kl_sum = kl_sum + torch.where(okc, kl, 0.0).sum()
            if not (need_h or need_w):
                continue
            scale = okc.to(torch.float32).unsqueeze(1) / n  # rows whose label is -100 get no gradient
            if temperature == 1.0:  # g = (a + b) s - b q - a onehot(y)
                g = z.sub_(lse.unsqueeze(1)).exp_().mul_(a + b).sub_(q.mul_(b))
            else:
                s_t = zt.sub_(lse_t.unsqueeze(1)).exp_()
                g = s_t.sub_(q).mul_(b * inv_t).add_(z.sub_(lse.unsqueeze(1)).exp_().mul_(a))
            if a:
                g.scatter_add_(1, yc0, torch.full_like(yc0, -a, dtype=g.dtype))
            g.mul_(scale)
            g_c = g.to(w_c.dtype)
            if need_h:
                grad_h[i : i + rows] = torch.mm(g_c, w_c).to(h.dtype)
            if need_w:
                grad_w += torch.mm(g_c.t(), hc.to(w_c.dtype)).float()
        ctx.grads, ctx.w_dtype = (grad_h, grad_w), w.dtype
        lm, kl = ce_sum / n, kl_sum / n
        ctx.mark_non_differentiable(lm, kl)
        return a * lm + b * kl, lm, kl

    @staticmethod
    def backward(ctx, g_loss, _g_lm, _g_kl):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        gh = grad_h * g_loss if grad_h is not None else None
        gw = (grad_w * g_loss).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None


def distill_loss(
    hidden: Tensor,
    head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    lm_weight: float = 0.0,
    kl_weight: float = 1.0,
    chunk: int = CHUNK,
) -> tuple[Tensor, Tensor, Tensor]:
    """(lm_weight * LM + kl_weight * KL, LM, KL): the mean next-token cross-entropy of the student and
    the mean KL(teacher || student) at `temperature`, over the positions whose next label is not
    -100; only the first is differentiable. hidden / teacher_hidden (B, T, C) final-norm outputs;
    labels (B, T) aligned with the inputs (shifted here). At most `chunk` positions per row of logits
    exist at once."""
    B = hidden.shape[0]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    th = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    return _HeadLoss.apply(
        h, head_weight, th.detach(), teacher_head_weight.detach(), y, temperature, lm_weight, kl_weight,
        chunk * B,
    )  # fmt: skip


def lm_and_kl_reference(logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0):
    """The obviously-correct slow path of `distill_loss`: (LM, KL) from full (B, T, V) logits (tests)."""
    z, zt, y = logits[:, :-1].float(), teacher_logits[:, :-1].float(), labels[:, 1:]
    ok = y != -100
    ce = F.cross_entropy(z.flatten(0, 1), y.flatten(), ignore_index=-100)
    p_t = torch.softmax(zt / temperature, -1)
    kl = (p_t * (torch.log_softmax(zt / temperature, -1) - torch.log_softmax(z / temperature, -1))).sum(-1)
    return ce, kl[ok].mean()


def distill_step(forward, model, teacher, x: Tensor, cfg, kw: dict) -> tuple[Tensor, Tensor, Tensor, object]:
    """One micro-batch: (loss to minimise, LM loss, KL, the student's output)."""
    out = forward(x, return_hidden=True, **kw)
    with torch.no_grad():
        t_hidden = teacher(x, return_hidden=True, **kw).hidden
    w, t = cfg.distill_weight, cfg.distill_temperature
    loss, lm, kl = distill_loss(
        out.hidden, model.head.weight, t_hidden, teacher.head.weight, x, t, 1.0 - w, w * t * t
    )
    if out.select_loss is not None:
        loss = loss + out.select_loss
    return loss, lm, kl, out
