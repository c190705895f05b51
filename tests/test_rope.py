"""RoPE scaling (subllm/model/rope.py): logits equal transformers' LlamaForCausalLM for every
rope_type past the original length, cached == uncached for a nested SUBLLM with each, positions
given explicitly, config checks and the HF / convert round trips."""

import json

import pytest
import torch
from helpers import left_padded, tiny_model

from subllm import SubLLM, SubLLMError
from subllm.config import ModelConfig
from subllm.inference.generation import stream_generate
from subllm.model.layers import rope_cos_sin

ORIG = 32  # original_max_position_embeddings of the tiny configs: every test runs past it
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0, "original_max_position_embeddings": ORIG},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": ORIG,
        "beta_fast": 16,
        "mscale": 0.7,
        "mscale_all_dim": 1.0,
        "truncate": False,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIG,
    },
}


def _hf_llama(scaling, theta=5000.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    params = {"rope_type": "default"} if scaling is None else dict(scaling)
    params["rope_theta"] = theta
    max_pos = 128
    if params["rope_type"] == "dynamic":  # HF's dynamic reads its original length from here
        max_pos = params.pop("original_max_position_embeddings")
    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )
    torch.manual_seed(3)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention: positions matter to the logits
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight *= 6.0
            layer.self_attn.k_proj.weight *= 6.0
    return hf


@pytest.mark.parametrize("name", list(SCALINGS))
def test_logits_equal_hf_llama_past_the_original_length(name):
    hf = _hf_llama(SCALINGS[name])
    model = SubLLM.from_hf_llama(hf).eval()
    assert (model.config.rope_scaling or {}).get("rope_type") == (SCALINGS[name] or {}).get("rope_type")
    ids = torch.randint(0, 101, (2, 90))  # 90 > ORIG: the scaling changes the frequencies
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids).logits
        plain = SubLLM(model.config.replace(rope_scaling=None)).eval()
        plain.load_state_dict(model.state_dict())
        unscaled = plain(ids).logits
    assert (ref - ours).abs().max() < 1e-4
    if name != "default":  # the test can fail: scaling really changes these logits
        assert (unscaled - ours).abs().max() > 1e-3


def test_dynamic_uses_the_current_length():
    """HF's dynamic: a sequence of at most the original length gets plain RoPE, a longer one the
    frequencies of its own length (so logits of a prefix change when the sequence grows past it)."""
    hf = _hf_llama(SCALINGS["dynamic"])
    model = SubLLM.from_hf_llama(hf).eval()
    assert model.config.max_seq_len == ORIG * 3
    ids = torch.randint(0, 101, (1, 70))
    with torch.no_grad():
        short = model(ids[:, :ORIG]).logits
        plain = SubLLM(model.config.replace(rope_scaling=None)).eval()
        plain.load_state_dict(model.state_dict())
        assert torch.equal(short, plain(ids[:, :ORIG]).logits)
        long = model(ids).logits
        assert (long[:, :ORIG] - short).abs().max() > 1e-3
        for T in (ORIG + 1, 50, 70):
            assert (
                model(ids[:, :T]).logits - _hf_llama(SCALINGS["dynamic"])(ids[:, :T]).logits
            ).abs().max() < 1e-4


def sharp_model(seed=1, **kw) -> SubLLM:
    """tiny_model with sharper attention (q, k scaled up), so that positions matter to the logits."""
    model = tiny_model(rope_theta=5000.0, max_seq_len=128, seed=seed, **kw)
    with torch.no_grad():
        for block in model.layers:
            qk = block.attn.n_heads * block.attn.head_dim + block.attn.n_kv_heads * block.attn.head_dim
            block.attn.wqkv.weight[:qk] *= 6.0
    return model


