"""Tiny seeded training runs reproduce the stored loss curves (catches silent maths changes): the
paper's rule with AdamW, and the default selection with ScaledAdam + Eden (0.5x score lr)."""

import json

import pytest
from golden_curve import GOLDEN, GOLDEN_ALIGNED, run_curve


@pytest.mark.parametrize(
    "path,recipe,optimizer", [(GOLDEN, "paper", "adamw"), (GOLDEN_ALIGNED, "aligned", "scaled_adam")]
)
def test_golden_loss_curve(path, recipe, optimizer):
    want = json.loads(path.read_text())["losses"]
    got = run_curve(len(want), recipe, optimizer)
    diffs = [abs(a - b) for a, b in zip(got, want)]
    assert max(diffs) < 2e-4, list(zip(got, want))
    assert got[-1] < got[0] - 0.05  # and it does learn
