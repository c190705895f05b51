"""Benchmark smoke tests: the commands run at tiny sizes and end with one JSON line.
(Speed is measured by the benchmarks themselves, never asserted here.)"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from helpers import WORDS, checkpoint_with_tokenizer

from subllm.bench.train import bound_loss
from subllm.config import get_preset
from subllm.model.subllm import SubLLM


def test_bound_runs_the_level_lengths():
    """The bound's layers see T, ceil(r T), ceil(r ceil(r T)) tokens - no subsampling ops."""
    cfg = get_preset("subllm-tiny")
    llama = SubLLM(cfg.as_llama())
    seen = []
    for layer in llama.layers:
        layer.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    bound_loss(llama, torch.randint(0, cfg.vocab_size, (1, 100)), cfg)
    assert seen == [100, 100, 64, 41, 41, 64, 100]  # structure TT(T(TT)T)T


def test_gpu_script_cpu_smoke(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(root / "benchmarks" / "gpu.sh"), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "CPU smoke run" in res.stdout
    train = json.loads((tmp_path / "train.txt").read_text().strip().splitlines()[-1])
    assert train["bench"] == "train" and len(train["results"]) == 2
    r = train["results"][0]
    assert r["ideal_speedup"] > 1 and r["memory_bytes"]["subllm"] < r["memory_bytes"]["llama"]
    assert (tmp_path / "train_speedup.png").stat().st_size > 0
    infer = json.loads((tmp_path / "infer.txt").read_text().strip().splitlines()[-1])
    assert infer["bench"] == "infer"
    for r in infer["results"]:  # measured allocation: at or above the ideal (reserved decode slots)
        assert r["kv_ideal_ratio"] <= r["kv_alloc_ratio"] < 1.0
        for m, (lo, med, hi) in r["prefill_s_min_med_max"].items():  # timings as min / median / max
            assert lo <= med <= hi and med == r["prefill_s"][m]
        for m, (lo, med, hi) in r["decode_tok_s_min_med_max"].items():
            assert lo <= med <= hi and med == r["decode_tok_s"][m]
    for r in train["results"]:
        for k, (lo, med, hi) in r["step_s_min_med_max"].items():
            assert lo <= med <= hi and med == r["step_s"][k] and lo == r["step_s_min"][k]


def _tiny_checkpoint(path):
    checkpoint_with_tokenizer(path)
    return WORDS


def test_text_windows_are_consecutive_and_decode_reads_on():
    from subllm.bench.infer import text_windows

    ids, dec = text_windows(list(range(100)), 10, 3, 4)
    assert ids.tolist() == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    assert dec.T.tolist() == [list(range(10, 14)), list(range(20, 24)), list(range(30, 34))]


def test_infer_text_keep_equals_a_full_forward_recount(tmp_path, capsys, monkeypatch):
    """`bench infer --checkpoint --text`: prompts are windows of the text, decode is teacher-forced
    on the text's next tokens, and the reported keep per S in prefill and decode equals a recount
    from eval-mode full forwards of the same windows (Selection.n_kept over Selection.n_real)."""
    import math
    import random

    import subllm.bench.infer as infer
    from subllm.bench.infer import run_infer, text_windows
    from subllm.cli import main
    from subllm.data.tokenizer import load_tokenizer

    ck = tmp_path / "ck"
    words = _tiny_checkpoint(ck)
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(200)))
    tokens = load_tokenizer(ck)(text.read_text(), add_special_tokens=False)["input_ids"]
    assert len(tokens) == 200
    D = 6
    fed = []  # (prompt ids, decode tokens) of every setting, as the benchmark ran them
    real_bench = infer.bench_setting

    def recording(sub, llama, st, ids, dec, seed):
        fed.append((ids, dec))
        return real_bench(sub, llama, st, ids, dec, seed)

    monkeypatch.setattr(infer, "bench_setting", recording)
    report = run_infer(
        "subllm-tiny", str(ck), [40], [1, 3], ["fp32"], D, reps=1, warmup=0, bound=False,
        log=lambda *a: None, text=str(text),
    )  # fmt: skip
    assert report["text"] == {"path": str(text), "tokens": 200} and "text" in report["prompts"]
    model = SubLLM.from_pretrained(ck).eval()

    def same(a, b):
        return (math.isnan(a) and math.isnan(b)) or a == b

    for r, (ran_ids, ran_dec) in zip(report["results"], fed, strict=True):
        ids, dec = text_windows(tokens, r["prompt_len"], r["batch"], D)
        assert torch.equal(ran_ids, ids) and torch.equal(ran_dec, dec)  # the text, not random ids
        assert ids[-1].tolist() == tokens[(r["batch"] - 1) * 40 : r["batch"] * 40]
        with torch.no_grad():
            pre = model(ids, return_selections=True).selections
            full = model(torch.cat([ids, dec.T], 1), return_selections=True).selections
        keep_pre = [round(int(p.n_kept.sum()) / int(p.n_real.sum()), 4) for p in pre]
        kept_dec = [int((f.n_kept - p.n_kept).sum()) for p, f in zip(pre, full)]
        real_dec = [int((f.n_real - p.n_real).sum()) for p, f in zip(pre, full)]
        keep_dec = [round(k / n, 4) if n else math.nan for k, n in zip(kept_dec, real_dec)]
        assert r["keep_prefill"] == keep_pre
        assert all(same(a, b) for a, b in zip(r["keep_decode"], keep_dec)), (r["keep_decode"], keep_dec)
        assert all(0 < f < 1 for f in keep_pre)  # a real mix of kept and dropped tokens
        assert r["decode_ideal"] > 1 and r["decode_efficiency"] > 0

    # error paths, each one line
    base = ["bench", "infer", "--dtypes", "fp32", "--reps", "1", "--decode-tokens", str(D)]
    assert main([*base, "--text", str(text)]) == 2
    assert "--text needs --checkpoint" in capsys.readouterr().err
    base += ["--checkpoint", str(ck), "--batch-sizes", "3"]
    assert main([*base, "--text", str(text), "--lengths", "40,70"]) == 2
    assert "--text has 200 tokens; ctx 70 x batch 3 + 6 decode tokens needs 216" in capsys.readouterr().err
    assert main([*base, "--text", str(tmp_path / "nope.txt"), "--lengths", "40"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_hf_baseline_times_the_same_computation():
    """`--hf`: transformers' Llama with our LLaMA's weights - its prefill + teacher-forced decode
    (rewound by crop before every run) ends on the logits of our engine's decode."""
    from subllm.bench.hf_llama import hf_decode, hf_prefill, hf_twin
    from subllm.inference.engine import decode_step, new_cache, prefill

    torch.manual_seed(0)
    llama = SubLLM(get_preset("subllm-tiny").as_llama()).eval()
    ids = torch.randint(3, 256, (2, 30))
    dec = torch.randint(3, 256, (5, 2))
    hf = hf_twin(llama, "cpu")
    run = hf_decode(hf, hf_prefill(hf, ids, "fp32", "cpu")(), 30, dec, "fp32", "cpu")
    first, again = run(), run()
    torch.testing.assert_close(again, first)  # rewound: the second run decodes from the prompt again
    cache = new_cache(llama, 2)
    with torch.no_grad():
        prefill(llama, ids, None, cache)
        for tok in dec:
            ours = decode_step(llama, cache, tok)
    torch.testing.assert_close(first, ours, rtol=1e-4, atol=1e-4)


def test_train_report_with_hf_and_compile_keeps_both(monkeypatch):
    """--hf and --compile together: the report carries both comparisons (one once overwrote the other)."""
    from subllm.bench.train import print_report, run_train_bench

    monkeypatch.setattr("subllm.trainer.compiled.BACKEND", "aot_eager")
    torch._dynamo.reset()
    rep = run_train_bench(
        "subllm-tiny", [32], 1, "fp32", reps=1, warmup=0, log=lambda *a: None, compile=True, hf=True
    )
    r = rep["results"][0]
    assert r["llama_over_hf"] > 0 and r["compiled"]["speedup"] > 0
    assert {"subllm_compiled", "llama_compiled", "hf_llama"} <= set(r["step_s"])
    import io

    out = io.StringIO()
    print_report(rep, {}, out=out)
    assert "HF LlamaForCausalLM" in out.getvalue() and "torch.compile" in out.getvalue()


def test_infer_preset_past_its_max_seq_len():
    """Random-weight presets run past their max_seq_len (raised for the benchmark); checkpoints keep
    theirs (the --text test above checks that error)."""
    from subllm.bench.infer import build_models

    sub, llama = build_models("subllm-tiny", None, 0, "cpu", 600)
    assert sub.config.max_seq_len == llama.config.max_seq_len == 600
    assert build_models("subllm-tiny", None, 0, "cpu", 100)[0].config.max_seq_len == 512


def test_infer_quantized_and_compiled_decode():
    """bench infer --quantize int4 --compile: both models quantized and compiled before timing."""
    from subllm.bench.infer import run_infer

    report = run_infer(
        "subllm-tiny", None, [32], [1], ["fp32"], 4, 1, 0, bound=False, log=lambda *a: None,
        bandwidth=False, quantize="int4", compile=True,
    )  # fmt: skip
    assert report["model"]["quantize"] == "int4" and report["model"]["compiled_decode"] is True
    (r,) = report["results"]
    assert all(v > 0 for v in r["decode_tok_s"].values())
