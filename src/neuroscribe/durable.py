"""Durable file writes: the one home for "temporary name, fsync, rename, fsync the folder".

A file written through :func:`atomic_file` is either absent, the old version, or the complete new
version, even across a crash or a power cut.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data and metadata to disk (works while another handle has it open)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path | str, mode: str = "wb", **open_args: Any) -> Iterator[IO[Any]]:
    """Open a unique temporary file beside ``path``; on success make it ``path``, durably.

    The body writes to the yielded file. If it raises, the temporary file is removed and ``path``
    is untouched. Text modes default to UTF-8 with ``\\n`` line ends. The file gets mode 0644.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        open_args = {"encoding": "utf-8", "newline": "\n", **open_args}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
