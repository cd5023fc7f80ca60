"""The service's periodic jobs: an APScheduler 3 ``BackgroundScheduler`` whose jobs live in the state DB.

::

    scheduler = JobScheduler(settings.storage.resolved_database_url)
    scheduler.start(paused=True)          # job store ready, nothing runs yet
    retraining.schedule(scheduler, settings)            # binds its context, adds or removes its job
    scheduler.add_interval_job("retention", "neuroscribe.daemon.retention:run_job", 3600)
    scheduler.resume()                    # jobs run from now on
    ...
    retraining.unbind()                   # stops a running training subprocess
    scheduler.shutdown()

Jobs are rows of ``apscheduler_jobs`` in the state database (SQLite or PostgreSQL, the same URL as
the store), so a job's next run time survives a restart. Each job has a fixed id and is added with
``replace_existing=True``: a restart updates the one row instead of adding another. When the stored
job has the same interval, its next run time is kept, so frequent restarts do not postpone it
forever; a run missed while the service was down runs once at start (``coalesce``) if it is less
than one interval late (``misfire_grace_time``), else the schedule simply resumes.

A stored job names its function by textual reference (``"package.module:function"``) and its
arguments are pickled, so jobs take plain arguments only. A job that needs the running service's
objects (settings, the store) reads them from a small module-level context that the service sets
before :meth:`JobScheduler.resume` and clears at shutdown (``retraining.bind``/``unbind``); a job
that fires with no context set logs a warning and does nothing.

Several nodes sharing one PostgreSQL database must not all run the same job: APScheduler 3 has no
cross-node lock. Enable such jobs (retraining) on one node only.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.exc import SQLAlchemyError

from neuroscribe.errors import NeuroScribeError
from neuroscribe.log import get_logger

__all__ = ["JOBS_TABLE", "JobScheduler", "SchedulerError"]

LOG = get_logger(__name__)

#: The table of the state database that holds the scheduled jobs.
JOBS_TABLE = "apscheduler_jobs"
#: Threads running jobs; each job has at most one running instance (``max_instances=1``).
EXECUTOR_THREADS = 4
#: SQLite busy timeout of the job store's connections (seconds); the store's own is 30 s too.
SQLITE_TIMEOUT_SECONDS = 30


class SchedulerError(NeuroScribeError):
    """The scheduler cannot be started, or a job cannot be added; the message says why."""


class JobScheduler:
    """A ``BackgroundScheduler`` (UTC) with the SQLAlchemy job store in the state database.

    Parameters
    ----------
    database_url
        SQLAlchemy URL of the state database (``settings.storage.resolved_database_url``).
    tablename
        The jobs table.
    """

    def __init__(self, database_url: str, *, tablename: str = JOBS_TABLE) -> None:
        if not database_url:
            raise SchedulerError("database_url is empty: the job store needs the state database URL")
        self.database_url = database_url
        engine_options: dict[str, Any] = (
            {"connect_args": {"timeout": SQLITE_TIMEOUT_SECONDS}} if database_url.startswith("sqlite")
            else {"pool_pre_ping": True})
        try:
            store = SQLAlchemyJobStore(url=database_url, tablename=tablename, engine_options=engine_options)
        except (SQLAlchemyError, ValueError, ImportError) as exc:
            raise SchedulerError(f"job store: database URL not usable: {type(exc).__name__}: {exc}") from exc
        self._scheduler = BackgroundScheduler(
            jobstores={"default": store},
            executors={"default": ThreadPoolExecutor(EXECUTOR_THREADS)},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone=UTC,
        )
        self._scheduler.add_listener(self._on_event, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`shutdown` (paused or not)."""
        return bool(self._scheduler.running)

    def start(self, *, paused: bool = False) -> None:
        """Open the job store (its table is created if absent) and start; ``paused`` runs nothing yet."""
        try:
            self._scheduler.start(paused=paused)
        except SQLAlchemyError as exc:
            raise SchedulerError(f"job store: cannot open table {JOBS_TABLE!r}: "
                                 f"{type(exc).__name__}") from exc
        LOG.info("scheduler_started", paused=paused, jobs=[job.id for job in self._scheduler.get_jobs()])

    def resume(self) -> None:
        """Run jobs from now on (after ``start(paused=True)``)."""
        self._scheduler.resume()

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop; with ``wait``, after the running jobs return. Jobs stay stored for the next start."""
        try:
            self._scheduler.shutdown(wait=wait)
        except SchedulerNotRunningError:
            return
        LOG.info("scheduler_stopped")

    def add_interval_job(self, job_id: str, func_ref: str, seconds: float, *, args: tuple[Any, ...] = (),
                         kwargs: dict[str, Any] | None = None, misfire_grace_seconds: float | None = None,
                         first_run: datetime | None = None) -> datetime | None:
        """Add or replace the job ``job_id``: ``func_ref(*args, **kwargs)`` every ``seconds``; its next run.

        Parameters
        ----------
        job_id
            Fixed id: adding it again (each start) replaces the stored job, never duplicates it.
        func_ref
            ``"package.module:function"`` of a module-level function (it is stored as text).
        seconds
            Interval. When the stored job has the same interval its next run time is kept.
        args, kwargs
            Plain, picklable values (they are stored in the database).
        misfire_grace_seconds
            How late a missed run may still start; default one interval.
        first_run
            Next run time of a new (or re-timed) job; default one interval from now.
        """
        if not self.running:
            raise SchedulerError(f"add_interval_job({job_id!r}): start the scheduler first "
                                 "(start(paused=True))")
        if ":" not in func_ref:
            raise SchedulerError(f"func_ref {func_ref!r}: must be a textual reference "
                                 "'package.module:function'")
        if not seconds > 0:
            raise SchedulerError(f"interval of job {job_id!r} = {seconds!r}: must be > 0 seconds")
        interval = timedelta(seconds=seconds)
        existing = self._scheduler.get_job(job_id)
        next_run = first_run
        if (next_run is None and existing is not None and existing.next_run_time is not None
                and isinstance(existing.trigger, IntervalTrigger) and existing.trigger.interval == interval
                and existing.func_ref == func_ref):
            next_run = existing.next_run_time
        grace = max(1, round(seconds if misfire_grace_seconds is None else misfire_grace_seconds))
        options: dict[str, Any] = {} if next_run is None else {"next_run_time": next_run}
        job = self._scheduler.add_job(
            func_ref, IntervalTrigger(seconds=seconds, timezone=UTC), args=args, kwargs=kwargs or {},
            id=job_id, name=job_id, replace_existing=True, coalesce=True, max_instances=1,
            misfire_grace_time=grace, **options)
        stored = self._scheduler.get_job(job_id)
        next_time = stored.next_run_time if stored is not None else getattr(job, "next_run_time", None)
        LOG.info("job_scheduled", job_id=job_id, func=func_ref, every_seconds=seconds,
                 next_run=next_time.isoformat() if next_time else None, kept=existing is not None and
                 next_run is not None and first_run is None)
        return next_time

    def remove_job(self, job_id: str) -> bool:
        """Remove the job ``job_id`` if stored (e.g. a feature switched off); True if it was."""
        if self._scheduler.get_job(job_id) is None:
            return False
        self._scheduler.remove_job(job_id)
        LOG.info("job_removed", job_id=job_id)
        return True

    def run_now(self, job_id: str) -> None:
        """Run the stored job ``job_id`` as soon as a thread is free (then on its schedule again).

        ``max_instances=1`` still holds: while a run is in progress this one is skipped with a warning.
        """
        if self._scheduler.get_job(job_id) is None:
            raise SchedulerError(f"run_now({job_id!r}): no such job")
        self._scheduler.modify_job(job_id, next_run_time=datetime.now(UTC))  # wakes the scheduler

    def jobs(self) -> list[dict[str, Any]]:
        """One dict per stored job: id, func (textual reference), next_run (UTC) and interval seconds."""
        rows = []
        for job in self._scheduler.get_jobs():
            trigger = job.trigger
            rows.append({
                "id": job.id, "func": job.func_ref,
                "next_run": job.next_run_time.isoformat() if job.next_run_time else None,
                "interval_seconds": trigger.interval.total_seconds()
                if isinstance(trigger, IntervalTrigger) else None,
            })
        return rows

    @staticmethod
    def _on_event(event: JobExecutionEvent) -> None:
        """One log line per job run: done, failed (with the traceback) or missed."""
        if event.code == EVENT_JOB_MISSED:
            LOG.warning("job_missed", job_id=event.job_id, scheduled=event.scheduled_run_time.isoformat())
        elif event.exception is not None:
            LOG.error("job_failed", job_id=event.job_id, error=f"{type(event.exception).__name__}: "
                      f"{event.exception}", traceback=event.traceback)
        else:
            LOG.info("job_done", job_id=event.job_id)
