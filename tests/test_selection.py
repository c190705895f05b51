"""The selection options of issue 9: the paper's rule pinned bit for bit, the auxiliary BCE, the
calibrated threshold (training estimate, inference rule, cache, save/load) and the counted Balancer."""

import json
import math

import pytest
import torch
from helpers import tiny_config, tiny_model
from paper_rule_pin import PIN, run_pin

from subllm import ModelConfig, SubLLM
from subllm.config import SELECTION_RECIPES
from subllm.model.scaling import balance
from subllm.model.subsample import selection_bce


def _close(a, b, tol=1e-6):
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, tol)
    else:
        assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), (a, b)


def test_paper_rule_is_pinned_to_the_original_implementation():
    want = json.loads(PIN.read_text())
    got = run_pin(**SELECTION_RECIPES["paper"])
    for key in ("train_idx", "eval_idx"):
        assert got[key] == want[key], key  # the same tokens, exactly
    for key in ("train_loss", "train_weight", "score_grad", "bypass_grad", "eval_logits"):
        _close(got[key], want[key])


def test_paper_recipe_names_a_config_and_old_configs_load_as_paper():
    cfg = tiny_config().with_selection("paper")
    assert cfg.selection == "paper"
    d = cfg.to_dict()
    for k in SELECTION_RECIPES["paper"]:
        d.pop(k)  # a config.json written before the selection fields existed
    assert ModelConfig.from_dict(d).selection == "paper"
    with pytest.raises(Exception, match="unknown selection recipe"):
        cfg.with_selection("nope")


@pytest.mark.parametrize(
    "bad",
    [dict(threshold="x"), dict(balancer_fraction="x"), dict(select_loss=-1.0), dict(threshold_momentum=2.0)],
)
def test_bad_selection_fields_are_one_line_errors(bad):
    with pytest.raises(Exception, match=next(iter(bad))):
        tiny_config(**bad)


def test_selection_bce_matches_formula_and_ignores_pads():
    """Mean over the real tokens of the batch of BCE(sigmoid(s / tau), kept), written out per token;
    each pad's own BCE is large (~18 and ~14), so a pad leaking into the mean shows."""
    s = torch.tensor([[2.0, -1.0, 0.5, 9.0], [-7.0, 0.3, -2.0, 1.5]])
    kept = torch.tensor([[True, False, False, False], [True, True, False, True]])
    valid = torch.tensor([[True, True, True, False], [False, True, True, True]])
    tau = 0.5
    terms = []
    for b in range(2):
        for t in range(4):
            if valid[b, t]:
                p = 1 / (1 + math.exp(-float(s[b, t]) / tau))
                terms.append(-math.log(p) if kept[b, t] else -math.log(1 - p))
    assert math.isclose(float(selection_bce(s, kept, valid, tau)), sum(terms) / len(terms), rel_tol=1e-6)


def test_select_loss_is_added_and_pulls_scores_toward_topk():
    cfg = tiny_config(select_loss=0.3, select_loss_tau=0.5, balancer_steps=10, bypass_steps=10)
    torch.manual_seed(0)
    model = SubLLM(cfg).train()
    model.set_step(0)
    x = torch.randint(3, cfg.vocab_size, (2, 30))
    out = model(x, labels=x, return_selections=True)
    assert out.select_loss is not None and float(out.select_loss.detach()) > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.select_loss)
    manual = sum(selection_bce(s.scores, s.kept_mask, None, 0.5) for s in out.selections) * 0.3
    torch.testing.assert_close(out.select_loss, manual)
    # gradient of the auxiliary loss alone on the scores: kept tokens up, dropped tokens down
    sel = out.selections[0]
    (g,) = torch.autograd.grad(out.select_loss, sel.scores, retain_graph=True)
    assert (g[sel.kept_mask] < 0).all() and (g[~sel.kept_mask] > 0).all()
    model.eval()
    assert model(x, labels=x).select_loss is None  # training only


def test_counted_balancer_fraction_pushes_the_right_way():
    torch.manual_seed(0)
    s = (torch.randn(4, 64) + 2.0).requires_grad_(True)  # ~98% positive, keep ratio 0.5: push down
    balance(s, 0.5, None, 1.0, direct=True).backward(torch.full_like(s, 1e-3))
    assert (s.grad > 1e-3).all()  # every score's gradient grew: descent lowers them all
    s2 = (torch.randn(4, 64) * 2.0).requires_grad_(True)  # ~50% positive, inside [0.45, 0.55]
    balance(s2, 0.5, None, 1.0, direct=True, min_abs=0.01, max_abs=100.0).backward(torch.full_like(s2, 1e-3))
    torch.testing.assert_close(s2.grad, torch.full_like(s2, 1e-3))  # inside every limit: no push


