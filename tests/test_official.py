"""`subllm convert --from-official / --to-official`: the authors' SubllmModel state-dict layout.

The oracle is `reference_logits`, a slow, loop-free-of-tricks forward written directly on THEIR
key names (separate q/k/v, w12/w3, their inv_freq buffers, bypasses numbered by ')'), batch 1,
eval mode (keep iff s > 0, original RoPE positions at every level, docs/method.md sections 3, 5, 6).
"""

import json

import pytest
import torch
import torch.nn.functional as F

from subllm import ModelConfig, SubLLM
from subllm.cli import main
from subllm.hf.official import bypass_order

STRUCTURE = "T(T(T)T)T(T)T"  # '(' order: outer, inner, last; ')' order: inner, outer, last
DIM, HEADS, FFN, VOCAB = 32, 4, 48, 61


def official_config(**kw) -> dict:
    cfg = {
        "num_embeddings": VOCAB,
        "decoder_embed_dim": DIM,
        "decoder_ffn_embed_dim": FFN,
        "hidden_size": DIM,
        "decoder_layers": STRUCTURE.count("T"),
        "decoder_attention_heads": HEADS,
        "norm_name": "rmsnorm",
        "mlp_name": "swiglu",
        "qk_bias": False,
        "tokens_per_sample": 64,
        "padding_idx": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "downsampling_factor_denominator": "0.64",
        "tie_weights": False,
        "structure": STRUCTURE,
    }
    return {**cfg, **kw}


