"""Periodic validation during training: what SUBLLM's selection rule costs and how well it is learnt.

On the same validation windows, two forwards:

1. EVAL mode (the causal inference rule, keep t iff score > theta; docs/method.md section 3): the
   validation loss, bits per byte (tokens -> bytes from the shards' metadata) and the realised
   keep fraction of every S.
2. TRAIN mode under torch.no_grad (global top-k, section 2): top-k lets future scores decide what
   is kept, so this loss can be lower than the eval-mode one; `leak_gap` = eval-mode loss minus
   train-mode loss measures that leak. It is reported, not hidden. This forward also gives the
   train/infer selection agreement (share of real tokens where top-k and score > theta agree). It
   runs from a fixed RNG seed, and the RNG state is saved and restored around it, so evaluating
   never perturbs the training randomness (a resumed run stays bit-identical).

Under DDP/FSDP every rank evaluates its share of the batches and the sums are all-reduced; every
rank runs the same number of forwards (a rank short of batches repeats one with weight 0), as
FSDP's collectives require.
"""

from __future__ import annotations

import math

import torch

from subllm.trainer.distributed import DistInfo, all_reduce_sum


def load_val_batches(val_dir, batch_size: int, seq_len: int, max_batches: int) -> list[torch.Tensor]:
    """`max_batches` full validation batches (B, T) spread evenly over the validation split (its
    documents are held-out whole works, one after another: the first batches alone would see only
    the first work), the same on every rank."""
    from subllm.data.packing import val_batches

    every = list(val_batches(val_dir, batch_size, seq_len, drop_last=True))
    if len(every) <= max_batches:
        return every
    if max_batches == 1:
        return [every[len(every) // 2]]
    return [every[round(i * (len(every) - 1) / (max_batches - 1))] for i in range(max_batches)]


def _my_batches(batches: list, info: DistInfo) -> list[tuple[torch.Tensor, float]]:
    per_rank = math.ceil(len(batches) / info.world_size)
    out = []
    for i in range(per_rank):
        j = i * info.world_size + info.rank
        out.append((batches[j], 1.0) if j < len(batches) else (batches[0], 0.0))
    return out


def _forward(model, mine, info: DistInfo, autocast):
    """(model output, batch weight, weighted predicted tokens) of each of this rank's batches."""
    for x, w in mine:
        x = x.to(info.device)
        with autocast():
            out = model(x, labels=x, return_selections=True)
        yield out, w, w * x.shape[0] * (x.shape[1] - 1)


@torch.no_grad()
def evaluate(
    model, batches: list, info: DistInfo, step: int, autocast, tokens_per_byte: float | None
) -> dict:
    """Validation metrics of `model` (the module itself, not a DDP wrapper) at training step `step`.

    With subsampling modules, also `selection` (subllm/evals/selection.py: per S keep in both modes,
    agreement, score quantiles, saturation, theta, the Balancer's last push); its score quantiles
    are this rank's, the rest is pooled over ranks."""
    from subllm.evals.selection import SelectionMeter, train_mode_pass

    was_training = model.training
    n_subs = model.config.n_subsamples
    mine = _my_batches(batches, info)
    meter = SelectionMeter(n_subs)
    ev = [0.0, 0.0]  # nll, predicted tokens
    model.eval()
    for out, w, n in _forward(model, mine, info, autocast):
        ev[0] += float(out.lm_loss) * n
        ev[1] += n
        if w:
            meter.add_eval(out.selections)
    result = {"step": step}
    tr = [0.0, 0.0]
    if n_subs:

        def run():
            for out, w, n in _forward(model, mine, info, autocast):
                tr[0] += float(out.lm_loss) * n  # without the auxiliary selection loss
                tr[1] += n
                if w:
                    meter.add_train(out.selections)

        train_mode_pass(model, run)
    sums = all_reduce_sum(ev + tr + meter.sums(), info)
    ev, tr = sums[:2], sums[2:4]
    meter.load_sums(sums[4:])
    if ev[1] > 0:
        loss = ev[0] / ev[1]
        result["val_loss"] = loss
        result["val_tokens"] = int(ev[1])
        if tokens_per_byte:
            result["val_bpb"] = loss / math.log(2) * tokens_per_byte
    if n_subs and ev[1] > 0:
        sel = meter.result(model)
        result["val_loss_train_mode"] = tr[0] / tr[1]
        result["leak_gap"] = result["val_loss"] - result["val_loss_train_mode"]
        result["keep_fractions_eval"] = sel["keep_eval"]
        result["keep_fractions_train"] = sel["keep_train"]
        result["agreement"] = sel["agreement"]
        result["selection"] = sel
    model.train(was_training)
    return result
