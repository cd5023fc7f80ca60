"""Tests for neuroscribe.store: migrations, SQLite set-up, instances, series states and concurrency."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from neuroscribe.errors import StoreError
from neuroscribe.store import LATEST_VERSION, Database, InstanceRecord, SeriesState, StateStore
from neuroscribe.store.tables import metadata

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES_A = "1.2.826.0.1.3680043.8.498.1.1"
SERIES_B = "1.2.826.0.1.3680043.8.498.1.2"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 's.sqlite3'}"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database in tmp_path."""
    database = Database(_url(tmp_path))
    yield database
    database.close()


@pytest.fixture
def store(db: Database) -> StateStore:
    """The state store over ``db``."""
    return StateStore(db)


def _rec(
    n: int, at: float, series: str = SERIES_A, study: str = STUDY, header: dict[str, Any] | None = None
) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series}.{n}",
        series_instance_uid=series,
        study_instance_uid=study,
        sop_class_uid=CT,
        transfer_syntax_uid=EXPLICIT_LE,
        path=Path(f"/spool/{series}/{n}.dcm"),
        size_bytes=1000 + n,
        received_at=at,
        calling_ae="SCANNER1",
        header=header if header is not None else {"instance_number": n},
    )


def _version_rows(db: Database) -> list[int]:
    with db.read() as conn:
        return [row[0] for row in conn.execute(text("SELECT version FROM schema_version ORDER BY version"))]


# -- migrations and SQLite set-up ------------------------------------------------------------------


def test_new_database_is_migrated_to_latest(db: Database) -> None:
    """Opening an empty database applies every migration and records each version once."""
    assert db.schema_version == LATEST_VERSION
    assert _version_rows(db) == list(range(1, LATEST_VERSION + 1))


def test_reopening_is_a_no_op(tmp_path: Path, db: Database, store: StateStore) -> None:
    """Opening a migrated database again applies nothing and keeps the data."""
    store.record_instance(_rec(1, 100.0))
    again = Database(_url(tmp_path))
    try:
        assert again.schema_version == LATEST_VERSION
        assert _version_rows(again) == list(range(1, LATEST_VERSION + 1))
        assert StateStore(again).instance_count() == 1
    finally:
        again.close()


def test_newer_schema_is_refused(tmp_path: Path, db: Database) -> None:
    """A database written by a newer NeuroScribe (schema 999) is not opened, and not downgraded."""
    with db.write() as conn:
        conn.execute(text("INSERT INTO schema_version (version, description, applied_at) "
                          "VALUES (999, 'from the future', 0)"))
    db.close()
    with pytest.raises((StoreError, RuntimeError), match="999"):
        Database(_url(tmp_path))
    with closing(sqlite3.connect(tmp_path / "s.sqlite3")) as conn:  # read back without migrating
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == [*range(1, LATEST_VERSION + 1), 999]


def test_newer_schema_is_refused_as_store_error(tmp_path: Path, db: Database) -> None:
    """The refusal of a newer schema is a StoreError, the error the stages catch."""
    with db.write() as conn:
        conn.execute(text("INSERT INTO schema_version (version, description, applied_at) "
                          "VALUES (999, 'from the future', 0)"))
    db.close()
    with pytest.raises(StoreError, match="999"):
        Database(_url(tmp_path))


def test_migrated_columns_match_table_definitions(db: Database) -> None:
    """Every table of tables.py exists with exactly its columns, in order, and their nullability."""
    inspector = inspect(db.engine)
    assert set(metadata.tables) <= set(inspector.get_table_names())
    for name, table in metadata.tables.items():
        found = inspector.get_columns(name)
        assert [c["name"] for c in found] == [c.name for c in table.columns], name
        for column, expected in zip(found, table.columns, strict=True):
            if not expected.primary_key:
                assert column["nullable"] == expected.nullable, f"{name}.{expected.name}"
        assert inspector.get_pk_constraint(name)["constrained_columns"] == [
            c.name for c in table.primary_key.columns
        ]


def test_sqlite_runs_in_wal_mode(db: Database) -> None:
    """Every connection uses WAL, a busy timeout and foreign keys."""
    with db.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_database_directory_is_created(tmp_path: Path) -> None:
    """The SQLite file's folder is made when missing."""
    database = Database(f"sqlite:///{tmp_path / 'a' / 'b' / 's.sqlite3'}")
    try:
        assert (tmp_path / "a" / "b" / "s.sqlite3").is_file()
    finally:
        database.close()


