"""The training configuration: one `TrainConfig` dataclass, every field settable by a CLI flag or a
JSON config file (flags win), validated up front with one-line `SubLLMError`s.

Values arrive as strings (flags) or JSON values (file); `FIELDS` names each field's parser, so the
two sources are checked by the same code. `model_config()` turns preset + overrides + data into
the `ModelConfig` to train, including the Balancer/bypass schedule lengths (docs/method.md
section 7): "paper" keeps 8,000 / 20,000 steps, "scale" stretches them to the run length (the
bypass minimum reaches its floor at the last step, the Balancer probability at 40% of the run,
the paper's 8,000 : 20,000 ratio). Which one was used is recorded in config.extra.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from subllm.config import SELECTION_RECIPES, ModelConfig, get_preset
from subllm.dtype import DTYPES  # auto | bf16 | fp32, resolved per device in the loop
from subllm.errors import SubLLMError

OPTIMIZERS = ("scaled_adam", "adamw")
SCHEDULES = ("paper", "scale")
DEVICES = ("auto", "cpu", "cuda")
BALANCER_FRACTION = 0.4  # 8000 / 20000: where the Balancer schedule ends, as a share of the bypass one


@dataclass
class TrainConfig:
    preset: str = "subllm-small"
    data: str | None = None
    structure: str | None = None
    keep_ratio: float | list[float] | None = None
    selection: str | None = None  # a SELECTION_RECIPES name applied before --set (None = the preset's)
    set: dict = field(default_factory=dict)  # ModelConfig field overrides
    tokenizer: str | None = None
    vocab_size: int = 8192  # only when a tokenizer is trained for a raw-text --data
    optimizer: str = "scaled_adam"
    lr: float | None = None  # None = the optimizer's default (0.035 ScaledAdam, 3e-4 AdamW)
    warmup_steps: int | None = None  # None = min(500, steps // 10)
    weight_decay: float = 0.1  # AdamW only
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    steps: int | None = None
    tokens: int | None = None
    time_limit: float | None = None  # seconds of training after which the run stops (eval, save) early
    eval_every: int = 200
    eval_batches: int = 16
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    out: str = "runs/train"
    seed: int = 0
    dtype: str = "auto"  # bf16 where the hardware does bf16 natively, else fp32 (subllm/dtype.py)
    schedule_steps: str = "paper"
    fsdp: bool = False
    compile: bool = (
        False  # torch.compile the training forward+backward (one static graph, subllm/trainer/compiled.py)
    )
    pose_target: int | None = None  # PoSE: position ids spanning up to this length (trainer/pose.py)
    retrieval_mix: float | None = None  # share of rows replaced by passkey/mqar (trainer/retrieval_mix.py)
    checkpointing: bool = False  # activation checkpointing, per layer (recompute in backward)
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    init_from: str | None = None  # uptraining: start from this LLaMA folder (trainer/uptrain.py)
    train_only: list[str] | None = None  # subsets of uptrain.TRAIN_ONLY to train; None = all parameters
    distill_from: str | None = None  # a frozen teacher: LM loss mixed with KL to it (trainer/distill.py)
    distill_weight: float = 0.5  # w in (1 - w) * LM + w * t^2 * KL
    distill_temperature: float = 1.0
    sequence_parallel: int = 1  # ranks sharing each sequence under torchrun (subllm/seqpar/); 1 = off
    sp_attention: str = "ulysses"  # attention under --sequence-parallel: ulysses (all-to-all) or ring

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# fields that decide the training trajectory: a resumed run must agree on all of them, except lr (a new
# --lr on resume is applied and recorded as a trajectory change, trainer/loop.py _lr_change)
TRAJECTORY = (
    "optimizer",
    "lr",
    "warmup_steps",
    "weight_decay",
    "batch_size",
    "seq_len",
    "grad_accum",
    "seed",
    "dtype",  # as requested: "auto" resumes as "auto" (resolved again on the resuming machine)
    "schedule_steps",
    "pose_target",
    "retrieval_mix",
    "init_from",
    "train_only",
    "distill_from",
    "distill_weight",
    "distill_temperature",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_int(name, v, lo=1, none_ok=False):
    if v is None and none_ok:
        return None
    if isinstance(v, bool):
        raise SubLLMError(f"{_flag(name)} must be an integer, got {v!r}")
    if isinstance(v, str):
        s = v.strip().replace("_", "")
        mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(s[-1:].lower(), 1)
        if mult > 1:
            s = s[:-1]
        try:
            f = float(s) * mult
        except ValueError:
            raise SubLLMError(f"{_flag(name)} must be an integer, got {v!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise SubLLMError(f"{_flag(name)} must be an integer, got {v!r}")
        v = int(f)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int):
        raise SubLLMError(f"{_flag(name)} must be an integer, got {v!r}")
    if v < lo:
        raise SubLLMError(f"{_flag(name)} must be >= {lo}, got {v}")
    return v


def _float(name, v, positive=True, none_ok=False):
    if v is None and none_ok:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise SubLLMError(f"{_flag(name)} must be a number, got {v!r}") from None
    if not math.isfinite(f) or (positive and f <= 0) or f < 0:
        raise SubLLMError(
            f"{_flag(name)} must be a {'positive' if positive else 'non-negative'} number, got {v!r}"
        )
    return f


def _choice(choices):
    def parse(name, v):
        if v not in choices:
            raise SubLLMError(f"{_flag(name)} must be one of {', '.join(choices)}; got {v!r}")
        return v

    return parse


def _bool(name, v):
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise SubLLMError(f"{_flag(name)} must be true or false, got {v!r}")


def _str(name, v, none_ok=True):
    if v is None and none_ok:
        return None
    if not isinstance(v, str) or not v:
        raise SubLLMError(f"{_flag(name)} must be a non-empty string, got {v!r}")
    return v


def _keep_ratio(name, v):
    if v is None:
        return None
    items = v.split(",") if isinstance(v, str) else v if isinstance(v, list) else [v]
    out = []
    for x in items:
        try:
            r = float(x)
        except (TypeError, ValueError):
            raise SubLLMError(
                f"--keep-ratio must be a number or comma-separated numbers, got {v!r}"
            ) from None
        if not 0.0 < r <= 1.0:
            raise SubLLMError(f"--keep-ratio values must lie in (0, 1], got {r}")
        out.append(r)
    return out[0] if len(out) == 1 else out


def parse_overrides(name, v):
    """`--set dim=128 --set n_heads=2` (or a JSON object in the config file) -> {field: value}."""
    if v is None:
        return {}
    if isinstance(v, dict):
        items = v.items()
    else:
        pairs = [v] if isinstance(v, str) else list(v)
        items = []
        for p in pairs:
            if not isinstance(p, str) or "=" not in p:
                raise SubLLMError(f"--set takes KEY=VALUE (a ModelConfig field), got {p!r}")
            k, val = p.split("=", 1)
            try:
                val = json.loads(val)
            except json.JSONDecodeError:
                pass  # a bare string, e.g. structure=TT(TT)TT
            items.append((k.strip(), val))
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    out = {}
    for k, val in items:
        if k not in fields:
            raise SubLLMError(
                f"--set {k}=...: unknown ModelConfig field; choose from {', '.join(sorted(fields))}"
            )
        out[k] = val
    return out


def _unit(name, v):
    """A number in [0, 1]."""
    f = _float(name, v, positive=False)
    if f > 1.0:
        raise SubLLMError(f"{_flag(name)} must lie in [0, 1], got {v!r}")
    return f


def _share(name, v):
    """A share in [0, 1]; 0 (or None) = off, stored as None."""
    if v is None:
        return None
    f = _float(name, v, positive=False)
    if f > 1.0:
        raise SubLLMError(f"{_flag(name)} is a share of each batch's rows, in [0, 1]; got {v!r}")
    return f or None


def _train_only(name, v):
    from subllm.trainer.uptrain import TRAIN_ONLY

    if v is None:
        return None
    items = [x.strip() for x in v.split(",")] if isinstance(v, str) else v if isinstance(v, list) else [v]
    bad = [x for x in items if x not in TRAIN_ONLY]
    if bad or not items:
        raise SubLLMError(f"--train-only takes a comma-separated subset of {','.join(TRAIN_ONLY)}; got {v!r}")
    return [g for g in TRAIN_ONLY if g in items]


FIELDS = {
    "preset": lambda n, v: _str(n, v, none_ok=False),
    "data": _str,
    "structure": _str,
    "keep_ratio": _keep_ratio,
    "selection": lambda n, v: None if v is None else _choice(tuple(SELECTION_RECIPES))(n, v),
    "set": parse_overrides,
    "tokenizer": _str,
    "vocab_size": lambda n, v: parse_int(n, v, lo=259),
    "optimizer": _choice(OPTIMIZERS),
    "lr": lambda n, v: _float(n, v, none_ok=True),
    "warmup_steps": lambda n, v: parse_int(n, v, lo=0, none_ok=True),
    "weight_decay": lambda n, v: _float(n, v, positive=False),
    "batch_size": parse_int,
    "seq_len": lambda n, v: parse_int(n, v, lo=2),
    "grad_accum": parse_int,
    "steps": lambda n, v: parse_int(n, v, none_ok=True),
    "tokens": lambda n, v: parse_int(n, v, none_ok=True),
    "time_limit": lambda n, v: _float(n, v, positive=False, none_ok=True),
    "eval_every": lambda n, v: parse_int(n, v, lo=0),
    "eval_batches": parse_int,
    "save_every": lambda n, v: parse_int(n, v, lo=0),
    "keep_checkpoints": parse_int,
    "log_every": parse_int,
    "out": lambda n, v: _str(n, v, none_ok=False),
    "seed": lambda n, v: parse_int(n, v, lo=0),
    "dtype": _choice(DTYPES),
    "schedule_steps": _choice(SCHEDULES),
    "fsdp": _bool,
    "compile": _bool,
    "pose_target": lambda n, v: parse_int(n, v, lo=2, none_ok=True),
    "retrieval_mix": lambda n, v: _share(n, v),
    "checkpointing": _bool,
    "device": _choice(DEVICES),
    "threads": lambda n, v: parse_int(n, v, none_ok=True),
    "progress": _bool,
    "init_from": lambda n, v: None if v is None else str(Path(_str(n, v)).resolve()),
    "train_only": _train_only,
    "distill_from": lambda n, v: None if v is None else str(Path(_str(n, v)).resolve()),
    "distill_weight": lambda n, v: _unit(n, v),
    "distill_temperature": _float,
    "sequence_parallel": parse_int,
    "sp_attention": _choice(("ulysses", "ring")),
}


def read_config_file(path: str | Path) -> dict:
    from subllm.model.io import read_json  # imports torch: not at `subllm train --help` time

    p = Path(path)
    if not p.is_file():
        raise SubLLMError(f"--config {p}: no such file")
    d = read_json(p, f"--config {p}")
    if not isinstance(d, dict):
        raise SubLLMError(f"--config {p} must hold a JSON object of training options")
    d = {k.replace("-", "_"): v for k, v in d.items()}
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise SubLLMError(f"--config {p}: unknown option(s) {', '.join(unknown)}")
    return d


def build_config(*sources: dict) -> TrainConfig:
    """TrainConfig from the defaults overridden by each source in turn (None values are skipped),
    every value parsed and checked."""
    values = TrainConfig().to_dict()
    for src in sources:
        for k, v in src.items():
            if v is not None:
                values[k] = v
    parsed = {k: FIELDS[k](k, v) for k, v in values.items()}
    cfg = TrainConfig(**parsed)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks (single values were checked by their parsers)."""
    if cfg.data is None:
        raise SubLLMError("--data is required: a packed shard folder, a corpus folder or a .txt file")
    if cfg.steps is not None and cfg.tokens is not None:
        raise SubLLMError("give --steps or --tokens, not both")
    get_preset(cfg.preset)  # unknown preset -> SubLLMError naming the choices
    if cfg.pose_target is not None and cfg.pose_target < cfg.seq_len:
        raise SubLLMError(f"--pose-target ({cfg.pose_target}) must be at least --seq-len ({cfg.seq_len})")
    if cfg.train_only is not None and cfg.init_from is None:
        raise SubLLMError("--train-only needs --init-from (frozen random layers would train nothing)")
    if cfg.init_from is not None and cfg.tokenizer is not None:
        raise SubLLMError(
            "--tokenizer and --init-from exclude each other: the tokenizer comes from that folder"
        )
    if cfg.distill_from is not None and (cfg.fsdp or cfg.compile):
        raise SubLLMError("--distill-from works with plain or DDP training; drop --fsdp / --compile")
    sp = cfg.sequence_parallel
    if sp > 1:
        if cfg.seq_len % sp:
            raise SubLLMError(f"--seq-len {cfg.seq_len} is not divisible by --sequence-parallel {sp}")
        for flag, on in (
            ("--fsdp", cfg.fsdp),
            ("--compile", cfg.compile),
            ("--distill-from", cfg.distill_from),
        ):
            if on:
                raise SubLLMError(f"--sequence-parallel does not support {flag} (it composes with DDP only)")
    if cfg.warmup_steps is not None and cfg.steps is not None and cfg.warmup_steps > cfg.steps:
        raise SubLLMError(f"--warmup-steps ({cfg.warmup_steps}) exceeds --steps ({cfg.steps})")


