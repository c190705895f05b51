"""A tiny seeded training run reproduces the stored loss curve (catches silent maths changes)."""

import json

from golden_curve import GOLDEN, run_curve


def test_golden_loss_curve():
    want = json.loads(GOLDEN.read_text())["losses"]
    got = run_curve(len(want))
    diffs = [abs(a - b) for a, b in zip(got, want)]
    assert max(diffs) < 2e-4, list(zip(got, want))
    assert got[-1] < got[0] - 0.05  # and it does learn
