"""Issue 10 item 2: one training step (forward + backward) of an unpadded batch makes no host
synchronisation inside the model - every count comes from shapes, every random decision and every
statistic stays a tensor. Counted: Tensor.item / tolist / cpu / numpy and int() / float() / bool()
/ index use of a tensor. A padded batch syncs once per S (the ragged count), and only that."""

import contextlib

import pytest
import torch
from helpers import tiny_config

from subllm import SubLLM

CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_syncs():
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def wrap(name, fn):
        def counted(self, *a, **k):
            calls.append(name)
            return fn(self, *a, **k)

        return counted

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("recipe", ["paper", "aligned"])
def test_training_step_makes_no_host_sync(recipe):
    cfg = tiny_config(balancer_steps=10, bypass_steps=10).with_selection(recipe)
    model = SubLLM(cfg).train()
    x = torch.randint(3, 97, (2, 40))
    for step in (0, 5, 20):  # Balancer always on, sometimes on, rarely on
        model.set_step(step)
        with count_syncs() as calls:
            out = model(x, labels=x)
            out.loss.backward()
        assert calls == [], (step, calls)
        assert out.keep_fractions.shape == (2,) and out.agreement.shape == (2,)  # tensors, for the logger


def test_padded_batch_syncs_once_per_subsampling_module():
    model = SubLLM(tiny_config(balancer_steps=10, bypass_steps=10)).train()
    model.set_step(0)
    x = torch.randint(3, 97, (2, 40))
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    with count_syncs() as calls:
        model(x, attention_mask=mask, labels=x).loss.backward()
    # SubLLM.forward asks whether the mask pads anything; each S then reads its ragged count
    assert 0 < len(calls) <= 1 + model.config.n_subsamples, calls
