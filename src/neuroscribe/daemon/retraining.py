"""Scheduled retraining: enough new paired studies -> train in a limited subprocess -> gate -> promote.

One run, top to bottom (:func:`maybe_retrain`)::

    <storage.root>/site-data/manifest.jsonl      paired studies (final report + series), de-identified
      |  count the study ids the last run did not use; fewer than [retraining] min_new_pairs: skipped
      v  (an exclusive flock on <root>/retraining/.lock: one run at a time, across processes)
    RUN_DIR = <runs_dir>/<UTC time>/
      manifest.jsonl    snapshot: one line per study whose series is still on disk
      series/           hard links to those series (safe from the quota during the run; removed after)
      train.toml        the training settings used ([retraining] train_config, or the demo's)
      train.log         `neuroscribe train` output; first line: the resource limits it ran under
      bundle/ ...       the trainer's run folder (checkpoints, metrics, curves, the sealed bundle)
      gate.log          `neuroscribe models promote RUN_DIR/bundle --data RUN_DIR/manifest.jsonl`
      outcome.json      what happened (:class:`RetrainOutcome`)
    <root>/retraining/state.json                 study ids used by the last completed run
    <root>/retraining/cache/                     decoded series, shared between runs

Training and the gate run as subprocesses (``python -m neuroscribe train`` and ``... models
promote``) under ``neuroscribe.daemon._limited``: RLIMIT_DATA, RLIMIT_CPU, a higher niceness, their
own process group (killed at the wall-clock timeout or when the service stops), output to a log in
the run folder, exit status checked. The service imports neither torch nor the training code
beyond the registry: the gate, which decodes held-out studies with ONNX Runtime, runs in the
subprocess too. The gate scores the candidate and the current model on the same studies: the test
split of the snapshot under the candidate's own patient split (salt and fractions from its
manifest), which the candidate never trained on.

On promotion the registry's ``current`` changes atomically (``registry.json`` renamed into place
under its lock); the drafting worker notices it between jobs and loads the new bundle, no restart.
``neuroscribe models rollback`` undoes it. Every run ends in one log line (``retraining_done``),
one audit event (``retraining``; ``model_promoted`` too when it promoted) and the metrics below.

The service binds its settings here (:func:`bind`) so that the stored scheduler job
(:data:`JOB_FUNC`, a textual reference without arguments) can reach them; see
``neuroscribe.daemon.scheduler``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from neuroscribe import audit
from neuroscribe.config import Settings
from neuroscribe.durable import atomic_file
from neuroscribe.errors import ConfigError, NeuroScribeError
from neuroscribe.inference.bundle import read_manifest
from neuroscribe.log import get_logger
from neuroscribe.training.registry import Registry, bundle_id

if TYPE_CHECKING:
    from neuroscribe.daemon.scheduler import JobScheduler

__all__ = [
    "JOB_FUNC",
    "JOB_ID",
    "Limits",
    "RetrainOutcome",
    "RetrainStatus",
    "bind",
    "demo_train_config",
    "gate_and_promote",
    "maybe_retrain",
    "pairs_waiting",
    "read_pairs",
    "resolve_train_config",
    "schedule",
    "scheduled_check",
    "site_manifest",
    "unbind",
]

LOG = get_logger(__name__)

SITE_DATA_DIR = "site-data"
MANIFEST_FILE = "manifest.jsonl"
RETRAINING_DIR = "retraining"
STATE_FILE = "state.json"
STATE_FORMAT = "neuroscribe-retraining/1"
LOCK_FILE = ".lock"
CACHE_DIR = "cache"
RUNS_DIR = "runs"
TRAIN_TOML, TRAIN_LOG, GATE_LOG, OUTCOME_FILE = "train.toml", "train.log", "gate.log", "outcome.json"
SERIES_DIR = "series"  # hard links to the snapshot's series, removed when the run ends
BUNDLE_DIR = "bundle"  # the trainer writes RUN_DIR/bundle
#: The scheduler job: fixed id, textual reference (jobs are stored in the state database).
JOB_ID = "retraining"
JOB_FUNC = "neuroscribe.daemon.retraining:scheduled_check"
#: Seconds between SIGTERM and SIGKILL when a subprocess group is stopped.
KILL_GRACE_SECONDS = 10.0
#: How often the waiting thread looks at the stop flag and the deadline.
POLL_SECONDS = 0.5
#: Log lines that mean the memory limit (RLIMIT_DATA) was hit.
_MEMORY_MARKERS = ("memoryerror", "cannot allocate memory", "can't allocate memory", "bad_alloc",
                   "failed to map segment")
#: Name given to a model trained with the demo's settings on site data (the demo's own says "demo").
SITE_MODEL_NAME = "neuroscribe-site-cvit"

RUNS = Counter("neuroscribe_retraining_runs",
               "Retraining checks by outcome (skipped, promoted, refused, failed)", ["outcome"])
PROMOTIONS = Counter("neuroscribe_model_promotions", "Models made current by retraining through the gate")
PAIRS_WAITING = Gauge("neuroscribe_retraining_pairs_waiting",
                      "Paired studies (final report + series) the last completed retraining run did not use")
RUNNING = Gauge("neuroscribe_retraining_running", "1 while a retraining subprocess (training or gate) runs")
LAST_RUN_SECONDS = Gauge("neuroscribe_retraining_last_run_seconds", "Duration of the last retraining run")


class RetrainStatus(StrEnum):
    """How a retraining check ended."""

    SKIPPED = "skipped"
    """Nothing trained: not enough new pairs, no data, or a run is in progress already."""
    PROMOTED = "promoted"
    """A candidate was trained, passed the gate and is now the registry's current model."""
    REFUSED = "refused"
    """A candidate was trained and did not pass the gate; the current model stays."""
    FAILED = "failed"
    """Training or the gate did not finish: exit status, timeout, resource limit; see ``log``."""


