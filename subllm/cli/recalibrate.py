"""`subllm recalibrate`: set a checkpoint's inference thresholds from a pass over text.

A calibrated S keeps token t at inference iff s_t > theta, theta being an exponential average of
training top-k's cut (momentum `threshold_momentum`). When training ends while the keep ratio or
the scores still move - a short uptraining, a keep ratio annealed until late - theta lags, and
inference keeps a different share than training did. This replaces each theta by the mean cut of
a training-mode pass over `--text` (subllm/evals/selection.py `recalibrate`; nothing else
changes) and writes the model to `--out`, with the selection before and after on the same windows:

    subllm recalibrate --checkpoint runs/grid/sub080 --text data/corpus/val --out runs/grid/sub080_recal
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from subllm.errors import SubLLMError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model folder (or a run folder)")
    parser.add_argument("--text", required=True, help="text file or folder of .txt files to calibrate on")
    parser.add_argument("--out", required=True, help="new model folder (the checkpoint is left as it is)")
    parser.add_argument(
        "--seq-len", type=int, help="window in tokens (default: the training seq_len, else max_seq_len)"
    )
    parser.add_argument("--max-tokens", type=int, default=16384, help="tokens of --text used (16384)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    from subllm.config import module_names
    from subllm.data.tokenizer import load_tokenizer_for, save_tokenizer
    from subllm.dtype import autocast, resolve_dtype
    from subllm.evals.selection import format_selection, measure_selection, recalibrate
    from subllm.evals.suite import default_window, text_windows
    from subllm.evals.tasks import read_texts
    from subllm.hf.llama import copy_tokenizer_files
    from subllm.model.io import resolve_checkpoint
    from subllm.model.subllm import load_model

    for name in ("seq_len", "max_tokens", "batch_size", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SubLLMError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    out = Path(args.out)
    if out.resolve() == resolve_checkpoint(args.checkpoint).resolve():
        raise SubLLMError("--out must be a new folder: the checkpoint is not overwritten")
    if not Path(args.text).exists():
        raise SubLLMError(f"--text {args.text} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    tok = load_tokenizer_for(args.checkpoint)
    texts = read_texts(args.text)
    seq_len = args.seq_len or default_window(args.checkpoint, model)
    windows = text_windows(model, tok, texts, seq_len, args.batch_size, args.max_tokens)
    dtype = resolve_dtype(args.dtype, "cpu", "train")
    amp = (lambda: autocast(dtype, "cpu")) if dtype == "bf16" else None
    names, ratios = module_names(model.config.structure), model.config.keep_ratios
    n = sum(w.numel() for w in windows)
    print(f"{args.checkpoint}: {model.config.structure}, {n:,} tokens of {args.text} in windows of {seq_len}")
    print("before:\n" + format_selection(measure_selection(model, windows, amp), ratios, names))
    changed = recalibrate(model, windows, amp)
    print("theta: " + ", ".join(f"{old:+.4f} -> {new:+.4f}" for old, new in changed))
    after = measure_selection(model, windows, amp)
    print("after (the same windows):\n" + format_selection(after, ratios, names))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if not copy_tokenizer_files(resolve_checkpoint(args.checkpoint), out):
        save_tokenizer(tok, out)
    print(f"wrote {out}")
    return 0