def _calibrated(**kw):
    kw = dict(threshold_momentum=0.5, balancer_steps=10, bypass_steps=10, **kw)
    return tiny_config(threshold="calibrated", **kw)


def test_calibrated_threshold_tracks_the_topk_cut():
    torch.manual_seed(0)
    model = SubLLM(_calibrated()).train()
    s0 = model.subsamples[0]
    with torch.no_grad():
        s0.score.weight.mul_(40.0)
    model.set_step(0)
    x = torch.randint(3, 97, (3, 50))
    assert float(s0.threshold) == 0.0
    out = model(x, return_selections=True)
    sel = out.selections[0]
    top = sel.scores.sort(1, descending=True).values
    k = sel.k
    want = ((top[:, k - 1] + top[:, k]) / 2).mean()
    torch.testing.assert_close(s0.threshold, want)  # the first update is the batch's cut itself
    assert int(s0.threshold_updates) == 1
    # in eval mode the rule is s > theta: about the trained fraction is kept on the same batch
    model.eval()
    ev = model(x, return_selections=True).selections[0]
    kept = ev.n_kept.float() / 50
    assert (kept - k / 50).abs().max() < 0.25
    assert torch.equal(ev.n_kept, (ev.scores > s0.threshold).sum(1))
    assert ev.weight.max() <= 1 and torch.equal(ev.weight, ev.scores.clamp(0, 1).gather(1, ev.idx))


def test_calibrated_threshold_only_follows_training():
    """Training with a calibrated threshold is the paper's training, whatever theta holds."""
    x = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for threshold in ("zero", "calibrated"):
        torch.manual_seed(0)
        model = SubLLM(_calibrated().replace(threshold=threshold)).train()
        if threshold == "calibrated":
            for s in model.subsamples:
                s.threshold.fill_(0.7)
        model.set_step(2)
        torch.manual_seed(5)
        out = model(x, labels=x)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(model.subsamples[0].score.weight.grad)
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])


def test_calibrated_threshold_saved_loaded_and_used_by_the_cache(tmp_path):
    from subllm.inference.generation import generate

    model = tiny_model(threshold="calibrated", score_norm=False)  # scores O(1)
    with torch.no_grad():
        for i, s in enumerate(model.subsamples):
            s.threshold.fill_(0.3 - 0.5 * i)  # nonzero thresholds, one per S
    model.save_pretrained(tmp_path / "m")
    back = SubLLM.from_pretrained(tmp_path / "m").eval()
    assert back.config.threshold == "calibrated"
    for a, b in zip(model.subsamples, back.subsamples):
        assert torch.equal(a.threshold, b.threshold)
    ids = torch.randint(3, 97, (3, 12), generator=torch.Generator().manual_seed(3))
    cached = generate(back, ids, max_new_tokens=10)
    plain = generate(back, ids, max_new_tokens=10, use_cache=False)
    assert torch.equal(cached, plain)
    with torch.no_grad():  # the threshold matters: zero thresholds keep other tokens
        k_theta = back(ids, return_selections=True).selections[0].n_kept
        for s in back.subsamples:
            s.threshold.zero_()
        k_zero = back(ids, return_selections=True).selections[0].n_kept
    assert not torch.equal(k_theta, k_zero)


