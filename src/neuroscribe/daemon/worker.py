"""The drafting worker: a separate process that turns queued jobs into reports.

::

    service process                                   worker process (spawned)
    assembler: SELECTED series -> job queued  --wake-->  claim -> draft_report -> job reported
    supervisor thread  <--events (model, job done)--     reloads the model when the registry changes
    outbox thread      <--wake (a report is queued)--

Decoding and inference never run in the service process, let alone on an association thread: a
model that crashes, leaks or hangs takes down this process only. The supervisor
(:class:`WorkerSupervisor`) restarts it with backoff and marks the job it died on as failed after
``inference.max_attempts`` deaths, so one poisonous series cannot stop the queue.

Hot swap: before each job the worker asks which bundle to serve (:func:`resolve_bundle`); when the
registry's current model changed (``neuroscribe models promote``, or a retraining run promoted one),
it loads and verifies the new bundle first and only then drops the old one, so no job waits on a
half-loaded model and a broken candidate leaves the old model serving.

The job's state machine is in :mod:`neuroscribe.store.jobs`; each transition is idempotent, and the
report's SR UIDs are derived from its instances (:func:`~neuroscribe.reporting.drafting.sr_uids_for`),
so a job redone after a crash finds its report instead of making a second one.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import neuroscribe
from neuroscribe import failpoints
from neuroscribe.config import Settings
from neuroscribe.daemon._limited import die_with_parent
from neuroscribe.errors import NeuroScribeError, VolumeError
from neuroscribe.log import configure_logging, get_logger, hash_uid
from neuroscribe.store import Database, JobRow, JobState, JobStore, StateStore, accession_key

LOG = get_logger(__name__)

#: The demo bundle of a source checkout (absent from a wheel install).
DEMO_BUNDLE = Path(neuroscribe.__file__).resolve().parents[2] / "models" / "demo" / "bundle"
#: The worker's own log file beside the service's (two processes must not rotate one file).
WORKER_LOG_FILE = "worker.jsonl"
#: Restart delays after the worker died, growing to this ceiling.
_RESTART_DELAYS = (1.0, 2.0, 5.0, 15.0, 60.0)


@dataclass(frozen=True)
class ModelChoice:
    """The bundle the service should run and why (``configured``, ``registry`` or ``demo``)."""

    path: Path
    source: str


def resolve_bundle(settings: Settings) -> ModelChoice | None:
    """``[models] bundle`` when set, else the registry's current model, else the demo bundle, else None."""
    if settings.models.bundle is not None:
        return ModelChoice(Path(settings.models.bundle), "configured")
    from neuroscribe.training.registry import BUNDLES_DIR, Registry  # no torch: registry only

    registry_root = settings.models.dir or settings.storage.models_dir
    current = Registry(registry_root).current_id()
    if current is not None:
        return ModelChoice(Path(registry_root) / BUNDLES_DIR / current, "registry")
    if DEMO_BUNDLE.is_dir():
        return ModelChoice(DEMO_BUNDLE, "demo")
    return None


# -- the worker process ------------------------------------------------------------------------


