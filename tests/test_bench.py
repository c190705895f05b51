"""Benchmark smoke tests: the commands run at tiny sizes and end with one JSON line.
(Speed is measured by the benchmarks themselves, never asserted here.)"""

import json
import subprocess
import sys
from pathlib import Path

import torch

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
    assert infer["bench"] == "infer" and all(r["kv_exact"] for r in infer["results"])
