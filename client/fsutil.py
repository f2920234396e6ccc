"""Durable file operations: write under a temporary name, fsync, rename into place."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import IO


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Flags of every file the client creates: exclusively (a second writer fails instead of truncating
#: the first's file), and never through a symbolic link planted under its name.
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def create_exclusive(path: Path) -> int:
    """A new file at ``path`` (``FileExistsError`` if anything is there, a link included); its descriptor."""
    return os.open(path, CREATE_FLAGS, 0o644)


def open_nofollow(path: Path, mode: str = "r+b") -> IO[bytes]:
    """``path`` opened for reading and writing (created if missing), never through a symbolic link."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, mode)


def atomic_write(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never a torn one.

    The temporary file is created exclusively: with ``exclusive`` one left by another writer (or a
    crash, which the writer's caller cleans up under its lock) is an error, else it is removed first.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    if not exclusive:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with os.fdopen(create_exclusive(tmp), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()
