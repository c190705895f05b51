"""The loss decomposition's modes against hand-built slow paths: plain == an all-T model with the
same layers; context == the inner layers run on every token, kept ones blended by hand; the layers
each token ran; an identity-started student decomposes to zero; the modes leave the model as it was."""

import pytest
import torch
from helpers import tiny_config, tiny_model

from subllm import SubLLMError
from subllm.config import identity_start
from subllm.evals.decompose import decompose, forward_mode, layers_run, mean_loss
from subllm.model.subllm import SubLLM


def ids_batch(B=2, T=24, seed=3, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)


def all_t_copy(model) -> SubLLM:
    plain = SubLLM(tiny_config("T" * model.config.n_layers)).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith(("subsamples.", "bypasses.")) for k in unexpected)
    return plain


@torch.no_grad()
def test_plain_mode_is_the_llama_with_the_same_weights():
    model, ids = tiny_model(), ids_batch()
    with forward_mode(model, "plain"):
        got = model(ids).logits
    want = all_t_copy(model)(ids).logits
    assert (got - want).abs().max() < 1e-5
    assert (model(ids).logits - want).abs().max() > 1e-2  # the model itself does drop tokens


@torch.no_grad()
def test_context_mode_by_hand():
    model, ids = tiny_model("T(TT)T"), ids_batch()
    with forward_mode(model, "context"):
        got = model(ids).logits
    L = model.layers
    lev = model.make_level(torch.arange(ids.shape[1]).expand_as(ids), None)
    x1 = L[0](model.embed(ids), lev.cos, lev.sin, lev.mask)
    h = L[2](L[1](x1, lev.cos, lev.sin, lev.mask), lev.cos, lev.sin, lev.mask)  # every token as context
    s = model.subsamples[0]
    kept = s.keep(s.scores(x1))
    w = torch.where(kept, s.scores(x1).clamp(0, 1), torch.zeros(()))
    z = x1 + model.bypasses[0].scale * w[..., None] * (h - x1)
    want = model.head(model.norm(L[3](z, lev.cos, lev.sin, lev.mask)))
    assert 0.1 < kept.float().mean() < 0.9
    assert (got - want).abs().max() < 1e-5
    with forward_mode(model, "as_trained"):
        assert (model(ids).logits - got).abs().max() > 1e-3


@torch.no_grad()
def test_modes_restore_the_model():
    model, ids = tiny_model(), ids_batch()
    before = model(ids).logits
    for mode in ("context", "plain"):
        with forward_mode(model, mode):
            model(ids)
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match="mode must be"):
        with forward_mode(model, "nope"):
            pass


@torch.no_grad()
def test_layers_run_nested():
    model, ids = tiny_model("TT(T(TT)T)T"), ids_batch()
    out = model(ids, return_selections=True)
    n = layers_run(model, out.selections, ids.shape[1])
    assert set(n.unique().tolist()) == {3, 5, 7}  # 3 outside, 2 more inside S0, 2 more inside S1
    kept0 = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        sel = out.selections[0]
        idx = sel.idx[b] if sel.valid is None else sel.idx[b][sel.valid[b]]
        kept0[b, idx] = True
    assert torch.equal(n > 3, kept0)


@torch.no_grad()
def test_identity_student_decomposes_to_zero():
    cfg = identity_start(tiny_config(keep_ratio=1.0))
    torch.manual_seed(0)
    student = SubLLM(cfg).eval()
    source = all_t_copy(student)
    res = decompose(student, source, [ids_batch(), ids_batch(seed=4)])
    assert res["tokens"] == 2 * 2 * 23
    assert all(abs(v) < 1e-5 for v in res["parts"].values()), res["parts"]
    assert [r["layers"] for r in res["by_layers"]] == [7] and abs(res["by_layers"][0]["share"] - 1) < 1e-9


@torch.no_grad()
def test_parts_add_up_and_mod_refused():
    student, ids = tiny_model(), ids_batch()
    res = decompose(student, all_t_copy(student), [ids])
    gap = res["loss"]["as_trained"] - res["loss"]["source"]
    assert abs(sum(res["parts"].values()) - gap) < 1e-6
    assert abs(sum(r["gap_share"] for r in res["by_layers"]) - gap) < 1e-5
    mod = tiny_model("TMTMT")
    with pytest.raises(SubLLMError, match="Mixture-of-Depths"):
        with forward_mode(mod, "plain"):
            pass


@torch.no_grad()
def test_an_all_t_student_has_no_gap_parts():
    torch.manual_seed(0)
    student = SubLLM(tiny_config("TTTT")).eval()
    res = decompose(student, student, [ids_batch()])
    assert res["by_layers"][0]["layers"] == 4 and abs(res["by_layers"][0]["share"] - 1) < 1e-9
    assert all(v == 0 for v in res["parts"].values())


@torch.no_grad()
def test_mean_loss_is_per_token_over_windows_of_different_sizes():
    model, windows = tiny_model(), [ids_batch(), ids_batch(B=3, T=16, seed=4)]
    total = sum(
        torch.nn.functional.cross_entropy(
            model(w).logits[:, :-1].flatten(0, 1), w[:, 1:].flatten(), reduction="sum"
        )
        for w in windows
    )
    assert abs(mean_loss(model, windows) - float(total) / sum(w[:, 1:].numel() for w in windows)) < 1e-5
