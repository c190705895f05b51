"""`subllm train --time-limit S`: the run stops after the step at which training passes S seconds,
evaluates and saves there like at its end, records why in summary.json; `--resume` without the
limit then continues the same schedules to the same weights as a run never stopped."""

import json

import pytest
import torch
from helpers import WORDS, pack_synthetic

from subllm.cli import main
from subllm.trainer import checkpoint as ckpt
from subllm.trainer.metrics import read_metrics


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_synthetic(tmp_path_factory.mktemp("data"), WORDS, seed=0, n_train=600)


def _args(packed, out):
    flags = dict(preset="subllm-tiny", data=packed, steps=6, batch_size=2, seq_len=32, eval_every=0,
                 eval_batches=1, save_every=0, optimizer="adamw", lr=2e-3, out=out, threads=1)  # fmt: skip
    return [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))] + ["--no-progress"]


def test_time_limit_stops_saves_and_resumes_exactly(packed, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert main(["train", *_args(packed, straight)]) == 0
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 6 and "stopped" not in summary

    run = tmp_path / "run"
    assert main(["train", *_args(packed, run), "--time-limit", "0"]) == 0  # over after the first step
    assert "stopping early, time limit" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["stopped"].startswith("time limit")
    assert "val_loss" in summary  # evaluated at the stop like at an end
    assert ckpt.latest_checkpoint(run).name == "step-00000001"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1]

    assert main(["train", *_args(packed, run), "--resume"]) == 0  # no limit: on to step 6
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(straight))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert b.step == a.step == 6
    for k, v in a.model_state.items():
        assert torch.equal(v, b.model_state[k]), k


def test_time_limit_must_be_a_number(packed, tmp_path, capsys):
    assert main(["train", *_args(packed, tmp_path / "r"), "--time-limit", "soon"]) == 2
    assert "time" in capsys.readouterr().err
