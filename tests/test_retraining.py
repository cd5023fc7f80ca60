"""Scheduled retraining: threshold, limited subprocess, gate, promotion, timeout; the persistent scheduler."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from prometheus_client import REGISTRY

from neuroscribe import audit
from neuroscribe.config import Settings, load_settings
from neuroscribe.daemon import retraining
from neuroscribe.daemon.retraining import RetrainStatus, maybe_retrain, read_pairs
from neuroscribe.daemon.scheduler import JOBS_TABLE, JobScheduler, SchedulerError
from neuroscribe.errors import ConfigError
from neuroscribe.training.registry import Registry

pytest.importorskip("torch")  # the subprocess trains

#: Test-sized training: 8 x 32 x 32 inputs, a 1-layer decoder of width 32, one epoch (a few steps).
TINY_TOML = """
slices = 8
height = 32
width = 32
epochs = 1
batch_size = 8
vocab_size = 300
checkpoint_every = 100
max_new_tokens = 16
eval_batch_size = 16
val_limit = 4
test_fraction = 0.2
captioning = false
threads = 1
warmup_steps = 1
name = "retrain-test"
version = "0.0.1"

[model]
vision_width = 8
vision_depth = 3
d_vision = 32
max_slices = 8
num_latents = 4
vision_pool = 2
resampler_layers = 1
resampler_heads = 2
n_layer = 1
n_embd = 32
n_head = 2
n_positions = 1024
"""
N_STUDIES = 24
GIB = 1024**3


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic paired studies as the site-data export writes them: ``manifest.jsonl`` + series."""
    from neuroscribe.training.synth import generate_dataset

    folder = tmp_path_factory.mktemp("site-data")
    records = generate_dataset(folder, N_STUDIES, 7, "standard", "small", rows=32, columns=32, slices=8)
    with (folder / "manifest.jsonl").open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps({"study_id": r["study_instance_uid"], "patient_id": r["patient_id"],
                                 "series_path": r["series_path"], "report": r["report"]}) + "\n")
    return folder


@pytest.fixture(scope="module")
def train_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny training settings."""
    path = tmp_path_factory.mktemp("cfg") / "train.toml"
    path.write_text(TINY_TOML, encoding="utf-8")
    return path


def make_settings(root: Path, site: Path, train_toml: Path, margin: float = 0.0, **retrain: Any) -> Settings:
    """Settings with their own storage root (state, runs, registry) on the shared site data."""
    section = {"min_new_pairs": N_STUDIES, "train_config": str(train_toml), "memory_limit_bytes": 8 * GIB,
               "cpu_nice": 5, "timeout_hours": 0.1, **retrain}
    return load_settings(storage={"root": str(root)}, learning={"site_data_dir": str(site)},
                         models={"promotion_margin": margin}, retraining=section)


def metric(name: str, **labels: str) -> float:
    """A sample of the default Prometheus registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def promoted(site: Path, train_toml: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[Settings, retraining.RetrainOutcome, Path, float]]:
    """One retraining run at the threshold on an empty registry, with the audit trail recorded."""
    root = tmp_path_factory.mktemp("promoted")
    settings = make_settings(root, site, train_toml, cpu_limit_seconds=900)
    trail, previous = root / "audit.jsonl", audit.path()
    audit.configure(trail)
    before = metric("neuroscribe_model_promotions_total")
    try:
        started = time.monotonic()
        outcome = maybe_retrain(settings, datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))
        print(f"train + gate run: {time.monotonic() - started:.1f} s")
    finally:
        audit.configure(previous)
    yield settings, outcome, trail, before


