"""Uptraining (`subllm train --init-from DIR`, subllm/trainer/uptrain.py): a SUBLLM started from a
tiny LLaMA - one of our folders or a Hugging Face Llama folder - copies every shared weight exactly,
an all-T start has the source's logits, router tuning (`--train-only subsample,bypass`) leaves every
other parameter bit-identical, resume stays bit-exact, and bad folders or flags are one-line errors."""

import json
import shutil

import pytest
import torch
from helpers import crash_while_logging, pack_synthetic

from subllm import SubLLM, SubLLMError
from subllm.config import get_preset
from subllm.trainer import checkpoint as ckpt
from subllm.trainer import uptrain
from subllm.trainer.config import build_config, model_config
from subllm.trainer.loop import train
from subllm.trainer.metrics import read_metrics

WORDS = "the a king queen lord castle sword crown speak love night day river sea and or but not with".split()
NESTED = "TT(T(TT)T)T"  # 7 T, like the source
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_synthetic(tmp_path_factory.mktemp("data"), WORDS, seed=3, n_train=800)


def _with_tokenizer(directory, packed):
    for f in (packed.parent / "tok").iterdir():
        shutil.copyfile(f, directory / f.name)
    return directory


@pytest.fixture(scope="module")
def llama_dir(packed, tmp_path_factory):
    """A tiny LLaMA in our format (config.json + model.safetensors + tokenizer), as a run leaves it."""
    torch.manual_seed(7)
    model = SubLLM(get_preset("llama-tiny").replace(vocab_size=300))
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d)
    return _with_tokenizer(d, packed)


@pytest.fixture(scope="module")
def hf_dir(llama_dir, packed, tmp_path_factory):
    """The same LLaMA as a Hugging Face LlamaForCausalLM folder."""
    from subllm.hf.llama import to_hf_llama

    d = tmp_path_factory.mktemp("hf")
    to_hf_llama(SubLLM.from_pretrained(llama_dir)).save_pretrained(str(d))
    return _with_tokenizer(d, packed)


def _cfg(packed, out, **kw):
    base = dict(
        preset="subllm-tiny",
        data=str(packed),
        steps=4,
        batch_size=2,
        seq_len=32,
        eval_every=2,
        eval_batches=1,
        save_every=2,
        out=str(out),
        threads=1,
        progress=False,
        schedule_steps="scale",
    )
    return build_config({**base, **kw})


def _shared(state):
    return {k: v for k, v in state.items() if not k.startswith(("subsamples.", "bypasses."))}


@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_init_copies_shared_weights_and_all_t_keeps_the_logits(kind, llama_dir, hf_dir, packed, tmp_path):
    source_model = SubLLM.from_pretrained(llama_dir).eval()
    src = uptrain.load_source(llama_dir if kind == "ours" else hf_dir)
    assert src.kind == ("subllm" if kind == "ours" else "hf-llama")
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    for structure in (None, NESTED):
        cfg = _cfg(packed, tmp_path, init_from=str(llama_dir), structure=structure)
        mc = model_config(cfg, 4, None, base=uptrain.base_config(cfg.preset, src.config))
        model = SubLLM(mc)
        fresh = uptrain.copy_weights(model, src)
        want = _shared(source_model.state_dict())
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
        if structure is None:
            assert fresh == [] and mc.structure == "TTTTTTT"
            assert torch.equal(model.eval()(ids).logits, source_model(ids).logits)
        else:
            assert fresh and all(k.startswith(("subsamples.", "bypasses.")) for k in fresh)
            assert mc.structure == NESTED and mc.keep_ratios == [0.64, 0.64] and mc.dim == 64


def test_all_t_start_evaluates_like_the_source(llama_dir, packed, tmp_path):
    """The eval at step 0 of an uptraining run is the source's own validation loss."""
    from subllm.trainer.distributed import DistInfo
    from subllm.trainer.evaluation import evaluate, load_val_batches

    out = tmp_path / "cont"
    train(_cfg(packed, out, init_from=str(llama_dir), dtype="fp32"), **QUIET)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    val = load_val_batches(packed / "val", 2, 32, 1)
    import contextlib

    own = evaluate(
        SubLLM.from_pretrained(llama_dir).train(), val, DistInfo(), 0, contextlib.nullcontext, None
    )
    assert evals[0]["val_loss"] == own["val_loss"]