@dataclass(frozen=True)
class RetrainOutcome:
    """What one check did; ``reason`` is the sentence for people, the other fields for programs."""

    status: RetrainStatus
    reason: str
    new_pairs: int = 0
    total_pairs: int = 0
    run_dir: Path | None = None
    #: The log of the step that decided the outcome (train.log or gate.log).
    log: Path | None = None
    #: ``train`` or ``gate`` for failures.
    stage: str | None = None
    exit_code: int | None = None
    #: PID of the last subprocess.
    pid: int | None = None
    bundle: str | None = None
    candidate_f1: float | None = None
    current_f1: float | None = None
    margin: float | None = None
    heldout: str | None = None
    studies: int | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Limits:
    """Resource limits of the subprocesses; 0 means none."""

    data_bytes: int = 0
    cpu_seconds: int = 0
    nice: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The ``[retraining]`` limits."""
        r = settings.retraining
        return cls(r.memory_limit_bytes, r.cpu_limit_seconds, r.cpu_nice)


@dataclass(frozen=True)
class _Finished:
    exit_code: int | None
    pid: int
    seconds: float
    timed_out: bool = False
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.stopped


# ------------------------------------------------------------------------------------- places

def site_manifest(settings: Settings) -> Path:
    """The paired studies' manifest: ``<learning.site_data_dir or storage.root/site-data>/manifest.jsonl``."""
    learning = getattr(settings, "learning", None)
    folder = getattr(learning, "site_data_dir", None) or settings.storage.root / SITE_DATA_DIR
    return Path(folder) / MANIFEST_FILE


def _home(settings: Settings) -> Path:
    return settings.storage.root / RETRAINING_DIR


def _runs_dir(settings: Settings) -> Path:
    return settings.retraining.runs_dir or _home(settings) / RUNS_DIR


def _registry(settings: Settings) -> Registry:
    return Registry(settings.models.dir or settings.storage.models_dir)


def demo_train_config() -> Path | None:
    """``models/demo/train.toml`` of the source checkout this module runs from, or None (packaged install)."""
    root = Path(__file__).resolve().parents[3]
    path = root / "models" / "demo" / "train.toml"
    return path if path.is_file() and (root / "pyproject.toml").is_file() else None