def test_below_the_threshold_nothing_is_started(site: Path, train_toml: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer new pairs than min_new_pairs: skipped, no subprocess, no run folder; the gauge counts them."""
    def no_subprocess(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a subprocess was started")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    skipped_before = metric("neuroscribe_retraining_runs_total", outcome="skipped")
    outcome = maybe_retrain(make_settings(tmp_path, site, train_toml, min_new_pairs=N_STUDIES + 1))
    assert outcome.status == RetrainStatus.SKIPPED
    assert (outcome.new_pairs, outcome.total_pairs) == (N_STUDIES, N_STUDIES)
    assert f"{N_STUDIES} new paired studies; {N_STUDIES + 1} needed" in outcome.reason
    assert not (tmp_path / "retraining" / "runs").exists()
    assert skipped_before + 1 == metric("neuroscribe_retraining_runs_total", outcome="skipped")
    assert metric("neuroscribe_retraining_pairs_waiting") == N_STUDIES


def test_a_run_in_progress_elsewhere_is_skipped(site: Path, train_toml: Path, tmp_path: Path) -> None:
    """While another process holds the retraining lock, a check is skipped at once."""
    lock = tmp_path / "retraining" / ".lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(["flock", str(lock), "sleep", "30"]) if _has_flock() else None
    try:
        if holder is None:  # same process, another open file: flock conflicts just the same
            fh = lock.open("a")
            fcntl.flock(fh, fcntl.LOCK_EX)
        else:
            _wait_for(lambda: _locked(lock))
        outcome = maybe_retrain(make_settings(tmp_path, site, train_toml, min_new_pairs=1))
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        else:
            fh.close()
    assert outcome.status == RetrainStatus.SKIPPED
    assert "in progress already" in outcome.reason


def test_enough_pairs_train_in_a_limited_subprocess_and_promote_the_first_model(promoted) -> None:
    """At the threshold a child under the limits trains; the empty registry takes the model; all recorded."""
    settings, outcome, trail, promotions_before = promoted
    assert outcome.status == RetrainStatus.PROMOTED, (outcome, _tail(outcome.log))
    run_dir = outcome.run_dir
    assert run_dir is not None and run_dir.name == "20250102T030405Z"
    registry = Registry(settings.storage.models_dir)
    assert outcome.bundle is not None and registry.current_id() == outcome.bundle
    assert outcome.current_f1 is None and outcome.heldout == "none"
    assert (outcome.new_pairs, outcome.total_pairs, outcome.studies) == (N_STUDIES, N_STUDIES, N_STUDIES)

    limits = json.loads((run_dir / "train.log").read_text().splitlines()[0])
    assert limits["event"] == "resource_limits"
    assert limits["pid"] != os.getpid() and limits["pid"] == limits["pgid"]
    assert limits["rlimit_data"] == [8 * GIB, 8 * GIB]
    assert limits["rlimit_cpu"][0] == 900
    assert min(19, os.nice(0) + 5) == limits["nice"]
    assert "train" in limits["command"]
    gate = json.loads((run_dir / "gate.log").read_text().splitlines()[0])
    assert "promote" in gate["command"] and outcome.pid == gate["pid"]

    snapshot = [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(snapshot) == N_STUDIES
    assert all(Path(r["series_path"]).parent == run_dir / "series" for r in snapshot)
    assert not (run_dir / "series").exists()  # the hard links are gone with the run
    state = json.loads((settings.storage.root / "retraining" / "state.json").read_text())
    assert sorted(r["study_id"] for r in snapshot) == state["trained_study_ids"]
    assert json.loads((run_dir / "outcome.json").read_text())["status"] == "promoted"

    events = [json.loads(line) for line in trail.read_text().splitlines()]
    assert [e["event"] for e in events] == ["model_promoted", "retraining"]
    assert outcome.bundle == events[0]["bundle"] and events[1]["outcome"] == "success"
    assert (os.getpid(), outcome.pid) == (events[1]["pid"], events[1]["child_pid"])
    assert promotions_before + 1 == metric("neuroscribe_model_promotions_total")

    again = maybe_retrain(settings)
    assert again.status == RetrainStatus.SKIPPED and again.new_pairs == 0


def test_a_candidate_within_the_margin_is_refused_with_both_figures(promoted, site: Path,
                                                                    train_toml: Path) -> None:
    """A forced run with margin 1.0 is refused: the current model stays, and both figures are given."""
    settings, first, _trail, _ = promoted
    strict = make_settings(settings.storage.root, site, train_toml, margin=1.0)
    registry = Registry(strict.storage.models_dir)
    current = registry.current_id()
    outcome = maybe_retrain(strict, force=True)
    assert outcome.status == RetrainStatus.REFUSED, (outcome, _tail(outcome.log))
    assert current == registry.current_id() == first.bundle != outcome.bundle
    assert outcome.candidate_f1 is not None and outcome.current_f1 is not None
    assert outcome.margin == 1.0 and outcome.heldout.startswith("data:")
    assert f"{outcome.candidate_f1:.4f}" in outcome.reason and f"{outcome.current_f1:.4f}" in outcome.reason
    event = registry.history()[-1]
    assert ("refuse", outcome.bundle) == (event["action"], event["bundle"])
    assert (outcome.candidate_f1, outcome.current_f1) == (event["candidate_f1"], event["current_f1"])


def test_the_cpu_limit_fails_the_run_with_a_clear_reason(site: Path, train_toml: Path,
                                                         tmp_path: Path) -> None:
    """RLIMIT_CPU of 1 s: the child gets SIGXCPU; the outcome says resource limit, nothing is promoted."""
    settings = make_settings(tmp_path, site, train_toml, cpu_limit_seconds=1)
    outcome = maybe_retrain(settings)
    assert outcome.status == RetrainStatus.FAILED, outcome
    assert outcome.reason.startswith("resource limit: CPU time (1 s"), outcome.reason
    assert outcome.stage == "train" and outcome.log == outcome.run_dir / "train.log"
    assert Registry(settings.storage.models_dir).current_id() is None
    state = json.loads((tmp_path / "retraining" / "state.json").read_text())
    assert state["trained_study_ids"] == [] and state["consecutive_failures"] == 1
    assert metric("neuroscribe_retraining_pairs_waiting") == N_STUDIES


def test_the_memory_limit_fails_the_run_with_a_clear_reason(site: Path, train_toml: Path,
                                                            tmp_path: Path) -> None:
    """RLIMIT_DATA of 400 MB: torch cannot allocate; the outcome says resource limit: memory."""
    outcome = maybe_retrain(make_settings(tmp_path, site, train_toml, memory_limit_bytes=400_000_000))
    assert outcome.status == RetrainStatus.FAILED
    assert outcome.reason.startswith("resource limit: memory (400000000 bytes"), outcome.reason


def test_the_wall_clock_timeout_kills_the_process_group(site: Path, train_toml: Path, tmp_path: Path) -> None:
    """A run still going after timeout_hours is killed with its process group and reported as a timeout."""
    settings = make_settings(tmp_path, site, train_toml, timeout_hours=2 / 3600)
    started = time.monotonic()
    outcome = maybe_retrain(settings)
    assert outcome.status == RetrainStatus.FAILED
    assert outcome.reason.startswith("timeout: training still running after"), outcome.reason
    assert time.monotonic() - started < 20
    with pytest.raises(ProcessLookupError):
        os.killpg(outcome.pid, 0)


def test_stopping_the_service_stops_a_running_run(site: Path, train_toml: Path, tmp_path: Path) -> None:
    """Setting the stop event (``unbind`` at shutdown) kills the child at once."""
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    outcome = maybe_retrain(make_settings(tmp_path, site, train_toml), stop=stop)
    assert outcome.status == RetrainStatus.FAILED
    assert "stopped: the service is shutting down" in outcome.reason


@pytest.mark.slow
def test_neuroscribe_retrain_trains_and_promotes_under_the_units_seccomp_filters(
        site: Path, train_toml: Path, tmp_path: Path) -> None:
    """Under the unit's filters (W^X memory, system call allow-list) the limits apply and training runs."""
    import ctypes.util

    from tests.test_systemd import LAUNCHER, seccomp_spec

    if ctypes.util.find_library("seccomp") is None:
        pytest.fail("libseccomp not found: it comes with the systemd package that ./run test needs")
    env = {**os.environ, "NEUROSCRIBE_STORAGE__ROOT": str(tmp_path),
           "NEUROSCRIBE_LEARNING__SITE_DATA_DIR": str(site),
           "NEUROSCRIBE_RETRAINING__TRAIN_CONFIG": str(train_toml),
           "NEUROSCRIBE_RETRAINING__CPU_LIMIT_SECONDS": "600",
           "NEUROSCRIBE_RETRAINING__MIN_NEW_PAIRS": str(N_STUDIES), "NEUROSCRIBE_LOGGING__FORMAT": "console"}
    command = [sys.executable, "-m", "neuroscribe", "retrain", "--json"]
    result = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(seccomp_spec()), "--", *command],
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    outcome = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert result.returncode == 0 and outcome["status"] == "promoted", (result.stderr,
                                                                        _tail(Path(outcome["log"])))
    log = (Path(outcome["run_dir"]) / "train.log").read_text()
    assert json.loads(log.splitlines()[0])["rlimit_cpu"][0] == 600
    assert "W^X enforced" in log
    assert Registry(tmp_path / "models").current_id() == outcome["bundle"]