def tokens_per_step(cfg: TrainConfig, world_size: int) -> int:
    return cfg.batch_size * cfg.seq_len * cfg.grad_accum * world_size


def total_steps(cfg: TrainConfig, world_size: int) -> int:
    """--steps, or --tokens rounded up to whole optimizer steps, or 1000."""
    if cfg.steps is not None:
        return cfg.steps
    if cfg.tokens is not None:
        return max(1, math.ceil(cfg.tokens / tokens_per_step(cfg, world_size)))
    return 1000


def model_config(
    cfg: TrainConfig, steps: int, tokenizer_meta: dict | None, base: ModelConfig | None = None
) -> ModelConfig:
    """Preset (or `base`: an uptraining run's, trainer/uptrain.py), then --structure / --keep-ratio,
    --selection, the tokenizer's vocabulary and special ids, the schedule lengths, and finally --set
    overrides."""
    mc = get_preset(cfg.preset) if base is None else base
    changes: dict = {}
    if cfg.structure is not None:
        changes["structure"] = cfg.structure
        n_subs = cfg.structure.count("(")
        if cfg.keep_ratio is None and isinstance(mc.keep_ratio, list) and len(mc.keep_ratio) != n_subs:
            changes["keep_ratio"] = mc.keep_ratios[0] if mc.keep_ratios else 0.64
    if cfg.keep_ratio is not None:
        changes["keep_ratio"] = cfg.keep_ratio
    if tokenizer_meta:
        changes["vocab_size"] = int(tokenizer_meta["vocab_size"])
        for ours, theirs in (
            ("pad_token_id", "pad_id"),
            ("bos_token_id", "bos_id"),
            ("eos_token_id", "eos_id"),
        ):
            if tokenizer_meta.get(theirs) is not None:
                changes[ours] = int(tokenizer_meta[theirs])
    if cfg.selection is not None:
        changes.update(SELECTION_RECIPES[cfg.selection])
    if cfg.schedule_steps == "scale":
        changes["bypass_steps"] = max(1, steps)
        changes["balancer_steps"] = max(1, round(BALANCER_FRACTION * steps))
    changes.update(cfg.set)
    extra = dict(mc.extra)
    extra["schedule_steps"] = cfg.schedule_steps
    changes["extra"] = extra
    try:
        mc = mc.replace(**changes)
    except TypeError as e:  # a --set value of the wrong kind
        raise SubLLMError(f"bad model override: {e}") from None
    if tokenizer_meta and mc.vocab_size < int(tokenizer_meta["vocab_size"]):
        raise SubLLMError(
            f"vocab_size {mc.vocab_size} is smaller than the tokenizer's {tokenizer_meta['vocab_size']}"
        )
    if cfg.seq_len > mc.max_seq_len:
        raise SubLLMError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {mc.max_seq_len}")
    if cfg.pose_target is not None and cfg.pose_target > mc.max_seq_len:
        raise SubLLMError(
            f"--pose-target {cfg.pose_target} exceeds the model's max_seq_len {mc.max_seq_len} "
            f"(raise it: --set max_seq_len={cfg.pose_target})"
        )
    return mc


def config_diff(a: dict, b: dict, keys=None) -> list[str]:
    """'key: a -> b' for every differing key (all keys of both when `keys` is None)."""
    keys = sorted(set(a) | set(b)) if keys is None else keys
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
