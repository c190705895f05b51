"""The sequence-parallel group and the four collectives the sharded forward needs, each an autograd
Function whose backward is written out next to its forward.

- `seq_to_heads` / `heads_to_seq`: Ulysses all-to-all. Before attention every rank holds all heads
  of its own tokens; after `seq_to_heads` it holds 1/N of the heads for every rank's tokens. The
  backward of an all-to-all with equal splits is the reverse all-to-all.
- `gather_level`: all-gather of one float per token (the scores of S). Everything computed from the
  gathered tensor is computed identically on every rank, so its gradient is already the whole
  gradient on every rank: the backward only takes this rank's slice.
- `sum_grad`: identity forward; backward all-reduces (sums) the gradient. For the one tensor that
  is computed identically everywhere but used by each rank for its own tokens only: the weights of
  U (docs/method.md sections 2 and 5).

gloo implements all_to_all_single, all_gather_into_tensor and all_reduce on CPU (checked with torch
2.13); nccl on CUDA. A group of size 1 runs no collective at all (the one-process slow path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from subllm.errors import SubLLMError


@dataclass(frozen=True)
class SeqGroup:
    """This rank's place: `size` ranks share each sequence (a contiguous block of global ranks,
    `group` their process group, None when size is 1), `dp_size` such blocks split the batch."""

    size: int = 1
    rank: int = 0  # within the sequence group: this rank holds shard `rank` of every row
    group: object = None
    dp_rank: int = 0
    dp_size: int = 1
    world: bool = False  # a default process group exists (gradient sync runs over it)


def sequence_groups(n: int) -> SeqGroup:
    """Split the launched world (torchrun) into world / n sequence groups of n consecutive ranks.
    Every rank must call this (new_group is collective)."""
    if n < 1:
        raise SubLLMError(f"--sequence-parallel must be >= 1, got {n}")
    if not (dist.is_available() and dist.is_initialized()):
        if n > 1:
            raise SubLLMError(
                f"--sequence-parallel {n} needs torchrun with a multiple of {n} processes "
                f"(torchrun --nproc_per_node {n} -m subllm train ...)"
            )
        return SeqGroup()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % n:
        raise SubLLMError(f"--sequence-parallel {n} does not divide the {world} processes of torchrun")
    group = None
    for g in range(world // n):  # every rank creates every group, in the same order
        ranks = list(range(g * n, (g + 1) * n))
        pg = dist.new_group(ranks) if n > 1 else None
        if rank in ranks:
            group = pg
    return SeqGroup(n, rank % n, group, rank // n, world // n, world > 1)


class _AllToAll(torch.autograd.Function):
    """x (N, ...) contiguous: slice j goes to rank j; out[i] came from rank i."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: Tensor, group) -> Tensor:
    x = x.contiguous()  # a gradient may arrive strided: empty_like would copy its strides
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x, group=group)
    return out


def _a2a(x: Tensor, g: SeqGroup) -> Tensor:
    return x if g.size == 1 else _AllToAll.apply(x, g.group)


def seq_to_heads(x: Tensor, g: SeqGroup) -> Tensor:
    """x (B, N, h, M, hd): this rank's M tokens, its heads grouped by the rank that will own them
    -> (B, h, N * M, hd): the h heads this rank owns for all ranks' tokens, rank-major."""
    B, N, h, M, hd = x.shape
    y = _a2a(x.transpose(0, 1).contiguous(), g)  # (N, B, h, M, hd): y[i] = rank i's tokens
    return y.permute(1, 2, 0, 3, 4).reshape(B, h, N * M, hd)


def heads_to_seq(x: Tensor, g: SeqGroup) -> Tensor:
    """The inverse: x (B, h, N * M, hd) -> (B, N * h, M, hd), all heads of this rank's tokens."""
    B, h, NM, hd = x.shape
    N = g.size
    y = x.view(B, h, N, NM // N, hd).permute(2, 0, 1, 3, 4).contiguous()  # (N, B, h, M, hd)
    y = _a2a(y, g)  # y[i] = heads of rank i's group for this rank's tokens
    return y.transpose(0, 1).reshape(B, N * h, NM // N, hd)


class _GatherLevel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, rank: int, size: int) -> Tensor:
        ctx.rank, ctx.m = rank, x.shape[1]
        out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)  # ranks stacked along dim 0
        return out.view(size, *x.shape).transpose(0, 1).reshape(x.shape[0], size * x.shape[1], *x.shape[2:])

    @staticmethod
    def backward(ctx, grad: Tensor):
        # the gathered tensor feeds identical computations on every rank: grad is already whole
        return grad[:, ctx.rank * ctx.m : (ctx.rank + 1) * ctx.m], None, None, None


def gather_level(x: Tensor, g: SeqGroup) -> Tensor:
    """x (B, M, ...) of every rank -> (B, N * M, ...), rank-major, on every rank."""
    return x if g.size == 1 else _GatherLevel.apply(x, g.group, g.rank, g.size)


class _SumGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, scale: float) -> Tensor:
        ctx.group, ctx.scale = group, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return (grad if ctx.scale == 1.0 else grad * ctx.scale), None, None


def sum_grad(x: Tensor, g: SeqGroup) -> Tensor:
    """Identity; in backward every rank gets the sum of the ranks' gradients."""
    return x if g.size == 1 else _SumGrad.apply(x, g.group, 1.0)


def mean_grad(x: Tensor, g: SeqGroup) -> Tensor:
    """Identity; in backward every rank gets the mean of the ranks' gradients. For a replicated
    tensor whose backward acts on the SIGN of its whole gradient (the bypass limiter of
    docs/method.md section 5): it then sees the whole gradient's sign, and the N equal shares still
    add up to the whole in `sync_grads`."""
    return x if g.size == 1 else _SumGrad.apply(x, g.group, 1.0 / g.size)


def all_reduce_value(x: Tensor, g: SeqGroup) -> Tensor:
    """The sum over the sequence group of a detached tensor (no gradient)."""
    if g.size == 1:
        return x.detach()
    y = x.detach().clone()
    dist.all_reduce(y, group=g.group)
    return y


@torch.no_grad()
def sync_grads(params, g: SeqGroup) -> None:
    """After backward (and accumulation): each rank holds its tokens' share of every gradient;
    the model's gradient is their sum over the sequence group, averaged over the data-parallel
    groups (as DDP averages) - one all-reduce over the whole world of one flat buffer.
    A parameter without a gradient on this rank takes part with zeros (every rank sends the same
    layout); a frozen one (requires_grad False) is skipped everywhere."""
    if not g.world:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    if g.dp_size > 1:
        flat /= g.dp_size
    i = 0
    for p in params:
        n = p.numel()
        chunk = flat[i : i + n].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        i += n