def test_read_pairs_counts_complete_lines_and_keeps_the_latest(tmp_path: Path) -> None:
    """A half-written line is not counted; a repeated study counts once (its last line); paths absolute."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"study_id": "a", "series_path": "s1", "report": "r1"}\n'
                        '{"study_id": "b", "series_path": "/abs/s2", "report": "r2"}\n'
                        '{"study_id": "a", "series_path": "s3", "report": "corrected"}\n'
                        '{"study_id": "c", "series_pa')
    pairs = read_pairs(manifest)
    assert list(pairs) == ["b", "a"]
    assert ("corrected", str(tmp_path / "s3")) == (pairs["a"]["report"], pairs["a"]["series_path"])
    assert pairs["b"]["series_path"] == "/abs/s2"
    assert read_pairs(tmp_path / "absent.jsonl") == {}


def test_pinned_series_survive_the_deletion_of_the_pair(tmp_path: Path) -> None:
    """A run's hard links keep a series readable after the training store deleted the pair."""
    source = tmp_path / "pair" / "series"
    source.mkdir(parents=True)
    (source / "1.dcm").write_bytes(b"one")
    pinned = retraining._pin_series(source, tmp_path / "run" / "series" / "000000")
    assert pinned == tmp_path / "run" / "series" / "000000"
    shutil.rmtree(tmp_path / "pair")
    assert (pinned / "1.dcm").read_bytes() == b"one"
    assert retraining._pin_series(source, tmp_path / "run" / "series" / "000001") is None