def _generate(model, ids, mask, n, cached):
    steps = list(stream_generate(model, ids, mask, max_new_tokens=n, use_cache=cached, return_logits=True))
    return torch.stack([t for t, _ in steps], 1), torch.stack([lg for _, lg in steps], 1)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_cached_equals_uncached_nested_subllm(name):
    """A nested SUBLLM with each scaling: cached greedy generation (prefill + decode_step) equals the
    full forward recomputed at every step, token for token, past the original length (dynamic: up
    to it - past it, see test_dynamic_cached_decode_equals_hf_cached_decode)."""
    model = sharp_model(rope_scaling=SCALINGS[name])
    lens, n = ([40, 22, 31], 24) if name != "dynamic" else ([20, 9, 14], 12)
    ids, mask = left_padded(lens, vocab=97)
    tok_c, lg_c = _generate(model, ids, mask, n, True)
    tok_u, lg_u = _generate(model, ids, mask, n, False)
    assert torch.equal(tok_c, tok_u)
    assert (lg_c - lg_u).abs().max() < 1e-4
    fr = model(torch.cat([ids, tok_c], 1), torch.cat([mask, torch.ones_like(tok_c)], 1)).keep_fractions
    assert all(0.1 < f < 0.9 for f in fr), fr  # kept and dropped tokens at every S
    if name not in ("default", "dynamic"):  # the scaling matters over this run
        assert (_generate(sharp_model(), ids, mask, n, False)[1] - lg_u).abs().max() > 1e-2


def test_kept_tokens_rotate_at_original_positions_with_scaling():
    """Every level's cos/sin are rope_cos_sin at the kept tokens' original positions (yarn: with
    the attention factor), and for dynamic with the full sequence's length."""
    for name in ("yarn", "dynamic"):
        model = tiny_model(rope_scaling=SCALINGS[name], max_seq_len=128)
        T = 60
        seen = []
        hook = model.layers[3].register_forward_pre_hook(lambda m, a, seen=seen: seen.append((a[1], a[2])))
        with torch.no_grad():
            sels = model(torch.randint(3, 97, (1, T)), return_selections=True).selections
        hook.remove()
        orig_pos = sels[0].idx.gather(1, sels[1].idx)  # layer 3 sits inside both S
        c = model.config
        cos, sin = rope_cos_sin(orig_pos, c.head_dim, c.rope_theta, c.rope_scaling, torch.tensor([T]))
        assert torch.equal(seen[0][0], cos) and torch.equal(seen[0][1], sin)


