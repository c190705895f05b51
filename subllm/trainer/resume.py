"""Whether a checkpoint can be resumed by this run: every trajectory setting, the model config, the
step count, the sequence-parallel degree and the world size must agree; the learning rate alone may
change (recorded as a trajectory change by the loop, subllm/trainer/loop.py)."""

from __future__ import annotations

from subllm.errors import SubLLMError
from subllm.trainer.config import TRAJECTORY, TrainConfig, config_diff


def check_resumable(loaded, cfg: TrainConfig, mconf, steps: int, info) -> None:
    saved = loaded.trainer_state.get("train_config", {})
    diffs = config_diff(saved, cfg.to_dict(), [k for k in TRAJECTORY if k != "lr"])  # lr: lr_change_on_resume
    if loaded.trainer_state.get("total_steps") != steps:
        diffs.append(f"total steps: {loaded.trainer_state.get('total_steps')} -> {steps}")
    diffs += [f"model {d}" for d in config_diff(loaded.config.to_dict(), mconf.to_dict())]
    saved_sp, sp = saved.get("sequence_parallel", 1), cfg.sequence_parallel
    if saved_sp != sp:
        diffs.append(f"sequence parallel: {saved_sp} -> {sp}")
    if loaded.trainer_state.get("world_size") != info.world_size:
        diffs.append(f"world size: {loaded.trainer_state.get('world_size')} -> {info.world_size}")
    if diffs:
        raise SubLLMError(
            f"checkpoint {loaded.path} does not match this run ({'; '.join(diffs)}): "
            "resume with the original settings, or start a new run with another --out"
        )


def lr_change_on_resume(saved: dict, cfg: TrainConfig) -> tuple[float, float] | None:
    """(saved lr, new lr) when a resumed run asks for another learning rate (None = the default)."""
    from subllm.optim import DEFAULT_LR

    old = saved.get("lr") if saved.get("lr") is not None else DEFAULT_LR[cfg.optimizer]
    new = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]
    return None if float(old) == float(new) else (float(old), float(new))
