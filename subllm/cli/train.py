"""`subllm train`: pretrain a SUBLLM (or, with a llama-* preset, the same-size LLaMA baseline).

    subllm train --preset subllm-small --data data/corpus --steps 2000 --out runs/x
    subllm train --out runs/x --resume                       # continue after a crash / kill
    subllm train --init-from runs/llama --structure 'TT(TT)TT' --data ... [--train-only subsample,bypass]
    torchrun --nproc_per_node 2 -m subllm train ... [--fsdp] # DDP (gloo on CPU, nccl on CUDA) / FSDP2
    torchrun --nproc_per_node 2 -m subllm train ... --sequence-parallel 2   # long rows over 2 ranks

Options come from flags and/or a JSON file (`--config FILE`, keys = the long flag names; flags
win; on --resume the run's saved options are the base). Every value is checked before anything
runs. The loop lives in subllm/trainer/loop.py, the options in subllm/trainer/config.py.
"""

from __future__ import annotations

import argparse

from subllm.trainer.config import DEVICES, DTYPES, OPTIMIZERS, SCHEDULES, TrainConfig

HELP = {
    "preset": "model preset from subllm.config.PRESETS (default subllm-small)",
    "data": "packed shards (a split folder or one with train/ val/), or raw text: a corpus folder or .txt "
    "file, tokenized and packed into OUT/data",
    "structure": "override the preset's structure string, e.g. 'TT(TT(TT)TT)TT'",
    "keep_ratio": "keep ratio per S: one number or one per '(' comma-separated (default: the preset's)",
    "selection": "how S learns to select at inference what it selects in training: aligned (the default "
    "of new configs: auxiliary BCE, normalised scores, counted Balancer, calibrated threshold) | paper (the "
    "released "
    "rule); default: the preset's",
    "set": "override any ModelConfig field, KEY=VALUE (repeatable), e.g. --set dim=128 --set n_heads=2",
    "tokenizer": "tokenizer for raw-text --data (default: train one), or where packed data's tokenizer is",
    "vocab_size": "vocabulary of the tokenizer trained for raw-text --data (default 8192)",
    "optimizer": f"{' | '.join(OPTIMIZERS)} (default scaled_adam, with Eden; adamw uses warmup-cosine)",
    "lr": "base learning rate (default: 0.035 scaled_adam, 3e-4 adamw); with --resume a new value applies "
    "from the resumed step on and is recorded as a trajectory change",
    "warmup_steps": "lr warmup steps (default min(500, steps // 10))",
    "weight_decay": "AdamW weight decay (default 0.1)",
    "batch_size": "sequences per micro-batch per rank (default 8)",
    "seq_len": "tokens per sequence (default 256)",
    "grad_accum": "micro-batches per optimizer step (default 1)",
    "steps": "optimizer steps (default 1000); or give --tokens",
    "tokens": "training tokens (rounded up to whole steps); accepts 2e6, 500k, 2M",
    "time_limit": "stop after the step at which training (evaluation and saving not counted) passes this "
    "many seconds, then evaluate and save as at the end; schedules stay those of --steps, and --resume "
    "(which does not inherit the limit) continues them (default: no limit)",
    "eval_every": "evaluate every N steps, and at the end (0 = only at the end; default 200)",
    "eval_batches": "validation batches per evaluation (default 16)",
    "save_every": "checkpoint every N steps, and at the end (0 = only at the end; default 500)",
    "keep_checkpoints": "how many recent checkpoints to keep (default 2)",
    "log_every": "progress-bar refresh of loss and tokens/s, in steps (default 10)",
    "out": "run folder: checkpoints, metrics.jsonl, loss.png and the final model (default runs/train)",
    "seed": "random seed, the same on every rank (default 0)",
    "dtype": f"{' | '.join(DTYPES)}: bf16 autocast or plain fp32; auto (default) = bf16 on a GPU or CPU "
    "that does bf16 natively, else fp32 (bf16 is far slower than fp32 on AVX2-only CPUs); no fp16",
    "schedule_steps": f"{' | '.join(SCHEDULES)}: Balancer/bypass schedules of 8000/20000 steps as in the "
    "paper (default), or scaled to this run's length",
    "fsdp": "shard with FSDP2 (fully_shard) instead of DDP under torchrun",
    "compile": "torch.compile the training step's forward and backward (inductor): one graph per model, "
    "compiled once (the first step takes a while); evaluation stays eager",
    "pose_target": "PoSE: train at --seq-len with position ids split into 2 chunks with a random skip, "
    "so that relative distances up to N are seen (Zhu et al. 2023); default off",
    "retrieval_mix": "share in [0, 1] of each batch's rows replaced by passkey / mqar retrieval examples of "
    "--seq-len tokens, built from the training split's text (subllm/trainer/retrieval_mix.py); default off",
    "checkpointing": "activation checkpointing per layer: recompute each layer in backward (less memory)",
    "device": f"{' | '.join(DEVICES)} (default auto: cuda if available)",
    "threads": "torch CPU threads per process (default: torch's choice; torchrun sets 1)",
    "progress": "show a progress bar (default on)",
    "init_from": "uptraining: start from this LLaMA (one of our run/model folders, or a Hugging Face Llama "
    "folder); its layers are copied exactly, --structure/--keep-ratio decide which S/B modules are added "
    "(default: its own all-T structure), architecture and tokenizer come from it; a SUBLLM folder is "
    "fine-tuned as it is (its whole config); --set rope_scaling=... / max_seq_len=... may change its context",
    "train_only": "with --init-from: train only these parameter groups, comma-separated subset of "
    "subsample,bypass (router tuning: the S score layers and B scales); default all parameters",
    "distill_from": "distillation: a frozen teacher model (model or run folder, same vocabulary), e.g. the "
    "LLaMA given to --init-from; the loss is (1 - w) LM + w t^2 KL(teacher || student), logits in chunks",
    "distill_weight": "w of --distill-from, in [0, 1] (default 0.5)",
    "distill_temperature": "t of --distill-from: both distributions at temperature t (default 1.0)",
    "sequence_parallel": "under torchrun: N ranks share each sequence (contiguous shards, Ulysses or ring "
    "attention, SUBLLM's selection exact); the other ranks split the batch as DDP does (default 1 = off)",
    "sp_attention": "attention under --sequence-parallel: ulysses (all-to-all of heads; N must divide "
    "n_heads) or ring (k, v blocks passed around the ranks, log-sum-exp merge; any n_heads); "
    "default ulysses",
}

