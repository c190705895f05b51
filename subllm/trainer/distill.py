"""Distillation from a frozen teacher (issue 20): `subllm train --distill-from DIR`.

The student (the model being trained, typically a SUBLLM converted from DIR) learns
    loss = (1 - w) * LM + w * t^2 * KL(teacher_t || student_t) (+ S's auxiliary selection loss)
with w = --distill-weight, t = --distill-temperature, KL over the next-token distributions at
temperature t, averaged over the same positions as the LM loss (t^2 keeps the KL's gradient at the
LM's scale, Hinton et al. 2015). The teacher is frozen (no gradients, no optimizer state), in eval
mode, and runs under no_grad and the same autocast as the student.

Both models return their final hidden states (`SubLLM.forward(return_hidden=True)`); the logits are
formed `chunk` positions at a time, and each chunk's student logits are recomputed in backward
(torch.utils.checkpoint), so at most one chunk of logits per model exists at once instead of two
(B, T, V) tensors - at a 49k vocabulary these dominate the memory of a small model's step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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


def _chunk_terms(h: Tensor, head_w: Tensor, t_logits: Tensor, y: Tensor, temp: float) -> Tensor:
    """(sum of CE, sum of KL) over one chunk's positions: h (N, C), t_logits (N, V), y (N,)."""
    z = F.linear(h, head_w).float()  # (N, V)
    ok = y != -100
    ce = F.cross_entropy(z, y, ignore_index=-100, reduction="sum")
    log_s = F.log_softmax(z / temp, dim=-1)
    log_t = F.log_softmax(t_logits.float() / temp, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (N,)
    return torch.stack([ce, (kl * ok).sum()])


def lm_and_kl(
    hidden: Tensor,
    head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    chunk: int = CHUNK,
) -> tuple[Tensor, Tensor]:
    """Mean next-token cross-entropy of the student and mean KL(teacher || student) at
    `temperature`, over the positions whose next label is not -100. hidden / teacher_hidden
    (B, T, C) final-norm outputs; labels (B, T) aligned with the inputs (shifted here)."""
    B, T, _ = hidden.shape
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    th = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    n = (y != -100).sum().clamp(min=1)
    total = hidden.new_zeros(2, dtype=torch.float32)
    rows = chunk * B
    for i in range(0, h.shape[0], rows):
        with torch.no_grad():
            t_logits = F.linear(th[i : i + rows], teacher_head_weight)
        args = (h[i : i + rows], head_weight, t_logits, y[i : i + rows], temperature)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            total = total + _chunk_terms(*args)
    return total[0] / n, total[1] / n


def lm_and_kl_reference(logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0):
    """The obviously-correct slow path of `lm_and_kl`, from full (B, T, V) logits (tests)."""
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
    lm, kl = lm_and_kl(
        out.hidden, model.head.weight, t_hidden, teacher.head.weight, x, cfg.distill_temperature
    )
    w, t = cfg.distill_weight, cfg.distill_temperature
    loss = (1.0 - w) * lm + w * t * t * kl
    if out.select_loss is not None:
        loss = loss + out.select_loss
    return loss, lm, kl, out
