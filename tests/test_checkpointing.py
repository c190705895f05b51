"""Activation checkpointing (`subllm train --checkpointing`): per-layer recomputation gives the
plain path's loss and gradients exactly, really recomputes, saves fewer activation bytes, and the
trainer's flag switches it on."""

import torch
from helpers import tiny_model

from subllm.bench.train import activation_bytes
from subllm.model.layers import SwiGLU


def _loss_and_grads(model, ids, checkpointing):
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same Balancer / flip coins on both paths
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_gives_equal_gradients_and_recomputes(monkeypatch):
    model = tiny_model().train()
    model.set_step(2)
    ids = torch.randint(3, 97, (2, 40))
    calls = []
    ffn = SwiGLU.forward  # counted at the class: module hooks do not fire during the recomputation
    monkeypatch.setattr(SwiGLU, "forward", lambda self, x: calls.append(1) or ffn(self, x))
    loss_a, grads_a = _loss_and_grads(model, ids, False)
    plain_calls = len(calls)
    loss_b, grads_b = _loss_and_grads(model, ids, True)
    assert plain_calls == 7 and len(calls) - plain_calls == 2 * plain_calls  # every layer again in backward
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(model.parameters()))
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n
    with torch.no_grad():  # eval and no-grad forwards never checkpoint
        model.eval()
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_checkpointing_saves_fewer_activation_bytes():
    model = tiny_model(dim=64, n_heads=4, ffn_dim=256).train()
    model.set_step(0)
    ids = torch.randint(3, 97, (2, 128))
    sizes = {}
    for flag in (False, True):
        model.activation_checkpointing = flag
        sizes[flag] = activation_bytes(lambda: model(ids, labels=ids).loss)
    assert sizes[True] < 0.5 * sizes[False], sizes


def test_train_flag_gives_the_same_run(tmp_path):
    """`--checkpointing` in the trainer: the same losses, bit for bit, as the plain run."""
    from helpers import WORDS, pack_synthetic

    from subllm.trainer.config import build_config
    from subllm.trainer.loop import train
    from subllm.trainer.metrics import read_metrics

    data = pack_synthetic(tmp_path / "data", WORDS, seed=0, n_train=400)
    losses = []
    for flag in ("false", "true"):
        out = tmp_path / f"run-{flag}"
        cfg = build_config(dict(preset="subllm-tiny", data=str(data), steps=3, batch_size=2, seq_len=32,
                                eval_every=0, eval_batches=1, save_every=0, out=str(out), threads=1,
                                progress=False, checkpointing=flag))  # fmt: skip
        train(cfg, log=lambda *a, **k: None)
        losses.append([r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"])
    assert len(losses[0]) == 3 and losses[0] == losses[1]
