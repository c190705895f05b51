"""Who holds which token at each nesting level under sequence parallelism.

Rank r holds the r-th contiguous shard of every row at level 0, and at every inner level the
tokens of its own shard that all enclosing S kept, in their original order (nothing moves between
ranks; the imbalance this leaves is measured, `Placement.per_rank`). Each rank stores its tokens
in M slots (M = the most any rank holds in any row; the rest are padding slots), so that the
"gathered" layout of a level - rank 0's M slots, then rank 1's, ... - has N * M slots.

A level is also the one-process level (`L` slots, `SubLLM._run`'s tensors): `order` (B, L) maps
each one-process slot to its gathered slot, `inv` (B, N * M) maps back (L = a padding slot).
Because shards are contiguous and kept tokens stay in order, the gathered order restricted to real
slots IS the one-process order; `order` only squeezes the padding out. Every rank computes every
rank's placement from the selection, which every rank holds whole: no communication here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from subllm.model.subllm import attention_mask_for


@dataclass
class Placement:
    """One level: the one-process view (the same on every rank) and this rank's slots."""

    m: int  # slots per rank
    order: Tensor  # (B, L) gathered slot of each one-process slot (0 at invalid one-process slots)
    inv: Tensor  # (B, N * M) one-process slot of each gathered slot, L at padding slots
    valid: Tensor | None  # (B, L) the one-process level's validity (None = all valid)
    mask: Tensor | None  # (B, 1, L, L) one process's attention mask (None = plain causal)
    pos: Tensor  # (B, L) original positions of the one-process slots
    local_pos: Tensor  # (B, M) positions of this rank's slots (0 at padding slots)
    per_rank: Tensor  # (B, N) real tokens each rank holds, per row
    identity: bool = False  # order and inv are the identity (level 0: padding is masked, not moved)

    @property
    def length(self) -> int:
        return self.order.shape[1]


def root(pos: Tensor, valid: Tensor | None, n: int, rank: int) -> Placement:
    """Level 0: T = n * M tokens per row, rank r holds [r M, (r + 1) M)."""
    B, T = pos.shape
    m = T // n
    ar = torch.arange(T, device=pos.device).expand(B, T)
    real = torch.ones(B, T, dtype=torch.long, device=pos.device) if valid is None else valid.long()
    per_rank = real.view(B, n, m).sum(2)
    local = pos[:, rank * m : (rank + 1) * m]
    return Placement(m, ar, ar, valid, attention_mask_for(valid), pos, local, per_rank, identity=True)


def child(parent: Placement, idx: Tensor, sel_valid: Tensor | None, n: int, rank: int):
    """The level inside an S that kept one-process slots `idx` (B, K) (ascending; `sel_valid`
    (B, K) marks real slots, None = all) -> (Placement, src, slot), where for this rank's M' slots
    `src` (B, M') is the parent-local slot each one gathers (0 at padding) and `slot` (B, M') the
    one-process slot of the selection it holds (K at padding: its weight is 0)."""
    B, K = idx.shape
    dev = idx.device
    g = parent.order.gather(1, idx)  # (B, K) gathered parent slots
    owner = g // parent.m  # (B, K) rank holding each kept token
    ok = torch.ones_like(idx, dtype=torch.bool) if sel_valid is None else sel_valid
    owner = torch.where(ok, owner, n)  # invalid slots: an extra "rank" n, dropped below
    counts = torch.zeros(B, n + 1, dtype=torch.long, device=dev).scatter_add_(
        1, owner, torch.ones_like(owner)
    )
    per_rank = counts[:, :n]
    m = max(int(per_rank.max()), 1)
    start = torch.cumsum(counts, 1) - counts  # (B, n + 1) first one-process slot of each rank
    local = torch.arange(K, device=dev) - start.gather(1, owner)  # (B, K) slot within its rank
    order = torch.where(ok, owner * m + local, 0)
    inv = torch.full((B, n * m + 1), K, dtype=torch.long, device=dev)
    inv.scatter_(1, torch.where(ok, order, n * m), torch.arange(K, device=dev).expand(B, K))
    inv = inv[:, : n * m]
    slot = inv[:, rank * m : (rank + 1) * m]  # (B, M') one-process slot, K at padding
    held = slot < K
    src = g.gather(1, slot.clamp(max=K - 1)) - rank * parent.m
    src = torch.where(held, src, 0)
    pos = parent.pos.gather(1, idx)
    local_pos = torch.where(held, pos.gather(1, slot.clamp(max=K - 1)), 0)
    place = Placement(m, order, inv, sel_valid, attention_mask_for(sel_valid), pos, local_pos, per_rank)
    return place, src, slot


class _Take(torch.autograd.Function):
    """x.gather(2, idx) that saves only the index for backward (autograd's gather keeps all of x
    alive: here, a copy of every head's q, k, v or output per layer)."""

    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return x.gather(2, idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter_add_(2, idx, grad), None


def take(x: Tensor, index: Tensor) -> Tensor:
    """x (B, H, S, D), index (B, L) -> (B, H, L, D): x[b, :, index[b, l]]."""
    B, H, _, D = x.shape
    return _Take.apply(x, index[:, None, :, None].expand(B, H, -1, D))


def imbalance(per_rank: Tensor) -> float:
    """max over ranks of the tokens a rank holds (summed over rows) / their mean: 1.0 = balanced."""
    tot = per_rank.sum(0).float()
    return float(tot.max() / tot.mean().clamp(min=1e-9))
