"""Learning from the site: final reports from the RIS, their training pairs, and spool purges.

Two tables (migration 4):

* ``final_reports``: one row per final report kept (one per ``(sender, control_id)``, so a message
  sent twice is kept once), in state ``unpaired``, ``paired`` or ``discarded``
  (:class:`~neuroscribe.store.tables.FinalReportState`). The row holds no patient data: the
  accession and PID-3 only as keyed hashes, the report text only in files (``report_file`` while
  unpaired, ``pair_dir`` once paired);
* ``spool_purges``: one row per series whose spool files retention deleted.

Every transition is one conditional UPDATE, so two threads (the listener and the scheduler's retry)
cannot pair or discard the same report twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from neuroscribe.errors import StoreError
from neuroscribe.store.database import Database
from neuroscribe.store.outbox import sortable_id
from neuroscribe.store.tables import (
    FinalReportState,
    JobState,
    SeriesState,
    final_reports,
    instances,
    jobs,
    series,
    spool_purges,
)

__all__ = [
    "FinalReportRow",
    "FinalReportStore",
    "PurgeCandidate",
    "SpoolRetentionStore",
    "count_pairs",
]

#: Job states whose spool files retention may delete (nothing more will read them).
PURGEABLE_JOB_STATES = (JobState.DELIVERED, JobState.DEAD, JobState.FAILED)


@dataclass(frozen=True)
class FinalReportRow:
    """One final report as the database holds it (hashes and file names, never patient data)."""

    final_report_id: str
    received_at: float
    sender: str
    control_id: str
    accession_hash: str
    patient_hash: str | None
    result_status: str
    state: FinalReportState
    report_file: str | None
    series_instance_uid: str | None
    job_id: str | None
    pair_dir: str | None
    patient_pseudonym: str | None
    instances: int
    bytes: int
    paired_at: float | None
    discarded_at: float | None
    reason: str | None


class FinalReportStore:
    """The ``final_reports`` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, *, received_at: float, sender: str, control_id: str, accession_hash: str,
            patient_hash: str | None, result_status: str, report_file: str,
            final_report_id: str | None = None) -> tuple[FinalReportRow, bool]:
        """Keep a new final report as ``unpaired``; returns ``(row, True)``.

        A report already kept from ``sender`` with ``control_id`` is returned as ``(row, False)``
        and nothing changes (the RIS re-sent it).
        """
        known = self.find(sender, control_id)
        if known is not None:
            return known, False
        final_report_id = final_report_id or sortable_id("fr")
        try:
            with self.db.write() as conn:
                conn.execute(insert(final_reports).values(
                    final_report_id=final_report_id, received_at=received_at, sender=sender,
                    control_id=control_id, accession_hash=accession_hash, patient_hash=patient_hash,
                    result_status=result_status, state=FinalReportState.UNPAIRED,
                    report_file=report_file, instances=0, bytes=0,
                ))
        except StoreError as exc:
            if isinstance(exc.__cause__, IntegrityError):  # the same message on two connections
                known = self.find(sender, control_id)
                if known is not None:
                    return known, False
            raise
        row = self.get(final_report_id)
        assert row is not None, "a row just inserted is readable"
        return row, True

    def find(self, sender: str, control_id: str) -> FinalReportRow | None:
        """The report kept from ``sender`` with MSH-10 ``control_id``, or None."""
        found = self._rows(select(final_reports).where(final_reports.c.sender == sender)
                           .where(final_reports.c.control_id == control_id))
        return found[0] if found else None

    def get(self, final_report_id: str) -> FinalReportRow | None:
        """One report, or None."""
        found = self._rows(select(final_reports).where(final_reports.c.final_report_id == final_report_id))
        return found[0] if found else None

    def rows(self, *, states: tuple[FinalReportState, ...] | None = None,
             accession_hash: str | None = None) -> list[FinalReportRow]:
        """Reports matching every given filter, oldest first (by arrival)."""
        query = select(final_reports)
        if states is not None:
            query = query.where(final_reports.c.state.in_([str(s) for s in states]))
        if accession_hash is not None:
            query = query.where(final_reports.c.accession_hash == accession_hash)
        return self._rows(query.order_by(final_reports.c.received_at, final_reports.c.final_report_id))

    def pairs(self) -> list[FinalReportRow]:
        """The paired reports, oldest pair first (the order the quota deletes them in)."""
        return self._rows(select(final_reports).where(final_reports.c.state == FinalReportState.PAIRED)
                          .order_by(final_reports.c.paired_at, final_reports.c.final_report_id))

    def mark_paired(self, final_report_id: str, *, series_instance_uid: str, job_id: str, pair_dir: str,
                    patient_pseudonym: str, instances: int, size_bytes: int, now: float) -> bool:
        """``unpaired`` -> ``paired`` with its pair folder; False if it was no longer unpaired."""
        return self._move(final_report_id, (FinalReportState.UNPAIRED,), FinalReportState.PAIRED,
                          series_instance_uid=series_instance_uid, job_id=job_id, pair_dir=pair_dir,
                          patient_pseudonym=patient_pseudonym, instances=instances, bytes=size_bytes,
                          paired_at=now, report_file=None, reason=None)

    def mark_discarded(self, final_report_id: str, reason: str, now: float,
                       from_states: tuple[FinalReportState, ...] = (FinalReportState.UNPAIRED,
                                                                   FinalReportState.PAIRED)) -> bool:
        """-> ``discarded`` with ``reason`` (free of patient data); False if not in ``from_states``."""
        return self._move(final_report_id, from_states, FinalReportState.DISCARDED, reason=reason,
                          discarded_at=now, report_file=None)

    def paired_bytes(self) -> int:
        """Bytes the paired reports' folders hold (as recorded when they were made)."""
        with self.db.read() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(final_reports.c.bytes), 0))
                                    .where(final_reports.c.state == FinalReportState.PAIRED)).scalar_one())

    def counts(self) -> dict[FinalReportState, int]:
        """How many reports are in each state (every state listed, zeros included)."""
        with self.db.read() as conn:
            found = dict(conn.execute(select(final_reports.c.state, func.count())
                                      .group_by(final_reports.c.state)).all())
        return {state: int(found.get(state.value, 0)) for state in FinalReportState}

    def _move(self, final_report_id: str, from_states: tuple[FinalReportState, ...], to: FinalReportState,
              **values: Any) -> bool:
        with self.db.write() as conn:
            result = conn.execute(
                update(final_reports).where(final_reports.c.final_report_id == final_report_id)
                .where(final_reports.c.state.in_([str(s) for s in from_states]))
                .values(state=to, **values)
            )
            return result.rowcount == 1

    def _rows(self, query: Any) -> list[FinalReportRow]:
        with self.db.read() as conn:
            return [_final_report(row._mapping) for row in conn.execute(query)]


