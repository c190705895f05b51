"""`subllm train`: an end-to-end run on a small text file, option parsing and its one-line errors,
the schedule-length flag, and an evaluation that leaves the training randomness untouched."""

import json
import random

import pytest
import torch

from subllm import SubLLM, SubLLMError
from subllm.cli import main
from subllm.trainer.config import build_config, model_config, total_steps
from subllm.trainer.metrics import read_metrics

WORDS = "the a king queen lord castle sword crown speak love night day river sea and or but not with".split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(2)
    lines = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(1500))
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(capsys, *args):
    rc = main(["train", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_end_to_end_on_a_text_file(text_file, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    rc, stdout, err = _cli(
        capsys,
        "--preset", "subllm-tiny", "--data", str(text_file), "--vocab-size", "300", "--steps", "6",
        "--batch-size", "4", "--seq-len", "48", "--grad-accum", "2", "--eval-every", "3",
        "--eval-batches", "2", "--save-every", "3", "--out", str(out), "--threads", "1",
        "--schedule-steps", "scale", "--optimizer", "adamw", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert train[-1]["tokens"] == 6 * 4 * 48 * 2 and all(r["tok_per_s"] > 0 for r in train)
    assert [r["step"] for r in evals] == [3, 6]
    for key in ("val_loss", "val_bpb", "val_loss_train_mode", "leak_gap", "keep_fractions_eval", "agreement"):
        assert key in evals[-1], key
    assert len(evals[-1]["agreement"]) == 2 and 0 <= evals[-1]["agreement"][0] <= 1
    run = records[0]
    assert run["kind"] == "run"
    assert run["schedule_steps"] == {"mode": "scale", "balancer_steps": 2, "bypass_steps": 6}
    assert (out / "loss.png").stat().st_size > 1000
    sel = evals[-1]["selection"]  # issue 9: the selection, seen at every evaluation
    for key in ("keep_eval", "keep_train", "agreement", "score_p05", "score_p50", "score_p95", "saturated"):
        assert len(sel[key]) == 2, key
    assert sel["score_p05"][0] <= sel["score_p50"][0] <= sel["score_p95"][0]
    assert sel["keep_eval"] == evals[-1]["keep_fractions_eval"] and len(sel["balancer_push"]) == 2
    assert (out / "selection.png").stat().st_size > 1000
    # the final model folder and the latest checkpoint both load with SubLLM and AutoTokenizer
    for d in (out, out / "checkpoints" / "latest"):
        model = SubLLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(str(d))
        assert model.config.vocab_size == len(tok) == 300
        assert model.config.extra["schedule_steps"] == "scale" and model.config.bypass_steps == 6
    ids = torch.tensor([tok.encode("the king and the queen")])
    assert model.eval()(ids).logits.shape == (1, ids.shape[1], 300)
    assert "eval @ step 6" in stdout
    # `--resume` with only --out takes the saved options; a finished run has nothing left to do
    rc, stdout, err = _cli(capsys, "--out", str(out), "--resume", "--threads", "1", "--no-progress")
    assert rc == 0, err
    assert "resuming from" in stdout and len(read_metrics(out / "metrics.jsonl")) == len(records) + 1
    rc, _, err = _cli(capsys, "--out", str(out), "--resume", "--seq-len", "32", "--no-progress")
    assert rc == 2 and "does not match this run (seq_len: 48 -> 32" in err


def test_llama_preset_and_packed_data(text_file, tmp_path, capsys):
    first = tmp_path / "first"
    rc, _, err = _cli(
        capsys, "--preset", "llama-tiny", "--data", str(text_file), "--vocab-size", "300", "--steps", "2",
        "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--out", str(first), "--threads", "1",
        "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    # the packed shards of that run are valid --data for another (tokenizer found via meta.json)
    cfg_file = tmp_path / "opts.json"
    cfg_file.write_text(json.dumps({"preset": "llama-tiny", "steps": 5, "batch-size": 2, "seq_len": 32}))
    rc, _, err = _cli(
        capsys, "--config", str(cfg_file), "--data", str(first / "data" / "tokens"), "--steps", "2",
        "--eval-every", "0", "--out", str(tmp_path / "second"), "--threads", "1", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    saved = json.loads((tmp_path / "second" / "train_config.json").read_text())
    assert saved["steps"] == 2 and saved["batch_size"] == 2  # flags win over the file
    ev = [r for r in read_metrics(tmp_path / "second" / "metrics.jsonl") if r["kind"] == "eval"]
    assert "leak_gap" not in ev[0] and "keep_fractions_eval" not in ev[0]  # LLaMA: no selection


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "subllm-huge"], "unknown preset 'subllm-huge'"),
        (["--steps", "-3"], "--steps must be >= 1"),
        (["--steps", "ten"], "--steps must be an integer"),
        (["--dtype", "fp16"], "--dtype must be one of auto, bf16, fp32"),
        (["--keep-ratio", "1.5"], r"--keep-ratio values must lie in \(0, 1\]"),
        (["--lr=-1e-3"], "--lr must be a positive number"),
        (["--set", "dimension=3"], "unknown ModelConfig field"),
        (["--structure", "TT(T"], "unclosed"),
        (["--steps", "5", "--tokens", "1000"], "--steps or --tokens, not both"),
        (["--data", "/no/such/corpus"], "--data /no/such/corpus: no such file or folder"),
        (["--config", "/no/such.json"], "--config /no/such.json: no such file"),
    ],
)
def test_clear_errors(text_file, tmp_path, capsys, args, message):
    import re

    base = ["--data", str(text_file), "--out", str(tmp_path / "r"), "--no-progress"]
    rc, _, err = _cli(capsys, *base, *args)
    assert rc == 2
    assert err.startswith("subllm train: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_missing_data_flag_and_resume_without_checkpoint(tmp_path, capsys):
    rc, _, err = _cli(capsys, "--out", str(tmp_path))
    assert rc == 2 and "--data is required" in err
    with pytest.raises(SubLLMError, match="no checkpoint"):
        from subllm.trainer.loop import train

        train(build_config({"data": str(tmp_path), "out": str(tmp_path)}), resume=True)


def test_tokens_and_schedule_scaling():
    opts = {"data": "x", "tokens": "100k", "batch_size": 4, "seq_len": 100, "schedule_steps": "scale"}
    cfg = build_config(opts)
    steps = total_steps(cfg, world_size=2)
    assert steps == 125  # ceil(100000 / (4 * 100 * 2))
    mc = model_config(cfg, steps, {"vocab_size": 300, "pad_id": 0, "bos_id": 1, "eos_id": 2})
    assert (mc.bypass_steps, mc.balancer_steps, mc.vocab_size) == (125, 50, 300)
    paper = model_config(build_config({"data": "x"}), 1000, None)
    assert (paper.bypass_steps, paper.balancer_steps) == (20000, 8000)
    assert paper.extra["schedule_steps"] == "paper"


def test_evaluation_leaves_rng_untouched():
    import contextlib

    from subllm.config import get_preset
    from subllm.model.subllm import SubLLM
    from subllm.trainer.distributed import DistInfo
    from subllm.trainer.evaluation import evaluate

    model = SubLLM(get_preset("subllm-tiny")).train()
    model.set_step(3)
    batches = [torch.randint(0, 256, (2, 40)) for _ in range(3)]
    before = torch.get_rng_state()
    res = evaluate(model, batches, DistInfo(), 3, contextlib.nullcontext, tokens_per_byte=0.5)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training and model.step == 3
    again = evaluate(model, batches, DistInfo(), 3, contextlib.nullcontext, tokens_per_byte=0.5)
    assert res == again  # the train-mode pass runs from a fixed seed
    assert res["val_bpb"] == pytest.approx(res["val_loss"] / 0.6931471805599453 * 0.5)
    assert res["leak_gap"] == pytest.approx(res["val_loss"] - res["val_loss_train_mode"])
