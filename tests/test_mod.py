"""Mixture-of-Depths `M` layers (subllm/model/mod.py): the structure string, exact top-k counts, the
training forward against a slow per-row reference of MoD's equation, causal inference, cached ==
uncached generation, the KV invariant, the auxiliary losses, save/load, HF AutoModel, the trainer
and uptraining into `M` layers."""

import math

import pytest
import torch
from helpers import WORDS, checkpoint_with_tokenizer, left_padded, tiny_config

from subllm import SubLLM, SubLLMError
from subllm.cli import main
from subllm.config import ModelConfig, Sub, module_names, parse_structure
from subllm.inference.engine import new_cache, prefill
from subllm.inference.generation import stream_generate
from subllm.model.layers import rope_cos_sin

ROUTERS = ["aux_loss", "predictor"]


def mod_model(structure="TMT(MT)M", router="aux_loss", seed=0, capacity=0.3, **kw) -> SubLLM:
    torch.manual_seed(seed)
    cfg = tiny_config(structure, 0.6, mod_capacity=capacity, mod_router=router, vocab_size=256, **kw)
    return SubLLM(cfg)


def mixing_eval_model(structure="TMT(MT)M", router="aux_loss", seed=0, **kw) -> SubLLM:
    """Eval-mode model whose decisions keep some and drop some tokens at every router: scores scaled
    up (S and routers), and the predictor's output bias set to split its logits about in half."""
    m = mod_model(structure, router, seed, **kw)
    x = torch.randn(4, 64, m.config.dim)
    with torch.no_grad():
        for s in m.subsamples:
            s.score.weight.mul_(40.0)
            if getattr(s, "predictor", None) is not None:
                s.predictor.fc2.weight.mul_(40.0)
                s.predictor.fc2.bias.sub_(s.predictor(x).median())
    return m.eval()


def test_structure_parsing_numbers_m_layers_and_routers():
    tree = parse_structure("TMT(MT)M")
    assert tree == (0, Sub(0, (1,), mod=True), 2, Sub(1, (Sub(2, (3,), mod=True), 4)), Sub(3, (5,), mod=True))
    c = tiny_config("TMT(MT)M", [0.5], mod_capacity=0.25)
    assert c.n_layers == 6 and c.n_subsamples == 4
    assert c.mod_flags == [True, False, True, True]
    assert c.keep_ratios == [0.25, 0.5, 0.25, 0.25]
    assert c.as_llama().structure == "TTTTTT" and c.as_llama().n_subsamples == 0
    assert module_names("TMT(MT)M") == ["M0", "S1", "M2", "M3"]
    with pytest.raises(SubLLMError, match="only 'T', 'M', '\\(' and '\\)'"):
        tiny_config("TXT")
    with pytest.raises(SubLLMError, match="keep_ratio has 2 values"):
        tiny_config("TMT(MT)M", [0.5, 0.5])  # keep_ratio counts brackets only
    with pytest.raises(SubLLMError, match="mod_router"):
        tiny_config("TMT", mod_router="softmax")
    with pytest.raises(SubLLMError, match="mod_capacity"):
        tiny_config("TMT", mod_capacity=0.0)
    back = ModelConfig.from_dict(tiny_config("TMT", mod_router="predictor").to_dict())
    assert back.mod_router == "predictor"


@pytest.mark.parametrize("router", ROUTERS)
def test_training_keeps_exactly_top_k_per_row(router):
    m = mod_model(router=router, capacity=0.3)
    m.train()
    m.set_step(0)
    ids, mask = left_padded([40, 17, 29])
    out = m(ids, mask, return_selections=True)
    n_real = mask.sum(1)
    for i, (sel, r) in enumerate(zip(out.selections, m.config.keep_ratios)):
        n = n_real if i in (0, 1) else sel.n_real  # inside S, the tokens S1 passed on
        expect = torch.tensor([math.ceil(r * int(v) - 1e-9) for v in n])
        assert torch.equal(sel.n_kept, expect), (i, sel.n_kept, expect)
        assert bool(((sel.weight >= 0) & (sel.weight <= 1)).all())  # sigmoid weights, as S's lie in [0, 1]
        if m.config.mod_flags[i] and router == "aux_loss":  # the router's top-k among real tokens
            key = sel.scores if sel.real is None else sel.scores.masked_fill(~sel.real, float("-inf"))
            for b in range(3):
                top = key[b].topk(int(expect[b])).indices
                assert bool(sel.kept_mask[b, top].all()) and int(sel.kept_mask[b].sum()) == int(expect[b])
    assert torch.equal(out.selections[1].n_real, n_real)