def resolve_train_config(settings: Settings) -> tuple[Path, bool]:
    """``(TOML file, is the demo default)``; :class:`ConfigError` when there is none."""
    configured = settings.retraining.train_config
    if configured is not None:
        if not configured.is_file():
            raise ConfigError(f"retraining.train_config = {str(configured)!r}: no such file")
        return configured, False
    demo = demo_train_config()
    if demo is None:
        raise ConfigError("retraining.train_config is empty and this install has no models/demo/train.toml "
                          "(only a source checkout has): set retraining.train_config to a training TOML file")
    return demo, True


# ------------------------------------------------------------------------------------- pairs and state

def read_pairs(manifest: Path) -> dict[str, dict[str, Any]]:
    """Study id -> record of a JSONL manifest, ``series_path`` made absolute; later lines win.

    Lines that are not JSON objects with a string ``study_id`` (or ``study_instance_uid``) are
    skipped, so a line being appended while we read is simply not counted yet. A missing file is empty.
    """
    try:
        text = manifest.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    pairs: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        study = record.get("study_id") or record.get("study_instance_uid")
        if not isinstance(study, str) or not study:
            continue
        series = record.get("series_path")
        if isinstance(series, str) and series and not Path(series).is_absolute():
            record = {**record, "series_path": str(manifest.parent / series)}
        pairs.pop(study, None)
        pairs[study] = record
    return pairs


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = {}
    except ValueError as exc:
        raise NeuroScribeError(f"retraining state {path} is not valid JSON ({exc}); fix or delete it "
                               "(deleting it makes every paired study count as new)") from exc
    return {"format": STATE_FORMAT, "trained_study_ids": [], "runs": 0, "consecutive_failures": 0,
            "last_run": None, **state}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_file(path, "w") as fh:
        json.dump(state, fh, indent=1, sort_keys=True)
        fh.write("\n")


def pairs_waiting(settings: Settings) -> tuple[int, int]:
    """``(new, total)`` paired studies: those the last completed run did not use, and all of them."""
    pairs = read_pairs(site_manifest(settings))
    trained = set(_load_state(_home(settings) / STATE_FILE)["trained_study_ids"])
    new = len(pairs.keys() - trained)
    PAIRS_WAITING.set(new)
    return new, len(pairs)


@contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """An exclusive, non-blocking flock on ``path`` (released on exit, or when the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------- subprocesses

def _neuroscribe(*args: str) -> list[str]:
    """``neuroscribe ARGS`` as a subprocess (through ``daemon._child``: it copes with W^X sandboxes)."""
    return [sys.executable, "-m", "neuroscribe.daemon._child", *args]


def _run_limited(command: list[str], log_path: Path, limits: Limits, deadline: float,
                 stop: threading.Event, cwd: Path) -> _Finished:
    """Run ``command`` under ``limits`` in its own process group, output appended to ``log_path``."""
    wrapper = [sys.executable, "-m", "neuroscribe.daemon._limited", "--data-bytes", str(limits.data_bytes),
               "--cpu-seconds", str(limits.cpu_seconds), "--nice", str(limits.nice),
               "--parent", str(os.getpid()), "--", *command]
    tmp = cwd / ".tmp"  # the gate's decoded-series cache goes here, not to a small /tmp
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)}
    started = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(wrapper, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd, env=env, start_new_session=True)
    LOG.info("retraining_subprocess_started", pid=proc.pid, command=command[3:5], log=str(log_path))
    RUNNING.set(1)
    timed_out = stopped = False
    try:
        while True:
            try:
                proc.wait(timeout=max(0.0, min(POLL_SECONDS, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if stop.is_set():
                    stopped = True
                elif time.monotonic() >= deadline:
                    timed_out = True
                else:
                    continue
                _kill_group(proc)
                break
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt in `neuroscribe retrain`)
            _kill_group(proc)
        RUNNING.set(0)
        shutil.rmtree(tmp, ignore_errors=True)
    return _Finished(proc.returncode, proc.pid, time.monotonic() - started, timed_out, stopped)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after a grace period; reap the leader."""
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=KILL_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # also children that outlived the leader
    proc.wait()