def count_pairs(db: Database) -> int:
    """How many training pairs the site store holds now (for the retraining trigger)."""
    return FinalReportStore(db).counts()[FinalReportState.PAIRED]


def _final_report(row: Any) -> FinalReportRow:
    values = {k: row[k] for k in FinalReportRow.__dataclass_fields__}
    return FinalReportRow(**{**values, "state": FinalReportState(row["state"])})


@dataclass(frozen=True)
class PurgeCandidate:
    """A series whose spool files retention may delete, and why."""

    series_instance_uid: str
    revision: int
    #: ``job delivered``, ``job dead``, ``job failed`` or ``rejected``.
    reason: str


class SpoolRetentionStore:
    """What retention asks of the state database: which series to purge, and forgetting them."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def candidates(self, *, finished_before: float, rejected_before: float) -> list[PurgeCandidate]:
        """Series with instance rows whose job ended before ``finished_before`` (delivered, dead or
        failed, for the series' current revision), or REJECTED before ``rejected_before``; oldest first.
        """
        has_instances = exists().where(instances.c.series_instance_uid == series.c.series_instance_uid)
        done = (
            select(series.c.series_instance_uid, series.c.revision, jobs.c.state, jobs.c.finished_at)
            .join(jobs, and_(jobs.c.series_instance_uid == series.c.series_instance_uid,
                             jobs.c.revision == series.c.revision))
            .where(series.c.state == SeriesState.SELECTED)
            .where(jobs.c.state.in_([str(s) for s in PURGEABLE_JOB_STATES]))
            .where(jobs.c.finished_at <= finished_before)
            .where(has_instances)
        )
        rejected = (
            select(series.c.series_instance_uid, series.c.revision, series.c.decided_at)
            .where(series.c.state == SeriesState.REJECTED)
            .where(series.c.decided_at <= rejected_before)
            .where(has_instances)
        )
        with self.db.read() as conn:
            found = [(row.finished_at, PurgeCandidate(row.series_instance_uid, row.revision,
                                                      f"job {row.state}"))
                     for row in conn.execute(done)]
            found += [(row.decided_at, PurgeCandidate(row.series_instance_uid, row.revision, "rejected"))
                      for row in conn.execute(rejected)]
        return [candidate for _, candidate in sorted(found, key=lambda item: item[0])]

    def still_purgeable(self, candidate: PurgeCandidate) -> bool:
        """True while the series is at the candidate's revision and decided (no late instance came)."""
        with self.db.read() as conn:
            row = conn.execute(select(series.c.state, series.c.revision)
                               .where(series.c.series_instance_uid == candidate.series_instance_uid)).first()
        return (row is not None and row.revision == candidate.revision
                and row.state in (SeriesState.SELECTED, SeriesState.REJECTED))

    def forget_instances(self, candidate: PurgeCandidate, *, files: int, size_bytes: int,
                         now: float) -> bool:
        """Delete the series' instance rows (its files are already gone) and record the purge.

        Keeps the series, job and report rows (the history). Returns False, changing nothing, if a
        late instance reopened the series meanwhile.
        """
        with self.db.write() as conn:
            current = conn.execute(
                select(series.c.revision).where(series.c.series_instance_uid == candidate.series_instance_uid)
                .where(series.c.state.in_([SeriesState.SELECTED, SeriesState.REJECTED]))
            ).scalar()
            if current != candidate.revision:
                return False
            conn.execute(delete(instances)
                         .where(instances.c.series_instance_uid == candidate.series_instance_uid))
            conn.execute(insert(spool_purges).values(
                purge_id=sortable_id("pg"), series_instance_uid=candidate.series_instance_uid,
                revision=candidate.revision, purged_at=now, reason=candidate.reason, files=files,
                bytes=size_bytes,
            ))
        return True

    def purges(self) -> list[dict[str, Any]]:
        """Every recorded purge, oldest first."""
        with self.db.read() as conn:
            return [dict(row._mapping) for row in
                    conn.execute(select(spool_purges).order_by(spool_purges.c.purged_at,
                                                               spool_purges.c.purge_id))]

    def was_purged(self, series_instance_uid: str) -> bool:
        """True if retention deleted this series' files at some revision."""
        with self.db.read() as conn:
            return conn.execute(select(func.count()).select_from(spool_purges)
                                .where(spool_purges.c.series_instance_uid == series_instance_uid)
                                ).scalar_one() > 0
