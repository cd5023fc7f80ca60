"""The report job state machine (store/jobs.py): every transition once, in order, whatever repeats."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuroscribe.store import (
    Database,
    Destination,
    DestinationKind,
    InstanceRecord,
    JobState,
    JobStore,
    OutboxState,
    OutboxStore,
    ReportRecord,
    SeriesState,
    StateStore,
    accession_key,
)
from tests.conftest import logging_restored


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'state.sqlite3'}")
    yield database
    database.close()


def selected_series(db: Database, uid: str, now: float = 10.0) -> None:
    """Record one instance of series ``uid`` and take it through COMPLETE to SELECTED."""
    store = StateStore(db)
    store.record_instance(InstanceRecord(
        sop_instance_uid=f"{uid}.1", series_instance_uid=uid, study_instance_uid=f"{uid}.0",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=Path(f"/spool/{uid}/1.dcm"), size_bytes=10, received_at=now, calling_ae="CT1", header={},
    ))
    (row,) = store.complete_quiet_series(now + 5, quiet_seconds=1, force_complete_seconds=100)
    assert store.decide_series(uid, row.revision, SeriesState.SELECTED, now + 5)


def add_report(db: Database, report_id: str, destinations: list[Destination]) -> None:
    record = ReportRecord(report_id=report_id, study_instance_uid="1.0", series_instance_uid="1",
                          sr_sop_instance_uid=f"2.25.{len(report_id)}{ord(report_id[-1])}",
                          sr_series_instance_uid="2.25.9", control_id=None, model_name="m",
                          model_version="1", created_at=0.0, sr_file="x/sr.dcm", sr_sha256="0" * 64,
                          er7_file=None, er7_sha256=None)
    OutboxStore(db).add_report(record, destinations, 0.0)


def test_a_selected_series_gets_one_job_however_often_it_is_queued(db: Database) -> None:
    selected_series(db, "1.2.3")
    jobs = JobStore(db)
    (job,) = jobs.queue_selected(20.0)
    assert (job.state, job.revision, job.last_instance_at, job.attempts) == (JobState.QUEUED, 1, 10.0, 0)
    assert jobs.queue_selected(21.0) == []
    assert len(jobs.jobs()) == 1


def test_claim_report_and_follow_the_deliveries_to_delivered(db: Database) -> None:
    selected_series(db, "1.2.3")
    jobs = JobStore(db)
    jobs.queue_selected(20.0)
    job = jobs.claim("w1", 21.0)
    assert job is not None and (job.state, job.attempts, job.worker) == (JobState.INFERRING, 1, "w1")
    assert jobs.claim("w2", 21.0) is None  # nothing else queued

    pacs, ris = Destination(DestinationKind.PACS, "p"), Destination(DestinationKind.RIS, "r")
    add_report(db, "R1", [pacs, ris])
    assert jobs.mark_reported(job.job_id, report_id="R1", accession_hash=accession_key(" ACC1 "),
                              model_id="bundle", inference_seconds=1.5, now=22.0)
    assert not jobs.mark_reported(job.job_id, report_id="R1", accession_hash=None, model_id="bundle",
                                  inference_seconds=1.0, now=23.0)  # once only
    assert jobs.sync_deliveries(23.0) == []  # nothing tried yet: still reported

    outbox = OutboxStore(db)
    items = {i.destination: i for i in outbox.items()}
    outbox.record_attempt(items[pacs].item_id, state=OutboxState.DELIVERED, outcome="delivered", reason="ok",
                          now=24.0)
    outbox.record_attempt(items[ris].item_id, state=OutboxState.PENDING, outcome="retry", reason="down",
                          now=24.0, next_attempt_at=30.0)
    assert [(j.job_id, s) for j, s in jobs.sync_deliveries(25.0)] == [(job.job_id, JobState.DELIVERING)]
    outbox.record_attempt(items[ris].item_id, state=OutboxState.DELIVERED, outcome="delivered", reason="AA",
                          now=31.0)
    assert [s for _, s in jobs.sync_deliveries(32.0)] == [JobState.DELIVERED]
    assert jobs.sync_deliveries(33.0) == []
    done = jobs.job(job.job_id)
    assert done is not None and done.state == JobState.DELIVERED and done.finished_at == 32.0
    assert done.accession_hash == accession_key("ACC1") and "ACC1" not in done.accession_hash
    assert jobs.jobs(accession_hash=accession_key("ACC1")) == [done]


def test_a_dead_delivery_makes_the_job_dead_and_no_destinations_make_it_delivered(db: Database) -> None:
    jobs = JobStore(db)
    for uid, report_id, destinations in (("1.1", "RA", [Destination(DestinationKind.PACS, "p")]),
                                         ("1.2", "RB", [])):
        selected_series(db, uid)
        jobs.queue_selected(20.0)
        job = jobs.claim("w", 21.0)
        assert job is not None
        add_report(db, report_id, destinations)
        jobs.mark_reported(job.job_id, report_id=report_id, accession_hash=None, model_id="b",
                           inference_seconds=None, now=22.0)
    outbox = OutboxStore(db)
    (item,) = outbox.items()
    outbox.record_attempt(item.item_id, state=OutboxState.DEAD, outcome="dead", reason="refused", now=23.0)
    moved = {j.report_id: s for j, s in jobs.sync_deliveries(24.0)}
    assert moved == {"RA": JobState.DEAD, "RB": JobState.DELIVERED}
    assert {j.report_id: j.reason for j in jobs.jobs()}["RB"] == "no destinations configured"


def test_failures_retry_until_max_attempts_then_fail(db: Database) -> None:
    selected_series(db, "1.2.3")
    jobs = JobStore(db)
    jobs.queue_selected(20.0)
    for attempt in (1, 2):
        job = jobs.claim("w", 21.0)
        assert job is not None and job.attempts == attempt
        assert jobs.mark_failed(job.job_id, "the worker died", 22.0, max_attempts=3) == JobState.QUEUED
    job = jobs.claim("w", 23.0)
    assert job is not None
    assert jobs.mark_failed(job.job_id, "the worker died", 24.0, max_attempts=3) == JobState.FAILED
    assert jobs.mark_failed(job.job_id, "again", 25.0, max_attempts=3) is None  # not inferring any more
    assert jobs.claim("w", 26.0) is None
    assert jobs.requeue_failed([job.job_id], 27.0) == 1
    again = jobs.claim("w", 28.0)
    assert again is not None and again.attempts == 1


def test_a_restart_requeues_inferring_jobs_and_a_late_instance_supersedes(db: Database) -> None:
    selected_series(db, "1.2.3")
    jobs = JobStore(db)
    jobs.queue_selected(20.0)
    job = jobs.claim("old-worker", 21.0)
    assert job is not None
    assert jobs.requeue_inferring(22.0, worker="someone-else") == 0
    assert jobs.requeue_inferring(22.0) == 1
    job = jobs.claim("new-worker", 23.0)
    assert job is not None and job.attempts == 2 and jobs.is_current(job)

    StateStore(db).record_instance(InstanceRecord(  # a late instance: revision 2, RECEIVING again
        sop_instance_uid="1.2.3.2", series_instance_uid="1.2.3", study_instance_uid="1.2.3.0",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=Path("/spool/1.2.3/2.dcm"), size_bytes=10, received_at=24.0, calling_ae="CT1", header={},
    ))
    assert not jobs.is_current(job)
    assert jobs.supersede(job.job_id, 25.0)
    assert not jobs.supersede(job.job_id, 26.0)
    assert jobs.counts()[JobState.SUPERSEDED] == 1


def test_jobs_command_lists_hashed_series_and_retries_failed_jobs(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``neuroscribe jobs list`` shows no UID in clear; ``retry`` queues failed jobs and refuses others."""
    from neuroscribe.cli import main
    from neuroscribe.log import hash_uid

    selected_series(db, "1.2.826.99.7")
    jobs = JobStore(db)
    (job,) = jobs.queue_selected(20.0)
    claimed = jobs.claim("w", 21.0)
    assert claimed is not None
    jobs.mark_failed(job.job_id, "file #3: Pixel Data cannot be decoded", 22.0, max_attempts=1)
    monkeypatch.setenv("NEUROSCRIBE_STORAGE__ROOT", str(tmp_path))
    with logging_restored():
        assert main(["jobs", "list"]) == 0
        out = capsys.readouterr().out
        assert job.job_id in out and "failed" in out and hash_uid("1.2.826.99.7") in out
        assert "1.2.826.99.7" not in out and "cannot be decoded" in out
        assert main(["jobs", "list", "--json", "--state", "failed"]) == 0
        (listed,) = json.loads(capsys.readouterr().out)
        assert listed["series_instance_uid"] == hash_uid("1.2.826.99.7")
        assert main(["jobs", "retry", job.job_id, "job-unknown"]) == 1
        out = capsys.readouterr().out
    assert f"queued {job.job_id}" in out and "unchanged job-unknown" in out
    assert jobs.counts()[JobState.QUEUED] == 1