def test_unusable_url_is_a_store_error() -> None:
    """A URL SQLAlchemy cannot use is reported as a StoreError."""
    with pytest.raises(StoreError, match="not usable"):
        Database("nosuchdialect://x/y")


def test_failed_write_rolls_back(store: StateStore, db: Database) -> None:
    """An exception inside a write transaction leaves nothing behind."""
    with pytest.raises(ZeroDivisionError), db.write() as conn:
        conn.execute(text("DELETE FROM schema_version"))
        raise ZeroDivisionError
    assert _version_rows(db) == list(range(1, LATEST_VERSION + 1))


def test_database_error_is_a_store_error(db: Database) -> None:
    """SQL errors inside read and write surface as StoreError."""
    with pytest.raises(StoreError, match="write failed"), db.write() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    with pytest.raises(StoreError, match="read failed"), db.read() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))


# -- instances -------------------------------------------------------------------------------------


def test_record_instance_new_then_resent(store: StateStore) -> None:
    """The first recording is new, the same SOP Instance UID again is not and adds no row."""
    assert store.record_instance(_rec(1, 100.0)) is True
    assert store.record_instance(_rec(1, 101.0)) is False
    assert store.instance_count() == 1
    row = store.series_row(SERIES_A)
    assert row is not None
    assert row.instance_count == 1
    assert row.state == SeriesState.RECEIVING
    assert row.revision == 1
    assert row.first_received_at == 100.0
    assert row.last_received_at == 101.0


def test_resent_instance_replaces_its_row(store: StateStore) -> None:
    """A re-sent instance's header and path replace the old ones."""
    store.record_instance(_rec(1, 100.0, header={"rows": 32}))
    store.record_instance(_rec(1, 101.0, header={"rows": 64}))
    [header] = store.instance_headers(SERIES_A)
    assert header["rows"] == 64


def test_resent_instance_does_not_reopen_a_decided_series(store: StateStore) -> None:
    """Sending a known instance again leaves a decided series decided, same revision."""
    store.record_instance(_rec(1, 100.0))
    store.complete_quiet_series(200.0, 30.0, 3600.0)
    assert store.decide_series(SERIES_A, 1, SeriesState.SELECTED, 201.0)
    assert store.record_instance(_rec(1, 300.0)) is False
    row = store.series_row(SERIES_A)
    assert row is not None
    assert (row.state, row.revision, row.last_received_at) == (SeriesState.SELECTED, 1, 100.0)


def test_new_instance_reopens_a_decided_series(store: StateStore) -> None:
    """A new instance for a decided series makes it RECEIVING again at revision 2, reason cleared."""
    store.record_instance(_rec(1, 100.0))
    store.complete_quiet_series(200.0, 30.0, 3600.0)
    assert store.decide_series(SERIES_A, 1, SeriesState.REJECTED, 201.0, reason="not_head", detail="x")
    rejected = store.series_row(SERIES_A)
    assert rejected is not None
    assert (rejected.reason, rejected.reason_detail) == ("not_head", "x")

    assert store.record_instance(_rec(2, 300.0)) is True
    row = store.series_row(SERIES_A)
    assert row is not None
    assert row.state == SeriesState.RECEIVING
    assert row.revision == 2
    assert row.reason is None
    assert row.reason_detail is None
    assert row.completed_at is None
    assert row.completion is None
    assert row.first_received_at == 300.0
    assert row.instance_count == 2


def test_new_instance_while_receiving_keeps_revision(store: StateStore) -> None:
    """Instances arriving while a series receives only move its last_received_at."""
    for n, at in enumerate((100.0, 105.0, 103.0)):
        store.record_instance(_rec(n, at))
    row = store.series_row(SERIES_A)
    assert row is not None
    assert (row.revision, row.first_received_at, row.last_received_at) == (1, 100.0, 105.0)
    assert row.instance_count == 3


