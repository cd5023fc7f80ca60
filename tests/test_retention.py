"""Retention: spool files purged after delivery (injected clock), the training store kept under its quota."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from neuroscribe.config import Settings
from neuroscribe.daemon.retention import enforce_quota, purge_spool, run_retention
from neuroscribe.dicom_io.spool import Spool
from neuroscribe.reporting.final_reports import FinalReportIntake, PairOutcome
from neuroscribe.reporting.site_data import count_pairs, manifest_path
from neuroscribe.store import (
    Database,
    FinalReportState,
    FinalReportStore,
    InstanceRecord,
    JobState,
    SeriesState,
    StateStore,
)
from neuroscribe.store.site import SpoolRetentionStore
from tests.site_helpers import final_oru, learning_settings, small_spec, store_series

HOUR = 3600.0
NOW = 1_800_000_000.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Defaults: spool purged 72 h after delivery, rejected series after 24 h."""
    return learning_settings(tmp_path)


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    """The state database of ``settings``."""
    database = Database(settings.storage.resolved_database_url)
    yield database
    database.close()


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class TestPurgeSpool:
    def test_delivered_series_is_purged_after_its_time_and_not_before(self, settings: Settings,
                                                                       db: Database) -> None:
        """71 h after delivery nothing happens; at 73 h files, folder and instance rows go, the rest stays."""
        stored = store_series(settings, db, small_spec(), NOW)
        state = StateStore(db)
        purged = _metric("neuroscribe_spool_purged_series_total", reason="delivered")
        size = sum(path.stat().st_size for path in stored.paths)
        assert purge_spool(settings, db, NOW + 71 * HOUR)["series"] == 0
        assert all(path.exists() for path in stored.paths)
        counts = purge_spool(settings, db, NOW + 73 * HOUR)
        assert counts == {"series": 1, "files": len(stored.paths), "bytes": size}
        assert not any(path.exists() for path in stored.paths)
        assert not stored.paths[0].parent.exists()
        assert state.instance_paths(stored.spec.series_instance_uid) == []
        row = state.series_row(stored.spec.series_instance_uid)
        assert row is not None and row.state is SeriesState.SELECTED and row.instance_count == 0
        (purge,) = SpoolRetentionStore(db).purges()
        assert (purge["reason"], purge["files"]) == ("job delivered", len(stored.paths))
        assert _metric("neuroscribe_spool_purged_series_total", reason="delivered") == purged + 1
        assert purge_spool(settings, db, NOW + 100 * HOUR)["series"] == 0  # nothing left to do

    def test_rejected_series_is_purged_after_its_own_time(self, settings: Settings, db: Database) -> None:
        """A series not reported on goes purge_rejected_after_hours after the decision."""
        stored = store_series(settings, db, small_spec(), NOW, rejected=True)
        assert purge_spool(settings, db, NOW + 23 * HOUR)["series"] == 0
        assert purge_spool(settings, db, NOW + 25 * HOUR)["series"] == 1
        assert not any(path.exists() for path in stored.paths)

    def test_series_whose_job_is_not_finished_is_kept(self, settings: Settings, db: Database) -> None:
        """Inferring or reported (not yet delivered) series are never purged."""
        inferring = store_series(settings, db, small_spec(), NOW, job=JobState.INFERRING)
        reported = store_series(settings, db, small_spec(), NOW, job=JobState.REPORTED)
        assert purge_spool(settings, db, NOW + 1000 * HOUR)["series"] == 0
        assert all(p.exists() for p in [*inferring.paths, *reported.paths])

    def test_series_reopened_by_a_late_instance_is_kept(self, settings: Settings, db: Database) -> None:
        """A late instance makes the series RECEIVING again (a new revision): nothing is purged."""
        stored = store_series(settings, db, small_spec(), NOW)
        late = stored.paths[0].with_name("LATE.dcm")
        late.write_bytes(stored.paths[0].read_bytes())
        StateStore(db).record_instance(InstanceRecord(
            sop_instance_uid="1.2.3.999", series_instance_uid=stored.spec.series_instance_uid,
            study_instance_uid=stored.spec.study_instance_uid, sop_class_uid=stored.spec.sop_class_uid,
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=late, size_bytes=late.stat().st_size,
            received_at=NOW + 72 * HOUR, calling_ae="SCANNER1", header={}))
        assert purge_spool(settings, db, NOW + 73 * HOUR)["series"] == 0
        assert all(path.exists() for path in stored.paths)

    def test_interrupted_purge_is_finished_by_the_next_pass(self, settings: Settings, db: Database) -> None:
        """Files already gone (a crash before the rows were deleted) are fine: the next pass ends it."""
        stored = store_series(settings, db, small_spec(), NOW)
        stored.paths[0].unlink()
        counts = purge_spool(settings, db, NOW + 73 * HOUR)
        assert counts["series"] == 1 and counts["files"] == len(stored.paths) - 1
        assert StateStore(db).instance_paths(stored.spec.series_instance_uid) == []

    def test_spool_recreates_a_purged_series_folder(self, settings: Settings) -> None:
        """A late instance for a series whose folder retention removed is still stored."""
        spool = Spool(settings.storage.spool_dir, settings.storage.incoming_dir)
        spool.prepare()
        partial = settings.storage.incoming_dir / "a.part"
        partial.write_bytes(b"first")
        first = spool.commit(partial, "1.2.3", "1.2.3.1")  # the spool now knows the folder
        first.unlink()
        first.parent.rmdir()  # what purge_spool does to an emptied series folder
        partial.write_bytes(b"late")
        assert spool.commit(partial, "1.2.3", "1.2.3.2").read_bytes() == b"late"

    def test_final_report_after_the_purge_is_discarded(self, settings: Settings, db: Database) -> None:
        """Retention wins: a final report for a purged series is given up as series_purged."""
        store_series(settings, db, small_spec(), NOW)
        purge_spool(settings, db, NOW + 73 * HOUR)
        intake = FinalReportIntake(settings, db, clock=lambda: NOW + 74 * HOUR)
        answer = intake.receive(final_oru("RIS0100"))
        assert answer.final_report_id is not None
        assert intake.pair(answer.final_report_id) is PairOutcome.DISCARDED
        (row,) = FinalReportStore(db).rows()
        assert (row.reason or "").startswith("series_purged")

    def test_disabled_retention_purges_nothing(self, tmp_path: Path) -> None:
        """retention.enabled = false: run_retention leaves the spool alone."""
        settings = learning_settings(tmp_path)
        settings = settings.model_copy(update={"retention": settings.retention.model_copy(
            update={"enabled": False})})
        database = Database(settings.storage.resolved_database_url)
        try:
            store_series(settings, database, small_spec(), NOW)
            assert run_retention(settings, database, NOW + 1000 * HOUR)["spool_series_purged"] == 0
        finally:
            database.close()