def _failure_reason(fin: _Finished, limits: Limits, log_path: Path, stage: str, timeout_hours: float) -> str:
    if fin.stopped:
        return f"{stage} stopped: the service is shutting down"
    if fin.timed_out:
        return (f"timeout: {stage} still running after {timeout_hours:g} h ([retraining] timeout_hours); "
                "its process group was killed")
    rc = fin.exit_code if fin.exit_code is not None else -1
    if rc == -signal.SIGXCPU:
        return f"resource limit: CPU time ({limits.cpu_seconds} s, [retraining] cpu_limit_seconds) exceeded"
    if limits.data_bytes and _log_mentions(log_path, _MEMORY_MARKERS):
        return (f"resource limit: memory ({limits.data_bytes} bytes, [retraining] memory_limit_bytes) "
                f"exceeded; {stage} exited with code {rc}")
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        hint = " (the hard CPU limit, or the kernel's OOM killer)" if -rc == signal.SIGKILL else ""
        return f"{stage} killed by signal {name}{hint}"
    return f"{stage} exited with code {rc}"


def _log_mentions(path: Path, markers: tuple[str, ...]) -> bool:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 65536))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return False
    tail = tail.lower()
    return any(marker in tail for marker in markers)


# ------------------------------------------------------------------------------------- gate

def gate_and_promote(settings: Settings, bundle: Path, data: Path, *, log_path: Path | None = None,
                     limits: Limits | None = None, deadline: float | None = None,
                     stop: threading.Event | None = None) -> RetrainOutcome:
    """Offer ``bundle`` to the registry's gate, scored on the held-out studies of ``data``, in a subprocess.

    The service may call this on demand too. Returns PROMOTED (the registry's current model is now
    the bundle; the worker swaps it in before its next job), REFUSED (both figures), or FAILED.
    """
    limits = Limits.from_settings(settings) if limits is None else limits
    deadline = time.monotonic() + settings.retraining.timeout_hours * 3600 if deadline is None else deadline
    stop = _STOP if stop is None else stop
    log_path = bundle.parent / GATE_LOG if log_path is None else log_path
    registry = _registry(settings)
    ident = bundle_id(read_manifest(bundle))
    margin = settings.models.promotion_margin
    before = len(registry.history())
    command = _neuroscribe("models", "--dir", str(registry.root), "promote", str(bundle), "--data", str(data),
                           "--margin", repr(margin))
    fin = _run_limited(command, log_path, limits, deadline, stop, cwd=log_path.parent)
    events = [e for e in registry.history()[before:] if e.get("bundle") == ident]
    event = events[-1] if events else {}
    figures = {"bundle": ident, "candidate_f1": event.get("candidate_f1"),
               "current_f1": event.get("current_f1"), "margin": margin, "heldout": event.get("heldout"),
               "log": log_path, "pid": fin.pid,
               "exit_code": fin.exit_code}
    if event.get("heldout") == "none":
        compared = "no current model: the candidate becomes the first"
    else:
        compared = (f"strict FORTE mean F1 {_fmt(event.get('candidate_f1'))} against the current model's "
                    f"{_fmt(event.get('current_f1'))}, margin {margin:.3f} ({event.get('heldout')})")
    if fin.ok and event.get("action") == "promote" and registry.current_id() == ident:
        PROMOTIONS.inc()
        _audit("model_promoted", "success", bundle=ident, previous=event.get("previous"),
               candidate_f1=event.get("candidate_f1"), current_f1=event.get("current_f1"), margin=margin,
               heldout=event.get("heldout"), by="retraining")
        LOG.info("model_promoted", bundle=ident, previous=event.get("previous"),
                 candidate_f1=event.get("candidate_f1"), current_f1=event.get("current_f1"), margin=margin,
                 heldout=event.get("heldout"), swap="the drafting worker loads it before its next job")
        return RetrainOutcome(RetrainStatus.PROMOTED, f"promoted {ident}: {compared}", **figures)
    if fin.exit_code == 1 and not (fin.timed_out or fin.stopped) and event.get("action") == "refuse":
        return RetrainOutcome(RetrainStatus.REFUSED, f"refused {ident}: {compared}", **figures)
    reason = _failure_reason(fin, limits, log_path, "gate", settings.retraining.timeout_hours)
    return RetrainOutcome(RetrainStatus.FAILED, reason, stage="gate", **figures)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ------------------------------------------------------------------------------------- one run

