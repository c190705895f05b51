"""Starting a SUBLLM where its source LLaMA is and distilling it (issue 20): the identity start
(config.identity_start) equals the source at keep ratio 1.0, the keep ratio anneals from 1.0,
the chunked LM + KL loss equals the full-logits reference, and `subllm train --distill-from`
logs the KL, leaves the teacher alone and resumes bit for bit."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import crash_while_logging, pack_synthetic

from subllm import SubLLM, SubLLMError
from subllm.config import get_preset, identity_start, keep_count
from subllm.trainer.config import build_config
from subllm.trainer.distill import distill_loss, lm_and_kl_reference
from subllm.trainer.loop import train
from subllm.trainer.metrics import read_metrics

WORDS = "the a king queen lord castle sword crown speak love night day river sea and or but not with".split()
NESTED = "TT(T(TT)T)T"  # 7 layers, like llama-tiny
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_synthetic(tmp_path_factory.mktemp("data"), WORDS, seed=3, n_train=600)


@pytest.fixture(scope="module")
def llama_dir(packed, tmp_path_factory):
    torch.manual_seed(7)
    d = tmp_path_factory.mktemp("llama")
    SubLLM(get_preset("llama-tiny").replace(vocab_size=300)).save_pretrained(d)
    for f in (packed.parent / "tok").iterdir():
        shutil.copyfile(f, d / f.name)
    return d


def _cfg(packed, out, **kw):
    base = dict(preset="subllm-tiny", data=str(packed), steps=6, batch_size=2, seq_len=32, eval_every=3,
                eval_batches=1, save_every=2, out=str(out), threads=1, progress=False, optimizer="adamw",
                lr=1e-3, schedule_steps="scale")  # fmt: skip
    return build_config({**base, **kw})


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_lm_and_kl_equal_the_full_logits_reference(temperature):
    torch.manual_seed(0)
    B, T, C, V = 2, 37, 16, 50
    h = torch.randn(B, T, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    th, tw = torch.randn(B, T, C), torch.randn(V, C)
    y = torch.randint(0, V, (B, T))
    y[0, 5] = y[1, 30] = -100
    loss, lm, kl = distill_loss(h, w, th, tw, y, temperature, 1.0, 3.0, chunk=5)  # 5 x 2 rows: 8 chunks
    loss.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    lm_ref, kl_ref = lm_and_kl_reference(h @ w.T, th @ tw.T, y, temperature)
    (lm_ref + 3 * kl_ref).backward()
    torch.testing.assert_close(loss, lm_ref + 3 * kl_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lm, lm_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-5, atol=1e-7)
    assert kl > 0.1  # two unrelated models: the test is not comparing zeros


def test_fused_head_loss_pure_distillation_autocast_and_no_grad():
    """The weights of a distillation run (LM 0, KL 1), under bf16 autocast: the fused gradients equal
    autograd's through the same bf16 matmuls (to bf16 rounding); without grad the values are the same
    and no gradient is formed; a frozen head (router tuning) gets none."""
    torch.manual_seed(1)
    B, T, C, V = 2, 21, 32, 300
    h = torch.randn(B, T, C, requires_grad=True)
    w = (0.2 * torch.randn(V, C)).requires_grad_()
    th, tw, y = torch.randn(B, T, C), 0.2 * torch.randn(V, C), torch.randint(0, V, (B, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, lm, kl = distill_loss(h, w, th, tw, y, 1.0, 0.0, 1.0, chunk=4)
        loss.backward()
        lm_ref, kl_ref = lm_and_kl_reference(F.linear(h, w), F.linear(th, tw), y)
    fused = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    kl_ref.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, kl_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lm, lm_ref, rtol=1e-4, atol=1e-5)
    for got, ref in zip(fused, (h.grad, w.grad)):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    with torch.no_grad():
        again = distill_loss(h, w, th, tw, y, 1.0, 0.0, 1.0, chunk=4)
    assert [x.item() for x in again] == [x.item() for x in distill_loss(h, w, th, tw, y, 1.0, 0.0, 1.0, 4)]
    h.grad = w.grad = None
    w.requires_grad_(False)
    distill_loss(h, w, th, tw, y, 1.0, 0.0, 1.0, chunk=4)[0].backward()
    assert h.grad is not None and w.grad is None


def _converted(start, keep, structure=None):
    torch.manual_seed(1)
    source = SubLLM(get_preset("llama-tiny")).eval()
    cfg = get_preset("subllm-tiny").replace(keep_ratio=keep, mod_capacity=keep)
    cfg = cfg if structure is None else cfg.replace(structure=structure)
    cfg = identity_start(cfg) if start == "identity" else cfg
    torch.manual_seed(2)
    model = SubLLM(cfg)
    model.load_state_dict(source.state_dict(), strict=False)
    return source, model


@pytest.mark.parametrize("structure", [None, "TMT(TM)TT"])  # subllm-tiny's nested S; M layers (MoD)
def test_identity_start_equals_the_source_at_keep_ratio_one(structure):
    ids = torch.randint(3, 256, (3, 40))
    source, model = _converted("identity", 1.0, structure)
    n = model.config.n_subsamples
    with torch.no_grad():
        ref = source(ids).logits
        assert (model.eval()(ids).logits - ref).abs().max() < 1e-5
        model.train().set_step(0)
        out = model(ids)
        assert (out.logits - ref).abs().max() < 1e-5 and out.keep_fractions.tolist() == [1.0] * n
        _, fresh = _converted("fresh", 1.0, structure)  # the paper's start (bypass 0.5, no score bias;
        assert (fresh.eval()(ids).logits - ref).abs().max() > 1e-2  # MoD's sigmoid weight) is not


def test_hf_llama_conversion_starts_at_the_source():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ref = hf(ids).logits
        model = SubLLM.from_hf_llama(hf, structure="T(T(T)T)", keep_ratio=1.0).eval()
        assert (model(ids).logits - ref).abs().max() < 1e-4
        fresh = SubLLM.from_hf_llama(hf, structure="T(T(T)T)", keep_ratio=1.0, start="fresh").eval()
        assert (fresh(ids).logits - ref).abs().max() > 1e-3
    with pytest.raises(SubLLMError, match="start"):
        SubLLM.from_hf_llama(hf, structure="T(T(T)T)", start="warm")


def test_keep_ratio_anneals_from_one_to_the_target():
    cfg = get_preset("subllm-tiny").replace(keep_ratio=[0.6, 0.5], keep_anneal_steps=10)
    assert cfg.keep_ratios_at(0) == [1.0, 1.0] and cfg.keep_ratios_at(10) == [0.6, 0.5]
    assert cfg.keep_ratios_at(5) == pytest.approx([0.8, 0.75]) and cfg.keep_ratios_at(99) == [0.6, 0.5]
    assert cfg.replace(keep_anneal_steps=0).keep_ratios_at(0) == [0.6, 0.5]
    torch.manual_seed(0)
    model = SubLLM(identity_start(cfg)).train()
    ids = torch.randint(3, 256, (2, 64))
    for step in (0, 3, 5, 10, 20):
        model.set_step(step)
        with torch.no_grad():
            sels = model(ids, return_selections=True).selections
        r0, r1 = cfg.keep_ratios_at(step)
        k0 = keep_count(64, r0)
        assert sels[0].k == k0 and sels[1].k == keep_count(k0, r1), step
        model.eval()
        assert model(ids).keep_fractions.tolist() == [1.0, 1.0]  # identity start: inference keeps all
        model.train()
    with pytest.raises(SubLLMError, match="keep_anneal_steps"):
        cfg.replace(keep_anneal_steps=-1)


def test_distillation_logs_the_kl_freezes_the_teacher_and_resumes_bit_exact(
    llama_dir, packed, tmp_path, monkeypatch
):
    def train_records(d):
        return [r for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train"]

    before = {k: v.clone() for k, v in SubLLM.from_pretrained(llama_dir).state_dict().items()}
    opts = dict(init_from=str(llama_dir), distill_from=str(llama_dir), structure=NESTED,
                set={"keep_anneal_steps": 4}, distill_weight=0.7, distill_temperature=2.0)  # fmt: skip
    train(_cfg(packed, tmp_path / "straight", **opts), **QUIET)
    recs = train_records(tmp_path / "straight")
    assert len(recs) == 6 and all("kl" in r for r in recs)
    assert recs[0]["kl"] < 1e-6 < recs[-1]["kl"]  # step 0: keep 1.0 and the identity start = the teacher
    after = SubLLM.from_pretrained(llama_dir).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher's folder is untouched
    crashed = tmp_path / "crashed"
    with crash_while_logging(monkeypatch, 4):
        train(_cfg(packed, crashed, **opts), **QUIET)
    train(_cfg(packed, crashed, **opts), resume=True, **QUIET)
    assert [(r["loss"], r["kl"]) for r in train_records(crashed)] == [(r["loss"], r["kl"]) for r in recs]
    a = SubLLM.from_pretrained(tmp_path / "straight").state_dict()
    b = SubLLM.from_pretrained(crashed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SubLLMError, match="distill_weight"):  # resuming with another trajectory
        train(_cfg(packed, crashed, **{**opts, "distill_weight": 0.5}), resume=True, **QUIET)


def test_distillation_flags_are_checked(llama_dir, packed, tmp_path):
    with pytest.raises(SubLLMError, match="--distill-weight must lie in"):
        _cfg(packed, tmp_path / "x", distill_from=str(llama_dir), distill_weight=1.5)
    with pytest.raises(SubLLMError, match="drop --fsdp / --compile"):
        _cfg(packed, tmp_path / "x", distill_from=str(llama_dir), compile=True)
    other = tmp_path / "other"
    SubLLM(get_preset("llama-tiny").replace(vocab_size=400)).save_pretrained(other)
    with pytest.raises(SubLLMError, match="vocabulary 400"):
        train(_cfg(packed, tmp_path / "y", init_from=str(llama_dir), distill_from=str(other)), **QUIET)


def test_keep_first_pins_each_rows_first_token_in_training_inference_and_decode():
    from helpers import left_padded, tiny_model

    from subllm import generate

    model = tiny_model(keep_first=1, seed=4)  # scores scaled up: a real mix of kept and dropped
    ids, mask = left_padded([9, 14, 5], seed=2, vocab=97)
    first = mask.argmax(1)  # each row's first real token (left padding)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        model.set_step(0)
        with torch.no_grad():
            sels = model(ids, mask, return_selections=True).selections
        s0 = sels[0]  # level 0: positions are the rows' own
        for b in range(3):
            slots = (s0.idx[b] == first[b]).nonzero()
            assert len(slots) == 1, (mode, b)
            assert float(s0.weight[b, slots[0, 0]]) == 1.0, (mode, b)
    model.eval()
    free = tiny_model(keep_first=0, seed=4).eval()
    with torch.no_grad():
        dropped = free(ids, mask, return_selections=True).selections[0]
    assert any(first[b] not in dropped.idx[b] for b in range(3))  # without the pin some row drops it
    cached = generate(model, ids, mask, max_new_tokens=6)
    assert torch.equal(cached, generate(model, ids, mask, max_new_tokens=6, use_cache=False))
    for b in range(3):  # each row as it runs alone
        row = ids[b : b + 1, -int(mask[b].sum()) :]
        assert torch.equal(generate(model, row, max_new_tokens=6)[0, -6:], cached[b, -6:])
