"""SubLLM against the invariants of docs/design.md: HF parity, causality, exact top-k counts,
padding invariance, original positions, gradients to every score layer, loud missing step."""

import math

import pytest
import torch
from helpers import tiny_config, tiny_model

from subllm import SubLLM, SubLLMError
from subllm.model.layers import apply_rope, rope_cos_sin


def _hf_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        max_position_embeddings=128,
        **kw,
    )
    torch.manual_seed(1)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_key_value_heads=6),
        dict(num_key_value_heads=2, rope_theta=5000.0),
        dict(num_key_value_heads=3, tie_word_embeddings=True, rms_norm_eps=1e-5),
    ],
)
def test_all_t_matches_hf_llama(kw):
    hf = _hf_llama(**kw)
    model = SubLLM.from_hf_llama(hf).eval()
    assert model.config.structure == "TTT"
    ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids).logits
    assert (ref - ours).abs().max() < 1e-4


def test_hf_llama_with_structure_copies_layers():
    hf = _hf_llama(num_key_value_heads=2)
    model = SubLLM.from_hf_llama(hf, structure="T(T)T", keep_ratio=0.5)
    assert model.config.keep_ratios == [0.5]
    assert torch.equal(model.layers[1].ffn.w2.weight, hf.model.layers[1].mlp.down_proj.weight)
    with pytest.raises(SubLLMError, match="has 2 layers"):
        SubLLM.from_hf_llama(hf, structure="T(T)")


def test_eval_mode_is_causal_with_mixed_selection():
    model = tiny_model()
    T = 48
    ids = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        out = model(ids, return_selections=True)
        fr = out.keep_fractions
        assert all(0.15 < f < 0.85 for f in fr), fr  # a real mix of kept and dropped at every S
        for t in [0, 5, 20, 47]:
            ids2 = ids.clone()
            ids2[:, t + 1 :] = torch.randint(0, 97, (2, T - t - 1))
            out2 = model(ids2)
            assert (out.logits[:, : t + 1] - out2.logits[:, : t + 1]).abs().max() < 1e-5, t


@pytest.mark.parametrize("ratio", [0.64, 0.5, 1.0, 0.1])
def test_training_keeps_exact_counts(ratio):
    model = tiny_model(keep_ratio=ratio).train()
    model.set_step(0)
    T = 37
    lens = [37, 20, 1, 30]
    mask = torch.zeros(4, T, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    ids = torch.randint(0, 97, (4, T))
    out = model(ids, attention_mask=mask, labels=ids, return_selections=True)
    s0, s1 = out.selections
    k0 = [math.ceil(ratio * n - 1e-9) for n in lens]
    assert s0.n_kept.tolist() == k0
    assert s1.n_kept.tolist() == [math.ceil(ratio * k - 1e-9) for k in k0]
    for sel in out.selections:
        assert (sel.weight >= 0).all() and (sel.weight <= 1).all()
        valid = sel.valid if sel.valid is not None else torch.ones_like(sel.idx, dtype=torch.bool)
        for b in range(4):
            kept = sel.idx[b][valid[b]]
            assert torch.equal(kept, kept.sort().values)  # ascending = causal order
    kept0 = s0.idx[0][: k0[0]]
    assert mask[0, kept0].all()  # pads are never kept
    out.loss.backward()
    for s in model.subsamples:
        assert s.score.weight.grad is not None and s.score.weight.grad.abs().sum() > 0
    for b in model.bypasses:
        assert b.scale.grad is not None


def test_training_forward_without_step_fails_loudly():
    model = tiny_model().train()
    with pytest.raises(SubLLMError, match="set_step"):
        model(torch.randint(0, 97, (1, 8)))
    llama = SubLLM(tiny_config().as_llama()).train()  # no schedules: no step needed
    llama(torch.randint(0, 97, (1, 8)))


def _pad(ids, n_pad, left):
    pad = torch.zeros(ids.shape[0], n_pad, dtype=ids.dtype)
    x = torch.cat([pad, ids], 1) if left else torch.cat([ids, pad], 1)
    m = (
        torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], 1)
        if left
        else torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], 1)
    )
    return x, m


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_padding_invariance(left, training):
    model = tiny_model()
    model.train(training)
    model.set_step(3)
    rows = [torch.randint(3, 97, (1, n)) for n in (30, 17, 24)]
    T = 30
    batch, mask = zip(*[_pad(r, T - r.shape[1], left) for r in rows])
    batch, mask = torch.cat(batch), torch.cat(mask)
    torch.manual_seed(5)
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
    for b, r in enumerate(rows):
        torch.manual_seed(5)  # same flip / limiter draws as the batched call
        with torch.no_grad():
            alone = model(r).logits[0]
        got = out.logits[b][mask[b].bool()]
        assert (got - alone).abs().max() < 1e-5, (b, (got - alone).abs().max())
        assert torch.isfinite(out.logits).all()


