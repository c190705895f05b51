"""Retrieval examples mixed into training (`subllm train --retrieval-mix`, subllm/trainer/
retrieval_mix.py): the share of rows replaced, examples built from the training split, a pure
function of (seed, rank, step, micro), exact resume, and clear errors for bad values."""

import pytest
import torch
from helpers import crash_while_logging, pack_synthetic

from subllm import SubLLMError
from subllm.data.tokenizer import load_tokenizer
from subllm.trainer.config import build_config
from subllm.trainer.loop import train
from subllm.trainer.metrics import read_metrics
from subllm.trainer.retrieval_mix import RetrievalMix

WORDS = "the a king queen lord castle sword crown speak love night day river sea and or but".split()
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_synthetic(tmp_path_factory.mktemp("data"), WORDS, seed=0, n_train=800)


@pytest.fixture(scope="module")
def tok(packed):
    return load_tokenizer(packed.parent / "tok")


def test_rows_replaced_by_retrieval_examples(packed, tok):
    T = 160
    mix = RetrievalMix(packed / "train", tok, 0.3, T, seed=0)
    assert set(mix.words) <= set(WORDS)  # keys from the training text
    x = torch.randint(3, 300, (8, T), generator=torch.Generator().manual_seed(0))
    counts, kinds = [], set()
    for step in range(60):
        y, rows = mix.apply(x, 0, step, 0)
        counts.append(len(rows))
        keep = [r for r in range(8) if r not in rows]
        assert torch.equal(y[keep], x[keep]) and y.shape == x.shape
        for r in rows:
            text = tok.decode(y[r].tolist())
            if "pass key" in text:  # the number asked for is the one stated earlier
                kinds.add("passkey")
                key = text.rsplit("The pass key is", 1)[1].strip()
                assert key.isdigit() and f"The pass key is {key}. Remember it." in text
            else:
                kinds.add("mqar")
                assert text.count("The code of") >= 4
        z, rows2 = mix.apply(x, 0, step, 0)  # a pure function of (seed, rank, step, micro)
        assert rows2 == rows and torch.equal(z, y)
    assert set(counts) == {2, 3} and abs(sum(counts) / len(counts) - 0.3 * 8) < 0.35
    assert kinds == {"passkey", "mqar"}
    assert mix.apply(x, 0, 1, 0)[1] != mix.apply(x, 0, 2, 0)[1] or not torch.equal(
        mix.apply(x, 0, 1, 0)[0], mix.apply(x, 0, 2, 0)[0]
    )
    full = RetrievalMix(packed / "train", tok, 1.0, T, seed=0)
    assert full.apply(x, 0, 0, 0)[1] == list(range(8))
    with pytest.raises(SubLLMError, match="too short"):
        RetrievalMix(packed / "train", tok, 0.5, 20, seed=0)
    with pytest.raises(SubLLMError, match="built for 160"):
        mix.apply(x[:, :100], 0, 0, 0)


def _cfg(packed, out, **kw):
    base = dict(preset="subllm-tiny", data=str(packed), steps=8, batch_size=4, seq_len=160, eval_every=0,
                eval_batches=1, save_every=4, out=str(out), threads=1, progress=False,
                optimizer="adamw")  # fmt: skip
    return build_config({**base, **kw})


def _losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def test_mixed_training_resumes_exactly(packed, tmp_path, monkeypatch):
    train(_cfg(packed, tmp_path / "plain"), **QUIET)
    train(_cfg(packed, tmp_path / "mix", retrieval_mix=0.5), **QUIET)
    plain, mixed = _losses(tmp_path / "plain"), _losses(tmp_path / "mix")
    assert len(mixed) == len(plain) == 8 and mixed != plain
    rows = [
        r["retrieval_rows"] for r in read_metrics(tmp_path / "mix" / "metrics.jsonl") if r["kind"] == "train"
    ]
    assert rows == [2] * 8

    with crash_while_logging(monkeypatch, 6):
        train(_cfg(packed, tmp_path / "resumed", retrieval_mix=0.5), **QUIET)
    train(_cfg(packed, tmp_path / "resumed", retrieval_mix=0.5), resume=True, **QUIET)
    assert _losses(tmp_path / "resumed") == mixed  # bit for bit
    with pytest.raises(SubLLMError, match="retrieval_mix"):  # a trajectory setting: resume must agree
        train(_cfg(packed, tmp_path / "resumed", retrieval_mix=0.25, steps=9), resume=True, **QUIET)


@pytest.mark.parametrize(
    "value, message", [("1.5", "in \\[0, 1\\]"), ("-0.1", "non-negative"), ("abc", "must be a number")]
)
def test_bad_values_are_clear_errors(packed, tmp_path, value, message):
    with pytest.raises(SubLLMError, match=message):
        _cfg(packed, tmp_path, retrieval_mix=value)
    assert _cfg(packed, tmp_path, retrieval_mix="0").retrieval_mix is None  # 0 = off
