"""Shared test helpers: tiny models whose scores give a real mix of kept and dropped tokens,
left-padded prompt batches, and tiny packed corpora for training runs."""

import contextlib
import random

import pytest
import torch

from subllm import ModelConfig, SubLLM
from subllm.config import get_preset


def tiny_config(structure="TT(T(TT)T)T", keep_ratio=0.6, **kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=256)
    return ModelConfig(structure=structure, keep_ratio=keep_ratio, **{**base, **kw})


def _scaled_scores(config: ModelConfig, score_scale: float, seed: int) -> SubLLM:
    """Random model of `config` in eval mode; score weights scaled up so scores are O(1) and about
    half are positive."""
    torch.manual_seed(seed)
    m = SubLLM(config)
    with torch.no_grad():
        for s in m.subsamples:
            s.score.weight.mul_(score_scale)
    return m.eval()


def tiny_model(structure="TT(T(TT)T)T", keep_ratio=0.6, score_scale=40.0, seed=0, **kw) -> SubLLM:
    """Random tiny model (`tiny_config`) with a real mix of kept and dropped tokens."""
    return _scaled_scores(tiny_config(structure, keep_ratio, **kw), score_scale, seed)


def tiny_preset_model(structure="TT(T(TT)T)T", score_scale=40.0, seed=0) -> SubLLM:
    """subllm-tiny (GQA, vocabulary 256) with `structure` and a real mix of kept and dropped tokens."""
    return _scaled_scores(get_preset("subllm-tiny").replace(structure=structure), score_scale, seed)


def left_padded(lens, seed=1, vocab=256):
    """Random prompts of lengths `lens`, left-padded to the longest: ids (B, T), mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lens)
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        ids[b, T - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, T - n :] = 1
    return ids, mask


def greedy_decode(model, lens, steps, subset_at=None):
    """Prefill left-padded random prompts of lengths `lens`, then `steps` greedy decode steps (a
    KV cache in chunks of 8 slots, so it grows while decoding); at step `subset_at` only row 1
    decodes (a subset-rows step). -> (logits (steps + 1, B, V), the cache)."""
    from subllm.inference.engine import decode_step, new_cache, prefill

    ids, mask = left_padded(lens, vocab=model.config.vocab_size)
    cache = new_cache(model, len(lens), chunk=8)
    with torch.no_grad():
        logits = [prefill(model, ids, mask, cache)]
        for i in range(steps):
            tokens = logits[-1].argmax(-1)
            if i == subset_at:
                out = logits[-1].clone()
                out[1] = decode_step(model, cache, tokens[1:2], [1])[0]
                logits.append(out)
            else:
                logits.append(decode_step(model, cache, tokens))
    return torch.stack(logits), cache


def pack_synthetic(root, words, seed, n_train, n_val=200):
    """A tiny tokenizer (300 tokens) and packed train/val shards of random sentences over `words`,
    built under `root`; returns the shards folder."""
    from subllm.data.packing import pack_corpus
    from subllm.data.tokenizer import train_tokenizer

    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        lines = (" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "." for _ in range(n))
        (root / "corpus" / split).mkdir(parents=True)
        (root / "corpus" / split / "text.txt").write_text("\n".join(lines) + "\n")
    train_tokenizer(root / "corpus" / "train", 300, root / "tok")
    for split in ("train", "val"):
        pack_corpus(root / "corpus" / split, root / "tok", root / "tokens" / split, log=lambda *a: None)
    return root / "tokens"


WORDS = "hello world the a cat sat on mat dog ran far".split()


def checkpoint_with_tokenizer(path, model: SubLLM | None = None) -> SubLLM:
    """A tiny SUBLLM checkpoint folder (`model`, default `tiny_preset_model`: a real mix of kept and
    dropped tokens) with a word-level tokenizer over WORDS saved beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "<pad>": 0,
        "<s>": 1,
        "</s>": 2,
        **{w: i + 3 for i, w in enumerate(WORDS)},
        "[UNK]": 3 + len(WORDS),
    }
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )
    model = model or tiny_preset_model()
    model.save_pretrained(path)
    fast.save_pretrained(str(path))
    return model


class Crash(Exception):
    """What `crash_while_logging` raises: a process dying mid-run."""


@contextlib.contextmanager
def crash_while_logging(monkeypatch, step: int):
    """The training run inside this block dies (raises Crash, expected here) while logging step
    `step`, i.e. after that step's update but before anything later; the patch is undone on exit."""
    from subllm.trainer import metrics

    real = metrics.MetricsWriter.write

    def write(self, record):
        if record.get("kind") == "train" and record["step"] == step:
            raise Crash()
        real(self, record)

    monkeypatch.setattr(metrics.MetricsWriter, "write", write)
    try:
        with pytest.raises(Crash):
            yield
    finally:
        monkeypatch.setattr(metrics.MetricsWriter, "write", real)


def spy_file_events(monkeypatch) -> list:
    """Record ("fsync", path) at every os.fsync (the path os.open gave the descriptor) and
    ("move", src, dst) at every os.rename / os.replace, in order, until monkeypatch.undo()."""
    import os

    events, opened = [], {}
    real_open, real_fsync = os.open, os.fsync

    def spy_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        opened[fd] = os.fspath(path)
        return fd

    def spy_fsync(fd):
        events.append(("fsync", opened.get(fd)))
        return real_fsync(fd)

    def spy_move(real):
        def move(src, dst, *a, **k):
            events.append(("move", os.fspath(src), os.fspath(dst)))
            return real(src, dst, *a, **k)

        return move

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "rename", spy_move(os.rename))
    monkeypatch.setattr(os, "replace", spy_move(os.replace))
    return events
