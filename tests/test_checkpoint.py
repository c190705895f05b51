"""Crash-safe checkpoints: a killed and resumed run reproduces the uninterrupted loss sequence bit
for bit; a crash in the middle of a save leaves the previous checkpoint loadable; corrupt or
mismatched checkpoints give one-line SubLLMErrors."""

import json
import os
import random

import numpy as np
import pytest
import torch
from helpers import crash_while_logging, pack_synthetic, spy_file_events

from subllm import SubLLM, SubLLMError
from subllm.trainer import checkpoint as ckpt
from subllm.trainer.config import build_config
from subllm.trainer.loop import train
from subllm.trainer.metrics import read_metrics

WORDS = (
    "the a king queen lord lady castle sword crown speak love death night day river sea wind fire "
    "stone heart good ill and or but not with upon thou art hath doth"
).split()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny tokenizer (300 tokens) and packed train/val shards of synthetic text."""
    return pack_synthetic(tmp_path_factory.mktemp("data"), WORDS, seed=0, n_train=1500)


def _cfg(packed, out, **kw):
    base = dict(
        preset="subllm-tiny",
        data=str(packed),
        steps=12,
        batch_size=4,
        seq_len=48,
        eval_every=5,
        eval_batches=2,
        save_every=4,
        out=str(out),
        threads=1,
        progress=False,
    )
    return build_config({**base, **kw})


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def _evals(run_dir):
    records = read_metrics(run_dir / "metrics.jsonl")
    return [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]


@pytest.mark.parametrize("optimizer", ["scaled_adam", "adamw"])
def test_resume_after_crash_is_bit_exact(packed, tmp_path, monkeypatch, optimizer):
    quiet = dict(log=lambda *a, **k: None)
    train(_cfg(packed, tmp_path / "straight", optimizer=optimizer, schedule_steps="scale"), **quiet)
    straight = _losses(tmp_path / "straight")
    assert [s for s, _ in straight] == list(range(1, 13))

    # crash while logging step 7 (last checkpoint: step 4, eval at 5 already done)
    crashed = tmp_path / "crashed"
    with crash_while_logging(monkeypatch, 7):
        train(_cfg(packed, crashed, optimizer=optimizer, schedule_steps="scale"), **quiet)
    assert ckpt.latest_checkpoint(crashed).name == "step-00000004"

    # a fresh start into the same folder is refused; --resume continues
    with pytest.raises(SubLLMError, match="--resume"):
        train(_cfg(packed, crashed, optimizer=optimizer, schedule_steps="scale"), **quiet)
    train(_cfg(packed, crashed, optimizer=optimizer, schedule_steps="scale"), resume=True, **quiet)
    assert _losses(crashed) == straight  # bit-exact, and steps 5-6 logged once only
    assert _evals(crashed) == _evals(tmp_path / "straight")
    a = SubLLM.from_pretrained(tmp_path / "straight").state_dict()
    b = SubLLM.from_pretrained(crashed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _save(run, step, cfg, tok=None, keep=3):
    model = SubLLM(cfg)
    state = {"step": step, "tokens_seen": 10 * step, "rng": [ckpt.capture_rng()]}
    optim_state = {"x": torch.ones(2)}
    return ckpt.save_checkpoint(run, step, cfg, model.state_dict(), optim_state, state, tok, keep=keep)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from subllm.config import get_preset

    cfg = get_preset("subllm-tiny")
    run = tmp_path / "run"
    first = _save(run, 1, cfg)
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if str(path).endswith(ckpt.TRAINER_STATE):
            raise OSError("disk full (simulated)")
        real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        _save(run, 2, cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.latest_checkpoint(run) == first.resolve()
    assert not (run / "checkpoints" / "step-00000002").exists()
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert loaded.step == 1 and loaded.trainer_state["tokens_seen"] == 10

    # a crash after the rename but before `latest` moves: latest still names a complete checkpoint
    monkeypatch.setattr(ckpt.os, "symlink", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        _save(run, 3, cfg)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(run).name == "step-00000001"
    ckpt.load_checkpoint(run / "checkpoints" / "step-00000003")  # complete, just not yet `latest`
    # the next save cleans up the temporary folder of the failed one
    _save(run, 4, cfg)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert ckpt.latest_checkpoint(run).name == "step-00000004"


def test_save_fsyncs_each_file_and_the_folder_before_the_renames(tmp_path, monkeypatch):
    """Data on disk before the names that point at it: every file of the checkpoint (synced under its
    own name, or as the temporary it was renamed from), then the folder itself, are fsynced before
    the folder is renamed into place; the checkpoints folder after that rename and after `latest`
    moves. Recorded at os.fsync / os.rename / os.replace."""
    from subllm.config import get_preset

    events = spy_file_events(monkeypatch)
    final = _save(tmp_path / "run", 2, get_preset("subllm-tiny"))
    monkeypatch.undo()

    def synced(path) -> list[int]:
        return [i for i, e in enumerate(events) if e == ("fsync", str(path))]

    def moved_to(path) -> list[int]:
        return [i for i, e in enumerate(events) if e[0] == "move" and e[2] == str(path)]

    (into,) = moved_to(final)
    tmp = events[into][1]
    names = sorted(p.name for p in final.iterdir())
    written = {ckpt.MANIFEST, ckpt.OPTIMIZER, ckpt.TRAINER_STATE, "model.safetensors", "config.json"}
    assert written <= set(names), names
    last_file = 0
    for name in names:
        path = os.path.join(tmp, name)
        sources = [path] + [events[i][1] for i in moved_to(path)]
        first = min((i for src in sources for i in synced(src)), default=None)
        assert first is not None and first < into, (name, events)
        last_file = max([last_file, first, *moved_to(path)])
    assert any(last_file < i < into for i in synced(tmp)), events  # the folder, after its files
    root = final.parent
    (latest,) = moved_to(root / ckpt.LATEST)
    assert any(into < i < latest for i in synced(root)), events  # the rename is durable before `latest`
    assert any(i > latest for i in synced(root)), events  # and `latest` itself


def test_prune_keeps_the_newest(tmp_path):
    from subllm.config import get_preset

    cfg = get_preset("llama-tiny")
    for step in range(1, 5):
        _save(tmp_path, step, cfg, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "missing", "config"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    from subllm.config import get_preset

    path = _save(tmp_path, 5, get_preset("subllm-tiny"))
    if damage == "flip":
        data = bytearray((path / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate":
        (path / ckpt.OPTIMIZER).write_bytes((path / ckpt.OPTIMIZER).read_bytes()[:50])
    elif damage == "manifest":
        (path / ckpt.MANIFEST).write_text("{not json")
    elif damage == "missing":
        (path / ckpt.TRAINER_STATE).unlink()
    else:
        (path / "config.json").write_text(json.dumps({"dim": 64, "bogus": 1}))
    with pytest.raises(SubLLMError, match="corrupt|incomplete|missing|does not match"):
        ckpt.load_checkpoint(path)


def test_mismatched_checkpoint_is_a_clear_error(packed, tmp_path):
    quiet = dict(log=lambda *a, **k: None)
    train(_cfg(packed, tmp_path, steps=2, eval_every=0), **quiet)
    with pytest.raises(SubLLMError, match="does not match this run.*seq_len"):
        train(_cfg(packed, tmp_path, steps=2, eval_every=0, seq_len=32), resume=True, **quiet)
    with pytest.raises(SubLLMError, match="does not match this run.*model structure"):
        train(_cfg(packed, tmp_path, steps=2, eval_every=0, structure="T(TT)T"), resume=True, **quiet)


def test_rng_roundtrip():
    state = ckpt.capture_rng()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.restore_rng(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
