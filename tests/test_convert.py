"""`subllm convert`: HF Llama -> SubLLM (all-T: identical logits; with a structure: only S and B
new) and all-T SubLLM -> HF Llama, round trips against a random transformers LlamaForCausalLM."""

import json

import pytest
import torch

from subllm import SubLLM
from subllm.cli import main
from subllm.config import IDENTITY_SCORE_BIAS

transformers = pytest.importorskip("transformers")


def _llama_dir(path, tie=False, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        **kw,
    )
    torch.manual_seed(1)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    return hf


@pytest.mark.parametrize("tie", [False, True])
def test_all_t_round_trip(tmp_path, tie, capsys):
    from transformers import LlamaForCausalLM

    hf = _llama_dir(tmp_path / "llama", tie=tie)
    assert main(["convert", "--from-hf-llama", str(tmp_path / "llama"), "--out", str(tmp_path / "sub")]) == 0
    assert "all-T" in capsys.readouterr().out
    model = SubLLM.from_pretrained(tmp_path / "sub").eval()
    assert model.config.structure == "TTTT" and model.config.n_kv_heads == 2
    assert model.config.rope_theta == 5000.0 and model.config.tie_embeddings == tie
    assert (tmp_path / "sub" / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    ids = torch.randint(0, 101, (2, 33))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() < 1e-5

    assert main(["convert", "--to-hf-llama", str(tmp_path / "sub"), "--out", str(tmp_path / "back")]) == 0
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    a, b = hf.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(back.config, key) == getattr(hf.config, key), key
    assert back.config.rope_parameters["rope_theta"] == 5000.0
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


def test_structure_conversion_only_s_and_b_are_new(tmp_path):
    hf = _llama_dir(tmp_path / "llama")
    out = tmp_path / "sub"
    args = ["convert", "--from-hf-llama", str(tmp_path / "llama"), "--out", str(out)]
    assert main([*args, "--structure", "T(T(T)T)", "--keep-ratio", "0.7,0.5"]) == 0
    model = SubLLM.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["model_type"] == "subllm" and cfg["structure"] == "T(T(T)T)" and cfg["keep_ratio"] == [0.7, 0.5]
    )
    hf_state = hf.state_dict()
    for i in range(4):
        assert torch.equal(
            model.layers[i].attn.wo.weight, hf_state[f"model.layers.{i}.self_attn.o_proj.weight"]
        )
        assert torch.equal(model.layers[i].ffn.w2.weight, hf_state[f"model.layers.{i}.mlp.down_proj.weight"])
    assert torch.equal(model.embed.weight, hf_state["model.embed_tokens.weight"])
    assert torch.equal(model.head.weight, hf_state["lm_head.weight"])
    new = {k for k in model.state_dict() if k.startswith(("subsamples.", "bypasses."))}
    assert new == {
        "subsamples.0.score.weight",
        "subsamples.1.score.weight",
        "subsamples.0.score.bias",  # the identity start (config.identity_start)
        "subsamples.1.score.bias",
        "bypasses.0.scale",
        "bypasses.1.scale",
        # the default ("aligned") rule's calibrated thresholds start at 0, the paper's rule
        "subsamples.0.threshold",
        "subsamples.0.threshold_updates",
        "subsamples.1.threshold",
        "subsamples.1.threshold_updates",
    }
    assert all(float(s.threshold) == 0.0 and int(s.threshold_updates) == 0 for s in model.subsamples)
    assert torch.all(model.bypasses[0].scale == 1.0)  # the identity start: a kept token passes exactly
    assert all(float(s.score.bias.detach()) == pytest.approx(IDENTITY_SCORE_BIAS) for s in model.subsamples)
    # ready for continued training: a training step runs and reaches the new score layers
    model.train().set_step(0)
    ids = torch.randint(0, 101, (2, 16))
    model(ids, labels=ids).loss.backward()
    assert model.subsamples[1].score.weight.grad is not None


def test_errors(tmp_path, capsys):
    _llama_dir(tmp_path / "llama")
    src = str(tmp_path / "llama")
    assert (
        main(["convert", "--from-hf-llama", src, "--structure", "T(T(T)T)", "--out", str(tmp_path / "s")])
        == 0
    )
    code = main(["convert", "--to-hf-llama", str(tmp_path / "s"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "subsampling modules" in err and "no counterpart" in err
    assert not (tmp_path / "x").exists()
    assert main(["convert", "--from-hf-llama", src, "--keep-ratio", "0.5", "--out", str(tmp_path / "k")]) == 2
    assert "needs --structure" in capsys.readouterr().err
    assert (
        main(["convert", "--from-hf-llama", src, "--structure", "TT(T)", "--out", str(tmp_path / "b")]) == 2
    )
    assert "has 3 layers" in capsys.readouterr().err
    assert main(["convert", "--from-hf-llama", src, "--out", str(tmp_path / "s")]) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", "--from-hf-llama", str(tmp_path / "nope"), "--out", str(tmp_path / "n")]) == 2
    assert "no config.json" in capsys.readouterr().err
