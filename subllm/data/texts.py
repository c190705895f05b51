"""User corpora: `load_texts(path)` reads documents from local files, folders or a Hugging Face dataset.

Accepted:
- a `.txt` file (one document) or a folder, searched recursively in sorted order for `.txt`, `.jsonl`
  and `.parquet` files (other files are ignored);
- `.jsonl`: one JSON object per line, the document in its `text` field (configurable);
- `.parquet`: the `text` column (needs `pyarrow`, imported lazily);
- `hf:NAME` or a bare `owner/name` that is not a local path: a Hugging Face dataset, only when the
  `datasets` package is installed and the hub is reachable (not with `HF_HUB_OFFLINE=1`).

A fetched corpus folder (`train/`, `val/`, `manifest.json`) is split with `corpus_splits`. Mistakes give
one-line `SubLLMError`s: a missing path, an empty corpus, a file that is not UTF-8 (with its name).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from subllm.errors import SubLLMError

SUFFIXES = (".txt", ".jsonl", ".parquet")
_HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SubLLMError(
            f"{path} is not UTF-8 text (bad byte at offset {e.start}): convert it to UTF-8"
        ) from e
    except OSError as e:
        raise SubLLMError(f"cannot read {path}: {e.strerror or e}") from e


def _iter_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    for i, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SubLLMError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise SubLLMError(f"{path}:{i}: no string field {text_field!r} (use --text-field to choose one)")
        yield f"{path}:{i}", record[text_field]


def _iter_parquet(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SubLLMError(f"reading {path} needs the `pyarrow` package (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError types
        raise SubLLMError(f"{path} is not a readable parquet file ({e})") from e
    if text_field not in pf.schema_arrow.names:
        raise SubLLMError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, str):
                yield f"{path}#{row}", value


def _iter_hf(name: str, text_field: str, split: str) -> Iterator[tuple[str, str]]:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise SubLLMError(
            f"{name!r} is not a local file or folder, and HF_HUB_OFFLINE=1 forbids downloading it as a "
            "Hugging Face dataset"
        )
    try:
        import datasets
    except ImportError as e:
        raise SubLLMError(
            f"{name!r} is not a local file or folder; to read it as a Hugging Face dataset install `datasets`"
        ) from e
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # network, auth and missing-dataset errors all end up here
        raise SubLLMError(f"cannot load the Hugging Face dataset {name!r} ({type(e).__name__}: {e})") from e
    for i, record in enumerate(ds):
        if text_field not in record:
            raise SubLLMError(f"Hugging Face dataset {name!r} has no field {text_field!r}")
        yield f"{name}#{i}", record[text_field]


def corpus_files(path: Path) -> list[Path]:
    """The corpus files of a file or folder (recursive, sorted); raises for a missing path."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise SubLLMError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)} or a folder)")
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    raise SubLLMError(f"no such file or folder: {path}")


def iter_documents(
    path: str | Path, text_field: str = "text", split: str = "train"
) -> Iterator[tuple[str, str]]:
    """(where, text) for every non-empty document of `path`; raises `SubLLMError` if there is none."""
    spec = str(path)
    found = 0
    if spec.startswith("hf:") or (not Path(spec).exists() and _HF_NAME.match(spec) and "/" in spec):
        source: Iterator[tuple[str, str]] = _iter_hf(spec.removeprefix("hf:"), text_field, split)
    else:
        source = _iter_local(Path(spec), text_field)
    for where, text in source:
        if text.strip():
            found += 1
            yield where, text
    if not found:
        raise SubLLMError(f"empty corpus: no non-empty text in {spec} (looked for {', '.join(SUFFIXES)})")


def _iter_local(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    for file in corpus_files(path):
        suffix = file.suffix.lower()
        if suffix == ".txt":
            yield str(file), _read_utf8(file)
        elif suffix == ".jsonl":
            yield from _iter_jsonl(file, text_field)
        else:
            yield from _iter_parquet(file, text_field)


def load_texts(path: str | Path, text_field: str = "text", split: str = "train") -> list[str]:
    """All non-empty documents of a file, folder or (online only) Hugging Face dataset, in a fixed order."""
    return [text for _, text in iter_documents(path, text_field, split)]


def corpus_splits(path: str | Path) -> dict[str, str | Path]:
    """{"train": ..., "val": ...} for a fetched corpus folder (with `train/`, optionally `val/`);
    {"train": path} for anything else."""
    p = Path(path)
    if (p / "train").is_dir():
        out: dict[str, str | Path] = {"train": p / "train"}
        if (p / "val").is_dir():
            out["val"] = p / "val"
        return out
    return {"train": path}