def test_the_demo_train_config_is_relabelled_for_site_data(tmp_path: Path) -> None:
    """Without [retraining] train_config the demo's settings are used, marked as trained on site data."""
    demo = retraining.demo_train_config()
    if demo is None:
        pytest.skip("not a source checkout")
    source, is_demo = retraining.resolve_train_config(load_settings())
    assert (demo, True) == (source, is_demo)
    written = retraining._write_train_config(demo, True, tmp_path / "train.toml")
    original = tomllib.loads(demo.read_text())
    relabelled = tomllib.loads(written.read_text())
    assert {**original, "synthetic": False, "name": retraining.SITE_MODEL_NAME} == relabelled


def test_settings_refuse_a_missing_train_config_and_a_zero_interval(tmp_path: Path) -> None:
    """Bad [retraining] values stop the start with the key named."""
    with pytest.raises(ConfigError, match="retraining"):
        load_settings(retraining={"enabled": True, "train_config": str(tmp_path / "absent.toml")})
    with pytest.raises(ConfigError, match=r"retraining\.check_every_hours"):
        load_settings(retraining={"check_every_hours": 0})


# ------------------------------------------------------------------------------------- the scheduler

def tick(path: str) -> None:
    """A job for the scheduler tests: append a line."""
    with Path(path).open("a") as fh:
        fh.write("tick\n")


