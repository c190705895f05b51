"""save_pretrained fsyncs what it writes; from_pretrained checks the weights' recorded sha256, so a
damaged copy is a clear SubLLMError instead of silently different weights."""

import os
import shutil
import subprocess

import pytest
import torch
from helpers import spy_file_events, tiny_model

from subllm import SubLLM, SubLLMError
from subllm.model.io import WEIGHTS_SHA256_NAME


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's data: safetensors' own header checks pass
    path.write_bytes(bytes(data))


def test_save_fsyncs_every_file_then_the_folder(tmp_path, monkeypatch):
    events = spy_file_events(monkeypatch)
    out = tmp_path / "m"
    tiny_model().save_pretrained(out)
    monkeypatch.undo()
    synced = [e[1] for e in events if e[0] == "fsync"]
    names = [os.path.basename(p) for p in synced]
    for f in ("model.safetensors", WEIGHTS_SHA256_NAME, "modeling_subllm.py", "config.json"):
        assert f + ".tmp" in names, (f, names)  # each file's content before its rename
    assert synced[-1] == str(out)  # and the folder after the last rename
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", WEIGHTS_SHA256_NAME, "modeling_subllm.py"]
    )


def test_sidecar_is_sha256sum_format(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum")
    r = subprocess.run(["sha256sum", "-c", WEIGHTS_SHA256_NAME], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and "model.safetensors: OK" in r.stdout


def test_corrupted_weights_raise_clearly(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    SubLLM.from_pretrained(tmp_path)  # intact: loads
    _flip_last_byte(tmp_path / "model.safetensors")
    with pytest.raises(SubLLMError, match=r"model.safetensors is corrupt: its sha256 .* recorded in"):
        SubLLM.from_pretrained(tmp_path)
    # what the check catches: safetensors alone loads the damaged file without complaint
    damaged = SubLLM.from_pretrained(tmp_path, verify=False)
    a, b = model.state_dict(), damaged.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import subllm.hf  # noqa: F401

    with pytest.raises(SubLLMError, match="is corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_training_checkpoint_is_checked_against_its_manifest(tmp_path):
    from subllm.trainer import checkpoint as ckpt

    model = tiny_model()
    path = ckpt.save_checkpoint(tmp_path, 3, model.config, model.state_dict(), {}, {"step": 3}, None)
    (path / WEIGHTS_SHA256_NAME).unlink()  # only checkpoint.json records the sha256 now
    SubLLM.from_pretrained(path)
    _flip_last_byte(path / "model.safetensors")
    with pytest.raises(SubLLMError, match="recorded in checkpoint.json"):
        SubLLM.from_pretrained(path)