METAVAR = {
    "preset": "NAME",
    "sp_attention": "NAME",
    "data": "PATH",
    "structure": "S",
    "keep_ratio": "R",
    "selection": "NAME",
    "tokenizer": "PATH",
    "optimizer": "NAME",
    "lr": "LR",
    "weight_decay": "WD",
    "out": "DIR",
    "dtype": "DTYPE",
    "schedule_steps": "MODE",
    "device": "DEVICE",
    "init_from": "DIR",
    "train_only": "GROUPS",
    "distill_from": "DIR",
    "distill_weight": "W",
    "distill_temperature": "T",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="JSON file of options (keys = long flag names)")
    for name in TrainConfig.__dataclass_fields__:
        flag = "--" + name.replace("_", "-")
        if name in ("fsdp", "compile", "checkpointing"):
            parser.add_argument(flag, action="store_const", const=True, default=None, help=HELP[name])
        elif name == "progress":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[name])
        elif name == "set":
            parser.add_argument(flag, action="append", metavar="KEY=VALUE", default=None, help=HELP[name])
        else:
            parser.add_argument(flag, metavar=METAVAR.get(name, "N"), default=None, help=HELP[name])
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- saved run options (with --resume) <- --config file <- flags, all validated."""
    from subllm.trainer.config import build_config, read_config_file

    flags = {
        k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if getattr(args, k, None) is not None
    }
    file = read_config_file(args.config) if args.config else {}
    base = {}
    if args.resume:
        base = _saved_options(flags.get("out") or file.get("out") or TrainConfig.out)
        if any(k in src for src in (file, flags) for k in ("steps", "tokens")):
            base.pop("steps", None), base.pop("tokens", None)  # a new length replaces the saved one
        base.pop("time_limit", None)  # a limit is this invocation's: a resumed run is not stopped again
    return build_config(base, file, flags)


def _saved_options(out: str) -> dict:
    import json
    from pathlib import Path

    from subllm.trainer.loop import TRAIN_CONFIG

    path = Path(out) / TRAIN_CONFIG
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}


def run(args: argparse.Namespace) -> int:
    from subllm.trainer.loop import train

    cfg = config_from_args(args)
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0