def test_instance_headers_paths_and_known_paths(store: StateStore) -> None:
    """Headers come back with SOP UIDs and path; paths per series and overall are listed."""
    store.record_instance(_rec(2, 100.0, header={"rows": 32, "image_type": ["ORIGINAL"]}))
    store.record_instance(_rec(1, 100.0))
    store.record_instance(_rec(1, 100.0, series=SERIES_B))
    headers = store.instance_headers(SERIES_A)
    assert [h["sop_instance_uid"] for h in headers] == [f"{SERIES_A}.1", f"{SERIES_A}.2"]
    assert headers[1] == {
        "rows": 32, "image_type": ["ORIGINAL"], "sop_instance_uid": f"{SERIES_A}.2",
        "sop_class_uid": CT, "path": f"/spool/{SERIES_A}/2.dcm",
    }
    assert sorted(store.instance_paths(SERIES_A)) == [
        Path(f"/spool/{SERIES_A}/1.dcm"), Path(f"/spool/{SERIES_A}/2.dcm")
    ]
    assert store.known_paths() == {
        f"/spool/{SERIES_A}/1.dcm", f"/spool/{SERIES_A}/2.dcm", f"/spool/{SERIES_B}/1.dcm"
    }
    assert store.instance_headers("9.9.9") == []


def test_record_failure_and_failures(store: StateStore) -> None:
    """Refused C-STOREs are kept, oldest first, with every field."""
    store.record_failure(at=1.0, calling_ae="A", peer_address="10.0.0.1", status=0xA900,
                         reason="missing_uid", detail="no SOPInstanceUID", sop_instance_uid_hash=None)
    store.record_failure(at=2.0, calling_ae="B", peer_address="10.0.0.2", status=0xC000,
                         reason="undecodable", detail="parse", sop_instance_uid_hash="abc123")
    failures = store.failures()
    assert [f["reason"] for f in failures] == ["missing_uid", "undecodable"]
    assert failures[0]["status"] == 0xA900
    assert failures[0]["sop_instance_uid_hash"] is None
    assert failures[1] == {
        "id": failures[1]["id"], "at": 2.0, "calling_ae": "B", "peer_address": "10.0.0.2",
        "status": 0xC000, "reason": "undecodable", "detail": "parse", "sop_instance_uid_hash": "abc123",
    }


# -- completion ------------------------------------------------------------------------------------


def test_quiet_series_completes(store: StateStore) -> None:
    """A series with no instance for quiet_seconds becomes COMPLETE with completion 'quiet'."""
    store.record_instance(_rec(1, 100.0))
    store.record_instance(_rec(2, 110.0))
    assert store.complete_quiet_series(139.9, 30.0, 3600.0) == []
    [row] = store.complete_quiet_series(140.0, 30.0, 3600.0)
    assert row.series_instance_uid == SERIES_A
    assert row.state == SeriesState.COMPLETE
    assert row.completion == "quiet"
    assert row.completed_at == 140.0
    assert row.instance_count == 2
    assert store.complete_quiet_series(500.0, 30.0, 3600.0) == []


def test_series_still_receiving_is_forced_at_the_ceiling(store: StateStore) -> None:
    """Instances every 5 s never leave 30 s of quiet; the 100 s ceiling completes it anyway."""
    for n in range(21):  # 100, 105, ... 200
        at = 100.0 + 5 * n
        store.record_instance(_rec(n, at))
        done = store.complete_quiet_series(at, 30.0, 100.0)
        assert [r.completion for r in done] == ([] if at < 200.0 else ["forced"])
    row = store.series_row(SERIES_A)
    assert row is not None
    assert (row.state, row.completion, row.completed_at) == (SeriesState.COMPLETE, "forced", 200.0)


def test_not_yet_quiet_series_stays_receiving(store: StateStore) -> None:
    """A series heard from recently stays RECEIVING."""
    store.record_instance(_rec(1, 100.0))
    assert store.complete_quiet_series(120.0, 30.0, 3600.0) == []
    row = store.series_row(SERIES_A)
    assert row is not None
    assert row.state == SeriesState.RECEIVING
    assert row.completed_at is None


def test_completion_is_per_series(store: StateStore) -> None:
    """Only the series that are quiet complete; series_rows filters by state."""
    store.record_instance(_rec(1, 100.0, series=SERIES_A))
    store.record_instance(_rec(1, 125.0, series=SERIES_B))
    assert [r.series_instance_uid for r in store.complete_quiet_series(135.0, 30.0, 3600.0)] == [SERIES_A]
    assert [r.series_instance_uid for r in store.series_rows(state=SeriesState.COMPLETE)] == [SERIES_A]
    assert [r.series_instance_uid for r in store.series_rows(state=SeriesState.RECEIVING)] == [SERIES_B]
    assert [r.series_instance_uid for r in store.series_rows()] == [SERIES_A, SERIES_B]
    assert store.series_rows([]) == []
    assert store.series_row("9.9.9") is None


# -- decisions -------------------------------------------------------------------------------------