def test_measure_selection_recounts_and_leaves_state_alone():
    from subllm.evals.selection import format_selection, measure_selection

    model = tiny_model(threshold="calibrated")
    with torch.no_grad():
        model.subsamples[0].threshold.fill_(0.2)
    windows = [torch.randint(3, 97, (2, 30), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rng = torch.get_rng_state()
    res = measure_selection(model, windows)
    assert torch.equal(rng, torch.get_rng_state()) and not model.training
    assert float(model.subsamples[0].threshold) == pytest.approx(0.2)  # measuring moves no theta
    assert int(model.subsamples[0].threshold_updates) == 0
    kept = [0, 0]
    real = [0, 0]
    agree = [0.0, 0.0]
    with torch.no_grad():
        for x in windows:
            for i, s in enumerate(model(x, return_selections=True).selections):
                kept[i] += int(s.n_kept.sum())
                real[i] += int(s.n_real.sum())
        model.train()
        model.set_step(0)
        for x in windows:  # agreement: top-k membership vs s > theta, in a train-mode forward
            for i, s in enumerate(model(x, return_selections=True).selections):
                theta = 0.2 if i == 0 else 0.0  # as before these forwards moved the thresholds
                agree[i] += float((s.kept_mask == (s.scores > theta)).float().sum())
        model.eval()
    train_real = [60 * 2, None]
    assert res["keep_eval"] == pytest.approx([k / r for k, r in zip(kept, real)])
    assert res["agreement"][0] == pytest.approx(agree[0] / train_real[0])
    assert res["threshold"][0] == pytest.approx(0.2) and res["threshold"][1] == 0.0
    lines = format_selection(res, model.config.keep_ratios).splitlines()
    assert len(lines) == 2 and "agreement with top-k" in lines[0] and "theta +0.200" in lines[0]


def test_train_selection_flag_names_a_recipe():
    from subllm.errors import SubLLMError
    from subllm.trainer.config import build_config, model_config

    assert model_config(build_config({"data": "-"}), 100, None).selection == "aligned"  # new configs
    paper = model_config(build_config({"data": "-", "selection": "paper"}), 100, None)
    assert paper.selection == "paper" and paper.select_loss == 0.0 and paper.threshold == "zero"
    mixed = model_config(
        build_config({"data": "-", "selection": "paper", "set": ["select_loss=0.2"]}), 100, None
    )
    assert mixed.select_loss == 0.2 and mixed.selection is None  # --set wins, and the mix has no name
    with pytest.raises(SubLLMError, match="--selection must be one of"):
        build_config({"data": "-", "selection": "best"})
    from subllm.config import get_preset

    assert (
        get_preset("subllm-1.3b").selection == "paper" and get_preset("subllm-small").selection == "aligned"
    )


def test_detached_select_loss_trains_only_the_score_layer():
    x = torch.randint(3, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    grads = {}
    for detach in (False, True):
        torch.manual_seed(0)
        model = SubLLM(tiny_config(select_loss=1.0, select_loss_detach=detach, balancer_prob_start=0.0,
                                   balancer_prob_end=0.0)).train()  # fmt: skip
        model.set_step(0)
        torch.manual_seed(3)
        model(x, labels=x).select_loss.backward()  # the auxiliary loss alone
        grads[detach] = (model.embed.weight.grad, model.subsamples[0].score.weight.grad)
    assert grads[False][0] is not None and grads[False][0].abs().sum() > 0  # reaches the layers below S
    assert grads[True][0] is None or grads[True][0].abs().sum() == 0  # detached: it does not
    torch.testing.assert_close(grads[True][1], grads[False][1])  # the score layer's own gradient is the same


def test_bench_selection_groups_seeds_and_scores_llama_on_the_same_windows(tmp_path, capsys):
    from helpers import WORDS, checkpoint_with_tokenizer

    from subllm.bench.selection import _loss_only, measure_run, summarize
    from subllm.cli import main
    from subllm.data.tokenizer import load_tokenizer
    from subllm.evals.suite import text_windows

    for name in ("cal_s0", "cal_s1"):
        checkpoint_with_tokenizer(tmp_path / name)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS * 30))
    assert (
        main(
            ["bench", "selection", "--runs", str(tmp_path / "cal_s*"), "--text", str(text), "--seq-len", "16"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["cal", "val"] for line in out.splitlines()[1:-1])
    res = [measure_run(tmp_path / n, {"val": [text]}, 16, 4, 4096) for n in ("cal_s0", "cal_s1")]
    rows = summarize(res)
    assert rows[0]["group"] == "cal" and rows[0]["runs"] == 2 and " / " in rows[0]["agreement"]
    # an all-T model's loss is taken on exactly the windows the SUBLLMs are measured on
    model = SubLLM(SubLLM.from_pretrained(tmp_path / "cal_s0").config.as_llama()).eval()
    tok = load_tokenizer(tmp_path / "cal_s0")
    docs = [text.read_text()]
    windows = text_windows(model, tok, docs, 16, 4, 4096)
    with torch.no_grad():
        want = sum(float(model(x, labels=x).lm_loss) * x.shape[0] * 15 for x in windows)
    want /= sum(x.shape[0] * 15 for x in windows)
    assert _loss_only(model, tok, docs, 16, 4, 4096) == pytest.approx(want)


def _hand_cuts(model, windows) -> list[float]:
    """The slow path of `recalibrate`: a train-mode forward from the same seed, and per S the mean
    over every row of the midpoint between its k-th and (k+1)-th highest score."""
    from subllm.evals.selection import SEED

    sums = [0.0] * model.config.n_subsamples
    rows = [0] * model.config.n_subsamples
    model.train()
    model.set_step(0)
    torch.manual_seed(SEED)
    with torch.no_grad():
        for x in windows:
            for i, sel in enumerate(model(x, return_selections=True).selections):
                for b in range(x.shape[0]):
                    top = sorted(sel.scores[b].tolist(), reverse=True)
                    k = int(sel.n_kept[b])
                    sums[i] += (top[k - 1] + top[k]) / 2 if k < len(top) else top[k - 1]
                    rows[i] += 1
    model.eval()
    return [s / n for s, n in zip(sums, rows)]


def test_recalibrate_sets_each_theta_to_the_mean_topk_cut():
    from subllm.evals.selection import measure_selection, recalibrate

    model = tiny_model(threshold="calibrated")
    with torch.no_grad():
        for s in model.subsamples:
            s.threshold.fill_(0.9)  # stale: far above this model's cuts
    windows = [torch.randint(3, 97, (3, 40), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    before = measure_selection(model, windows)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng, step = torch.get_rng_state(), model.step
    got = recalibrate(model, windows)
    assert [old for old, _ in got] == pytest.approx([0.9, 0.9])
    assert torch.equal(rng, torch.get_rng_state()) and model.step == step and not model.training
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():  # only the thresholds moved
        assert k.endswith(".threshold") or torch.equal(v, state[k]), k
        assert not k.endswith("threshold_updates") or torch.equal(v, state[k])
    want = _hand_cuts(model, windows)
    assert [new for _, new in got] == pytest.approx(want, abs=1e-6)
    assert [float(s.threshold) for s in model.subsamples] == pytest.approx(want, abs=1e-6)
    after = measure_selection(model, windows)  # inference now keeps what training keeps
    for i in range(2):
        assert abs(after["keep_eval"][i] - after["keep_train"][i]) < 0.1
        assert after["agreement"][i] > before["agreement"][i]
    with pytest.raises(Exception, match="no calibrated threshold"):
        recalibrate(tiny_model(threshold="zero"), windows)


def test_recalibrate_cli_writes_a_new_folder(tmp_path, capsys):
    from serve_helpers import tiny_checkpoint

    from subllm.cli import main

    ck = tmp_path / "tiny"
    model, _ = tiny_checkpoint(ck)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{5 + (i * 7) % 200}" for i in range(600)))
    argv = ["recalibrate", "--checkpoint", str(ck), "--text", str(text), "--seq-len", "64", "--dtype", "fp32"]
    assert main([*argv, "--out", str(ck)]) == 2  # never overwrites its input
    assert main([*argv, "--out", str(tmp_path / "recal")]) == 0
    out = capsys.readouterr().out
    assert "theta:" in out and "after (the same windows)" in out
    back = SubLLM.from_pretrained(tmp_path / "recal")
    same = SubLLM.from_pretrained(ck)
    assert [float(s.threshold) for s in same.subsamples] == [float(s.threshold) for s in model.subsamples]
    assert any(float(a.threshold) != float(b.threshold) for a, b in zip(back.subsamples, same.subsamples))
    assert (tmp_path / "recal" / "tokenizer.json").is_file()


def test_a_loaded_annealed_model_is_measured_at_its_final_keep_ratio():
    """A checkpoint carries no step: its train-mode pass (agreement, recalibration) must use top-k at
    the final keep ratio, not the anneal's start (keep 1.0, where agreement only echoes keep_eval)."""
    from subllm.evals.selection import measure_selection

    model = tiny_model(threshold="calibrated", keep_anneal_steps=10)
    assert model.step is None
    windows = [torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    res = measure_selection(model, windows)
    assert res["keep_train"][0] == pytest.approx(0.6, abs=0.02)  # ceil(0.6 n) per row at S0
    assert model.step is None
    model.set_step(0)  # during training: the current step's ratio (1.0 at the anneal's start)
    assert measure_selection(model, windows)["keep_train"][0] == 1.0


def test_text_windows_spread_over_many_texts():
    """More texts than windows fit in max_tokens: one window from each of an even spread of them,
    not the first files only (recalibrating on a corpus folder must see all of it)."""
    from subllm.evals.suite import text_windows

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(w) for w in text.split()]}

    model = tiny_model()
    texts = [" ".join([str(3 + i)] * 20) for i in range(40)]  # text i: 20 copies of token 3 + i
    windows = text_windows(model, Tok(), texts, 10, 2, 40)  # room for 4 windows of 10
    seen = sorted({int(t) for w in windows for t in w.flatten()} - {model.config.eos_token_id})
    assert seen == [3, 13, 23, 33]  # texts 0, 10, 20, 30
    few = text_windows(model, Tok(), texts[:2], 10, 2, 40)  # few texts: up to 20 tokens of each
    assert sorted({int(t) for w in few for t in w.flatten()} - {model.config.eos_token_id}) == [3, 4]