def test_router_tuning_trains_only_subsample_and_bypass(llama_dir, packed, tmp_path):
    out = tmp_path / "router"
    train(
        _cfg(packed, out, init_from=str(llama_dir), structure=NESTED, train_only="bypass,subsample"), **QUIET
    )
    source = SubLLM.from_pretrained(llama_dir).state_dict()
    tuned = SubLLM.from_pretrained(out).state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in _shared(source).items())  # bit-identical
    torch.manual_seed(0)  # the run's seed: the S/B it started from, as the loop built them
    start = SubLLM(SubLLM.from_pretrained(out).config)
    for k in (
        "subsamples.0.score.weight",
        "subsamples.1.score.weight",
        "bypasses.0.scale",
        "bypasses.1.scale",
    ):
        assert not torch.equal(tuned[k], start.state_dict()[k]), k
    run = read_metrics(out / "metrics.jsonl")[0]
    s_b = sum(p.numel() for k, p in start.named_parameters() if k.startswith(("subsamples.", "bypasses.")))
    assert run["trainable_params"] == s_b < run["params"]
    assert run["train_only"] == ["subsample", "bypass"] and run["init_from"]["kind"] == "subllm"
    assert json.loads((out / "train_config.json").read_text())["train_only"] == ["subsample", "bypass"]
    assert SubLLM.from_pretrained(out).config.extra["init_from"]["path"] == str(llama_dir.resolve())
    opt = ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).optimizer_state
    # optimizer state for the 2 score layers (weight and the identity start's bias) and 2 bypass scales only
    assert len(opt["state"]) == 6


def test_full_uptraining_from_hf_changes_the_shared_layers(hf_dir, llama_dir, packed, tmp_path):
    out = tmp_path / "full"
    train(_cfg(packed, out, init_from=str(hf_dir), structure=NESTED, keep_ratio="0.5,0.7"), **QUIET)
    source = SubLLM.from_pretrained(llama_dir).state_dict()
    tuned = SubLLM.from_pretrained(out)
    assert tuned.config.keep_ratios == [0.5, 0.7]
    assert not torch.equal(
        tuned.state_dict()["layers.0.attn.wqkv.weight"], source["layers.0.attn.wqkv.weight"]
    )
    run = read_metrics(out / "metrics.jsonl")[0]
    assert run["trainable_params"] == run["params"] and run["train_only"] is None
    assert run["init_from"]["kind"] == "hf-llama"