def test_config_checks_and_legacy():
    c = ModelConfig(dim=64, n_heads=4, rope_scaling={"type": "linear", "factor": 2, "rope_theta": 10000.0})
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2}
    y = ModelConfig(dim=64, n_heads=4, max_seq_len=512, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert y.rope_scaling["original_max_position_embeddings"] == 512
    assert (
        ModelConfig.from_dict({k: v for k, v in y.to_dict().items() if k != "rope_scaling"}).rope_scaling
        is None
    )
    for bad, msg in (
        ({"rope_type": "longrope", "factor": 2}, "not supported"),
        ({"rope_type": "linear"}, "needs factor"),
        ({"rope_type": "yarn", "factor": 2, "beta": 3}, "unknown key"),
        ({"rope_type": "linear", "factor": 0.5}, ">= 1"),
        ({"rope_type": "linear", "factor": 2, "rope_theta": 1.0}, "rope_theta"),
    ):
        with pytest.raises(SubLLMError, match=msg):
            ModelConfig(dim=64, n_heads=4, rope_scaling=bad)


@pytest.mark.parametrize("name", ["dynamic", "yarn"])
def test_convert_round_trip_and_hf_config_carry_scaling(tmp_path, name):
    from subllm.hf import SubLLMConfig, SubLLMForCausalLM
    from subllm.hf.llama import from_hf_llama_dir, to_hf_llama_dir

    hf = _hf_llama(SCALINGS[name])
    hf.save_pretrained(tmp_path / "hf")
    model = from_hf_llama_dir(tmp_path / "hf", tmp_path / "sub")
    back = to_hf_llama_dir(tmp_path / "sub", tmp_path / "hf2")
    assert back.config.rope_parameters["rope_type"] == name
    assert back.config.max_position_embeddings == hf.config.max_position_embeddings
    ids = torch.randint(0, 101, (1, 80))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max() < 1e-4
    loaded = SubLLMForCausalLM.from_pretrained(tmp_path / "sub").eval()
    assert loaded.config.rope_scaling == model.config.rope_scaling
    assert SubLLMConfig.from_model_config(model.config).to_model_config() == model.config
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() == 0


def test_dynamic_cached_decode_equals_hf_cached_decode():
    """Past the original length, "dynamic" cached decode is Hugging Face's: prefill at the prompt's
    length, each new token at the length it makes, cached keys unchanged - logits equal
    LlamaForCausalLM decoding with its own KV cache (and differ from recomputing the full forward,
    which moves every earlier token to the new length's frequencies)."""
    from subllm.inference.engine import decode_step, new_cache, prefill

    hf = _hf_llama(SCALINGS["dynamic"])
    model = SubLLM.from_hf_llama(hf).eval()
    ids = torch.randint(0, 101, (1, 40))
    new = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        out = hf(ids, use_cache=True)
        ref, past = [out.logits[:, -1]], out.past_key_values
        for t in range(new.shape[1]):
            out = hf(new[:, t : t + 1], cache=past, use_cache=True)
            ref.append(out.logits[:, -1])
            past = out.past_key_values
        cache = new_cache(model, 1)
        ours = [prefill(model, ids, None, cache)] + [decode_step(model, cache, new[:, t]) for t in range(10)]
        full = model(torch.cat([ids, new], 1)).logits[:, -1]
    assert (torch.stack(ref) - torch.stack(ours)).abs().max() < 1e-4
    assert (full - ours[-1]).abs().max() > 1e-3


def test_convert_cli_sets_rope_scaling(tmp_path, capsys):
    """`subllm convert --from-hf-llama --rope-scaling JSON --max-seq-len N`: a plain Llama extended
    with yarn equals the same Llama with yarn in transformers (the weights are untouched)."""
    from subllm.cli import main

    _hf_llama(None).save_pretrained(tmp_path / "hf")
    yarn = SCALINGS["yarn"]
    args = ["convert", "--from-hf-llama", str(tmp_path / "hf"), "--out", str(tmp_path / "sub")]
    assert main(args + ["--rope-scaling", json.dumps(yarn), "--max-seq-len", "512"]) == 0
    model = SubLLM.from_pretrained(tmp_path / "sub").eval()
    assert model.config.rope_scaling == yarn and model.config.max_seq_len == 512
    ids = torch.randint(0, 101, (1, 200))
    with torch.no_grad():
        assert (model(ids).logits - _hf_llama(yarn)(ids).logits).abs().max() < 1e-4
    assert main(args + ["--overwrite", "--rope-scaling", "yarn"]) != 0
    assert "--rope-scaling must be a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("head_dim", [16, 48, 64])
def test_decode_table_rows_equal_per_step_rotations(name, head_dim):
    """engine.decode_cos_sin reads rows of a kept table (grown past 1,024 positions on demand);
    the rows are what rope_cos_sin gives for those positions alone, the per-step computation."""
    from subllm.inference.engine import decode_cos_sin

    scaling = SCALINGS[name]
    model = tiny_model(dim=4 * head_dim, n_heads=4, n_kv_heads=2, rope_scaling=scaling, max_seq_len=4096)
    c = model.config
    for positions in ([0], [5], [1023], [1024], [3000], [7, 0, 2999]):
        cos, sin = decode_cos_sin(model, positions, torch.device("cpu"))
        pos = torch.tensor(positions)[:, None]
        seq_len = pos[:, 0] + 1 if name == "dynamic" else None
        ref_cos, ref_sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, c.rope_scaling, seq_len)
        assert cos.shape == ref_cos.shape == (len(positions), 1, head_dim)
        torch.testing.assert_close(cos, ref_cos, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sin, ref_sin, rtol=1e-6, atol=1e-7)
    table = model.__dict__.get("_rope_table")
    assert (table is None) == (name == "dynamic")  # dynamic: per row, never a table
    if table is not None:
        assert table[1].shape[0] >= 3001
