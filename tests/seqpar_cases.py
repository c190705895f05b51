"""The cases of tests/test_seqpar.py: one tiny model and batch per case, built the same way by the
gloo workers (sequence-parallel) and by the test itself (one process, the reference)."""

import os

import torch

from subllm import ModelConfig, SubLLM
from subllm.trainer.pose import pose_position_ids

SEED, STEP, T, B = 0, 3, 32, 2
VOCAB = 97
ATTENTIONS = ("ulysses", "ring")

CASES = {
    # the default ("aligned") selection: auxiliary BCE, counted Balancer, calibrated threshold;
    # nested S, one left-padded row (ragged keep counts), GQA with 2 kv heads
    "nested_padded": dict(structure="TT(T(TT)T)T", pad=5),
    # the paper's rule (Gaussian Balancer, no auxiliary loss), 3 levels, 1 kv head (repeated over
    # ranks), a pinned first token, the Balancer's "weight" gate, activation checkpointing, PoSE
    "deep_pose_ckpt": dict(
        structure="T(T(T(T)T)T)T",
        n_kv_heads=1,
        keep_first=1,
        selection="paper",
        balancer_gate="weight",
        checkpointing=True,
        pose=4 * T,
        score_scale=300.0,
    ),  # fmt: skip
}


def build(case: str):
    """(model in training mode at step STEP, input_ids, attention_mask, position_ids, checkpointing)."""
    c = dict(CASES[case])
    pad, pose, ckpt = c.pop("pad", 0), c.pop("pose", None), c.pop("checkpointing", False)
    selection, scale = c.pop("selection", None), c.pop("score_scale", 1.0)
    base = dict(
        vocab_size=VOCAB, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=4 * T, keep_ratio=0.6
    )
    cfg = ModelConfig(**{**base, **c})
    if selection:
        cfg = cfg.with_selection(selection).replace(**{k: v for k, v in c.items() if k == "balancer_gate"})
    torch.manual_seed(SEED)
    model = SubLLM(cfg).train()
    with torch.no_grad():  # scores of O(1) under the paper's init: a real mix inside (0, 1)
        for sub in model.subsamples:
            sub.score.weight.mul_(scale)
    model.set_step(STEP)
    model.activation_checkpointing = ckpt
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :pad] = 0
    pos = pose_position_ids(B, T, pose, g) if pose else None
    return model, ids, mask if pad else None, pos


def record(out, model) -> dict:
    """What is compared: loss, every gradient, every selection, the buffers S updates."""
    sels = [
        {"idx": s.idx, "valid": s.valid, "weight": s.weight.detach(), "n_kept": s.n_kept}
        for s in out.selections
    ]
    return {
        "loss": out.loss.detach(),
        "lm_loss": out.lm_loss.detach(),
        "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
        "sels": sels,
        "buffers": {k: b.clone() for k, b in model.named_buffers() if "threshold" in k},
        "logits": out.logits.detach(),
    }


def worker(rank: int, world: int, port: int, out_dir: str, sizes: tuple) -> None:
    """One gloo rank: every case sequence-parallel over groups of `sp` ranks, for each sp in
    `sizes`, with each attention; each rank saves its record (its logits shard; gradients
    synchronised, so every rank holds the whole) as CASE-SP-ATTENTION-RANK.pt."""
    import torch.distributed as dist

    from subllm.seqpar import sequence_groups, sp_forward, sync_grads

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        groups = {sp: sequence_groups(sp) for sp in sizes}  # collective: every rank, same order
        for sp, case, att in [(sp, case, att) for sp in sizes for case in CASES for att in ATTENTIONS]:
            g = groups[sp]
            model, ids, mask, pos = build(case)
            if g.dp_size > 1:  # data parallel over the rest: group d takes row d of the batch
                rows = slice(g.dp_rank, g.dp_rank + 1)
                ids, mask = ids[rows], None if mask is None else mask[rows]
                pos = None if pos is None else pos[rows]
            torch.manual_seed(SEED + 2)  # the model's draws: the same on every rank and in the reference
            out = sp_forward(model, ids, g, mask, ids, pos, return_selections=True, attention=att)
            out.loss.backward()
            sync_grads(model.parameters(), g)
            rec = record(out, model)
            rec["imbalance"] = out.imbalance
            torch.save(rec, os.path.join(out_dir, f"{case}-{sp}-{att}-{rank}.pt"))
    finally:
        dist.destroy_process_group()
