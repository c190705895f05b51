"""Checkpoints load with plain transformers, from a fresh process that never imports subllm
itself: `auto_map` in config.json + the modeling file written beside the weights, used through
AutoModelForCausalLM, pipeline("text-generation") and the real `lm_eval` CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_with_tokenizer

from subllm import SubLLM
from subllm.inference.generation import generate

pytest.importorskip("transformers")
WARNING = "to instantiate a model of type"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("remote") / "ckpt"
    checkpoint_with_tokenizer(path)
    return path


def _fresh(code: str, tmp: Path, timeout=120) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter, cwd outside the repository, HF offline, its own module cache."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp / "hf_modules"),
        "HF_DATASETS_CACHE": str(tmp / "hf_datasets"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_save_writes_auto_map_and_modeling_file(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["auto_map"] == {
        "AutoConfig": "modeling_subllm.SubLLMConfig",
        "AutoModelForCausalLM": "modeling_subllm.SubLLMForCausalLM",
    }
    assert (
        "from subllm.hf import SubLLMConfig, SubLLMForCausalLM" in (ckpt / "modeling_subllm.py").read_text()
    )
    assert SubLLM.from_pretrained(ckpt).config.structure == "TT(T(TT)T)T"  # auto_map is not a config field


def test_auto_model_and_tokenizer_with_trust_remote_code(ckpt, tmp_path):
    """Logits equal SubLLM's from the same folder; AutoTokenizer prints no model-type warning."""
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert "subllm" not in sys.modules
tok = AutoTokenizer.from_pretrained({str(ckpt)!r}, trust_remote_code=True)
m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True)
print(type(m).__module__, type(m).__name__, m.training, file=sys.stderr)
ids = torch.tensor([tok("hello world the cat sat on the mat").input_ids])
with torch.no_grad():
    torch.save({{"ids": ids, "logits": m(ids).logits}}, "out.pt")
"""
    r = _fresh(code, tmp_path)
    assert "subllm.hf.auto SubLLMForCausalLM False" in r.stderr
    assert WARNING not in r.stderr
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["ids"].shape == (1, 8)
    with torch.no_grad():
        assert torch.equal(SubLLM.from_pretrained(ckpt).eval()(out["ids"]).logits, out["logits"])


def test_pipeline_text_generation(ckpt, tmp_path):
    code = f"""
import json
from transformers import pipeline
p = pipeline("text-generation", model={str(ckpt)!r}, trust_remote_code=True)
out = p("hello world the cat", max_new_tokens=6, do_sample=False, return_tensors=True)
json.dump(out[0]["generated_token_ids"], open("out.json", "w"))
"""
    _fresh(code, tmp_path)
    got = json.loads((tmp_path / "out.json").read_text())
    prompt = torch.tensor([[3, 4, 5, 7]])  # hello world the cat (helpers.WORDS ids)
    assert got[:4] == prompt[0].tolist() and len(got) > 4
    model = SubLLM.from_pretrained(ckpt).eval()
    want = generate(model, prompt, max_new_tokens=len(got) - 4)[0].tolist()
    assert got == want


def test_lm_eval_cli_hf_backend(ckpt, tmp_path):
    """The real `lm_eval` command line, `--model hf`, on our shipped MMLU task (built offline)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from subllm.evals.harness import build_tasks

    build_tasks(["mmlu"], tmp_path / "tasks")
    lm_eval = Path(sys.executable).with_name("lm_eval")
    code = f"""
import subprocess, sys
sys.exit(subprocess.call([{str(lm_eval)!r}, "--model", "hf",
    "--model_args", "pretrained={ckpt},trust_remote_code=True", "--tasks", "subllm_mmlu",
    "--include_path", {str(tmp_path / "tasks")!r}, "--limit", "2", "--device", "cpu",
    "--output_path", "results"]))
"""
    _fresh(code, tmp_path, timeout=180)
    (res,) = (tmp_path / "results").rglob("results_*.json")
    data = json.loads(res.read_text())
    assert data["n-samples"]["subllm_mmlu"]["effective"] == 2
    assert 0.0 <= data["results"]["subllm_mmlu"]["acc,none"] <= 1.0
    assert data["config"]["model"] == "hf"


def test_tokenizer_loads_quietly_in_subllm_processes(ckpt, tmp_path):
    """subllm's own loaders register model_type "subllm" before AutoTokenizer reads config.json,
    so neither transformers' remote-code prompt nor its model-type warning appears (the logger
    is left at its default level)."""
    code = f"""
from pathlib import Path
from subllm.data.tokenizer import load_tokenizer
from subllm.data.tokenizer import load_tokenizer as load2
from transformers.utils import logging
assert logging.get_verbosity() == logging.WARNING
load_tokenizer(Path({str(ckpt)!r})); load2({str(ckpt)!r})
"""
    r = _fresh(code, tmp_path)
    assert WARNING not in r.stderr and "custom code" not in r.stderr, r.stderr
