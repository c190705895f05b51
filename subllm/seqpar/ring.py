"""Ring attention: the alternative to Ulysses (`--sp-attention ring`, forward.py). Every rank keeps
all heads of its own slots; the k and v blocks travel around the ring of the sequence group (rank
r sends to r + 1 and receives from r - 1, N - 1 times), and each rank merges the attention of its
queries over every block it receives by their log-sum-exp (online softmax).

Which keys a query sees is one process's mask (`attention_mask_for`) over the level's slots, in
one process's order: every slot carries its one-process index (`Placement.inv`; L at padding
slots) and validity, and query a sees key b when b is real and (b <= a and b is valid, or b == a).
Shards are contiguous and kept tokens stay in order, so a block from a higher rank holds only
later tokens and is skipped (it still travels: the ranks after it need it). Causal contiguous
shards leave the work unbalanced - rank r attends over r + 1 blocks - which a zigzag layout would
fix (not done: the layout is shared with Ulysses and with SUBLLM's inner levels).

Backward (written out, as flash attention's): the ring runs again with (k, v) plus the gradient
accumulators (dk, dv) of the block, which come home to their rank after one last pass. A block's
gradients need only the final output and log-sum-exp, saved by forward; the blocks themselves are
not saved (memory O(this rank's slots)). GQA: the blocks travel with their n_kv_heads heads, and
are repeated to n_heads only to compute.

Per block, on CPU: torch's flash attention kernels (`_scaled_dot_product_flash_attention_for_cpu`
and its backward, which return and take the log-sum-exp); elsewhere, or with `math=True`, the
plain softmax (the slow reference the tests compare with). Masks are additive (-1e9 instead of
-inf): a query whose block holds no key it may see gets a finite output of zero weight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

NEG = -1e9  # the additive mask of a hidden key (finite: fully hidden rows stay finite)


def _repeat(x: Tensor, rep: int) -> Tensor:
    return x if rep == 1 else x.repeat_interleave(rep, 1)


def _unrepeat(x: Tensor, rep: int) -> Tensor:
    """The gradient of `_repeat`: (B, H, S, hd) -> (B, H / rep, S, hd)."""
    return x if rep == 1 else x.unflatten(1, (-1, rep)).sum(2)


def block_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, math_: bool = False):
    """q (B, H, Sq, hd), k and v (B, H, Sk, hd), bias (B, 1, Sq, Sk) additive or None, causal: key j
    hidden from query i when j > i -> o (B, H, Sq, hd), lse (B, H, Sq) float32."""
    if q.device.type == "cpu" and not math_:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=None if bias is None else bias.to(q.dtype)
        )
        return o, lse.to(_acc(q))
    s = _scores(q, k, bias, causal)
    lse = torch.logsumexp(s, -1)
    o = (torch.exp(s - lse[..., None]) @ v.to(s.dtype)).to(q.dtype)
    return o, lse


def block_backward(do, q, k, v, o, lse, bias, causal: bool, math_: bool = False):
    """The block's share of the gradients, given the FINAL output o and log-sum-exp lse of q (over
    all blocks) -> dq, dk, dv (the shapes of q, k, v)."""
    if q.device.type == "cpu" and not math_:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, attn_mask=None if bias is None else bias.to(q.dtype)
        )
    scale = q.shape[-1] ** -0.5
    f = _acc(q)
    p = torch.exp(_scores(q, k, bias, causal) - lse[..., None])  # (B, H, Sq, Sk)
    do, o = do.to(f), o.to(f)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ v.to(f).transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    dq = (ds @ k.to(f)) * scale
    dk = (ds.transpose(-1, -2) @ q.to(f)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _acc(x: Tensor) -> torch.dtype:
    """The dtype softmax statistics are kept in: float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _scores(q: Tensor, k: Tensor, bias: Tensor | None, causal: bool) -> Tensor:
    f = _acc(q)
    s = (q.to(f) @ k.to(f).transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    if causal:
        Sq, Sk = s.shape[-2:]
        hidden = torch.ones(Sq, Sk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(hidden, NEG)
    return s


class Ring:
    """One level's ring: for every rank's slots, their one-process index and whether they are real
    (held, not padding) and valid. `inv` (B, N * M): one-process slot of each gathered slot, L at
    padding slots; `valid` (B, L) the one-process level's validity or None (all valid)."""

    def __init__(self, inv: Tensor, valid: Tensor | None, L: int, m: int, group, rank: int, size: int):
        self.m, self.group, self.rank, self.size = m, group, rank, size
        self.index = inv
        self.real = inv < L  # (B, N M)
        self.ok = self.real if valid is None else self.real & valid.gather(1, inv.clamp(max=L - 1))
        counts = self.real.view(inv.shape[0], size, m).sum(2)  # (B, N)
        # slots of rank s worth computing: up to the last real one of any row (padding is at the end)
        self.n = [max(int(c), 1) for c in counts.max(0).values]
        if size > 1:
            self.peers = [dist.get_global_rank(group, (rank + d) % size) for d in (1, -1)]

    def local_real(self) -> Tensor:
        """(B, M) this rank's real slots."""
        return self.real[:, self.rank * self.m : (self.rank + 1) * self.m]

    def span(self, s: int, n: int) -> slice:
        return slice(s * self.m, s * self.m + n)

    def bias(self, r: int, s: int) -> tuple[Tensor | None, bool]:
        """The mask of rank r's queries over rank s's keys (s <= r) -> (bias or None, causal)."""
        qs, ks = self.span(r, self.n[r]), self.span(s, self.n[s])
        ok = self.ok[:, ks]  # (B, Sk)
        plain = bool(ok.all()) and (s < r or bool(self.real[:, qs].all()))
        if plain:  # every key real and valid; on the diagonal also every query real: plain causal
            return None, s == r
        a, b = self.index[:, qs, None], self.index[:, None, ks]  # (B, Sq, 1), (B, 1, Sk)
        see = (ok[:, None, :] & (b <= a)) | ((b == a) & self.real[:, None, ks])
        zero = torch.zeros((), dtype=torch.float32, device=see.device)
        return torch.where(see, zero, NEG)[:, None], False

    def shift(self, tensors: list[Tensor]) -> tuple[list[Tensor], list]:
        """Start sending `tensors` to rank + 1 and receiving their like from rank - 1 -> (the
        receive buffers, the works to wait on)."""
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.peers[0], self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.peers[1], self.group) for t in recv]
        return recv, dist.batch_isend_irecv(ops)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ring: Ring, math_: bool) -> Tensor:
        rep = q.shape[1] // k.shape[1]
        r, N = ring.rank, ring.size
        nq = ring.n[r]
        qr = q[:, :, :nq]
        o = torch.zeros(qr.shape, dtype=_acc(q), device=q.device)
        lse = torch.full(qr.shape[:-1], float("-inf"), dtype=_acc(q), device=q.device)
        mine = kv = torch.stack([k, v])  # (2, B, Hkv, M, hd): the travelling block
        for t in range(N):
            s = (r - t) % N  # the rank whose block this rank holds now
            nxt, works = ring.shift([kv]) if t < N - 1 else (None, [])
            if s <= r:  # later ranks' blocks hold only later tokens
                ns = ring.n[s]
                bias, causal = ring.bias(r, s)
                kb, vb = (_repeat(x[:, :, :ns], rep) for x in kv)
                ob, lb = block_forward(qr, kb, vb, bias, causal, math_)
                new = torch.logaddexp(lse, lb)
                o = o * torch.exp(lse - new)[..., None] + ob.to(o.dtype) * torch.exp(lb - new)[..., None]
                lse = new
            for w in works:
                w.wait()
            kv = nxt[0] if nxt else kv
        o = o.to(q.dtype)
        # the stacked copy of k and v, not k and v: v is a view of the whole qkv projection's output
        ctx.save_for_backward(q, mine, o, lse)
        ctx.ring, ctx.math_ = ring, math_
        return torch.nn.functional.pad(o, (0, 0, 0, q.shape[2] - nq))  # slots past nq: padding

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, kv, o, lse = ctx.saved_tensors
        ring, math_ = ctx.ring, ctx.math_
        rep = q.shape[1] // kv.shape[2]
        r, N = ring.rank, ring.size
        nq = ring.n[r]
        qr, do = q[:, :, :nq], grad[:, :, :nq].contiguous()
        dq = torch.zeros(qr.shape, dtype=_acc(q), device=q.device)
        dkv = torch.zeros(kv.shape, dtype=_acc(q), device=kv.device)  # travels with its block
        for t in range(N):
            s = (r - t) % N
            nxt, works = ring.shift([kv]) if t < N - 1 else (None, [])
            if s <= r:
                ns = ring.n[s]
                bias, causal = ring.bias(r, s)
                kb, vb = (_repeat(x[:, :, :ns], rep) for x in kv)
                gq, gk, gv = block_backward(do, qr, kb, vb, o, lse, bias, causal, math_)
                dq += gq
                dkv[0, :, :, :ns] += _unrepeat(gk.to(dkv.dtype), rep)
                dkv[1, :, :, :ns] += _unrepeat(gv.to(dkv.dtype), rep)
            if N > 1:  # the accumulators follow their block; after N passes they are home
                (dkv,), more = ring.shift([dkv])
                works = works + more
            for w in works:
                w.wait()
            kv = nxt[0] if nxt else kv
        dq = torch.nn.functional.pad(dq, (0, 0, 0, q.shape[2] - nq))
        return dq.to(q.dtype), dkv[0].to(kv.dtype), dkv[1].to(kv.dtype), None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, ring: Ring, math_: bool = False) -> Tensor:
    """q (B, H, M, hd), k and v (B, Hkv, M, hd): this rank's slots -> o (B, H, M, hd), one process's
    attention of this rank's queries (0 at padding slots past every row's real ones)."""
    return _RingAttention.apply(q, k, v, ring, math_)