class DraftingWorker:
    """The worker's loop (runs in the child process; tests may run it in-process)."""

    def __init__(self, settings: Settings, worker_id: str, events: Any,
                 clock: Callable[[], float] = time.time) -> None:
        from neuroscribe.reporting.outbox import Outbox

        self.settings = settings
        self.worker_id = worker_id
        self.events = events
        self.clock = clock
        self.db = Database(settings.storage.resolved_database_url)
        self.jobs = JobStore(self.db)
        self.state = StateStore(self.db)
        self.outbox = Outbox(settings, self.db)
        self.engine: Any = None
        self.model: ModelChoice | None = None
        self._model_error_logged: str | None = None

    def ensure_model(self) -> bool:
        """Load the bundle :func:`resolve_bundle` names when it differs from the loaded one."""
        wanted = resolve_bundle(self.settings)
        if wanted is None:
            self._model_failed("no model: set [models] bundle or promote one into the registry")
            return self.engine is not None
        if self.model is not None and wanted.path.resolve() == self.model.path.resolve():
            return True
        from neuroscribe.inference.engine import Engine

        inference = self.settings.inference
        try:
            engine = Engine.load(wanted.path, device=inference.device, threads=inference.threads or None)
        except NeuroScribeError as exc:  # a broken bundle: keep the old model if there is one
            self._model_failed(f"model {wanted.source} bundle {wanted.path.name} not loaded: {exc}")
            return self.engine is not None
        previous = self.model
        self.engine, self.model, self._model_error_logged = engine, wanted, None
        manifest = engine.bundle.manifest
        info = {"source": wanted.source, "bundle": wanted.path.name, "name": str(manifest["name"]),
                "version": str(manifest["version"]), "model_uid_hash": hash_uid(manifest["model_uid"]),
                "providers": list(engine.providers), "device": engine.device,
                "fallback": engine.fallback_reason, "synthetic": engine.synthetic}
        LOG.info("model swapped in" if previous else "model loaded", **info,
                 previous=previous.path.name if previous else None)
        self.events.put(("model", info))
        return True

    def _model_failed(self, reason: str) -> None:
        if reason != self._model_error_logged:
            LOG.error("model unavailable", reason=reason, keeps_serving=self.engine is not None)
            self.events.put(("model_error", {"reason": reason}))
            self._model_error_logged = reason

    def run_once(self) -> JobRow | None:
        """Claim and draft one job; returns it (as claimed), or None when nothing was queued."""
        if not self.ensure_model():
            return None
        job = self.jobs.claim(self.worker_id, self.clock())
        if job is None:
            return None
        log = LOG.bind(job_id=job.job_id, series=hash_uid(job.series_instance_uid), attempt=job.attempts)
        if not self.jobs.is_current(job):
            self.jobs.supersede(job.job_id, self.clock())
            log.info("job superseded by a later revision of its series")
            return job
        failpoints.hit("worker.claimed")
        started = time.perf_counter()
        try:
            record, accession = self._draft(job)
        except NeuroScribeError as exc:
            permanent = _is_permanent(exc)
            state = self.jobs.mark_failed(job.job_id, str(exc), self.clock(),
                                          1 if permanent else self.settings.inference.max_attempts)
            log.warning("job failed", error=type(exc).__name__, reason=str(exc),
                        state=state.value if state else None)
            self.events.put(("job", {"job_id": job.job_id, "state": str(state), "error": type(exc).__name__}))
            return job
        seconds = time.perf_counter() - started
        failpoints.hit("worker.after_report")
        now = self.clock()
        assert self.model is not None and self.engine is not None
        self.jobs.mark_reported(job.job_id, report_id=record.report_id, accession_hash=accession,
                                model_id=self.model.path.name, inference_seconds=seconds, now=now)
        log.info("job reported", report_id=record.report_id, draft_seconds=round(seconds, 3),
                 since_last_instance_seconds=round(now - job.last_instance_at, 3))
        self.events.put(("job", {"job_id": job.job_id, "state": JobState.REPORTED.value,
                                 "draft_seconds": seconds,
                                 "since_last_instance": now - job.last_instance_at}))
        return job

    def _draft(self, job: JobRow) -> tuple[Any, str | None]:
        from pydicom import dcmread

        from neuroscribe.reporting.drafting import draft_report

        files = sorted(self.state.instance_paths(job.series_instance_uid))
        record = draft_report(self.engine, files, settings=self.settings, outbox=self.outbox)
        accession = str(dcmread(files[0], stop_before_pixels=True,
                                specific_tags=["AccessionNumber"]).get("AccessionNumber", "") or "")
        return record, accession_key(accession) if accession.strip() else None

    def run(self, stop: Any, wake: Any) -> None:
        """Loop until ``stop`` is set: draft every queued job, then wait for a wake-up or the poll."""
        poll = self.settings.inference.poll_seconds
        while not stop.is_set():
            try:
                job = self.run_once()
            except NeuroScribeError:
                LOG.exception("worker pass failed; retrying")
                job = None
            if job is None and wake.wait(poll):
                wake.clear()
        self.db.close()