@pytest.mark.parametrize("weight", ["raw", "sigmoid"])
def test_training_forward_equals_a_slow_reference_of_mods_equation(weight):
    """z_t = x_t + w(r_t) (block(x_S)_t - x_t) for the top-k tokens S of each row, x_t elsewhere
    (w(r) = r, or sigmoid(r)); the block attends causally among the chosen tokens only, at their
    original positions."""
    m = mod_model("TMT", capacity=0.4, mod_weight=weight)
    m.train()
    m.set_step(0)
    ids = torch.randint(3, 256, (3, 30))
    c = m.config
    with torch.no_grad():
        got = m(ids).logits
        pos = torch.arange(30)
        cos, sin = rope_cos_sin(pos[None], c.head_dim, c.rope_theta)
        x = m.layers[0](m.embed(ids), cos, sin, None)
        r = m.subsamples[0].scores(x)
        k = math.ceil(0.4 * 30)
        z = x.clone()
        for b in range(3):
            top = r[b].topk(k).indices.sort().values
            cb, sb = rope_cos_sin(top[None], c.head_dim, c.rope_theta)
            h = m.layers[1](x[b : b + 1, top], cb, sb, None)[0]
            w = r[b, top, None] if weight == "raw" else torch.sigmoid(r[b, top, None])
            z[b, top] = x[b, top] + w * (h - x[b, top])
        want = m.head(m.norm(m.layers[2](z, cos, sin, None)))
    assert (got - want).abs().max() < 1e-5


def _router_input(m, ids):
    """Slow reference pieces of a "TMT" model: the router's input x (the first layer's output),
    the router values r and the decision logits d (r, or the predictor's logit)."""
    c = m.config
    cos, sin = rope_cos_sin(torch.arange(ids.shape[1])[None], c.head_dim, c.rope_theta)
    x = m.layers[0](m.embed(ids), cos, sin, None)
    sub = m.subsamples[0]
    r = sub.scores(x)
    return x, r, (r if sub.predictor is None else sub.predictor(x)), (cos, sin)


@pytest.mark.parametrize("router", ROUTERS)
def test_aux_loss_equals_a_slow_reference(router):
    """select_loss = mod_aux_loss * the mean over tokens of BCE(sigmoid(d_t), t in the top-k of r),
    written out per token."""
    m = mod_model("TMT", router=router, capacity=0.4, mod_aux_loss=0.3)
    m.train()
    m.set_step(0)
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = float(m(ids).select_loss)
        _, r, d, _ = _router_input(m, ids)
    terms = []
    for b in range(2):
        top = set(r[b].topk(math.ceil(0.4 * 20)).indices.tolist())
        for t in range(20):
            p = 1 / (1 + math.exp(-float(d[b, t])))
            terms.append(-math.log(p) if t in top else -math.log(1 - p))
    assert got == pytest.approx(0.3 * sum(terms) / len(terms), rel=1e-5)


@pytest.mark.parametrize("router", ROUTERS)
def test_calibrated_threshold_follows_the_decision_logits(router):
    """The calibrated theta tracks the top-k cut of what decides at inference: the router values
    ("aux_loss") or the predictor's logits ("predictor"), never the other."""
    m = mod_model("TMT", router=router, capacity=0.4, threshold="calibrated")
    m.train()
    m.set_step(0)
    ids = torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(5))
    m(ids)  # a training forward with gradients: one update, which is the batch's cut itself
    with torch.no_grad():
        _, _, d, _ = _router_input(m, ids)
    top = d.sort(1, descending=True).values
    k = math.ceil(0.4 * 20)
    torch.testing.assert_close(m.subsamples[0].threshold, ((top[:, k - 1] + top[:, k]) / 2).mean())


def test_padded_training_rows_equal_each_row_alone():
    """Training mode, left-padded rows of unequal lengths (ragged top-k counts): every real token's
    logits equal its row run alone - the slots past a row's count carry weight 0 (invariant 3)."""
    m = mod_model("TMTMT", capacity=0.4)
    m.train()
    m.set_step(0)
    lens = [30, 17, 24]
    ids, mask = left_padded(lens)
    with torch.no_grad():
        got = m(ids, mask).logits
        for b, n in enumerate(lens):
            alone = m(ids[b : b + 1, -n:]).logits[0]
            assert (got[b, -n:] - alone).abs().max() < 1e-5, b


@pytest.mark.parametrize(
    "router,weight", [("aux_loss", "sigmoid"), ("aux_loss", "raw"), ("predictor", "sigmoid")]
)
def test_inference_forward_equals_a_slow_reference_of_mods_equation(router, weight):
    """Eval mode: keep t iff d_t > 0, and z_t = x_t + w(r_t) (block(x_kept)_t - x_t) for the kept
    tokens (w(r) = sigmoid(r), or r), x_t elsewhere; the block sees the kept tokens only, at their
    original positions."""
    m = mixing_eval_model("TMT", router=router, mod_weight=weight)
    ids = torch.randint(3, 256, (2, 30), generator=torch.Generator().manual_seed(6))
    c = m.config
    with torch.no_grad():
        got = m(ids).logits
        x, r, d, (cos, sin) = _router_input(m, ids)
        z = x.clone()
        for b in range(2):
            keep = (d[b] > 0).nonzero()[:, 0]
            assert 0 < len(keep) < 30
            cb, sb = rope_cos_sin(keep[None], c.head_dim, c.rope_theta)
            h = m.layers[1](x[b : b + 1, keep], cb, sb, None)[0]
            w = torch.sigmoid(r[b, keep, None]) if weight == "sigmoid" else r[b, keep, None]
            z[b, keep] = x[b, keep] + w * (h - x[b, keep])
        want = m.head(m.norm(m.layers[2](z, cos, sin, None)))
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("router", ROUTERS)
def test_inference_is_causal(router):
    m = mixing_eval_model(router=router)
    ids = torch.randint(3, 256, (2, 48))
    other = ids.clone()
    other[:, 30:] = torch.randint(3, 256, (2, 18))
    with torch.no_grad():
        a, b = m(ids), m(other)
    assert (a.logits[:, :30] - b.logits[:, :30]).abs().max() < 1e-5  # equal up to kernel rounding
    assert all(0.1 < f < 0.9 for f in a.keep_fractions), a.keep_fractions