class TestQuota:
    def _pairs(self, settings: Settings, db: Database, n: int) -> list[str]:
        """``n`` pairs, oldest first."""
        ids = []
        for k in range(n):
            accession = f"ACC-Q{k}"
            store_series(settings, db, small_spec(accession_number=accession), NOW)
            intake = FinalReportIntake(settings, db, clock=lambda k=k: NOW + k)
            answer = intake.receive(final_oru(f"RISQ{k}", accession))
            assert answer.final_report_id is not None
            assert intake.pair(answer.final_report_id, NOW + k) is PairOutcome.PAIRED
            ids.append(answer.final_report_id)
        return ids

    def test_oldest_pairs_are_deleted_beyond_the_quota(self, settings: Settings, db: Database) -> None:
        """With room for two of three pairs, the oldest goes, its folder too, and the manifest follows."""
        ids = self._pairs(settings, db, 3)
        store = FinalReportStore(db)
        sizes = {row.final_report_id: row.bytes for row in store.pairs()}
        quota = sizes[ids[1]] + sizes[ids[2]]
        small = settings.model_copy(update={"learning": settings.learning.model_copy(
            update={"quota_bytes": quota})})
        assert enforce_quota(small, db, NOW + 10) == 1
        assert [row.final_report_id for row in store.pairs()] == ids[1:]
        evicted = store.get(ids[0])
        assert evicted is not None and evicted.state is FinalReportState.DISCARDED
        assert not Path(evicted.pair_dir or "").exists()
        lines = [json.loads(line) for line in manifest_path(settings).read_text().splitlines()]
        assert [line["study_id"] for line in lines] == ids[1:]
        assert count_pairs(db) == 2
        assert run_retention(small, db, NOW + 20)["training_pairs_evicted"] == 0

    def test_pairing_enforces_the_quota(self, tmp_path: Path) -> None:
        """A new pair past the quota evicts older ones at once, never itself."""
        probe = learning_settings(tmp_path / "probe")
        database = Database(probe.storage.resolved_database_url)
        try:
            (first,) = self._pairs(probe, database, 1)
            size = FinalReportStore(database).get(first).bytes  # type: ignore[union-attr]
        finally:
            database.close()
        settings = learning_settings(tmp_path / "site", quota_bytes=int(size * 1.5))
        database = Database(settings.storage.resolved_database_url)
        try:
            ids = self._pairs(settings, database, 2)
            assert [row.final_report_id for row in FinalReportStore(database).pairs()] == ids[1:]
        finally:
            database.close()


def test_run_retention_reports_its_counts(settings: Settings, db: Database) -> None:
    """One pass returns what it did, for the scheduler's log line."""
    store_series(settings, db, small_spec(), time.time() - 80 * HOUR)
    counts = run_retention(settings, db, time.time())
    assert counts["spool_series_purged"] == 1 and counts["spool_files_purged"] == 4
    assert set(counts) == {"spool_series_purged", "spool_files_purged", "spool_bytes_purged",
                           "training_pairs_evicted"}