def test_resume_of_an_uptraining_run_is_bit_exact(llama_dir, packed, tmp_path, monkeypatch):
    def losses(d):
        return [(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train"]

    opts = dict(init_from=str(llama_dir), structure=NESTED, train_only="subsample,bypass", steps=6)
    train(_cfg(packed, tmp_path / "straight", **opts), **QUIET)
    crashed = tmp_path / "crashed"
    with crash_while_logging(monkeypatch, 5):
        train(_cfg(packed, crashed, **opts), **QUIET)
    train(_cfg(packed, crashed, **opts), resume=True, **QUIET)
    assert losses(crashed) == losses(tmp_path / "straight") and len(losses(crashed)) == 6
    a, b = (
        SubLLM.from_pretrained(tmp_path / "straight").state_dict(),
        SubLLM.from_pretrained(crashed).state_dict(),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SubLLMError, match="train_only"):  # resuming with other trainable groups
        train(_cfg(packed, crashed, **{**opts, "train_only": "bypass"}), resume=True, **QUIET)


def test_bad_folders_and_flags_are_clear_errors(llama_dir, packed, tmp_path):
    def fails(match, **kw):
        with pytest.raises(SubLLMError, match=match):
            train(_cfg(packed, tmp_path / "x", **kw), overwrite=True, **QUIET)

    fails("no such folder", init_from=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    fails("no config.json", init_from=str(tmp_path / "empty"))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    fails("model_type 'gpt2'", init_from=str(tmp_path / "gpt"))
    nested = tmp_path / "nested"
    SubLLM(get_preset("subllm-tiny").replace(vocab_size=300)).save_pretrained(nested)
    _with_tokenizer(nested, packed)
    fails("fine-tuning keeps its structure", init_from=str(nested), structure="TT(TTTT)T")
    fails("has 5 layers .* has 7", init_from=str(llama_dir), structure="TT(TT)T")
    fails(r"--set dim=128: .* fixes dim = 64", init_from=str(llama_dir), set={"dim": 128})
    fails("has no such parameters", init_from=str(llama_dir), train_only="subsample")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(llama_dir, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    fails("no tokenizer.json", init_from=str(no_tok))
    other = tmp_path / "other_tok"  # same model, another tokenizer than the data's
    shutil.copytree(llama_dir, other)
    from subllm.data.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(["castle sword crown " * 50], 280), other)
    fails("not the one the data was packed with", init_from=str(other))
    with pytest.raises(SubLLMError, match="--train-only needs --init-from"):
        _cfg(packed, tmp_path, train_only="subsample")
    with pytest.raises(SubLLMError, match="comma-separated subset"):
        _cfg(packed, tmp_path, init_from=str(llama_dir), train_only="subsample,attention")
    with pytest.raises(SubLLMError, match="exclude each other"):
        _cfg(packed, tmp_path, init_from=str(llama_dir), tokenizer=str(llama_dir))


def test_cli_flags(llama_dir, packed, tmp_path, capsys):
    from subllm.cli import main

    out = tmp_path / "cli"
    rc = main(
        ["train", "--init-from", str(llama_dir), "--structure", NESTED, "--train-only", "subsample,bypass",
         "--data", str(packed), "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
         "--out", str(out), "--threads", "1", "--no-progress"]
    )  # fmt: skip
    stdout = capsys.readouterr().out
    assert rc == 0 and "initialised from" in stdout and "eval @ step 0" in stdout
    rc = main(
        ["train", "--init-from", str(tmp_path / "nope"), "--data", str(packed), "--out", str(out) + "2"]
    )
    assert rc == 2 and "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("router", ["aux_loss", "predictor"])
def test_router_tuning_into_mod_layers(router, llama_dir, packed, tmp_path):
    """A LLaMA uptrained into Mixture-of-Depths layers (`M` in --structure): every layer keeps its
    weights, only the routers (and the predictor) train."""
    out = tmp_path / "mod"
    cfg = _cfg(
        packed, out, init_from=str(llama_dir), structure="TMTMTMT", train_only="subsample",
        set={"mod_router": router, "mod_capacity": 0.25},
    )  # fmt: skip
    train(cfg, **QUIET)
    tuned = SubLLM.from_pretrained(out)
    assert tuned.config.structure == "TMTMTMT" and tuned.config.keep_ratios == [0.25] * 3
    source = SubLLM.from_pretrained(llama_dir).state_dict()
    state = tuned.state_dict()
    assert all(torch.equal(state[k], v) for k, v in _shared(source).items())
    names = {k for k, _ in tuned.named_parameters() if k.startswith("subsamples.")}
    assert any(".predictor." in k for k in names) == (router == "predictor")
    run = read_metrics(out / "metrics.jsonl")[0]
    assert run["trainable_params"] == sum(p.numel() for k, p in tuned.named_parameters() if k in names)


def test_finetune_a_subllm_with_yarn_keeps_every_weight(packed, tmp_path):
    """A SUBLLM source is fine-tuned as it is (its config and every weight, S and B included); --set
    may change its RoPE scaling and max_seq_len (issue 11: YaRN + a short fine-tune)."""
    from subllm.model.rope import with_rope_scaling

    torch.manual_seed(3)
    src_dir = tmp_path / "sub"
    source = SubLLM(get_preset("subllm-tiny").replace(vocab_size=300, keep_ratio=[0.5, 0.7])).eval()
    source.save_pretrained(src_dir)
    _with_tokenizer(src_dir, packed)
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}
    cfg = _cfg(packed, tmp_path / "ft", init_from=str(src_dir), seq_len=64,
               set={"rope_scaling": yarn, "max_seq_len": 1024})  # fmt: skip
    src = uptrain.load_source(src_dir)
    uptrain.check_overrides(cfg.set, src.config, src_dir)
    mc = model_config(cfg, 4, None, base=uptrain.base_config(cfg.preset, src.config))
    assert mc.structure == source.config.structure and mc.keep_ratios == [0.5, 0.7]
    assert mc.rope_scaling["factor"] == 2.0 and mc.max_seq_len == 1024
    model = SubLLM(mc)
    assert uptrain.copy_weights(model, src) == []  # nothing left fresh
    want = source.state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    ids = torch.randint(3, 300, (2, 80), generator=torch.Generator().manual_seed(0))
    source.config = with_rope_scaling(source.config, yarn)  # the slow path: the same model, config swapped
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, source(ids).logits)
    train(cfg, **QUIET)
    tuned = SubLLM.from_pretrained(tmp_path / "ft")
    assert tuned.config.rope_scaling["rope_type"] == "yarn" and tuned.config.keep_ratios == [0.5, 0.7]
    evals = [r for r in read_metrics(tmp_path / "ft" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[0]["step"] == 0
    with pytest.raises(SubLLMError, match="fixes dim"):
        train(_cfg(packed, tmp_path / "x", init_from=str(src_dir), set={"dim": 128}), **QUIET)
