"""`subllm data fetch --technical`: general technical English - the Python 3.11 documentation's reST sources.

| source | package (registry)        | text                                           | held out     |
|--------|---------------------------|------------------------------------------------|--------------|
| pydoc  | `python3.11-doc` (Debian) | `html/_sources/**/*.rst.txt` (~500 pages, PSF) | the tutorial |

The corpus so far is literary (plays, poems, novels, scripture, the Brown samples). Distilling a pretrained
model on literary text alone teaches its router what matters in literary text only; this adds expository
prose about software (with code examples). The licence pages (`license`, `copyright`) are left out, so
licence text stays unseen in training (the real-model grid's "legal" register). reST markup is reduced to
its words: roles (`:func:`open`` -> `open`), inline literals, section underlines, targets, comments and
directive lines go; directive bodies, code and prose stay.
"""

from __future__ import annotations

import re
from pathlib import Path

from subllm.data.corpus import Log, Work, assign_splits, normalize_text, safe_name
from subllm.data.extra import fetch_deb, fetch_extra
from subllm.errors import SubLLMError

PYDOC_DEB = "python3.11-doc"
SKIPPED = ("license", "copyright", "contents", "bugs", "about")  # licence text and tables of contents
VAL_PREFIX = "tutorial_"

_ROLE = re.compile(r":[a-z][a-z0-9:+-]*:`(?:!|~)?([^`<]*?)\s*(?:<[^`>]*>)?`")
_LITERAL = re.compile(r"``([^`]+)``")
_UNDERLINE = re.compile(r"^([=\-~*^\"'#+`:.])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^\s*\.\.(\s|$)")
_KEEPS_BODY = re.compile(  # directives whose indented body is prose or code
    r"^\s*\.\.\s+(note|warning|versionadded|versionchanged|deprecated|seealso|code-block|testcode|doctest|"
    r"function|method|class|attribute|data|exception|module|describe)::"
)
_OPTION = re.compile(r"^\s*:[a-z-]+:(\s|$)")  # a directive's option (`:noindex:`, `:synopsis: ...`)


def rst_to_text(rst: str) -> str:
    """The words of one reST page: markup that is not prose removed, everything else kept."""
    out: list[str] = []
    skipping = False  # inside a comment / target / directive header's indented options
    for line in rst.split("\n"):
        if _DIRECTIVE.match(line):
            # `.. note::` / `.. code-block:: python` keep their bodies; comments, targets, `.. index::` do not
            keeps_body = _KEEPS_BODY.match(line)
            skipping = not keeps_body
            if keeps_body:
                head = line.split("::", 1)[1].strip()
                if head:
                    out.append(head)
            continue
        if skipping:
            if line.strip() and not line[:1].isspace():
                skipping = False
            else:
                continue
        if _UNDERLINE.match(line):
            continue
        if _OPTION.match(line):
            continue
        line = line.rstrip()
        line = _ROLE.sub(lambda m: m.group(1), line)
        line = _LITERAL.sub(lambda m: m.group(1), line)
        if line.strip() == "::":  # "a literal block follows"
            continue
        out.append(line[:-1] if line.endswith("::") else line)
    return normalize_text("\n".join(out))


def extract_pydoc(root: Path) -> list[Work]:
    """The pages of an unpacked python3.11-doc package (root of the .deb's data), one `Work` per page."""
    sources = sorted(Path(root).rglob("html/_sources"))
    if not sources:
        raise SubLLMError(f"no html/_sources folder under {root}")
    base = sources[0]
    texts = {}
    for path in sorted(base.rglob("*.rst.txt")):
        rel = path.relative_to(base).as_posix().removesuffix(".rst.txt")
        name = safe_name(rel)
        if name in SKIPPED:
            continue
        texts[name] = (rst_to_text(path.read_text(encoding="utf-8", errors="replace")), rel)
    val = [n for n in texts if n.startswith(VAL_PREFIX)]
    if not val or len(texts) < 100:
        raise SubLLMError(f"{base} holds {len(texts)} pages ({len(val)} tutorial): not the expected package")
    return assign_splits("pydoc", texts, val)


def fetch_pydoc(tmp: Path, log: Log) -> tuple[list[Work], dict]:
    return fetch_deb("pydoc", PYDOC_DEB, "PSF-2.0 (documentation)", extract_pydoc, tmp, log)


def fetch_technical(tmp: Path, log: Log = print) -> tuple[list[Work], dict[str, dict], dict[str, str]]:
    """The technical sources that can be fetched here: (works, {source: package info}, {skipped: reason})."""
    return fetch_extra(tmp, log, {"pydoc": fetch_pydoc})
