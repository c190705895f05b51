"""The sequence-parallel training forward of a SubLLM: equal to `SubLLM.forward` in training mode,
with each rank computing 1/N of every row (docs/method.md sections 2-6; the layout: layout.py).

- Embedding, RMSNorm, SwiGLU, score layers, U and B, the head and the loss: on this rank's tokens.
- Attention: Ulysses (default) or ring (`attention="ring"`, ring.py). Ulysses: q, k, v of this
  rank's tokens are exchanged (one all-to-all) for 1/N of the heads of every token; each rank
  attends over the whole level with one process's mask, then the outputs go back (a second
  all-to-all). GQA: each rank needs the kv heads of its query heads; when
  n_kv_heads is not a multiple of N, every kv head is repeated N / gcd(n_kv_heads, N) times first
  (n_kv_heads = 2, N = 4: each kv head twice) - more traffic for k and v, nothing else changes.
  n_heads must be a multiple of N. Ring: every rank keeps all heads of its own slots; the k, v
  blocks travel around the group and the partial attentions merge by log-sum-exp (any n_heads).
- S: each rank scores its tokens; the scores (one float per token) are all-gathered, and every rank
  runs one process's selection (`select_topk`: top-k, subtraction trick, Balancer statistics,
  auxiliary loss, threshold calibration) on the whole level - identical on every rank.
- Inner levels: a rank keeps the kept tokens of its own shard (no rebalancing), padded to the
  largest count of any rank.
- RoPE: every token carries its original position (position_ids / PoSE included).

The model itself knows nothing of this: its modules are called from here (as `SubLLM._run` calls
them) and S takes a `shard` hook. Parameters stay replicated; `comm.sync_grads` sums their
gradients over the sequence group after backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from subllm.config import Sub
from subllm.errors import SubLLMError
from subllm.model.layers import rope_cos_sin
from subllm.model.rope import is_dynamic
from subllm.model.subllm import SubLLMOutput, _agreement, _keep_fractions
from subllm.model.subsample import Selection, gather_tokens, upsample_bypass
from subllm.seqpar import layout
from subllm.seqpar.comm import (
    SeqGroup,
    all_reduce_value,
    gather_level,
    heads_to_seq,
    mean_grad,
    seq_to_heads,
    sum_grad,
)
from subllm.seqpar.ring import Ring, ring_attention


@dataclass
class Level:
    place: layout.Placement
    cos: Tensor  # (B, M, head_dim) this rank's slots
    sin: Tensor
    seq_len: Tensor | None
    ring: Ring | None = None  # the level's ring (ring attention only)


class _Shard:
    """The `shard` hook of Subsample.train_select for one level."""

    def __init__(self, place: layout.Placement, g: SeqGroup):
        self.place, self.g = place, g

    def scores(self, s: Tensor) -> Tensor:  # (B, M) this rank's -> (B, L) the level's, in order
        return gather_level(s, self.g).gather(1, self.place.order)

    def weights(self, w: Tensor) -> Tensor:
        return sum_grad(w, self.g)


ATTENTIONS = ("ulysses", "ring")


def check_supported(model, n: int, seq_len: int | None = None, attention: str = "ulysses") -> None:
    """One-line errors for what the sharded forward does not do."""
    c = model.config
    if attention not in ATTENTIONS:
        raise SubLLMError(f"--sp-attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention == "ulysses" and c.n_heads % n:
        raise SubLLMError(
            f"--sequence-parallel {n} must divide n_heads ({c.n_heads}): Ulysses splits heads over "
            "ranks (--sp-attention ring does not)"
        )
    if any(c.mod_flags):
        raise SubLLMError("--sequence-parallel does not support `M` (MoD router) layers")
    if seq_len is not None and seq_len % n:
        raise SubLLMError(f"--seq-len {seq_len} is not divisible by --sequence-parallel {n}")


def kv_repeat(n_kv_heads: int, n: int) -> int:
    """How often each kv head is repeated so that n ranks can each take whole kv heads."""
    return n // math.gcd(n_kv_heads, n)


def sp_forward(
    model,
    input_ids: Tensor,
    g: SeqGroup,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    position_ids: Tensor | None = None,
    return_selections: bool = False,
    attention: str = "ulysses",
) -> SubLLMOutput:
    """`model(input_ids, attention_mask, labels, position_ids)` in training mode, this rank's part.
    Every rank of the group passes the WHOLE batch (B, T) (ids are cheap; each rank embeds its
    shard). Returns: `logits` (B, T / N, V) of this rank's shard; `loss` and `lm_loss` hold one
    process's value on every rank, while their gradient is this rank's share (so `loss.backward()`
    then `comm.sync_grads` gives one process's gradient); selections in one process's level
    coordinates; `imbalance` (attribute of the output): per S, max/mean tokens per rank.
    `attention`: "ulysses" (all-to-all of heads) or "ring" (k, v blocks around the group)."""
    if not model.training:
        raise SubLLMError("the sequence-parallel forward is for training mode (evaluate unsharded)")
    B, T = input_ids.shape
    n = g.size
    check_supported(model, n, T, attention)
    c = model.config
    if T > c.max_seq_len:
        raise SubLLMError(f"sequence length {T} exceeds max_seq_len {c.max_seq_len}")
    if c.n_subsamples and not model._has_step:
        raise SubLLMError("training-mode forward before model.set_step(step) (docs/method.md section 7)")
    valid = None
    if attention_mask is not None:
        valid = attention_mask.bool()
        valid = None if bool(valid.all()) else valid
    if position_ids is not None:
        pos = position_ids.long()
    elif valid is None:
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
    else:
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    seq_len = None
    if is_dynamic(c.rope_scaling):
        seq_len = (pos if valid is None else pos.masked_fill(~valid, 0)).amax(1) + 1
    m = T // n
    lo, hi = g.rank * m, (g.rank + 1) * m
    sels: list[Selection | None] = [None] * c.n_subsamples
    stats: list[float | None] = [None] * c.n_subsamples
    run = _Runner(model, g, sels, stats, attention == "ring")
    x = model.embed(input_ids[:, lo:hi])  # (B, M, C)
    x = run.nodes(model.tree, x, run.level(layout.root(pos, valid, n, g.rank), seq_len))
    logits = model.head(model.norm(x))  # (B, M, V)
    loss = lm_loss = None
    if labels is not None:
        if valid is not None:
            labels = labels.masked_fill(~valid, -100)
        target = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): the label of each position
        count = (target != -100).sum().clamp(min=1)
        local = (
            F.cross_entropy(
                logits.flatten(0, 1).float(), target[:, lo:hi].flatten(), ignore_index=-100, reduction="sum"
            )
            / count
        )
        whole = all_reduce_value(local, g)
        loss = lm_loss = local + (whole - local.detach())  # one process's value, this rank's gradient
    aux = [s.select_loss for s in sels if s is not None and s.select_loss is not None]
    select_loss = c.select_loss * torch.stack(aux).sum() if aux else None
    if loss is not None and select_loss is not None:
        loss = loss + select_loss  # computed whole on every rank; `_Shard` keeps its gradient single
    out = SubLLMOutput(
        logits=logits,
        loss=loss,
        lm_loss=lm_loss,
        select_loss=select_loss,
        keep_fractions=_keep_fractions(sels),
        agreement=_agreement(sels),
        selections=sels if return_selections else None,
    )
    out.imbalance = stats
    return out


class _Runner:
    """`SubLLM._run` over sharded levels."""

    def __init__(self, model, g: SeqGroup, sels: list, stats: list, ring: bool = False):
        self.model, self.g, self.sels, self.stats, self.ring = model, g, sels, stats, ring
        c = model.config
        self.rep = kv_repeat(c.n_kv_heads, g.size) if c.n_kv_heads % g.size else 1

    def level(self, place: layout.Placement, seq_len: Tensor | None) -> Level:
        c = self.model.config
        cos, sin = rope_cos_sin(place.local_pos, c.head_dim, c.rope_theta, c.rope_scaling, seq_len)
        g, ring = self.g, None
        if self.ring:
            ring = Ring(place.inv, place.valid, place.length, place.m, g.group, g.rank, g.size)
        return Level(place, cos, sin, seq_len, ring)

    def nodes(self, nodes: tuple, x: Tensor, lvl: Level) -> Tensor:
        for node in nodes:
            x = self.subsample(node, x, lvl) if isinstance(node, Sub) else self.layer(node, x, lvl)
        return x

    def layer(self, i: int, x: Tensor, lvl: Level) -> Tensor:
        block = self.model.layers[i]
        if self.model.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.block, block, x, lvl, use_reentrant=False)
        return self.block(block, x, lvl)

    def block(self, block, x: Tensor, lvl: Level) -> Tensor:
        """Block.forward with sharded attention."""
        x = x + self.attention(block.attn, block.attn_norm(x), lvl)
        return x + block.ffn(block.ffn_norm(x))

    def attention(self, attn, x: Tensor, lvl: Level) -> Tensor:
        """x (B, M, C) this rank's slots -> attention output (B, M, C)."""
        if lvl.ring is not None:
            return self.ring_attention(attn, x, lvl)
        B, M, _ = x.shape
        n, p = self.g.size, lvl.place
        q, k, v = attn.qkv(x, lvl.cos, lvl.sin)  # (B, H, M, hd), (B, Hkv, M, hd)
        if self.rep > 1:
            k, v = k.repeat_interleave(self.rep, 1), v.repeat_interleave(self.rep, 1)
        hq, hk = q.shape[1] // n, k.shape[1] // n
        qkv = torch.cat([t.unflatten(1, (n, -1)) for t in (q, k, v)], 2)  # (B, N, hq + 2 hk, M, hd)
        qkv = seq_to_heads(qkv, self.g)  # (B, hq + 2 hk, N M, hd): my heads, every rank's slots
        hd = qkv.shape[-1]
        if not p.identity:  # level 0 is in one process's order already
            qkv = layout.take(qkv, p.order)  # (B, hq + 2 hk, L, hd) one process's order
        q, k, v = qkv.split([hq, hk, hk], 1)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=hq != hk
        )  # (B, hq, L, hd)
        if not p.identity:
            o = torch.cat([o, o.new_zeros(B, hq, 1, hd)], 2)  # slot L: what padding slots receive
            o = layout.take(o, p.inv)  # (B, hq, N M, hd)
        o = heads_to_seq(o, self.g)  # (B, H, M, hd)
        return attn.wo(o.transpose(1, 2).reshape(B, M, -1))

    def ring_attention(self, attn, x: Tensor, lvl: Level) -> Tensor:
        """The same with ring attention: every head of this rank's slots, no relayout."""
        B, M, _ = x.shape
        q, k, v = attn.qkv(x, lvl.cos, lvl.sin)  # (B, H, M, hd), (B, Hkv, M, hd)
        o = ring_attention(q, k, v, lvl.ring)  # (B, H, M, hd)
        o = o * lvl.ring.local_real()[:, None, :, None].to(o.dtype)  # padding slots: 0, as Ulysses'
        return attn.wo(o.transpose(1, 2).reshape(B, M, -1))

    def subsample(self, node: Sub, x: Tensor, lvl: Level) -> Tensor:
        model, g, p = self.model, self.g, lvl.place
        ratio = None
        if model.config.keep_anneal_steps > 0:
            ratio = model.config.keep_ratios_at(model._step)[node.index]
        sub = model.subsamples[node.index]
        ratio = sub.keep_ratio if ratio is None else ratio
        sel = sub.train_select(x, p.valid, model.step_tensor, ratio, sub.pin_mask(p.pos), shard=_Shard(p, g))
        self.sels[node.index] = sel
        if sel.k == 0:
            return x
        place, src, slot = layout.child(p, sel.idx, sel.valid, g.size, g.rank)
        self.stats[node.index] = layout.imbalance(place.per_rank)
        held = slot < sel.k
        w = torch.cat([sel.weight, sel.weight.new_zeros(sel.weight.shape[0], 1)], 1).gather(1, slot)
        w = w * held  # (B, M') this rank's kept tokens' weights, 0 at padding slots
        xg = gather_tokens(x, src)  # (B, M', C)
        h = self.nodes(node.children, xg, self.level(place, lvl.seq_len))
        # the limiter flips the gradient by its sign: it must see the whole gradient, not this rank's
        b = mean_grad(model.bypasses[node.index].scale_value(model.step_tensor), g)
        return upsample_bypass(x, xg, h, src, w, b)