def _is_permanent(exc: NeuroScribeError) -> bool:
    """A refusal of the series itself (unreadable files, volume checks): retrying cannot help."""
    from neuroscribe.dicom_io.model_input import ModelGridError
    from neuroscribe.reporting.drafting import DraftError

    return isinstance(exc, DraftError | VolumeError | ModelGridError)


def worker_main(settings_json: str, worker_id: str, events: Any, stop: Any, wake: Any,
                parent_pid: int) -> None:
    """Entry point of the spawned process (settings travel as JSON: they are already validated)."""
    die_with_parent(parent_pid)
    settings = Settings.model_validate_json(settings_json)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when the worker stops
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log = settings.logging
    configure_logging(level=log.level, fmt=log.format,
                      log_dir=settings.storage.log_dir if log.to_file else None, file_name=WORKER_LOG_FILE)
    LOG.info("drafting worker started", worker=worker_id)
    DraftingWorker(settings, worker_id, events).run(stop, wake)
    LOG.info("drafting worker stopped", worker=worker_id)


# -- the supervisor (service process) ----------------------------------------------------------


@dataclass
class WorkerStatus:
    """What the service knows of its worker, for ``/readyz`` and ``/metrics``."""

    alive: bool = False
    restarts: int = 0
    model: dict[str, Any] | None = None
    model_error: str | None = None


class WorkerSupervisor:
    """Starts the worker process, relays its events, restarts it when it dies."""

    def __init__(self, settings: Settings, jobs: JobStore, *,
                 on_event: Callable[[str, dict[str, Any]], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.jobs = jobs
        self.on_event = on_event
        self.clock = clock
        self.status = WorkerStatus()
        self._ctx = multiprocessing.get_context("spawn")
        self._events = self._ctx.Queue()
        self._stop = self._ctx.Event()
        self._wake = self._ctx.Event()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._generation = 0

    @property
    def worker_id(self) -> str:
        return f"{os.uname().nodename}:{os.getpid()}:{self._generation}"

    def start(self) -> None:
        """Spawn the worker and the thread that watches it."""
        os.environ[failpoints.SERVICE_PID_ENV] = str(os.getpid())
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A job was queued: have the worker look now."""
        self._wake.set()

    def _spawn(self) -> None:
        self._generation += 1
        self._process = self._ctx.Process(
            target=worker_main, name="neuroscribe-worker",
            args=(self.settings.model_dump_json(), self.worker_id, self._events, self._stop, self._wake,
                  os.getpid()),
        )
        self._process.start()
        self.status.alive = True
        LOG.info("drafting worker spawned", pid=self._process.pid, worker=self.worker_id)

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                kind, payload = self._events.get(timeout=0.5)
            except queue.Empty:
                kind = None
            except (EOFError, OSError):
                kind = None
            if kind is not None:
                if kind == "model":
                    self.status.model, self.status.model_error = payload, None
                elif kind == "model_error":
                    self.status.model_error = payload["reason"]
                self.on_event(kind, payload)
                if kind == "job":
                    failures = 0
                continue
            process = self._process
            if process is None or process.is_alive() or self._stopping.is_set():
                continue
            self.status.alive = False
            failed_id = self.worker_id
            LOG.error("drafting worker died", exitcode=process.exitcode, worker=failed_id)
            for job in self.jobs.jobs(states=(JobState.INFERRING,)):
                if job.worker == failed_id:
                    reason = f"the worker died (exit code {process.exitcode})"
                    self.jobs.mark_failed(job.job_id, reason, self.clock(),
                                          self.settings.inference.max_attempts)
            delay = _RESTART_DELAYS[min(failures, len(_RESTART_DELAYS) - 1)]
            failures += 1
            if self._stopping.wait(delay):
                break
            self.status.restarts += 1
            self._spawn()

    def stop(self, timeout: float) -> None:
        """Have the worker finish its job and exit; kill it after ``timeout`` (the job is queued at start)."""
        self._stopping.set()
        self._stop.set()
        self._wake.set()
        process = self._process
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                LOG.warning("drafting worker did not stop in time; killing it", timeout=timeout)
                process.kill()
                process.join(5)
        if self._thread is not None:
            self._thread.join(5)
        self.status.alive = False
        self._events.close()
        self._events.cancel_join_thread()
