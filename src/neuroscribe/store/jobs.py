"""Report jobs: one per SELECTED series revision, from queued to delivered (see :class:`JobState`).

Every transition is one conditional UPDATE (``WHERE state = <expected>``), so applying it twice,
or after a crash, or from two processes, changes the row at most once. The worker process claims
and finishes jobs; the service's assembler thread queues them and follows their deliveries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, func, insert, select, update

from neuroscribe.store.database import Database
from neuroscribe.store.outbox import sortable_id
from neuroscribe.store.tables import JobState, OutboxState, SeriesState, jobs, outbox, series

#: States after which nothing more happens to a job.
FINAL_STATES = (JobState.DELIVERED, JobState.DEAD, JobState.FAILED, JobState.SUPERSEDED)


def accession_key(accession_number: str) -> str:
    """The key a final report is paired by: SHA-256 of the stripped accession number (never the value)."""
    return hashlib.sha256(accession_number.strip().encode()).hexdigest()


@dataclass(frozen=True)
class JobRow:
    """One job as the database holds it."""

    job_id: str
    series_instance_uid: str
    study_instance_uid: str
    revision: int
    state: JobState
    attempts: int
    created_at: float
    updated_at: float
    last_instance_at: float
    worker: str | None
    report_id: str | None
    accession_hash: str | None
    model_id: str | None
    inference_seconds: float | None
    reported_at: float | None
    finished_at: float | None
    reason: str | None


class JobStore:
    """The jobs table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def queue_selected(self, now: float) -> list[JobRow]:
        """Queue a job for every SELECTED series revision that has none; returns the new jobs."""
        has_job = exists().where(and_(jobs.c.series_instance_uid == series.c.series_instance_uid,
                                      jobs.c.revision == series.c.revision))
        with self.db.write() as conn:
            pending = conn.execute(
                select(series.c.series_instance_uid, series.c.study_instance_uid, series.c.revision,
                       series.c.last_received_at)
                .where(series.c.state == SeriesState.SELECTED).where(~has_job)
                .order_by(series.c.decided_at)
            ).all()
            new_ids = []
            for row in pending:
                job_id = sortable_id("job")
                conn.execute(insert(jobs).values(
                    job_id=job_id, series_instance_uid=row.series_instance_uid,
                    study_instance_uid=row.study_instance_uid, revision=row.revision,
                    state=JobState.QUEUED, attempts=0, created_at=now, updated_at=now,
                    last_instance_at=row.last_received_at,
                ))
                new_ids.append(job_id)
        return self.jobs(job_ids=new_ids)

    def claim(self, worker: str, now: float) -> JobRow | None:
        """Take the oldest queued job for ``worker`` (state ``inferring``, attempts + 1), or None."""
        with self.db.write() as conn:
            job_id = conn.execute(
                select(jobs.c.job_id).where(jobs.c.state == JobState.QUEUED)
                .order_by(jobs.c.created_at, jobs.c.job_id).limit(1)
            ).scalar()
            if job_id is None:
                return None
            conn.execute(
                update(jobs).where(jobs.c.job_id == job_id).where(jobs.c.state == JobState.QUEUED)
                .values(state=JobState.INFERRING, attempts=jobs.c.attempts + 1, worker=worker,
                        updated_at=now)
            )
        return self.job(job_id)

    def is_current(self, job: JobRow) -> bool:
        """True while the job's revision is the series' revision (no late instance reopened it)."""
        with self.db.read() as conn:
            revision = conn.execute(
                select(series.c.revision).where(series.c.series_instance_uid == job.series_instance_uid)
            ).scalar()
        return revision == job.revision

    def mark_reported(self, job_id: str, *, report_id: str, accession_hash: str | None,
                      model_id: str, inference_seconds: float | None, now: float) -> bool:
        """``inferring`` -> ``reported`` with the report it made; False if the job was not inferring."""
        return self._move(job_id, (JobState.INFERRING,), JobState.REPORTED, now, report_id=report_id,
                          accession_hash=accession_hash, model_id=model_id,
                          inference_seconds=inference_seconds, reported_at=now, reason=None)

    def mark_failed(self, job_id: str, reason: str, now: float, max_attempts: int) -> JobState | None:
        """An attempt failed: back to ``queued`` while attempts remain, else ``failed``; the new state."""
        job = self.job(job_id)
        if job is None or job.state != JobState.INFERRING:
            return None
        state = JobState.QUEUED if job.attempts < max_attempts else JobState.FAILED
        moved = self._move(job_id, (JobState.INFERRING,), state, now, reason=reason,
                           finished_at=now if state == JobState.FAILED else None)
        return state if moved else None

    def supersede(self, job_id: str, now: float) -> bool:
        """A late instance reopened the series: this revision's job ends (the next revision gets one)."""
        return self._move(job_id, (JobState.QUEUED, JobState.INFERRING), JobState.SUPERSEDED, now,
                          reason="a later instance reopened the series", finished_at=now)

    def requeue_inferring(self, now: float, worker: str | None = None) -> int:
        """Jobs left ``inferring`` by a worker that died (all, or ``worker``'s) go back to ``queued``."""
        query = update(jobs).where(jobs.c.state == JobState.INFERRING)
        if worker is not None:
            query = query.where(jobs.c.worker == worker)
        with self.db.write() as conn:
            return conn.execute(query.values(state=JobState.QUEUED, updated_at=now,
                                             reason="the worker stopped during inference")).rowcount

    def requeue_failed(self, job_ids: list[str], now: float) -> int:
        """Give failed jobs another round (an operator's retry, or a new model)."""
        with self.db.write() as conn:
            return conn.execute(
                update(jobs).where(jobs.c.job_id.in_(job_ids)).where(jobs.c.state == JobState.FAILED)
                .values(state=JobState.QUEUED, attempts=0, updated_at=now, finished_at=None)
            ).rowcount

    def sync_deliveries(self, now: float) -> list[tuple[JobRow, JobState]]:
        """Follow each reported job's outbox items: ``delivering`` once tried, then ``delivered``/``dead``.

        A report with no destinations counts as delivered (there is nowhere to send it).
        Returns the jobs that moved, with their new state.
        """
        with self.db.read() as conn:  # one query for every job in flight, not one per job
            rows = conn.execute(
                select(jobs, outbox.c.state.label("item_state"), outbox.c.attempts.label("item_attempts"))
                .outerjoin(outbox, outbox.c.report_id == jobs.c.report_id)
                .where(jobs.c.state.in_([JobState.REPORTED.value, JobState.DELIVERING.value]))
                .order_by(jobs.c.created_at, jobs.c.job_id)
            ).all()
        in_flight: dict[str, tuple[JobRow, list[tuple[OutboxState, int]]]] = {}
        for row in rows:
            fields = row._mapping
            job, items = in_flight.setdefault(fields["job_id"], (_job(fields), []))
            if fields["item_state"] is not None:
                items.append((OutboxState(fields["item_state"]), fields["item_attempts"]))
        moved: list[tuple[JobRow, JobState]] = []
        for job, items in in_flight.values():
            states = {state for state, _ in items}
            if OutboxState.PENDING in states:
                target = JobState.DELIVERING if any(attempts for _, attempts in items) else job.state
            elif OutboxState.DEAD in states:
                target = JobState.DEAD
            else:
                target = JobState.DELIVERED
            if target != job.state and self._move(
                job.job_id, (job.state,), target, now,
                finished_at=now if target in FINAL_STATES else None,
                reason=None if items else "no destinations configured",
            ):
                moved.append((job, target))
        return moved

    def job(self, job_id: str) -> JobRow | None:
        """One job, or None."""
        found = self.jobs(job_ids=[job_id])
        return found[0] if found else None

    def jobs(self, *, job_ids: list[str] | None = None, states: tuple[JobState, ...] | None = None,
             series_instance_uid: str | None = None, accession_hash: str | None = None) -> list[JobRow]:
        """Jobs matching every given filter, oldest first."""
        query = select(jobs)
        if job_ids is not None:
            if not job_ids:
                return []
            query = query.where(jobs.c.job_id.in_(job_ids))
        if states is not None:
            query = query.where(jobs.c.state.in_([str(s) for s in states]))
        if series_instance_uid is not None:
            query = query.where(jobs.c.series_instance_uid == series_instance_uid)
        if accession_hash is not None:
            query = query.where(jobs.c.accession_hash == accession_hash)
        with self.db.read() as conn:
            return [_job(row._mapping) for row in conn.execute(query.order_by(jobs.c.created_at,
                                                                              jobs.c.job_id))]

    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state listed, zeros included)."""
        with self.db.read() as conn:
            found = dict(conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all())
        return {state: int(found.get(state.value, 0)) for state in JobState}

    def _move(self, job_id: str, from_states: tuple[JobState, ...], to: JobState, now: float,
              **values: Any) -> bool:
        with self.db.write() as conn:
            result = conn.execute(
                update(jobs).where(jobs.c.job_id == job_id)
                .where(jobs.c.state.in_([str(s) for s in from_states]))
                .values(state=to, updated_at=now, **values)
            )
            return result.rowcount == 1


def _job(row: Any) -> JobRow:
    return JobRow(**{**{k: row[k] for k in JobRow.__dataclass_fields__}, "state": JobState(row["state"])})
