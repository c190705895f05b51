"""`subllm eval`: evaluate a checkpoint - text loss / bits per byte and few-shot tasks via lm-eval.

    subllm eval --checkpoint runs/demo/subllm --tasks loss,mmlu,bbh,cloze,next_sentence

What each task measures: subllm/evals/suite.py. Prints a results table, then one JSON line with
every number (also written to --out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from subllm.errors import SubLLMError
from subllm.evals.suite import _DTYPE_ALIASES, ALL_TASKS, DEFAULT_TEXT, evaluate, format_table, parse_tasks
from subllm.inference import int4_correction
from subllm.inference.quantize import QUANTIZE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model folder (or a run folder)")
    parser.add_argument(
        "--tasks",
        default="loss,mmlu,bbh,cloze,next_sentence",
        help=f"comma-separated: {', '.join(ALL_TASKS)}, or 'all' (default: %(default)s)",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder/file (default: the checkpoint's)")
    parser.add_argument("--text", help=f"text file or folder for 'loss' (default {DEFAULT_TEXT})")
    parser.add_argument("--heldout", help="held-out text for cloze/next_sentence (default: --text)")
    parser.add_argument(
        "--seq-len", type=int, help="window in tokens (default: the training seq_len, else max_seq_len)"
    )
    parser.add_argument("--stride", type=int, help="loss window stride (default seq_len / 2)")
    parser.add_argument("--max-tokens", type=int, help="score at most this many tokens of --text")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32", *_DTYPE_ALIASES),
        default="auto",
        help="bf16 (autocast) or fp32 (float32 / bfloat16 also accepted); auto (default): bf16 where "
        "the CPU does bf16 natively, else fp32",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default="none",
        help="evaluate the model with weight-only int8 or int4 linear layers (subllm/inference/quantize.py)",
    )
    int4_correction.add_arguments(parser)
    parser.add_argument("--limit", type=int, help="evaluate at most this many documents per task")
    parser.add_argument("--n-text", type=int, default=200, help="cloze/next_sentence documents (default 200)")
    parser.add_argument("--mmlu-shots", type=int, default=5)
    parser.add_argument("--bbh-shots", type=int, default=2, help="at most 2 (3 examples per task bundled)")
    parser.add_argument("--cache-dir", help="where task documents are built (default ~/.cache/subllm/tasks)")
    parser.add_argument("--lengths", help="passkey/mqar example lengths, e.g. 1k,2k,4k (default: the window)")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="passkey needle depths in [0, 1]")
    parser.add_argument("--examples", type=int, default=5, help="passkey/mqar examples per setting (5)")
    parser.add_argument("--pairs", type=int, default=8, help="mqar key-value pairs per example (8)")
    parser.add_argument(
        "--rope-scaling",
        metavar="SPEC",
        help="evaluate with this RoPE scaling instead of the checkpoint's: TYPE:FACTOR (yarn:4, linear:2, "
        "dynamic:2, llama3:8), 'default' (plain RoPE) or a JSON object of HF's rope_parameters; "
        "original_max_position_embeddings defaults to the training window",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--verbose", action="store_true", help="show lm-eval's logging")


def run(args: argparse.Namespace) -> int:
    for name in ("seq_len", "stride", "max_tokens", "batch_size", "limit", "n_text", "examples", "pairs"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SubLLMError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.threads is not None:
        if args.threads < 1:
            raise SubLLMError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.mmlu_shots < 0 or args.bbh_shots < 0:
        raise SubLLMError("--mmlu-shots and --bbh-shots must be >= 0")
    res = evaluate(
        args.checkpoint,
        parse_tasks(args.tasks),
        tokenizer=args.tokenizer,
        text=args.text,
        heldout=args.heldout,
        seq_len=args.seq_len,
        stride=args.stride,
        batch_size=args.batch_size,
        dtype=args.dtype,
        limit=args.limit,
        max_tokens=args.max_tokens,
        n_text=args.n_text,
        mmlu_shots=args.mmlu_shots,
        bbh_shots=args.bbh_shots,
        cache_dir=args.cache_dir,
        seed=args.seed,
        verbose=args.verbose,
        lengths=_lengths(args.lengths),
        depths=_depths(args.depths),
        examples=args.examples,
        pairs=args.pairs,
        rope_scaling=args.rope_scaling,
        quantize=int4_correction.from_args(args),
        device=args.device,
    )
    m = res["model"]
    print(
        f"\n{res['checkpoint']}: {m['structure']}, {m['params']:,} parameters, window {res['window']} tokens"
    )
    print(format_table(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return 0


def _lengths(text: str | None) -> list[int] | None:
    from subllm.bench.common import int_list

    return int_list(text) if text else None


def _depths(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SubLLMError(f"--depths must be comma-separated numbers in [0, 1], got {text!r}") from None