def official_keys(n_layers, n_subs, tie) -> list[str]:
    """The authors' state-dict keys, written out by hand from their module tree."""
    keys = ["decoder.embed_tokens.weight", "decoder.layer_norm.weight", "decoder.output_projection.weight"]
    for i in range(n_layers):
        p = f"decoder.layers.{i}."
        keys += [p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v", "out")]
        keys += [p + "self_attn.position.inv_freq", p + "self_attn_layer_norm.weight"]
        keys += [p + "final_layer_norm.weight", p + "feedforward.swiglu.w12.weight"]
        keys += [p + "feedforward.swiglu.w3.weight"]
    keys += [f"decoder.downsamplers.{j}.to_scores.weight" for j in range(n_subs)]
    keys += [f"decoder.bypasses.{j}.bypass_scale" for j in range(n_subs)]
    return keys


def random_official_state(seed=0, tie=False) -> dict:
    """A random checkpoint in the authors' layout: unit-scale embeddings, so scores w.x with
    w ~ N(0, 1/d) are O(1) and about half the tokens are kept; a distinct bypass scale per ')'."""
    g = torch.Generator().manual_seed(seed)
    hd = DIM // HEADS

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "decoder.embed_tokens.weight": rnd(VOCAB, DIM),
        "decoder.layer_norm.weight": 1 + rnd(DIM, std=0.1),
        "decoder.output_projection.weight": rnd(VOCAB, DIM, std=DIM**-0.5),
    }
    for i in range(STRUCTURE.count("T")):
        p = f"decoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            sd[p + f"self_attn.{n}_proj.weight"] = rnd(DIM, DIM, std=DIM**-0.5)
        sd[p + "self_attn.position.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        sd[p + "self_attn_layer_norm.weight"] = 1 + rnd(DIM, std=0.1)
        sd[p + "final_layer_norm.weight"] = 1 + rnd(DIM, std=0.1)
        sd[p + "feedforward.swiglu.w12.weight"] = rnd(2 * FFN, DIM, std=DIM**-0.5)
        sd[p + "feedforward.swiglu.w3.weight"] = rnd(DIM, FFN, std=FFN**-0.5)
    for j in range(STRUCTURE.count("(")):
        sd[f"decoder.downsamplers.{j}.to_scores.weight"] = rnd(1, DIM, std=DIM**-0.5)
        sd[f"decoder.bypasses.{j}.bypass_scale"] = 0.2 + 0.8 * torch.rand(DIM, generator=g)
    if tie:
        sd["decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"]
    assert sorted(sd) == sorted(official_keys(STRUCTURE.count("T"), STRUCTURE.count("("), tie))
    return sd


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, inv_freq):  # x (L, H, hd)
    f = pos.float()[:, None] * inv_freq
    cos, sin = torch.cat([f, f], -1).cos()[:, None], torch.cat([f, f], -1).sin()[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _layer(sd, i, x, pos, heads):
    p = f"decoder.layers.{i}."
    L, d = x.shape
    hd = d // heads
    h = _rms(x, sd[p + "self_attn_layer_norm.weight"])
    q, k, v = (h @ sd[p + f"self_attn.{n}_proj.weight"].T for n in ("q", "k", "v"))
    inv = sd[p + "self_attn.position.inv_freq"]
    q, k, v = (t.view(L, heads, hd) for t in (q, k, v))
    q, k = _rope(q, pos, inv), _rope(k, pos, inv)
    att = torch.einsum("qhd,khd->hqk", q, k) * hd**-0.5
    att = att.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(L, d) @ sd[p + "self_attn.out_proj.weight"].T
    h = _rms(x, sd[p + "final_layer_norm.weight"])
    gate, up = (h @ sd[p + "feedforward.swiglu.w12.weight"].T).chunk(2, -1)
    return x + (F.silu(gate) * up) @ sd[p + "feedforward.swiglu.w3.weight"].T


def reference_logits(sd, cfg, ids) -> tuple[torch.Tensor, list[int]]:
    """Logits (T, V) of one sequence from the authors' layout; also the kept count per '('."""
    x, pos = sd["decoder.embed_tokens.weight"][ids], torch.arange(len(ids))
    stack, kept, layer, n_open, n_close = [], [], 0, 0, 0
    for ch in cfg["structure"]:
        if ch == "T":
            x = _layer(sd, layer, x, pos, cfg["decoder_attention_heads"])
            layer += 1
        elif ch == "(":
            s = x @ sd[f"decoder.downsamplers.{n_open}.to_scores.weight"][0]
            n_open += 1
            idx = (s > 0).nonzero()[:, 0]
            kept.append(len(idx))
            stack.append((x, pos, idx, s[idx].clamp(0, 1)[:, None]))
            x, pos = x[idx], pos[idx]
        else:
            xo, pos, idx, w = stack.pop()
            b = sd[f"decoder.bypasses.{n_close}.bypass_scale"]  # numbered by ')'
            n_close += 1
            y = xo.clone()
            y[idx] = w * x + (1 - w) * xo[idx]
            x = xo + b * (y - xo)
    x = _rms(x, sd["decoder.layer_norm.weight"])
    return x @ sd["decoder.output_projection.weight"].T, kept


def _write(tmp_path, sd, cfg, wrap=False):
    torch.save({"model": sd} if wrap else sd, tmp_path / "official.pt")
    (tmp_path / "official.json").write_text(json.dumps(cfg))
    return str(tmp_path / "official.pt"), str(tmp_path / "official.json")


def test_bypass_order():
    assert bypass_order("T(T(T)T)T(T)T") == [1, 0, 2]
    assert bypass_order("T(T)T(T)T") == [0, 1]
    assert bypass_order("((T)T)") == [1, 0]


@pytest.mark.parametrize("tie,wrap", [(False, False), (True, True)])
def test_from_official_matches_reference(tmp_path, tie, wrap, capsys):
    sd, cfg = random_official_state(seed=3, tie=tie), official_config(tie_weights=tie)
    ckpt, cjson = _write(tmp_path, sd, cfg, wrap)
    out = tmp_path / "ours"
    assert main(["convert", "--from-official", ckpt, "--config", cjson, "--out", str(out)]) == 0
    assert "norm eps 1e-05" in capsys.readouterr().out
    model = SubLLM.from_pretrained(out).eval()
    c = model.config
    assert (c.norm_eps, c.rope_theta, c.tie_embeddings, c.keep_ratio) == (1e-5, 10000.0, tie, 0.64)
    assert c.selection == "paper"
    for seed in range(3):
        ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(seed))
        ref, kept = reference_logits(sd, cfg, ids)
        assert all(0 < k < 40 for k in kept), kept  # a real mix of kept and dropped at every S
        with torch.no_grad():
            ours = model(ids[None]).logits[0]
        assert (ours - ref).abs().max() < 1e-4