def test_rope_positions_arange_equals_contiguous():
    hd, T = 16, 12
    x = torch.randn(2, 3, T, hd)
    cos, sin = rope_cos_sin(torch.arange(T).expand(2, T), hd, 10000.0)
    got = apply_rope(x, cos, sin)
    # obviously-correct reference: rotate pairs (i, i + hd/2) by angle t * theta^(-2i/hd)
    ref = torch.empty_like(x)
    for t in range(T):
        for i in range(hd // 2):
            a = t * 10000.0 ** (-2 * i / hd)
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[..., t, i], x[..., t, i + hd // 2]
            ref[..., t, i] = x1 * c - x2 * s
            ref[..., t, i + hd // 2] = x2 * c + x1 * s
    assert (got - ref).abs().max() < 1e-5
    # a subset of positions rotates exactly like the same rows of the full sequence
    sub = torch.tensor([[1, 4, 9], [0, 2, 11]])
    cs, ss = rope_cos_sin(sub, hd, 10000.0)
    xs = torch.stack([x[b, :, sub[b]] for b in range(2)])
    ys = apply_rope(xs, cs, ss)
    assert torch.allclose(ys, torch.stack([got[b, :, sub[b]] for b in range(2)]), atol=1e-6)


def test_nested_levels_see_original_positions():
    model = tiny_model()
    seen = []
    orig = model.make_level

    def spy(pos, valid, *rest):
        seen.append(pos.clone())
        return orig(pos, valid, *rest)

    model.make_level = spy
    with torch.no_grad():
        out = model(torch.randint(0, 97, (2, 40)), return_selections=True)
    s0, s1 = out.selections
    assert torch.equal(seen[1], s0.idx)  # level 1: the kept indexes of S0 are original positions
    assert torch.equal(seen[2], s0.idx.gather(1, s1.idx))  # level 2: composed index maps


def test_save_load_roundtrip(tmp_path):
    model = tiny_model(tie_embeddings=True)
    model.save_pretrained(tmp_path)
    again = SubLLM.from_pretrained(tmp_path).eval()
    assert again.config == model.config
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert again.head.weight is again.embed.weight
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SubLLMError, match="corrupt"):
        SubLLM.from_pretrained(tmp_path)
    with pytest.raises(SubLLMError, match="no config.json"):
        SubLLM.from_pretrained(tmp_path / "missing")


def test_output_fields_and_errors():
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 16))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 16, 97) and len(out.keep_fractions) == 2
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref)
    with pytest.raises(SubLLMError, match="max_seq_len"):
        model(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(SubLLMError, match="shape"):
        model(torch.zeros(5, dtype=torch.long))


def test_score_flags_reach_the_modules():
    """ModelConfig's score/Balancer fields (docs/method.md sections 2, 4; score_norm and the "weight"
    gate are beyond the paper) reach every S; the "paper" recipe gives the paper's, the defaults
    score on x / rms(x) with unit-scale scores at initialisation."""
    from subllm.model.subsample import ScoreLinear

    torch.manual_seed(0)
    m = SubLLM(tiny_config().with_selection("paper"))
    for s in m.subsamples:
        assert isinstance(s.score, ScoreLinear) and not s.score.norm
        assert s.options.balancer_gate == "grad" and s.grad_scale == 0.04
        assert 0.01 < float(s.score.weight.detach().std()) < 0.03  # init_std, like every Linear
    m = SubLLM(tiny_config())
    for s in m.subsamples:
        assert s.score.norm and 0.1 < float(s.score.weight.detach().std()) < 0.25  # 1/sqrt(32) = 0.18
    cfg = tiny_config(score_norm=True, score_init_std=0.5, balancer_gate="weight", balancer_grad_scale=0.1)
    m = SubLLM(cfg)
    for s in m.subsamples:
        assert s.score.norm and s.options.balancer_gate == "weight" and s.grad_scale == 0.1
        assert 0.35 < float(s.score.weight.detach().std()) < 0.65  # 32 draws of N(0, 0.5^2)
    assert 0.01 < float(m.layers[0].attn.wo.weight.detach().std()) < 0.03  # other Linears keep init_std
    for bad, frag in [(dict(balancer_gate="x"), "balancer_gate"), (dict(score_init_std=0.0), "score_init")]:
        with pytest.raises(SubLLMError, match=frag):
            tiny_config(**bad)


def test_score_norm_and_weight_gate_train_and_decode():
    torch.manual_seed(0)
    cfg = tiny_config(score_norm=True, score_init_std=32**-0.5, balancer_gate="weight")
    model = SubLLM(cfg).train()
    model.set_step(0)
    ids = torch.randint(0, 97, (3, 29))
    out = model(ids, labels=ids, return_selections=True)
    assert [s.n_kept.tolist() for s in out.selections][0] == [math.ceil(0.6 * 29)] * 3
    out.loss.backward()
    for s in model.subsamples:
        assert s.score.weight.grad is not None and s.score.weight.grad.abs().sum() > 0
    # inference: O(1) scores from the start, a real mix of kept and dropped; cached == uncached
    from subllm.inference.generation import stream_generate

    model.eval()
    fr = model(ids).keep_fractions
    assert all(0.1 < f < 0.9 for f in fr), fr

    def run(use_cache):
        kw = dict(max_new_tokens=6, use_cache=use_cache, return_logits=True)
        it = stream_generate(model, ids[:, :12], None, **kw)
        return torch.stack([lg for _, lg in it], 1)

    assert (run(True) - run(False)).abs().max() < 1e-5
