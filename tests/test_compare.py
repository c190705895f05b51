"""`subllm bench compare` (subllm/bench/compare.py): the equal-FLOP step counts, a tiny end-to-end
comparison (real `subllm train` subprocesses) whose report matches the runs' own summaries, resume
of an interrupted comparison, and `subllm bench train --set structure=...` on an `M` structure."""

import json
import math

import pytest
from helpers import WORDS, pack_synthetic

from subllm import SubLLMError
from subllm.cli import main
from subllm.flops import flops

TINY = ["--preset", "subllm-tiny", "--set", "vocab_size=300", "--seq-len", "32", "--batch-size", "2"]
ARCHS = ["--structure", "llama=TTTT", "--structure", "subllm=T(TT)T", "--structure", "mod=TMTM"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_synthetic(tmp_path_factory.mktemp("data"), WORDS, seed=5, n_train=400)


def _parse(argv):
    from subllm.cli import build_parser

    return build_parser(argv).parse_args(argv)


def test_plan_gives_each_architecture_the_steps_its_flops_buy(tmp_path, capsys):
    from subllm.bench.compare import model_of, plan

    args = _parse(["bench", "compare", "--out", str(tmp_path), "--steps", "275"])
    runs = plan(args)
    assert len(runs) == 3 * 5  # 3 seeds x (3 architectures at equal tokens + SUBLLM, MoD at equal FLOPs)
    cost = {a: flops(model_of(args, s), 256)["total"] for a, s in (("llama", "T" * 12), ("mod", "TM" * 6))}
    mod_flops = next(r for r in runs if r["name"] == "mod_flops_s0")
    assert mod_flops["steps"] == round(275 * cost["llama"] / cost["mod"]) and mod_flops["steps"] > 275
    sub_flops = next(r for r in runs if r["name"] == "subllm_flops_s0")
    assert 275 < sub_flops["steps"] < mod_flops["steps"]
    assert {r["steps"] for r in runs if r["budget"] == "tokens"} == {275}
    assert main(["bench", "compare", "--out", str(tmp_path), "--dry-run"]) == 0
    assert capsys.readouterr().err.count("subllm train") == 15
    with pytest.raises(SubLLMError, match="unknown"):
        plan(_parse(["bench", "compare", "--archs", "subllm,nope"]))
    # one architecture's own overrides; LLaMA stays the FLOP reference without being run
    args = _parse(["bench", "compare", "--archs", "pred", "--structure", "pred=TMTMTMTMTMTM",
                   "--arch-set", "pred:mod_router=predictor", "--seeds", "0"])  # fmt: skip
    runs = plan(args)
    assert [r["name"] for r in runs] == ["pred_tokens_s0", "pred_flops_s0"] and runs[1]["steps"] > 275
    from subllm.bench.compare import command

    cmd = command(args, runs[0])
    assert cmd[cmd.index("mod_router=predictor") - 1] == "--set"


def test_tiny_comparison_end_to_end_and_resume(packed, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["bench", "compare", "--out", str(out), "--data", str(packed), *TINY, *ARCHS]
    argv += ["--archs", "llama,mod", "--steps", "3", "--seeds", "0", "--dtype", "fp32"]
    assert main(argv) == 0
    assert "3 to train" in capsys.readouterr().err
    report = json.loads((out / "compare.json").read_text())
    assert sorted(r["name"] for r in report["runs"]) == ["llama_tokens_s0", "mod_flops_s0", "mod_tokens_s0"]
    for r in report["runs"]:  # every number comes from the run's own summary
        s = json.loads((out / r["name"] / "summary.json").read_text())
        assert r["val_loss"] == s["val_loss"] and r["tokens"] == s["tokens"] == r["steps"] * 2 * 32
        assert math.isfinite(r["val_loss"])
        assert (r["agreement_min"] is None) == (r["arch"] == "llama")
    assert (out / "compare.png").stat().st_size > 0 and "| mod | flops |" in (out / "compare.md").read_text()
    # an interrupted comparison resumes: a removed run is trained again, the others are not
    (out / "mod_flops_s0" / "summary.json").unlink()
    assert main(argv) == 0
    assert "2 of 3 runs already finished; 1 to train" in capsys.readouterr().err


def test_summary_is_mean_and_sample_sd_over_seeds():
    from subllm.bench.compare import markdown, summarize

    rows = [
        dict(arch="mod", budget="tokens", steps=5, seed=s, val_loss=v, val_bpb=None, tokens_per_s=10.0,
             peak_rss_mb=1.0, agreement_min=0.9, train_flops=1e15, keep_eval=[0.1, 0.2])
        for s, v in ((0, 5.0), (1, 5.2), (2, 5.4))
    ]  # fmt: skip
    (item,) = summarize(rows)
    assert item["n"] == 3 and item["seeds"] == [0, 1, 2] and "val_bpb" not in item
    assert item["val_loss"] == pytest.approx((5.2, 0.2)) and item["keep_eval"][0] == pytest.approx(0.15)
    assert "| mod | tokens | 5 | 3 | 5.2000 ± 0.2000 | - | 1.000 ± 0.000 |" in markdown([item])


def test_bench_train_takes_an_m_structure(capsys):
    argv = ["bench", "train", "--quick", "--set", "structure=TMT(TM)T", "--set", "mod_capacity=0.25"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["structure"] == "TMT(TM)T" and report["keep_ratios"][0] == 0.25
    assert report["results"][0]["ideal_speedup"] > 1
    assert main(["bench", "train", "--quick", "--set", "nope=1"]) == 2
    assert "unknown ModelConfig field" in capsys.readouterr().err


def test_a_run_another_comparison_is_training_is_skipped(tmp_path):
    import os
    import subprocess
    import sys

    from subllm.bench.compare import RUNNING, _taken

    d = tmp_path / "run"
    d.mkdir()
    assert not _taken(d)
    (d / RUNNING).write_text(str(os.getpid()))  # a live process holds it
    assert _taken(d)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    (d / RUNNING).write_text(str(done.pid))  # its trainer died: the run is free again
    assert not _taken(d)
    (d / "summary.json").write_text("{}")
    assert _taken(d)
