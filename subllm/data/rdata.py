"""A minimal reader for R lazy-load databases (`data/Rdata.rdx` + `data/Rdata.rdb`), no R needed.

Debian's `r-cran-janeaustenr` ships Jane Austen's six novels this way, each a character vector of lines.
`Rdata.rdx` is a gzip'd R serialization of a list whose `variables` element maps each object name to an
(offset, length) pair into `Rdata.rdb`; each `.rdb` entry is a 4-byte big-endian uncompressed length
followed by a zlib stream holding the XDR ("X\\n") serialization of the object.

Only what data packages use is decoded: NULL, symbols, pairlists (attributes), character/logical/
integer/double vectors and generic lists, with `names` turning a list into a dict. Anything else
(closures, environments, bytecode) raises `SubLLMError`.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

from subllm.errors import SubLLMError

_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC, _REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255
_PAIRLIST_LIKE = {2, 3, 5, 6, 17}  # LISTSXP, CLOSXP, PROMSXP, LANGSXP, DOTSXP share the layout
_SPECIAL_ENVS = {241, 242, 250, 251, 252, 253}  # baseenv, emptyenv, base namespace, ... -> None


class _Unserializer:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.refs, self.where = data, 0, [], where

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def top(self):
        if self._bytes(2) != b"X\n":
            raise SubLLMError(f"{self.where}: not an XDR R serialization")
        version = self._int()
        self._int(), self._int()  # writer's R version, minimal reader version
        if version == 3:
            self._bytes(self._int())  # native encoding name
        return self._item()

    def _item(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == _NIL or kind in _SPECIAL_ENVS:
            return None
        if kind == _REF:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == _SYM:
            name = self._item()
            self.refs.append(name)
            return name
        if kind in _PAIRLIST_LIKE:
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            out = {tag: self._item()}
            rest = self._item()
            if isinstance(rest, dict):
                out.update(rest)
            return out
        if kind == _CHAR:
            n = self._int()
            return None if n == -1 else self._bytes(n).decode("utf-8", errors="replace")
        if kind in (_LGL, _INT):
            n = self._int()
            value = list(struct.unpack(f">{n}i", self._bytes(4 * n)))
        elif kind == _REAL:
            n = self._int()
            value = list(struct.unpack(f">{n}d", self._bytes(8 * n)))
        elif kind in (_STR, _VEC):
            value = [self._item() for _ in range(self._int())]
        else:
            raise SubLLMError(f"{self.where}: unsupported R object type {kind}")
        if has_attr:
            attrs = self._item()
            if kind == _VEC and isinstance(attrs, dict) and isinstance(attrs.get("names"), list):
                return dict(zip(attrs["names"], value))
        return value


def unserialize(data: bytes, where: str = "R data"):
    """Python value of one XDR R serialization (str/int/float lists, dicts for named lists, None)."""
    try:
        return _Unserializer(data, where).top()
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise SubLLMError(f"{where}: truncated or corrupt R serialization ({e})") from e


def read_lazyload_db(stem: Path) -> dict:
    """{object name: value} of the lazy-load DB `stem.rdx` + `stem.rdb` (e.g. `.../data/Rdata`)."""
    stem = Path(stem)
    rdx, rdb = stem.with_suffix(".rdx"), stem.with_suffix(".rdb")
    for p in (rdx, rdb):
        if not p.is_file():
            raise SubLLMError(f"no such file: {p}")
    try:
        index = unserialize(gzip.decompress(rdx.read_bytes()), str(rdx))
    except (OSError, EOFError) as e:  # gzip errors
        raise SubLLMError(f"{rdx}: not a gzip'd R index ({e})") from e
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise SubLLMError(f"{rdx}: no `variables` table")
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        entry = blob[offset : offset + length]
        try:
            data = zlib.decompress(entry[4:])
        except zlib.error as e:
            raise SubLLMError(f"{rdb}: object {name!r} is not zlib-compressed ({e})") from e
        out[name] = unserialize(data, f"{rdb}:{name}")
    return out
