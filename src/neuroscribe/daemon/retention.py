"""Retention: the spool is purged a configured time after delivery; the training store keeps its quota.

::

    counts = run_retention(settings, db, time.time())   # the scheduler, every retention.poll_seconds

**Spool** (:func:`purge_spool`). A series' received files are deleted once

* its report job (for the series' current revision) ended, delivered, dead or failed, more than
  ``retention.purge_spool_after_hours`` ago, or
* it was REJECTED (not reported on) more than ``retention.purge_rejected_after_hours`` ago.

Files go first, then the instance rows, then a ``spool_purges`` row records it (files, bytes,
reason). The series, job and report rows stay: the history of what was reported on is kept, and a
series row with no instances is a purged one. A crash between deleting files and rows is finished by
the next pass (missing files are fine); rows are never deleted before their files, so start-up
recovery (which records spool files without rows) cannot bring a purged series back. A late
instance that reopens a series during a pass keeps its rows (the deletion is checked against the
series' revision).

Retention wins over learning: a final report that arrives after its series was purged cannot be
paired and is discarded as ``series_purged``. Set ``purge_spool_after_hours`` above the RIS's usual
time to a final report (docs/learning.md).

**Training store** (:func:`enforce_quota`): the oldest pairs are deleted until the store holds at
most ``learning.quota_bytes``, and the manifest is rewritten.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import Counter

from neuroscribe.config import Settings
from neuroscribe.durable import fsync_dir
from neuroscribe.log import get_logger, hash_uid
from neuroscribe.reporting.site_data import SiteData, site_data_dir
from neuroscribe.store import Database, FinalReportStore, StateStore
from neuroscribe.store.site import PurgeCandidate, SpoolRetentionStore

__all__ = ["enforce_quota", "purge_spool", "run_retention"]

LOG = get_logger(__name__)

PURGED_SERIES = Counter("neuroscribe_spool_purged_series", "Series deleted from the spool, by reason",
                        ["reason"])
PURGED_FILES = Counter("neuroscribe_spool_purged_files", "Instance files deleted from the spool")
PURGED_BYTES = Counter("neuroscribe_spool_purged_bytes", "Bytes deleted from the spool")

_HOUR = 3600.0


def purge_spool(settings: Settings, db: Database, now: float) -> dict[str, int]:
    """Delete the spool files of series past their retention time; returns series, files and bytes.

    Parameters
    ----------
    now
        POSIX seconds (the scheduler's clock; tests inject it).
    """
    retention = settings.retention
    store = SpoolRetentionStore(db)
    state = StateStore(db)
    spool_root = settings.storage.spool_dir.resolve()
    totals = {"series": 0, "files": 0, "bytes": 0}
    for candidate in store.candidates(finished_before=now - retention.purge_spool_after_hours * _HOUR,
                                      rejected_before=now - retention.purge_rejected_after_hours * _HOUR):
        if not store.still_purgeable(candidate):
            continue
        files, size = _delete_files(state.instance_paths(candidate.series_instance_uid), spool_root)
        if not store.forget_instances(candidate, files=files, size_bytes=size, now=now):
            LOG.warning("spool purge: a late instance reopened the series; its rows are kept",
                        series=hash_uid(candidate.series_instance_uid))
            continue
        _count(candidate, files, size)
        totals["series"] += 1
        totals["files"] += files
        totals["bytes"] += size
    if totals["series"]:
        LOG.info("spool purged", **{f"{k}_deleted": v for k, v in totals.items()})
    return totals


def _delete_files(paths: list[Path], spool_root: Path) -> tuple[int, int]:
    """Delete instance files (only inside the spool) and their emptied series folders."""
    files = size = 0
    folders: set[Path] = set()
    for path in paths:
        if not path.resolve().is_relative_to(spool_root):  # never outside the spool, whatever a row says
            LOG.warning("spool purge skipped a path outside the spool", file=path.name)
            continue
        try:
            size += path.stat().st_size
            path.unlink()
            files += 1
        except FileNotFoundError:  # deleted by an interrupted earlier pass
            pass
        folders.add(path.parent)
    for folder in folders:
        try:
            fsync_dir(folder)
            folder.rmdir()  # only when empty: a late instance's file keeps it
        except OSError:
            pass
    if folders:
        fsync_dir(spool_root)
    return files, size


def _count(candidate: PurgeCandidate, files: int, size: int) -> None:
    reason = "rejected" if candidate.reason == "rejected" else candidate.reason.removeprefix("job ")
    PURGED_SERIES.labels(reason=reason).inc()
    PURGED_FILES.inc(files)
    PURGED_BYTES.inc(size)
    LOG.info("series purged from the spool", series=hash_uid(candidate.series_instance_uid),
             revision=candidate.revision, reason=candidate.reason, files=files, bytes=size)


def enforce_quota(settings: Settings, db: Database, now: float) -> int:
    """Delete the oldest training pairs beyond ``learning.quota_bytes``; returns how many went."""
    root = site_data_dir(settings)
    if not root.is_dir():
        return 0
    site = SiteData(root)
    return len(site.enforce_quota(FinalReportStore(db), settings.learning.quota_bytes, now))


def run_retention(settings: Settings, db: Database, now: float) -> dict[str, int]:
    """One retention pass: the spool (when ``retention.enabled``), then the training store's quota.

    Returns ``spool_series_purged``, ``spool_files_purged``, ``spool_bytes_purged`` and
    ``training_pairs_evicted``.
    """
    spool = purge_spool(settings, db, now) if settings.retention.enabled else {"series": 0, "files": 0,
                                                                                "bytes": 0}
    evicted = enforce_quota(settings, db, now)
    return {"spool_series_purged": spool["series"], "spool_files_purged": spool["files"],
            "spool_bytes_purged": spool["bytes"], "training_pairs_evicted": evicted}
