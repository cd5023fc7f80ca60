"""The service process: receive, assemble, draft (in a worker process), deliver, observe.

::

    SCP threads ──> spool + DB ──> assembler thread: complete, select, queue jobs, follow deliveries
                                        │ wake                          ▲
                                        ▼                               │ reported
                          worker process (daemon/worker.py) ── draft_report ── outbox thread ──> PACS, RIS
    http thread: /healthz /readyz /metrics          scheduler: retention, retraining

Start-up order matters for "nothing lost": the database is migrated, partial files from a crash
are removed (never acknowledged), spool files without a state row are recorded, jobs a dead worker
left ``inferring`` are queued again, report folders without a row are removed; then the worker,
the outbox and the assembler start, and only then does the SCP accept associations. Every later
step is idempotent (see :mod:`neuroscribe.store.jobs`), so a restart after ``kill -9`` at any point
resumes where the database says, with the same SR UIDs and HL7 control IDs.

SIGTERM: the SCP stops accepting and lets open associations finish (bounded), the worker finishes
its job or is killed after ``SHUTDOWN_GRACE_SECONDS`` (its job is queued again at the next start),
the outbox ends its attempt in progress, and the process exits.
"""

from __future__ import annotations

import errno
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from neuroscribe import audit, failpoints
from neuroscribe.config import Settings
from neuroscribe.daemon import retraining, systemd
from neuroscribe.daemon.http import HealthServer
from neuroscribe.daemon.metrics import ScrapeSources, ServiceMetrics
from neuroscribe.daemon.retention import run_retention
from neuroscribe.daemon.scheduler import JobScheduler
from neuroscribe.daemon.worker import WorkerSupervisor
from neuroscribe.dicom_io.scp import StorageSCP, recover_unrecorded
from neuroscribe.dicom_io.series import SeriesAssembler
from neuroscribe.dicom_io.spool import Spool
from neuroscribe.errors import ConfigError, NeuroScribeError
from neuroscribe.log import get_logger
from neuroscribe.reporting.final_reports import FinalReportListener
from neuroscribe.reporting.outbox import Outbox
from neuroscribe.store import Database, JobState, JobStore, SeriesState, StateStore

LOG = get_logger(__name__)

#: How long SIGTERM waits for open associations, and then for the worker, before exiting anyway.
SHUTDOWN_GRACE_SECONDS = 20.0
#: Scheduler job ids and the functions they run (textual references: the jobs are stored in the DB).
RETENTION_JOB = ("retention", "neuroscribe.daemon.service:scheduled_retention")
PAIRING_JOB = ("final-report-pairing", "neuroscribe.daemon.service:scheduled_pairing")
#: Destinations are checked for /readyz at most this often (each check may wait for a timeout).
DESTINATION_CHECK_SECONDS = 15.0
_DESTINATION_TIMEOUT = 2.0