def test_bypass_reindex_matters():
    """Without the ')' -> '(' re-index (matching bypasses by number) the logits are far off."""
    sd, cfg = random_official_state(seed=3), official_config()
    swapped = dict(sd)
    swapped["decoder.bypasses.0.bypass_scale"] = sd["decoder.bypasses.1.bypass_scale"]
    swapped["decoder.bypasses.1.bypass_scale"] = sd["decoder.bypasses.0.bypass_scale"]
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    assert (reference_logits(sd, cfg, ids)[0] - reference_logits(swapped, cfg, ids)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("tie", [False, True])
def test_to_official_matches_reference(tmp_path, tie):
    cfg = ModelConfig(
        vocab_size=VOCAB, dim=DIM, n_heads=HEADS, ffn_dim=FFN, structure=STRUCTURE, max_seq_len=64,
        norm_eps=1e-5, tie_embeddings=tie,
    ).with_selection("paper")  # fmt: skip
    torch.manual_seed(5)
    model = SubLLM(cfg)
    with torch.no_grad():
        model.embed.weight.normal_()  # unit-scale x: scores O(1), a real mix kept and dropped
        for s in model.subsamples:
            s.score.weight.normal_(std=DIM**-0.5)
        for b in model.bypasses:
            b.scale.uniform_(0.2, 1.0)
    model.eval().save_pretrained(tmp_path / "ours")
    assert main(["convert", "--to-official", str(tmp_path / "ours"), "--out", str(tmp_path / "off")]) == 0
    sd = torch.load(tmp_path / "off" / "model.pt", weights_only=True)
    their_cfg = json.loads((tmp_path / "off" / "config.json").read_text())
    assert sorted(sd) == sorted(official_keys(cfg.n_layers, cfg.n_subsamples, tie))
    assert their_cfg["qk_bias"] is False and their_cfg["tie_weights"] is tie
    assert float(their_cfg["downsampling_factor_denominator"]) == 0.64
    for seed in range(3):
        ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(seed))
        ref, kept = reference_logits(sd, their_cfg, ids)
        assert all(0 < k < 40 for k in kept), kept
        with torch.no_grad():
            assert (model(ids[None]).logits[0] - ref).abs().max() < 1e-4
    # and back: the same weights, bit for bit
    assert main(["convert", "--from-official", str(tmp_path / "off" / "model.pt"), "--config",
                 str(tmp_path / "off" / "config.json"), "--out", str(tmp_path / "back")]) == 0  # fmt: skip
    a, b = model.state_dict(), SubLLM.from_pretrained(tmp_path / "back").state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_official_errors(tmp_path, capsys):
    sd = random_official_state()
    cfg = official_config()
    del cfg["qk_bias"]  # SubllmConfig's default is qk_bias=True
    ckpt, cjson = _write(tmp_path, sd, cfg)
    base = ["convert", "--from-official", ckpt, "--config", cjson, "--out", str(tmp_path / "o")]
    assert "qk_bias" in _err(capsys, base)
    bad = dict(sd)
    key = "decoder.layers.0.self_attn.position.inv_freq"
    bad[key] = sd[key] ** 1.1
    _write(tmp_path, bad, official_config())
    assert "inv_freq does not match RoPE base" in _err(capsys, base)
    _write(tmp_path, sd, official_config(norm_name="layernorm"))
    assert "only rmsnorm + swiglu" in _err(capsys, base)
    _write(tmp_path, {**sd, "decoder.layers.0.self_attn.q_proj.bias": torch.zeros(DIM)}, official_config())
    assert "biases" in _err(capsys, base)
    assert "needs --config" in _err(capsys, base[:3] + base[5:])
    # the way back refuses what their model cannot express (GQA here), naming it
    gqa = ModelConfig(vocab_size=VOCAB, dim=DIM, n_heads=4, n_kv_heads=2, ffn_dim=FFN, structure="T(T)T")
    SubLLM(gqa).save_pretrained(tmp_path / "gqa")
    msg = _err(capsys, ["convert", "--to-official", str(tmp_path / "gqa"), "--out", str(tmp_path / "x")])
    assert "grouped-query attention" in msg and "norm_eps 1e-06" in msg


def test_inv_freq_of_another_rope_base_is_refused():
    """A RoPE base of 10010 instead of 10000 moves every inv_freq by under 0.1%, and is still another
    model's positions: refused. The exact buffer converts."""
    from subllm import SubLLMError
    from subllm.hf.official import config_from_official, state_from_official

    sd, cfg = random_official_state(), config_from_official(official_config())
    state_from_official(sd, cfg)
    hd = DIM // HEADS
    near = 1.0 / (10010 ** (torch.arange(0, hd, 2).float() / hd))
    key = "decoder.layers.2.self_attn.position.inv_freq"
    assert 0 < float((near / sd[key] - 1).abs().max()) < 0.001
    with pytest.raises(SubLLMError, match="layers.2.self_attn.position.inv_freq does not match RoPE base"):
        state_from_official({**sd, key: near}, cfg)


def test_tied_checkpoint_with_another_output_projection_is_refused():
    """tie_weights=true: output_projection must equal embed_tokens (or be absent); one element off is
    an error, not a silently dropped head."""
    from subllm import SubLLMError
    from subllm.hf.official import config_from_official, state_from_official

    sd, cfg = random_official_state(tie=True), config_from_official(official_config(tie_weights=True))
    state_from_official(sd, cfg)
    no_head = {k: v for k, v in sd.items() if k != "decoder.output_projection.weight"}
    assert torch.equal(state_from_official(no_head, cfg)["head.weight"], sd["decoder.embed_tokens.weight"])
    head = sd["decoder.output_projection.weight"].clone()
    head[3, 5] += 1e-3
    with pytest.raises(SubLLMError, match="tie_weights=true but output_projection differs"):
        state_from_official({**sd, "decoder.output_projection.weight": head}, cfg)


def test_released_preset_eps():
    from subllm.config import get_preset

    assert get_preset("subllm-1.3b").norm_eps == 1e-5 and get_preset("llama-1.3b").norm_eps == 1e-5
