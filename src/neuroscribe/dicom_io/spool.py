"""The spool: durable, as-received storage of instances, one folder per series.

An instance streams into ``incoming/`` (same filesystem), is fsync'd, renamed to
``spool/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` and the folder fsync'd: after :meth:`commit`
returns, the bytes survive a crash or a power cut. UIDs are checked (digits and dots) before they
become path components.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from neuroscribe.durable import fsync_dir, fsync_file
from neuroscribe.log import get_logger

LOG = get_logger(__name__)

INSTANCE_SUFFIX = ".dcm"
PARTIAL_SUFFIX = ".part"


class Spool:
    """Received instances under ``spool_dir``; partial ones under ``incoming_dir``."""

    def __init__(self, spool_dir: Path, incoming_dir: Path) -> None:
        self.spool_dir = Path(spool_dir).resolve()
        self.incoming_dir = Path(incoming_dir).resolve()
        self._known_series_dirs: set[str] = set()

    def prepare(self) -> int:
        """Create the folders and delete partial files left by a crash; return how many.

        A partial file was never acknowledged (success is only sent after :meth:`commit`), so the
        sender still has it and will send it again.
        """
        for folder in (self.spool_dir, self.incoming_dir):
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        removed = 0
        for leftover in self.incoming_dir.iterdir():
            if leftover.is_file():
                leftover.unlink()
                removed += 1
        if removed:
            fsync_dir(self.incoming_dir)
        return removed

    def temp_file_factory(self) -> Callable[..., IO[bytes]]:
        """A ``NamedTemporaryFile`` that writes partial instances into ``incoming_dir``."""
        return functools.partial(
            tempfile.NamedTemporaryFile, dir=self.incoming_dir, suffix=PARTIAL_SUFFIX
        )

    def path_for(self, series_instance_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives once committed (UIDs must already be validated)."""
        return self.spool_dir / series_instance_uid / f"{sop_instance_uid}{INSTANCE_SUFFIX}"

    def commit(self, partial: Path, series_instance_uid: str, sop_instance_uid: str) -> Path:
        """fsync ``partial``, rename it into the spool, fsync the folder; return the final path.

        A re-sent SOP Instance UID atomically replaces the earlier file.
        """
        final = self.path_for(series_instance_uid, sop_instance_uid)
        series_dir = final.parent
        fsync_file(partial)
        if series_instance_uid not in self._known_series_dirs:
            if not series_dir.is_dir():
                series_dir.mkdir(exist_ok=True)
                fsync_dir(self.spool_dir)
            self._known_series_dirs.add(series_instance_uid)
        try:
            partial.replace(final)
        except FileNotFoundError:  # retention removed the folder since (daemon/retention.py)
            series_dir.mkdir(exist_ok=True)
            fsync_dir(self.spool_dir)
            partial.replace(final)
        fsync_dir(series_dir)
        return final

    def discard(self, partial: Path) -> None:
        """Remove a partial file that will not be stored."""
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()

    def free_bytes(self) -> int:
        """Free space on the spool's filesystem, for unprivileged users."""
        stats = os.statvfs(self.spool_dir)
        return stats.f_bavail * stats.f_frsize

    def files(self) -> Iterator[Path]:
        """Every committed instance file."""
        for series_dir in self.spool_dir.iterdir():
            if series_dir.is_dir():
                yield from series_dir.glob(f"*{INSTANCE_SUFFIX}")

    def __repr__(self) -> str:
        return f"Spool({str(self.spool_dir)!r})"