class Service:
    """One NeuroScribe node. ``start()`` returns once the SCP listens; ``stop()`` is idempotent."""

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.db = Database(settings.storage.resolved_database_url)
        self.store = StateStore(self.db)
        self.jobs = JobStore(self.db)
        self.spool = Spool(settings.storage.spool_dir, settings.storage.incoming_dir)
        self.scp = StorageSCP(
            settings.dicom, self.store, self.spool, settings.storage.min_free_bytes, clock=clock
        )
        self.assembler = SeriesAssembler(self.store, settings.series, settings.selection, clock=clock)
        self.outbox = Outbox(settings, self.db, clock=clock)
        self.worker = (WorkerSupervisor(settings, self.jobs, on_event=self._on_worker_event, clock=clock)
                       if settings.inference.enabled else None)
        self.metrics = ServiceMetrics(ScrapeSources(
            counters=self.scp.counters, state=self.store, jobs=self.jobs, outbox=self.outbox.store,
            storage_root=settings.storage.root, worker=self._worker_status,
        ))
        self.http = (HealthServer(settings.http.bind, settings.http.port, live=self.liveness,
                                  ready=self.readiness, metrics=self.metrics.render)
                     if settings.http.enabled else None)
        self.http_address: tuple[str, int] | None = None
        self.final_reports = (FinalReportListener(settings, self.db, clock=clock)
                              if settings.learning.enabled else None)
        self.final_reports_address: tuple[str, int] | None = None
        self.scheduler = JobScheduler(settings.storage.resolved_database_url)
        self._stop = threading.Event()
        self._outbox_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._destinations: tuple[float, list[dict[str, Any]]] = (float("-inf"), [])
        # systemd (daemon/systemd.py): READY/STOPPING/STATUS, and watchdog pings while loops beat.
        self.systemd = systemd.ServiceNotifier()
        self.heartbeats = {"series assembler": systemd.Heartbeat.for_loop(settings.series.poll_seconds)}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Recover, start the stages, then listen. Returns the SCP's bound (address, port)."""
        try:
            return self._start()
        except BaseException:
            self.stop()  # a worker already spawned must not outlive a failed start
            raise

    def _start(self) -> tuple[str, int]:
        s = self.settings
        self.outbox.check_tls()  # a bad certificate file stops the start here, naming its key
        audit.configure(s.storage.log_dir / audit.AUDIT_FILE_NAME)
        audit.audit_configuration(s, s.storage.root / audit.CONFIG_STATE_FILE_NAME)
        removed = self.spool.prepare()
        recovered = recover_unrecorded(self.spool, self.store)
        requeued = self.jobs.requeue_inferring(self.clock())
        orphans = self.outbox.recover()
        open_series = len(self.store.series_rows(state=SeriesState.RECEIVING))
        LOG.info("service starting", schema_version=self.db.schema_version,
                 partial_files_removed=removed, spool_files_recovered=recovered,
                 open_series=open_series, jobs_requeued=requeued, orphan_reports_removed=orphans,
                 jobs={k.value: v for k, v in self.jobs.counts().items() if v})
        if self.worker is not None:
            self.worker.start()
        else:
            LOG.warning("inference.enabled is false: selected series wait in the queue, no reports")
        self._threads.append(self.outbox.start(self._stop, self._outbox_wake))
        self._threads.append(self._thread(self._assemble_forever, "series-assembler"))
        self._start_scheduler()
        if self.final_reports is not None:
            with _listening("learning.port", s.learning.bind, s.learning.port):
                self.final_reports_address = self.final_reports.start()
        if self.http is not None:
            with _listening("http.port", s.http.bind, s.http.port):
                self.http_address = self.http.start()
        with _listening("dicom.port", s.dicom.bind, s.dicom.port):
            address = self.scp.start()
        self.systemd.ready(f"Receiving as {s.dicom.ae_title} on {address[0]}:{address[1]}; "
                           f"{open_series} open series at start", self.heartbeats)
        return address

    def _start_scheduler(self) -> None:
        """Retention, pairing retries and retraining on APScheduler (jobs kept in the state database)."""
        global _running
        _running = self
        self.scheduler.start(paused=True)
        retraining.schedule(self.scheduler, self.settings)
        for (job_id, func), enabled, seconds in (
            (RETENTION_JOB, self.settings.retention.enabled, self.settings.retention.poll_seconds),
            (PAIRING_JOB, self.final_reports is not None, self.settings.learning.pair_retry_seconds),
        ):
            if enabled:
                self.scheduler.add_interval_job(job_id, func, seconds)
            else:
                self.scheduler.remove_job(job_id)
        self.scheduler.resume()

    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def _assemble_forever(self) -> None:
        poll = self.settings.series.poll_seconds
        while not self._stop.wait(poll):
            self.heartbeats["series assembler"].beat()
            try:
                self.assemble_once()
            except NeuroScribeError:
                LOG.exception("series assembly pass failed; retrying next poll")
            except Exception:  # keep assembling: one bad series must not stop the service
                LOG.exception("series assembly pass failed unexpectedly; retrying next poll")

    def assemble_once(self) -> None:
        """One pass: complete and select series, queue their jobs, follow reported jobs' deliveries."""
        if self.assembler.tick().selected:
            failpoints.hit("assembler.after_select")
        now = self.clock()
        queued = self.jobs.queue_selected(now)
        if queued and self.worker is not None:
            self.worker.wake()
        for job in queued:
            LOG.info("job queued", job_id=job.job_id, revision=job.revision)
        for job, state in self.jobs.sync_deliveries(now):
            if state == JobState.DELIVERED:
                self.metrics.time_to_delivery.observe(now - job.last_instance_at)
            LOG.log(30 if state == JobState.DEAD else 20, "job delivery", job_id=job.job_id,
                    report_id=job.report_id, state=state.value)

    def _on_worker_event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "job" and payload.get("state") == JobState.REPORTED.value:
            self.metrics.time_to_report.observe(payload["since_last_instance"])
            self.metrics.draft_seconds.observe(payload["draft_seconds"])
            self._outbox_wake.set()

    def stop(self) -> None:
        """Stop accepting, let open work finish (bounded), stop the stages, close."""
        if self._stop.is_set():
            return
        self._stop.set()
        audit.record("service_stopped")
        LOG.info("service stopping", active_associations=self.scp.active_associations)
        self.systemd.stopping(f"Stopping: {self.scp.active_associations} open associations")
        self.scp.stop()
        if self.final_reports is not None:
            self.final_reports.stop()
        retraining.unbind()  # kills a training run in progress (it starts over at its next check)
        if self.scheduler.running:
            self.scheduler.shutdown()
        if self.worker is not None:
            self.worker.stop(SHUTDOWN_GRACE_SECONDS)
        self._outbox_wake.set()
        for thread in self._threads:
            thread.join(timeout=SHUTDOWN_GRACE_SECONDS)
        if self.http is not None:
            self.http.stop()
        global _running
        _running = None
        self.db.close()
        self.systemd.close()
        LOG.info("service stopped")

    def run_until_signal(self) -> int:
        """Serve until SIGTERM or SIGINT; return the process exit code."""
        stop_requested = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            LOG.info("signal received", signal=signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        while not stop_requested.wait(1.0):
            pass
        self.stop()
        return 0

    # -- health ------------------------------------------------------------------------------

    def _worker_status(self) -> dict[str, Any]:
        status = self.worker.status if self.worker is not None else None
        return {"alive": bool(status and status.alive), "restarts": status.restarts if status else 0,
                "model": status.model if status else None}

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Alive while every loop beats (``/healthz``)."""
        stale = [name for name, beat in self.heartbeats.items() if beat.stale]
        return not stale, {"stale_loops": stale}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Database, disk, model, execution provider and destinations, each with a reason (``/readyz``)."""
        checks: dict[str, dict[str, Any]] = {}
        try:
            queued = self.jobs.counts()[JobState.QUEUED]
            checks["database"] = {"ok": True, "queued_jobs": queued}
        except NeuroScribeError as exc:
            checks["database"] = {"ok": False, "reason": str(exc)}
        free = shutil.disk_usage(self.settings.storage.root).free
        low = free < self.settings.storage.min_free_bytes
        checks["disk"] = {"ok": not low, "free_bytes": free,
                          **({"reason": "below storage.min_free_bytes: C-STOREs are refused"} if low else {})}
        checks.update(self._model_checks())
        destinations = self._destination_checks()
        checks["destinations"] = {"ok": all(d["ok"] for d in destinations), "each": destinations}
        return all(c["ok"] for c in checks.values()), {"checks": checks}

    def _model_checks(self) -> dict[str, dict[str, Any]]:
        if self.worker is None:
            return {"model": {"ok": False, "reason": "inference.enabled is false"}}
        status = self.worker.status
        if not status.alive:
            return {"model": {"ok": False, "reason": "the drafting worker is not running"}}
        if status.model is None:
            return {"model": {"ok": False, "reason": status.model_error or "loading"}}
        model = status.model
        wanted = self.settings.inference.device
        provider_ok = not (wanted == "cuda" and model["device"] != "cuda")
        return {
            "model": {"ok": True, "name": model["name"], "version": model["version"],
                      "source": model["source"], "synthetic": model["synthetic"],
                      **({"reason": status.model_error} if status.model_error else {})},
            "execution_provider": {"ok": provider_ok, "providers": model["providers"],
                                   "device": model["device"],
                                   **({"fallback": model["fallback"]} if model["fallback"] else {})},
        }

    def _destination_checks(self) -> list[dict[str, Any]]:
        checked_at, results = self._destinations
        if self.clock() - checked_at >= DESTINATION_CHECK_SECONDS:
            results = [{"destination": str(r.destination), "ok": r.ok, "reason": r.reason}
                       for r in self.outbox.check_health(timeout=_DESTINATION_TIMEOUT)]
            self._destinations = (self.clock(), results)
        return results


@contextmanager
def _listening(key: str, bind: str, port: int) -> Iterator[None]:
    """Turn a listener's bind failure into an error that names the setting, not a traceback."""
    try:
        yield
    except OSError as exc:
        hint = " (is NeuroScribe already running?)" if exc.errno == errno.EADDRINUSE else ""
        raise ConfigError(f"{key} = {port}: cannot listen on {bind}:{port}: "
                          f"{exc.strerror or type(exc).__name__}{hint}") from None


# -- scheduler jobs (module-level: APScheduler stores them by name in the state database) ------------

_running: Service | None = None


def scheduled_retention() -> None:
    """The retention job: purge the spool after its time, keep the training store within its quota."""
    service = _running
    if service is None:
        LOG.warning("retention job fired without a running service")
        return
    counts = run_retention(service.settings, service.db, service.clock())
    LOG.info("retention pass", **counts)


def scheduled_pairing() -> None:
    """The pairing job: try unpaired final reports again (their series may have been reported since)."""
    service = _running
    if service is None or service.final_reports is None:
        return
    paired = service.final_reports.pair_pending(service.clock())
    if paired:
        LOG.info("final reports paired on retry", paired=paired)