def maybe_retrain(settings: Settings, now: datetime | None = None, *, force: bool = False,
                  stop: threading.Event | None = None) -> RetrainOutcome:
    """Train and gate a candidate if enough new paired studies arrived; never two runs at once.

    Parameters
    ----------
    settings
        ``[retraining]`` (thresholds, limits), ``[models]`` (registry, margin), ``[storage]``.
        ``enabled`` is not consulted: it switches the schedule, not this function.
    now
        The clock (names the run folder; recorded in the state).
    force
        Train even with fewer than ``min_new_pairs`` new pairs (not with none at all).
    stop
        Set it to kill a running subprocess (default: the one :func:`unbind` sets).

    Returns
    -------
    RetrainOutcome
        Also logged (``retraining_done`` or ``retraining_skipped``), counted in
        ``neuroscribe_retraining_runs_total{outcome}``, audited, and saved as the run's outcome.json.
    """
    now = datetime.now(UTC) if now is None else now
    stop = _STOP if stop is None else stop
    cfg = settings.retraining
    home = _home(settings)
    with _exclusive(home / LOCK_FILE) as held:
        if not held:
            return _skipped("a retraining run is in progress already", 0, 0)
        state_path = home / STATE_FILE
        state = _load_state(state_path)
        pairs = read_pairs(site_manifest(settings))
        trained = set(state["trained_study_ids"])
        new = len(pairs.keys() - trained)
        PAIRS_WAITING.set(new)
        if not pairs:
            return _skipped(f"no paired studies in {site_manifest(settings)}", 0, 0)
        if new < cfg.min_new_pairs and not force:
            return _skipped(f"{new} new paired studies; {cfg.min_new_pairs} needed "
                            "([retraining] min_new_pairs)", new, len(pairs))
        started = time.monotonic()
        used: list[str] = []
        run_dir: Path | None = None
        try:
            run_dir = _new_run_dir(_runs_dir(settings), now)
            outcome, used = _train_and_gate(settings, run_dir, pairs, stop)
        except (OSError, ValueError, NeuroScribeError, subprocess.SubprocessError) as exc:
            LOG.exception("retraining_error", run_dir=str(run_dir) if run_dir else None)
            outcome = RetrainOutcome(RetrainStatus.FAILED, f"{type(exc).__name__}: {exc}", run_dir=run_dir)
        finally:
            if run_dir is not None:
                shutil.rmtree(run_dir / SERIES_DIR, ignore_errors=True)
        outcome = dataclasses.replace(outcome, new_pairs=new, total_pairs=len(pairs), run_dir=run_dir,
                                      studies=len(used) or None, seconds=round(time.monotonic() - started, 3))
        _finish(state_path, state, outcome, used, pairs, now)
        if run_dir is not None:
            _prune_runs(run_dir.parent, cfg.keep_runs, run_dir)
    return outcome


def _skipped(reason: str, new: int, total: int) -> RetrainOutcome:
    outcome = RetrainOutcome(RetrainStatus.SKIPPED, reason, new, total)
    RUNS.labels(outcome=outcome.status.value).inc()
    LOG.info("retraining_skipped", reason=reason, new_pairs=new, total_pairs=total)
    return outcome


def _new_run_dir(root: Path, now: datetime) -> Path:
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        return path
    raise NeuroScribeError(f"no free run folder name for {stamp} in {root}")


