"""File helpers used by every wing that writes or checks files: sha256 of a file, fsync of a file or
folder, and an atomic write (temporary name, fsync, rename)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` to `path`.tmp, fsync it, rename it to `path`: a crash never leaves a torn file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
