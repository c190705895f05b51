"""After a NaN the trainer advises resuming with a lower --lr; `--resume --lr X` is accepted, the
new lr applies from the resumed step (every group scaled, ratios kept), and the change is
recorded in metrics.jsonl and carried by later checkpoints. Other trajectory changes stay refused."""

import re
import shlex

import pytest
import torch
from helpers import pack_synthetic

from subllm.cli import main
from subllm.trainer import checkpoint as ckpt
from subllm.trainer.metrics import read_metrics

WORDS = "the a king queen lord lady castle sword crown speak love death night day river sea".split()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_synthetic(tmp_path_factory.mktemp("data"), WORDS, seed=0, n_train=600)


def _args(packed, out):
    return [
        "--preset", "subllm-tiny", "--data", str(packed), "--steps", "8", "--batch-size", "2",
        "--seq-len", "32", "--eval-every", "0", "--save-every", "4", "--optimizer", "adamw", "--lr", "2e-3",
        "--out", str(out), "--threads", "1", "--no-progress",
    ]  # fmt: skip


def _lrs(out):
    return {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}


def test_nan_advice_then_resume_with_new_lr(packed, tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight"
    assert main(["train", *_args(packed, straight)]) == 0
    want = _lrs(straight)

    run = tmp_path / "run"
    real_ce, calls = torch.nn.functional.cross_entropy, [0]

    def nan_at_step_6(*a, **k):  # one loss per step (no eval, no accumulation)
        calls[0] += 1
        loss = real_ce(*a, **k)
        return loss * float("nan") if calls[0] == 6 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_at_step_6)
    capsys.readouterr()
    assert main(["train", *_args(packed, run)]) == 2
    err = capsys.readouterr().err
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real_ce)
    assert "the loss became nan at step 6" in err
    advice = re.search(r"\((subllm train [^;]*);", err).group(1)
    assert advice == f"subllm train --out {run} --resume --lr 0.001"
    assert ckpt.latest_checkpoint(run).name == "step-00000004"

    # follow the advice (plus thread/progress flags that are not part of the trajectory)
    assert main([*shlex.split(advice)[1:], "--threads", "1", "--no-progress"]) == 0
    assert "trajectory change at step 4: lr 0.002 -> 0.001" in capsys.readouterr().out
    got = _lrs(run)
    assert [s for s in got] == list(range(1, 9))
    for s in range(5, 9):  # the schedule is a function of the step: the same factor, half the base
        assert got[s] == pytest.approx(want[s] / 2, rel=1e-12)
    runs = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "run"]
    assert runs[-1]["trajectory_changes"] == [{"step": 4, "lr": {"from": 0.002, "to": 0.001}}]
    final = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert final.step == 8 and final.trainer_state["trajectory_changes"] == runs[-1]["trajectory_changes"]
    groups = final.optimizer_state["param_groups"]
    scales = {g["name"]: g["initial_lr"] for g in groups}
    assert scales["score_decay" if "score_decay" in scales else "score_no_decay"] == pytest.approx(
        0.5 * scales["main_decay"]
    )
    assert scales["main_decay"] == pytest.approx(1e-3)


def test_other_trajectory_changes_still_refused(packed, tmp_path, capsys):
    run = tmp_path / "run"
    args = _args(packed, run)
    args[args.index("--steps") + 1] = "4"
    assert main(["train", *args]) == 0
    rc = main(["train", "--out", str(run), "--resume", "--seed", "7", "--lr", "1e-3", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match this run (seed: 0 -> 7)" in err and "lr" not in err
