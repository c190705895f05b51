"""`subllm analyze`: per-token scores, kept tokens and attention analysis of a checkpoint (the
analysis itself: subllm/evals/analysis.py)."""

from __future__ import annotations

import argparse

from subllm.config import module_names
from subllm.errors import SubLLMError
from subllm.evals.analysis import analyze, fmt_corr


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model folder (or a run folder)")
    parser.add_argument("--text", required=True, help="a UTF-8 text file")
    parser.add_argument("--out", default="docs/analysis", help="output folder (default %(default)s)")
    parser.add_argument("--tokenizer", help="tokenizer folder/file (default: the checkpoint's)")
    parser.add_argument(
        "--seq-len", type=int, help="window (default: the training seq_len, else max_seq_len)"
    )
    parser.add_argument("--max-tokens", type=int, default=2048, help="analyse at most this many tokens")


def run(args: argparse.Namespace) -> int:
    for name in ("seq_len", "max_tokens"):
        v = getattr(args, name)
        if v is not None and v < 2:
            raise SubLLMError(f"--{name.replace('_', '-')} must be >= 2, got {v}")
    res = analyze(args.checkpoint, args.text, args.out, args.tokenizer, args.seq_len, args.max_tokens)
    print(f"{res['structure']} on {res['tokens']} tokens of {res['text']}")
    names = module_names(res["structure"])
    for st in res["per_S"]:
        rates = ", ".join(f"{c} {v['keep_rate']:.2f}" for c, v in st["keep_by_class"].items())
        g = st.get
        print(
            f"{names[st['S']]}: kept {st['kept']}/{st['tokens']} ({fmt_corr(st['keep_fraction'])}); "
            f"attention vs score: spearman {fmt_corr(g('spearman_attention_score'))}, "
            f"pearson {fmt_corr(g('pearson_attention_score'))}; mean attention kept "
            f"{fmt_corr(g('mean_attention_kept'))} vs dropped {fmt_corr(g('mean_attention_dropped'))}; "
            f"keep rate by class: {rates}"
        )
    from subllm.evals.selection import format_selection

    print("selection (eval rule vs training top-k, windows of the analysis):")
    print(format_selection(res["selection"], res["keep_ratios"], names))
    print("wrote " + ", ".join(res["files"]))
    return 0