@pytest.mark.parametrize(
    "router,weight", [("aux_loss", "raw"), ("predictor", "raw"), ("aux_loss", "sigmoid")]
)
def test_cached_generation_equals_uncached(router, weight):
    m = mixing_eval_model(router=router, mod_weight=weight)
    lens = [14, 6, 10]
    ids, mask = left_padded(lens)

    def run(ids, mask, use_cache):
        out = list(stream_generate(m, ids, mask, max_new_tokens=10, use_cache=use_cache, return_logits=True))
        return torch.stack([t for t, _ in out], 1), torch.stack([lg for _, lg in out], 1)

    tok_c, lg_c = run(ids, mask, True)
    tok_u, lg_u = run(ids, mask, False)
    assert torch.equal(tok_c, tok_u)
    assert (lg_c - lg_u).abs().max() < 1e-5
    for b, n in enumerate(lens):  # each row of the batch equals that row run alone
        t1, l1 = run(ids[b : b + 1, -n:], None, True)
        assert torch.equal(t1[0], tok_c[b]) and (l1[0] - lg_c[b]).abs().max() < 1e-5


@pytest.mark.parametrize("router", ROUTERS)
def test_a_skipped_token_never_enters_the_layers_cache(router):
    m = mixing_eval_model(router=router)
    ids, mask = left_padded([20, 9])
    with torch.no_grad():
        sels = m(ids, mask, return_selections=True).selections
        cache = new_cache(m, 2)
        prefill(m, ids, mask, cache)
    for i, sel in enumerate(sels):  # level i + 1 holds exactly the tokens router / S i kept, per row
        for b in range(2):
            assert cache.length(i + 1, b) == int(sel.n_kept[b]), (i, b)
    assert 0 < int(sels[0].n_kept.sum()) < int(mask.sum())


def test_predictor_loss_trains_the_predictor_only_and_aux_loss_trains_the_router():
    for router in ROUTERS:
        m = mod_model("TMT", router=router)
        m.train()
        m.set_step(0)
        out = m(torch.randint(3, 256, (2, 24)))
        out.select_loss.backward()
        grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if router == "predictor":
            assert grads == {n for n, _ in m.named_parameters() if ".predictor." in n}
        else:
            assert "subsamples.0.score.weight" in grads and not any(".predictor." in n for n in grads)
        assert out.agreement.shape == (1,) and 0 <= float(out.agreement[0]) <= 1


@pytest.mark.parametrize("router", ROUTERS)
def test_save_load_and_hf_auto_model(router, tmp_path):
    from transformers import AutoModelForCausalLM

    import subllm.hf  # noqa: F401  (registers the Auto classes)

    m = mixing_eval_model(router=router)
    m.save_pretrained(tmp_path)
    back = SubLLM.from_pretrained(tmp_path).eval()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 256, (2, 24))
    with torch.no_grad():
        want = m(ids).logits
        assert torch.equal(back(ids).logits, want)
        assert torch.equal(hf(ids).logits, want)


def test_official_export_refuses_m_layers():
    from subllm.hf.official import config_to_official

    with pytest.raises(SubLLMError, match="Mixture-of-Depths"):
        config_to_official(tiny_config("T(T)M", norm_eps=1e-5, n_kv_heads=4).with_selection("paper"))


def test_generate_eval_and_analyze_commands_take_an_m_model(tmp_path, capsys):
    checkpoint_with_tokenizer(tmp_path / "m", mixing_eval_model(router="predictor"))
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(600)))
    ck = ["--checkpoint", str(tmp_path / "m")]
    assert main(["generate", *ck, "--prompt", "the cat", "--max-new-tokens", "4", "--stats"]) == 0
    assert "keep M0" in capsys.readouterr().err
    ev = ["eval", *ck, "--tasks", "loss", "--text", str(text), "--seq-len", "64", "--dtype", "fp32"]
    assert main(ev) == 0
    assert "M2: keep" in capsys.readouterr().out
    assert main(["analyze", *ck, "--text", str(text), "--out", str(tmp_path / "an"), "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "M0: kept" in out and "S1: kept" in out and "M3: keep" in out