def _train_and_gate(settings: Settings, run_dir: Path, pairs: dict[str, dict[str, Any]],
                    stop: threading.Event) -> tuple[RetrainOutcome, list[str]]:
    """Snapshot, train, gate; ``(outcome, study ids used)``."""
    cfg = settings.retraining
    snapshot = run_dir / MANIFEST_FILE
    used: list[str] = []
    with atomic_file(snapshot, "w") as fh:
        for study, record in pairs.items():
            series = record.get("series_path")
            if not isinstance(series, str):
                continue
            pinned = _pin_series(Path(series), run_dir / SERIES_DIR / f"{len(used):06d}")
            if pinned is None:  # deleted meanwhile (the training store's quota)
                continue
            fh.write(json.dumps({**record, "study_id": study, "series_path": str(pinned)},
                                ensure_ascii=False) + "\n")
            used.append(study)
    if not used:
        return RetrainOutcome(RetrainStatus.FAILED, "no paired study's series folder exists any more",
                              stage="train"), []
    source, is_demo = resolve_train_config(settings)
    train_toml = _write_train_config(source, is_demo, run_dir / TRAIN_TOML)
    limits = Limits.from_settings(settings)
    deadline = time.monotonic() + cfg.timeout_hours * 3600
    log_path = run_dir / TRAIN_LOG
    LOG.info("retraining_started", run_dir=str(run_dir), studies=len(used), train_config=str(source),
             limits=dataclasses.asdict(limits))
    command = _neuroscribe("train", "--data", str(snapshot), "--out", str(run_dir), "--train-config",
                           str(train_toml), "--cache-dir", str(_home(settings) / CACHE_DIR), "--no-progress")
    fin = _run_limited(command, log_path, limits, deadline, stop, cwd=run_dir)
    common = {"log": log_path, "pid": fin.pid, "exit_code": fin.exit_code}
    if not fin.ok:
        reason = _failure_reason(fin, limits, log_path, "training", cfg.timeout_hours)
        return RetrainOutcome(RetrainStatus.FAILED, reason, stage="train", **common), used
    bundle = run_dir / BUNDLE_DIR
    if not (bundle / "manifest.json").is_file():
        return RetrainOutcome(RetrainStatus.FAILED, "training ended without a bundle (max_steps in the train "
                              "config stops a run early)", stage="train", **common), used
    return gate_and_promote(settings, bundle, snapshot, log_path=run_dir / GATE_LOG, limits=limits,
                            deadline=deadline, stop=stop), used


def _pin_series(source: Path, target: Path) -> Path | None:
    """Hard-link the files of ``source`` under ``target``; the folder to train on, or None if it is gone.

    The links keep a pair readable for the whole run even if the training store's quota deletes
    it meanwhile; they cost no space and are removed when the run ends. Where linking is not
    possible (another file system) the original folder is used as it is.
    """
    if not source.is_dir():
        return None
    try:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                link = target / path.relative_to(source)
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, link)
    except FileNotFoundError:
        shutil.rmtree(target, ignore_errors=True)
        return source if source.is_dir() else None
    except OSError:  # EXDEV, EPERM: no hard links here
        shutil.rmtree(target, ignore_errors=True)
        return source
    return target


def _write_train_config(source: Path, is_demo: bool, target: Path) -> Path:
    """Copy the training TOML into the run folder; the demo's is relabelled (site data, not phantoms)."""
    text = source.read_text(encoding="utf-8")
    if is_demo:
        data = tomllib.loads(text)
        data.update(synthetic=False, name=SITE_MODEL_NAME)
        header = "# [retraining] default: models/demo/train.toml, relabelled for site data\n"
        text = header + _toml_dumps(data)
        if tomllib.loads(text) != data:
            raise ValueError(f"could not rewrite {source} as TOML faithfully; set [retraining] train_config")
    with atomic_file(target, "w") as fh:
        fh.write(text)
    return target


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ValueError(f"cannot write {type(value).__name__} values as TOML")


