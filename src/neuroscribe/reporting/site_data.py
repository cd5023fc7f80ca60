"""The site training store on disk: pair folders, the inbox of unpaired reports, the manifest, the quota.

Layout (``learning.site_data_dir``, default ``<storage.root>/site-data``)::

    site-data/
      manifest.jsonl            # one line per pair, rewritten atomically from the database
      inbox/<id>.txt            # the stripped text of a final report waiting for its series
      <id>/series/<uid>.dcm     # the pair: the de-identified series (PS3.15 Basic Profile) ...
      <id>/report.txt           # ... and the final report without names
      .tmp-<id>/                # a pair being written; renamed to <id>/ when complete

``<id>`` is the final report's id (``fr...``), which is also the manifest's ``study_id``. A
manifest line is ``{"study_id", "patient_id", "series_path", "report"}`` as
``neuroscribe train --data <site-data>/manifest.jsonl`` reads it (docs/site-dataset.md):
``patient_id`` is the patient's pseudonym (keyed hash of PatientID, the same for all their studies,
so the split by patient holds) and ``series_path`` is relative to the manifest.

The database row is the truth. A pair folder appears by one rename and the row then says
``paired``; :meth:`SiteData.reconcile` removes what a crash left between the two.
Changes to pairs and the manifest happen under :data:`SITE_LOCK` (one process writes the store).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge

from neuroscribe.config import Settings
from neuroscribe.dicom_io.deidentify import Deidentifier, deidentify_file
from neuroscribe.durable import atomic_file, fsync_dir
from neuroscribe.log import get_logger
from neuroscribe.store import Database, FinalReportRow, FinalReportState, FinalReportStore
from neuroscribe.store import count_pairs as _count_pairs

__all__ = [
    "INBOX_DIR",
    "MANIFEST_FILE",
    "REPORT_FILE",
    "SERIES_DIR",
    "SITE_DATA_DIR",
    "SITE_LOCK",
    "ExportedPair",
    "SiteData",
    "count_pairs",
    "manifest_path",
    "secret_path",
    "site_data_dir",
]

LOG = get_logger(__name__)

SITE_DATA_DIR = "site-data"
MANIFEST_FILE = "manifest.jsonl"
INBOX_DIR = "inbox"
SERIES_DIR = "series"
REPORT_FILE = "report.txt"
TMP_PREFIX = ".tmp-"
#: Reason recorded for a pair deleted to keep the store under ``learning.quota_bytes``.
QUOTA_REASON = "deleted for the training store quota"

#: Held while pairs are added or removed and the manifest rewritten.
SITE_LOCK = threading.RLock()

PAIRS = Gauge("neuroscribe_training_pairs_stored", "Training pairs in the site store now")
STORE_BYTES = Gauge("neuroscribe_training_store_bytes", "Bytes of the training pairs in the site store")
QUOTA_BYTES = Gauge("neuroscribe_training_store_quota_bytes", "The site store's quota (learning.quota_bytes)")
EVICTED = Counter("neuroscribe_training_pairs_evicted", "Training pairs deleted for the quota")


def site_data_dir(settings: Settings) -> Path:
    """The training store: ``learning.site_data_dir``, or ``<storage.root>/site-data``."""
    return settings.learning.site_data_dir or settings.storage.root / SITE_DATA_DIR


def manifest_path(settings: Settings) -> Path:
    """``<site-data>/manifest.jsonl``: what ``neuroscribe train --data`` reads."""
    return site_data_dir(settings) / MANIFEST_FILE


def secret_path(settings: Settings) -> Path:
    """The de-identification secret: ``learning.secret_file``, or ``<storage.root>/secrets/deid.key``."""
    return settings.learning.secret_file or settings.storage.root / "secrets" / "deid.key"


def count_pairs(db: Database) -> int:
    """How many training pairs the store holds (the retraining trigger reads this)."""
    return _count_pairs(db)


@dataclass(frozen=True)
class ExportedPair:
    """A pair folder as written."""

    path: Path
    instances: int
    size_bytes: int
    patient_pseudonym: str


class SiteData:
    """The store's folder; every method that changes pairs takes :data:`SITE_LOCK`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def manifest(self) -> Path:
        """``manifest.jsonl``."""
        return self.root / MANIFEST_FILE

    def inbox_file(self, final_report_id: str) -> Path:
        """Where an unpaired report's stripped text waits."""
        return self.root / INBOX_DIR / f"{final_report_id}.txt"

    def pair_dir(self, final_report_id: str) -> Path:
        """The pair folder of a final report."""
        return self.root / final_report_id

    def write_inbox(self, final_report_id: str, text: str) -> Path:
        """Keep a stripped report durably until it is paired; returns its path."""
        path = self.inbox_file(final_report_id)
        with atomic_file(path, "w") as handle:
            handle.write(text)
        return path

    def export_pair(self, final_report_id: str, series_files: Iterable[Path], report: str,
                    deidentifier: Deidentifier) -> ExportedPair:
        """De-identify the series file by file into the pair folder, which appears whole or not at all.

        Raises
        ------
        DeidentificationRefused, DicomInputError, OSError
            From :func:`~neuroscribe.dicom_io.deidentify.deidentify_file`; nothing is left behind.
        """
        tmp = self.root / f"{TMP_PREFIX}{final_report_id}"
        final = self.pair_dir(final_report_id)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SERIES_DIR).mkdir(parents=True)
        try:
            written = [deidentify_file(path, tmp / SERIES_DIR, deidentifier) for path in sorted(series_files)]
            if not written:
                raise FileNotFoundError("the series has no files")
            pseudonyms = {f.patient_pseudonym for f in written}
            if len(pseudonyms) != 1:
                raise ValueError("the series' instances name more than one patient")
            with (tmp / REPORT_FILE).open("w", encoding="utf-8", newline="\n") as handle:
                handle.write(report)
                handle.flush()
                os.fsync(handle.fileno())
            fsync_dir(tmp / SERIES_DIR)
            fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)  # a leftover of a crash before the row was updated
            tmp.replace(final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = sum(f.size_bytes for f in written) + len(report.encode())
        return ExportedPair(final, len(written), size, pseudonyms.pop())

    def remove(self, path: Path | str | None) -> None:
        """Delete a pair folder or an inbox file (missing is fine)."""
        if not path:
            return
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if path.parent.is_dir():
            fsync_dir(path.parent)

    def read_report(self, row: FinalReportRow) -> str | None:
        """The stripped text of a report: from its pair folder or the inbox; None if it is gone."""
        path = Path(row.pair_dir) / REPORT_FILE if row.pair_dir else (
            Path(row.report_file) if row.report_file else None)
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8")
        except OSError:
            return None

    def write_manifest(self, store: FinalReportStore) -> int:
        """Rewrite ``manifest.jsonl`` from the paired rows (oldest pair first); returns its lines."""
        with SITE_LOCK:
            lines = []
            for row in store.pairs():
                report = self.read_report(row)
                if report is None or not row.pair_dir or not row.patient_pseudonym:
                    LOG.warning("training pair left out of the manifest: its folder is gone",
                                final_report_id=row.final_report_id)
                    continue
                lines.append(json.dumps({
                    "study_id": row.final_report_id,
                    "patient_id": row.patient_pseudonym,
                    "series_path": f"{Path(row.pair_dir).name}/{SERIES_DIR}",
                    "report": report,
                }, ensure_ascii=False, separators=(",", ":")))
            with atomic_file(self.manifest, "w") as handle:
                handle.write("".join(line + "\n" for line in lines))
            self.update_gauges(store)
            return len(lines)

    def update_gauges(self, store: FinalReportStore, quota_bytes: int | None = None) -> None:
        """Set the store's gauges from the database."""
        PAIRS.set(store.counts()[FinalReportState.PAIRED])
        STORE_BYTES.set(store.paired_bytes())
        if quota_bytes is not None:
            QUOTA_BYTES.set(quota_bytes)

    def enforce_quota(self, store: FinalReportStore, quota_bytes: int, now: float,
                      keep: str | None = None) -> list[str]:
        """Delete the oldest pairs until the store holds at most ``quota_bytes``; returns their ids.

        ``keep`` (the pair just made) is deleted last. The manifest is rewritten when a pair goes.
        """
        with SITE_LOCK:
            total = store.paired_bytes()
            evicted: list[str] = []
            pairs = sorted(store.pairs(), key=lambda row: row.final_report_id == keep)
            for row in pairs:
                if total <= quota_bytes:
                    break
                if store.mark_discarded(row.final_report_id, QUOTA_REASON, now,
                                        from_states=(FinalReportState.PAIRED,)):
                    self.remove(row.pair_dir)
                    total -= row.bytes
                    evicted.append(row.final_report_id)
                    EVICTED.inc()
                    LOG.info("training pair deleted for the quota", final_report_id=row.final_report_id,
                             bytes=row.bytes, quota_bytes=quota_bytes)
            if evicted:
                self.write_manifest(store)
            self.update_gauges(store, quota_bytes)
            return evicted

    def reconcile(self, store: FinalReportStore, now: float) -> dict[str, int]:
        """Make the folder agree with the database after a crash; returns what was fixed.

        Removes half-written pairs (``.tmp-*``), pair folders and inbox files no row claims, marks
        ``discarded`` the rows whose files are gone, and rewrites the manifest.
        """
        with SITE_LOCK:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / INBOX_DIR).mkdir(exist_ok=True)
            fixed = {"partial_pairs": 0, "orphan_pairs": 0, "orphan_inbox_files": 0, "lost_reports": 0}
            rows = store.rows(states=(FinalReportState.UNPAIRED, FinalReportState.PAIRED))
            pair_dirs = {Path(r.pair_dir).name for r in rows
                         if r.state is FinalReportState.PAIRED and r.pair_dir}
            inbox = {Path(r.report_file).name for r in rows
                     if r.state is FinalReportState.UNPAIRED and r.report_file}
            for entry in self.root.iterdir():
                if not entry.is_dir() or entry.name == INBOX_DIR:
                    continue
                if entry.name.startswith(TMP_PREFIX):
                    shutil.rmtree(entry, ignore_errors=True)
                    fixed["partial_pairs"] += 1
                elif entry.name not in pair_dirs:
                    shutil.rmtree(entry, ignore_errors=True)
                    fixed["orphan_pairs"] += 1
            for entry in (self.root / INBOX_DIR).iterdir():
                if entry.name not in inbox:
                    entry.unlink(missing_ok=True)
                    fixed["orphan_inbox_files"] += 1
            for row in rows:
                if self.read_report(row) is None and store.mark_discarded(
                        row.final_report_id, "lost: its files were gone at start-up", now,
                        from_states=(row.state,)):
                    self.remove(row.pair_dir)
                    fixed["lost_reports"] += 1
            fsync_dir(self.root)
            self.write_manifest(store)
            return fixed
