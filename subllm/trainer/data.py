"""What `--data` points at, resolved to packed train/val shard folders and a tokenizer folder.

`--data` may be
- a packed split (a folder with meta.json; its sibling `val/` is the validation split if present),
- a packed folder with `train/` and `val/` splits (what `subllm data pack --out` writes), or
- raw text (a fetched corpus folder, any folder of .txt/.jsonl/.parquet, or one .txt file): it is
  tokenized and packed here, once, into RUN/data/ with the data package (a tokenizer is trained on
  the train split unless --tokenizer is given). Without a `val/` split, whole documents at the end
  are held out for validation (or, for a single document, its last 5% of lines).

The tokenizer is always re-saved into RUN/tokenizer/ (verified against the shards' fingerprint),
so every checkpoint can carry a copy that `AutoTokenizer.from_pretrained` loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from subllm.errors import SubLLMError

META = "meta.json"
VAL_FRACTION = 0.05


@dataclass
class DataSpec:
    train_dir: Path
    val_dir: Path | None
    tokenizer_dir: Path
    train_meta: dict
    val_meta: dict | None

    @property
    def tokenizer_meta(self) -> dict:
        return self.train_meta["tokenizer"]


def _meta(d: Path) -> dict:
    try:
        return json.loads((d / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SubLLMError(f"{d / META} is unreadable ({e})") from None


def find_packed(path: Path) -> tuple[Path, Path | None] | None:
    """(train split, val split or None) if `path` is packed data, else None."""
    if (path / META).is_file():
        val = path.parent / "val"
        return path, (val if (val / META).is_file() and val.resolve() != path.resolve() else None)
    if (path / "train" / META).is_file():
        val = path / "val"
        return path / "train", (val if (val / META).is_file() else None)
    return None


def prepare_data(
    data: str, run_dir: Path, tokenizer: str | None, vocab_size: int, is_main: bool, log=print
) -> DataSpec:
    """Resolve (and on rank 0, if needed, build) the data of a run. Other ranks must call this
    again with is_main=False after a barrier, when rank 0 has finished."""
    path = Path(data)
    if not path.exists():
        raise SubLLMError(f"--data {data}: no such file or folder")
    packed = find_packed(path)
    if packed is None:
        packed = _pack_raw(path, run_dir / "data", tokenizer, vocab_size, is_main, log)
    train_dir, val_dir = packed
    train_meta = _meta(train_dir)
    val_meta = _meta(val_dir) if val_dir else None
    if val_meta and val_meta["tokenizer"]["sha256"] != train_meta["tokenizer"]["sha256"]:
        raise SubLLMError(f"{train_dir} and {val_dir} were packed with different tokenizers")
    tok_dir = run_dir / "tokenizer"
    if is_main:
        _save_verified_tokenizer(tokenizer or train_meta["tokenizer"].get("path"), train_meta, tok_dir)
    return DataSpec(train_dir, val_dir, tok_dir, train_meta, val_meta)


def _save_verified_tokenizer(source: str | None, meta: dict, out: Path) -> None:
    from subllm.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_fingerprint

    want = meta["tokenizer"]["sha256"]
    if (out / "tokenizer.json").is_file() and source is None:
        source = str(out)
    if source is None or not Path(source).exists():
        raise SubLLMError(
            f"the tokenizer the data was packed with ({source}) is not available: pass --tokenizer PATH"
        )
    tok = load_tokenizer(source)
    if tokenizer_fingerprint(tok) != want:
        raise SubLLMError(f"tokenizer {source} is not the one the data was packed with (fingerprint differs)")
    if not (out / "tokenizer.json").is_file() or Path(source).resolve() != out.resolve():
        save_tokenizer(tok, out)


def _pack_raw(
    path: Path, data_dir: Path, tokenizer: str | None, vocab_size: int, is_main: bool, log
) -> tuple[Path, Path]:
    from subllm.data.texts import corpus_splits

    tokens = data_dir / "tokens"
    done = data_dir / "source.json"
    source = {"data": str(path.resolve()), "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None}
    if not is_main or (done.is_file() and json.loads(done.read_text()) == source):
        if not (tokens / "train" / META).is_file():
            raise SubLLMError(f"{tokens} has no packed data (did rank 0 fail to pack it?)")
        return tokens / "train", tokens / "val"
    from subllm.data.packing import pack_corpus
    from subllm.data.tokenizer import load_tokenizer, train_tokenizer

    done.unlink(missing_ok=True)
    splits = corpus_splits(path)
    if "val" not in splits:
        splits = _hold_out(Path(splits["train"]), data_dir / "split", log)
    if tokenizer:
        tok = load_tokenizer(tokenizer)
        log(f"tokenizer: {tokenizer} ({len(tok)} tokens)")
    else:
        log(f"training a {vocab_size}-token byte-level BPE on {splits['train']}")
        tok = train_tokenizer(Path(splits["train"]), vocab_size, data_dir / "tokenizer")
        tokenizer = str(data_dir / "tokenizer")
    for split in ("train", "val"):
        log(f"packing {split} from {splits[split]}")
        pack_corpus(splits[split], tokenizer, tokens / split, log=log)
    done.write_text(json.dumps(source))
    return tokens / "train", tokens / "val"


def _hold_out(train: Path, out: Path, log) -> dict:
    """Split raw text without a val/ folder: whole documents at the end (>= 5% of the characters)
    become validation; a single document is split at a line boundary."""
    from subllm.data.texts import load_texts

    docs = load_texts(train)
    total = sum(len(d) for d in docs)
    out.mkdir(parents=True, exist_ok=True)
    if len(docs) >= 2:
        n_val, size = 0, 0
        while n_val < len(docs) - 1 and size < VAL_FRACTION * total:
            n_val += 1
            size += len(docs[-n_val])
        tr, va = docs[:-n_val], docs[-n_val:]
        _write_jsonl(out / "train.jsonl", tr)
        _write_jsonl(out / "val.jsonl", va)
        log(f"no val/ split in {train}: holding out the last {n_val} of {len(docs)} documents")
    else:
        lines = docs[0].splitlines(keepends=True)
        if len(lines) < 20:
            raise SubLLMError(f"{train} is too small to hold out a validation split (under 20 lines)")
        cut = len(lines) - max(1, int(len(lines) * VAL_FRACTION))
        _write_jsonl(out / "train.jsonl", ["".join(lines[:cut])])
        _write_jsonl(out / "val.jsonl", ["".join(lines[cut:])])
        log(f"no val/ split in {train}: holding out its last {len(lines) - cut} of {len(lines)} lines")
    return {"train": out / "train.jsonl", "val": out / "val.jsonl"}


def _write_jsonl(path: Path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