def _toml_dumps(data: dict[str, Any]) -> str:
    """TOML for a training config: root keys, then one table per dict value (inline tables below)."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{json.dumps(key)}]"]
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _finish(state_path: Path, state: dict[str, Any], outcome: RetrainOutcome, used: list[str],
            pairs: dict[str, dict[str, Any]], now: datetime) -> None:
    """State, outcome.json, metrics, audit, the summary log line."""
    state["runs"] = int(state.get("runs", 0)) + 1
    state["last_run"] = {"at": now.isoformat(timespec="seconds"), **outcome.to_dict()}
    if outcome.status in (RetrainStatus.PROMOTED, RetrainStatus.REFUSED):
        state["trained_study_ids"] = sorted(used)
        state["trained_at"] = now.isoformat(timespec="seconds")
        state["consecutive_failures"] = 0
    else:
        state["consecutive_failures"] = int(state.get("consecutive_failures", 0)) + 1
    _save_state(state_path, state)
    if outcome.run_dir is not None and outcome.run_dir.is_dir():
        with atomic_file(outcome.run_dir / OUTCOME_FILE, "w") as fh:
            json.dump(outcome.to_dict(), fh, indent=2)
            fh.write("\n")
    PAIRS_WAITING.set(len(pairs.keys() - set(state["trained_study_ids"])))
    RUNS.labels(outcome=outcome.status.value).inc()
    if outcome.seconds is not None:
        LAST_RUN_SECONDS.set(outcome.seconds)
    audit_outcome = {RetrainStatus.PROMOTED: "success", RetrainStatus.REFUSED: "refused"}.get(
        outcome.status, "failure")
    summary = {("child_pid" if k == "pid" else k): v for k, v in outcome.to_dict().items()
               if v is not None and k not in ("status", "reason")}
    _audit("retraining", audit_outcome, result=outcome.status.value, reason=outcome.reason, **summary)
    log = LOG.warning if outcome.status is RetrainStatus.FAILED else LOG.info
    log("retraining_done", status=outcome.status.value, reason=outcome.reason,
        consecutive_failures=state["consecutive_failures"], **summary)


def _audit(event: str, outcome: str, **fields: Any) -> None:
    """An audit event; a trail that cannot be written is logged, never fatal here."""
    try:
        audit.record(event, outcome, **fields)
    except OSError as exc:
        LOG.warning("audit_write_failed", audit_event=event, error=str(exc))


def _prune_runs(root: Path, keep: int, current: Path) -> None:
    """Delete all but the newest ``keep`` run folders (names sort by time)."""
    runs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in runs[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
            LOG.info("retraining_run_pruned", run_dir=str(old))


# ------------------------------------------------------------------------------------- the scheduler job

_STOP = threading.Event()
_bound: Settings | None = None


def bind(settings: Settings) -> None:
    """Give the scheduled job the service's settings (call at start, before the scheduler resumes)."""
    global _bound
    _bound = settings
    _STOP.clear()


def unbind() -> None:
    """Forget the settings and stop a running subprocess (call at shutdown, before the scheduler's)."""
    global _bound
    _bound = None
    _STOP.set()


def scheduled_check() -> None:
    """The scheduler job (:data:`JOB_FUNC`): :func:`maybe_retrain` with the bound settings."""
    settings = _bound
    if settings is None:
        LOG.warning("retraining_job_unbound", hint="the job fired in a process that did not call bind()")
        return
    maybe_retrain(settings)


def schedule(scheduler: JobScheduler, settings: Settings) -> bool:
    """Bind ``settings``; add the job if ``[retraining] enabled``, else remove a stored one; True if added.

    Raises :class:`ConfigError` when retraining is enabled without a usable training TOML.
    """
    bind(settings)
    if not settings.retraining.enabled:
        scheduler.remove_job(JOB_ID)
        return False
    resolve_train_config(settings)
    scheduler.add_interval_job(JOB_ID, JOB_FUNC, settings.retraining.check_every_hours * 3600)
    try:
        pairs_waiting(settings)  # the gauge from the start, not only after the first check
    except (OSError, NeuroScribeError) as exc:
        LOG.warning("retraining_state_unreadable", error=str(exc))
    return True
