"""transformers integration: Auto registration, one checkpoint format with exact round trips,
HF generate() == subllm.generate (greedy, batch 1 and left-padded batches, cached and uncached)."""

import subprocess
import sys

import pytest
import torch
from helpers import tiny_model

from subllm import SubLLM, SubLLMError
from subllm.inference.generation import generate

hf_mod = pytest.importorskip("subllm.hf")


def _same_state(a: dict, b: dict) -> bool:
    """Equal model tensors (the HF wrapper's own `train_step` counter aside)."""
    a, b = ({k: v for k, v in s.items() if k != "train_step"} for s in (a, b))
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_import_subllm_does_not_import_transformers():
    code = "import subllm, sys; subllm.SubLLM; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_is_idempotent_and_auto_classes_resolve():
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_mod.register()
    hf_mod.register()
    cfg = AutoConfig.for_model("subllm", vocab_size=97, dim=32, n_heads=4, structure="T(T)T")
    assert isinstance(cfg, hf_mod.SubLLMConfig)
    assert cfg.num_hidden_layers == 3 and cfg.hidden_size == 32
    model = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(model, hf_mod.SubLLMForCausalLM)
    assert "subsamples.0.score.weight" in model.state_dict()
    with pytest.raises(SubLLMError, match="unclosed"):
        hf_mod.SubLLMConfig(structure="T(T")


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_subllm_dir_through_auto(tmp_path, tie):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model(tie_embeddings=tie)
    model.save_pretrained(tmp_path / "a")
    cfg = AutoConfig.from_pretrained(tmp_path / "a")
    assert isinstance(cfg, hf_mod.SubLLMConfig) and cfg.to_model_config() == model.config
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert isinstance(hf, hf_mod.SubLLMForCausalLM) and not hf.training
    assert _same_state(model.state_dict(), hf.state_dict())
    assert (hf.head.weight is hf.embed.weight) == tie
    ids = torch.randint(3, 97, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hf(ids).logits)
    hf.save_pretrained(tmp_path / "b")  # the same format back
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "config.json",
        "model.safetensors",
        "model.safetensors.sha256",
        "modeling_subllm.py",
    ]
    back = SubLLM.from_pretrained(tmp_path / "b")
    assert back.config == model.config
    assert _same_state(model.state_dict(), back.state_dict())


def test_forward_loss_and_training_flag_match_subllm():
    model = tiny_model()
    hf = hf_mod.SubLLMForCausalLM.from_subllm(model)
    assert hf.embed is model.embed  # shared, not copied
    ids = torch.randint(3, 97, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=ids)
        theirs = hf(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.loss, theirs.loss)
    model.train()
    with pytest.raises(SubLLMError, match="set_step"):  # the core still needs its step
        model(ids)
    hf.train()  # the HF wrapper counts optimizer steps itself (tests/test_hf_trainer.py)
    hf(input_ids=ids)
    assert model.step == 0
    hf.set_step(0)
    hf(input_ids=ids, labels=ids).loss.backward()
    assert model.subsamples[0].score.weight.grad is not None


@pytest.mark.parametrize("use_cache", [True, False])
def test_hf_generate_greedy_equals_subllm_generate(use_cache):
    model = tiny_model()
    hf = hf_mod.SubLLMForCausalLM.from_subllm(model).eval()
    ids = torch.randint(3, 97, (1, 17))
    ref = generate(model, ids, max_new_tokens=20)
    out = hf.generate(ids, max_new_tokens=20, do_sample=False, use_cache=use_cache, eos_token_id=None)
    assert torch.equal(out, ref)


def test_hf_generate_left_padded_batch_equals_rows_alone():
    model = tiny_model(seed=3)
    hf = hf_mod.SubLLMForCausalLM.from_subllm(model).eval()
    lengths = [9, 16, 4]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = torch.randint(3, 97, (n,))
        mask[b, T - n :] = 1
    kw = dict(max_new_tokens=12, eos_token_id=5, pad_token_id=0)
    ref = generate(model, ids, attention_mask=mask, **kw)
    out = hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
    uncached = hf.generate(ids, attention_mask=mask, do_sample=False, use_cache=False, **kw)
    assert torch.equal(out, ref) and torch.equal(uncached, ref)
    for b, n in enumerate(lengths):  # each row equals that row run alone (until its eos)
        alone = hf.generate(ids[b : b + 1, T - n :], do_sample=False, **kw)[0]
        k = alone.shape[0]
        assert torch.equal(out[b, T - n : T - n + k], alone)


def test_generate_sampling_runs_and_cache_rejects_multi_token_decode():
    model = tiny_model()
    hf = hf_mod.SubLLMForCausalLM.from_subllm(model).eval()
    ids = torch.randint(3, 97, (2, 8))
    torch.manual_seed(0)
    out = hf.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, eos_token_id=None)
    assert out.shape == (2, 14) and torch.equal(out[:, :8], ids)
    cache = hf_mod.SubLLMCache()
    hf(input_ids=ids, cache=cache)
    assert cache.get_seq_length() == 8
    with pytest.raises(SubLLMError, match="one new token"):
        hf(input_ids=ids[:, :2], cache=cache)


def test_auto_model_carries_calibrated_thresholds_and_reads_old_configs_as_paper(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from subllm.config import SELECTION_RECIPES

    model = tiny_model(threshold="calibrated")
    with torch.no_grad():
        for i, s in enumerate(model.subsamples):
            s.threshold.fill_(0.25 * (i + 1))
    model.save_pretrained(tmp_path / "cal")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "cal")
    assert [float(s.threshold) for s in hf.subsamples] == [0.25, 0.5]
    assert _same_state(hf.state_dict(), model.state_dict())
    # a config.json from before the selection fields existed: the paper's rule, not today's defaults
    paper = tiny_model().config.with_selection("paper")
    SubLLM(paper).save_pretrained(tmp_path / "old")
    cfg_file = tmp_path / "old" / "config.json"
    d = json.loads(cfg_file.read_text())
    for k in SELECTION_RECIPES["paper"]:
        d.pop(k)
    cfg_file.write_text(json.dumps(d))
    old = AutoModelForCausalLM.from_pretrained(tmp_path / "old")
    assert old.config.to_model_config().selection == "paper"
    assert SubLLM.from_pretrained(tmp_path / "old").config.selection == "paper"