def test_jobs_persist_in_the_state_database_once_across_restarts(tmp_path: Path) -> None:
    """A job added at each start is stored once, and a restart keeps its next run time."""
    url = f"sqlite:///{tmp_path / 'state.sqlite3'}"
    first = JobScheduler(url)
    first.start(paused=True)
    next_run = first.add_interval_job("tick", "tests.test_retraining:tick", 3600, args=(str(tmp_path / "t"),))
    first.shutdown()
    second = JobScheduler(url)
    second.start(paused=True)
    try:
        assert [job["id"] for job in second.jobs()] == ["tick"]
        again = second.add_interval_job("tick", "tests.test_retraining:tick", 3600,
                                        args=(str(tmp_path / "t"),))
        assert next_run == again
        jobs = second.jobs()
        assert len(jobs) == 1 and jobs[0]["func"] == "tests.test_retraining:tick"
        assert jobs[0]["interval_seconds"] == 3600
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            query = f"SELECT id FROM {JOBS_TABLE}"  # noqa: S608 (a constant)
            rows = conn.execute(sqlalchemy.text(query)).all()
        engine.dispose()
        assert [tuple(r) for r in rows] == [("tick",)]
        assert second.remove_job("tick") and not second.remove_job("tick")
        with pytest.raises(SchedulerError, match="textual reference"):
            second.add_interval_job("bad", "not_a_reference", 10)
    finally:
        second.shutdown()


def test_an_interval_job_runs(tmp_path: Path) -> None:
    """A started scheduler runs an interval job, repeatedly; ``run_now`` runs one at once."""
    scheduler = JobScheduler(f"sqlite:///{tmp_path / 'state.sqlite3'}")
    scheduler.start(paused=True)
    out = tmp_path / "ticks"
    try:
        scheduler.add_interval_job("tick", "tests.test_retraining:tick", 0.3, args=(str(out),),
                                   first_run=datetime.now(UTC) + timedelta(seconds=0.1))
        scheduler.resume()
        _wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, timeout=10)
        hourly = tmp_path / "hourly"
        scheduler.add_interval_job("hourly", "tests.test_retraining:tick", 3600, args=(str(hourly),))
        scheduler.run_now("hourly")
        _wait_for(hourly.exists, timeout=10)
    finally:
        scheduler.shutdown()


def test_schedule_adds_the_retraining_job_only_when_enabled(site: Path, train_toml: Path,
                                                            tmp_path: Path) -> None:
    """Enabled: one job every check_every_hours; disabled: the stored job is removed; unbound: a no-op."""
    scheduler = JobScheduler(f"sqlite:///{tmp_path / 'state.sqlite3'}")
    scheduler.start(paused=True)
    try:
        enabled = make_settings(tmp_path, site, train_toml, enabled=True, check_every_hours=6)
        assert retraining.schedule(scheduler, enabled)
        jobs = [(j["id"], j["func"], j["interval_seconds"]) for j in scheduler.jobs()]
        assert jobs == [(retraining.JOB_ID, retraining.JOB_FUNC, 6 * 3600.0)]
        assert not retraining.schedule(scheduler, make_settings(tmp_path, site, train_toml))
        assert scheduler.jobs() == []
    finally:
        retraining.unbind()
        scheduler.shutdown()
    retraining.scheduled_check()  # unbound: logs a warning, starts nothing
    assert not (tmp_path / "retraining" / "runs").exists()


# ------------------------------------------------------------------------------------- helpers

def _has_flock() -> bool:
    return subprocess.run(["sh", "-c", "command -v flock"], capture_output=True, check=False).returncode == 0


def _locked(path: Path) -> bool:
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _tail(path: Path | None) -> str:
    return "" if path is None or not path.exists() else path.read_text()[-3000:]
