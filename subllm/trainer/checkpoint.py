"""Crash-safe training checkpoints: write everything to a temporary folder, fsync, rename, then
repoint `latest` (after nanochat's checkpoint_manager, made atomic).

Layout of a run directory:

    RUN/checkpoints/step-00000100/   config.json, model.safetensors (SubLLM.save_pretrained format),
                                     tokenizer files (AutoTokenizer.from_pretrained works here),
                                     optimizer.pt, trainer_state.pt (step, tokens seen, schedule,
                                     per-rank data-sampler and RNG states, the training config),
                                     checkpoint.json (written last: sha256 + size of every file)
    RUN/checkpoints/latest -> step-00000100   (a symlink, replaced atomically)

A kill at any moment leaves the previous checkpoint intact: a half-written folder is still named
`.tmp-*` (ignored, removed by the next save), and `latest` only ever points at a folder whose
`checkpoint.json` was complete before the rename. Loading verifies every file against
`checkpoint.json`, so a truncated or altered checkpoint is a `SubLLMError`, not a stack trace.
`.pt` files hold only tensors and plain Python values and are read with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from subllm.config import ModelConfig
from subllm.data.tokenizer import TOKENIZER_FILES
from subllm.errors import SubLLMError
from subllm.files import fsync_path, sha256_file
from subllm.model.io import read_json

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "checkpoint.json"
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.pt"
FORMAT = "subllm-checkpoint-v1"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---- RNG -------------------------------------------------------------------------------------


def capture_rng() -> dict:
    """torch (CPU and every CUDA device), Python `random` and NumPy global RNG states, as tensors
    and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )


# ---- saving ----------------------------------------------------------------------------------


def copy_tokenizer(src: Path | str | None, dst: Path) -> list[str]:
    """Copy the tokenizer files of folder `src` into `dst` (so AutoTokenizer.from_pretrained(dst)
    works); returns the names copied. Each file is copied to a temporary name and renamed."""
    if src is None:
        return []
    src = Path(src)
    if not src.is_dir():
        raise SubLLMError(f"tokenizer folder {src} does not exist")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            tmp = dst / (name + ".tmp")
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise SubLLMError(f"{src} holds no tokenizer.json / tokenizer.model to copy")
    return copied


def save_model_dir(
    directory: Path | str, config: ModelConfig, model_state: dict, tokenizer_dir: Path | str | None
) -> None:
    """A loadable model folder: config.json + model.safetensors (+ tokenizer). Each file is written
    atomically (temporary name, rename) by subllm.model.io."""
    from subllm.model.io import save_pretrained

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_pretrained(types.SimpleNamespace(config=config, state_dict=lambda: model_state), directory)
    copy_tokenizer(tokenizer_dir, directory)


def save_checkpoint(
    run_dir: Path | str,
    step: int,
    config: ModelConfig,
    model_state: dict,
    optimizer_state: dict,
    trainer_state: dict,
    tokenizer_dir: Path | str | None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep`; returns its path."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model_dir(tmp, config, model_state, tokenizer_dir)
    torch.save(optimizer_state, tmp / OPTIMIZER)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    files = {}
    for p in sorted(tmp.iterdir()):
        fsync_path(p)
        files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "format": FORMAT,
        "step": int(step),
        "tokens_seen": int(trainer_state.get("tokens_seen", 0)),
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one out of the way
        trash = root / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(root)
    link = root / f".{LATEST}.tmp-{os.getpid()}"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(final.name, link)
    os.replace(link, root / LATEST)
    fsync_path(root)
    prune(run_dir, keep)
    return final


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoint folders (with a manifest), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune(run_dir: Path | str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (never the one `latest` points to) and any
    leftover temporary folders of earlier crashed saves."""
    root = Path(run_dir) / CHECKPOINTS
    for p in [*root.glob(".tmp-*"), *root.glob(".trash-*")]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(f".{LATEST}.tmp-*"):
        p.unlink(missing_ok=True)
    if keep < 1:
        return
    latest = latest_checkpoint(run_dir)
    for p in list_checkpoints(run_dir)[:-keep]:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The checkpoint `latest` points to; if that link is missing or dangling, the newest complete
    folder; None when the run has no checkpoint."""
    link = Path(run_dir) / CHECKPOINTS / LATEST
    if link.is_symlink() or link.exists():
        target = link.resolve()
        if target.is_dir() and (target / MANIFEST).is_file():
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---- loading ---------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    path: Path
    step: int
    config: ModelConfig
    model_state: dict
    optimizer_state: dict
    trainer_state: dict


def verify_checkpoint(path: Path | str) -> dict:
    """The manifest of checkpoint folder `path`, after checking every file's size and sha256."""
    path = Path(path)
    if not path.is_dir():
        raise SubLLMError(f"checkpoint {path} does not exist")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise SubLLMError(f"{path} is not a complete checkpoint (no {MANIFEST}; an interrupted save?)")
    manifest = read_json(mpath, f"corrupt checkpoint manifest {mpath}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SubLLMError(f"{mpath}: not a {FORMAT} manifest")
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise SubLLMError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise SubLLMError(f"checkpoint {path} is corrupt: {name} does not match its recorded sha256")
    for name in ("config.json", "model.safetensors", OPTIMIZER, TRAINER_STATE):
        if name not in manifest.get("files", {}):
            raise SubLLMError(f"checkpoint {path} lacks {name}")
    return manifest


def _load_pt(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise SubLLMError(f"{path} is corrupt or unreadable ({type(e).__name__}: {e})") from None


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Everything of checkpoint folder `path` (verified first), on CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from subllm.model.io import load_config

    path = Path(path)
    manifest = verify_checkpoint(path)
    config = load_config(path)
    try:
        model_state = load_file(str(path / "model.safetensors"), device="cpu")
    except (SafetensorError, OSError) as e:
        raise SubLLMError(f"{path / 'model.safetensors'} is corrupt: {e}") from None
    if config.tie_embeddings and "head.weight" not in model_state:
        model_state["head.weight"] = model_state["embed.weight"]
    trainer_state = _load_pt(path / TRAINER_STATE)
    if not isinstance(trainer_state, dict) or trainer_state.get("step") != manifest["step"]:
        raise SubLLMError(f"{path}: trainer_state.pt does not belong to step {manifest['step']}")
    return Checkpoint(
        path=path,
        step=int(manifest["step"]),
        config=config,
        model_state=model_state,
        optimizer_state=_load_pt(path / OPTIMIZER),
        trainer_state=trainer_state,
    )