def test_decide_series_applies_to_complete_series_at_its_revision(store: StateStore) -> None:
    """A decision on the current revision of a COMPLETE series is recorded with its reason."""
    store.record_instance(_rec(1, 100.0))
    store.complete_quiet_series(200.0, 30.0, 3600.0)
    assert store.decide_series(SERIES_A, 1, SeriesState.REJECTED, 201.0, reason="modality",
                               detail="MR") is True
    row = store.series_row(SERIES_A)
    assert row is not None
    assert (row.state, row.reason, row.reason_detail) == (SeriesState.REJECTED, "modality", "MR")


def test_decide_series_refuses_wrong_revision(store: StateStore) -> None:
    """A decision made on an older revision changes nothing."""
    store.record_instance(_rec(1, 100.0))
    store.complete_quiet_series(200.0, 30.0, 3600.0)
    assert store.decide_series(SERIES_A, 2, SeriesState.SELECTED, 201.0) is False
    row = store.series_row(SERIES_A)
    assert row is not None
    assert row.state == SeriesState.COMPLETE


def test_decide_series_refuses_receiving_or_decided_series(store: StateStore) -> None:
    """Only COMPLETE series can be decided: not RECEIVING ones, and not twice."""
    store.record_instance(_rec(1, 100.0))
    assert store.decide_series(SERIES_A, 1, SeriesState.SELECTED, 101.0) is False
    store.complete_quiet_series(200.0, 30.0, 3600.0)
    assert store.decide_series(SERIES_A, 1, SeriesState.SELECTED, 201.0) is True
    assert store.decide_series(SERIES_A, 1, SeriesState.REJECTED, 202.0, reason="late") is False
    row = store.series_row(SERIES_A)
    assert row is not None
    assert (row.state, row.reason) == (SeriesState.SELECTED, None)
    assert store.decide_series("9.9.9", 1, SeriesState.SELECTED, 203.0) is False


@pytest.mark.parametrize("state", [SeriesState.RECEIVING, SeriesState.COMPLETE])
def test_decide_series_rejects_non_decision_states(store: StateStore, state: SeriesState) -> None:
    """A decision is SELECTED or REJECTED; anything else is a ValueError."""
    store.record_instance(_rec(1, 100.0))
    store.complete_quiet_series(200.0, 30.0, 3600.0)
    with pytest.raises(ValueError, match="SELECTED or REJECTED"):
        store.decide_series(SERIES_A, 1, state, 201.0)


def test_decision_on_old_revision_after_late_instance_is_refused(store: StateStore) -> None:
    """A late instance between completion and decision makes the decision on revision 1 void."""
    store.record_instance(_rec(1, 100.0))
    [row] = store.complete_quiet_series(200.0, 30.0, 3600.0)
    store.record_instance(_rec(2, 205.0))
    assert store.decide_series(SERIES_A, row.revision, SeriesState.SELECTED, 206.0) is False
    reopened = store.series_row(SERIES_A)
    assert reopened is not None
    assert (reopened.state, reopened.revision) == (SeriesState.RECEIVING, 2)


def test_study_series_lists_the_study(store: StateStore) -> None:
    """study_series returns every series of a study and none of another."""
    store.record_instance(_rec(1, 100.0, series=SERIES_A))
    store.record_instance(_rec(1, 101.0, series=SERIES_B))
    store.record_instance(_rec(1, 102.0, series="1.2.3.9", study="1.2.3"))
    assert {r.series_instance_uid for r in store.study_series(STUDY)} == {SERIES_A, SERIES_B}
    assert [r.series_instance_uid for r in store.study_series("1.2.3")] == ["1.2.3.9"]
    assert store.study_series("4.5.6") == []


# -- concurrency -----------------------------------------------------------------------------------


def test_concurrent_writers_record_every_instance(store: StateStore) -> None:
    """8 threads recording 50 instances each into one series lose nothing and raise nothing."""
    errors: list[BaseException] = []
    results: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(t: int) -> None:
        start.wait()
        try:
            for n in range(50):
                is_new = store.record_instance(_rec(t * 1000 + n, 100.0 + n))
                with lock:
                    results.append(is_new)
        except BaseException as exc:  # collected and asserted below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert results == [True] * 400
    assert store.instance_count() == 400
    row = store.series_row(SERIES_A)
    assert row is not None
    assert (row.instance_count, row.revision, row.state) == (400, 1, SeriesState.RECEIVING)
    assert (row.first_received_at, row.last_received_at) == (100.0, 149.0)
