"""Tests for neuroscribe.dicom_io.series: completion by quiet period or ceiling, and selection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from neuroscribe.config import SelectionSettings, SeriesSettings
from neuroscribe.dicom_io.inspect import ReceivedHeader, inspect_received
from neuroscribe.dicom_io.series import SeriesAssembler
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.store import Database, InstanceRecord, SeriesState, StateStore
from tests.conftest import Clock

QUIET = 30.0
CEILING = 300.0
SERIES_SETTINGS = SeriesSettings(quiet_seconds=QUIET, force_complete_seconds=CEILING)
RULES = SelectionSettings(min_slices=8)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A SQLite URL in tmp_path."""
    return f"sqlite:///{tmp_path / 's.sqlite3'}"


@pytest.fixture
def store(db_url: str) -> Iterator[StateStore]:
    """A state store over a fresh database."""
    db = Database(db_url)
    yield StateStore(db)
    db.close()


@pytest.fixture
def clock() -> Clock:
    """The injected clock."""
    return Clock(1000.0)


@pytest.fixture
def assembler(store: StateStore, clock: Clock) -> SeriesAssembler:
    """An assembler with a 30 s quiet period, a 300 s ceiling and at least 8 slices."""
    return SeriesAssembler(store, SERIES_SETTINGS, RULES, clock=clock)


def _spec(**changes: object) -> CtSeriesSpec:
    """A small axial head CT series (10 slices of 32 x 32, 5 mm) with fresh UIDs."""
    return CtSeriesSpec(rows=32, columns=32, slices=10).with_(**changes)


def _series(tmp_path: Path, spec: CtSeriesSpec) -> list[ReceivedHeader]:
    """Write the series as real files and read each back as the receiver does."""
    out = tmp_path / spec.series_instance_uid
    return [inspect_received(path) for path in write_ct_series(spec, out)]


def _record(store: StateStore, header: ReceivedHeader, at: float, tmp_path: Path) -> bool:
    return store.record_instance(InstanceRecord(
        sop_instance_uid=header.sop_instance_uid,
        series_instance_uid=header.series_instance_uid,
        study_instance_uid=header.study_instance_uid,
        sop_class_uid=header.sop_class_uid,
        transfer_syntax_uid=header.transfer_syntax_uid,
        path=tmp_path / f"{header.sop_instance_uid}.dcm",
        size_bytes=1,
        received_at=at,
        calling_ae="SCANNER1",
        header=header.fields,
    ))


def _feed(store: StateStore, headers: list[ReceivedHeader], at: float, tmp_path: Path) -> str:
    """Record every header at time ``at``; return the series UID."""
    for header in headers:
        _record(store, header, at, tmp_path)
    return headers[0].series_instance_uid


def _state(store: StateStore, uid: str) -> tuple[SeriesState, str | None, int]:
    row = store.series_row(uid)
    assert row is not None
    return row.state, row.reason, row.revision


# -- completion ------------------------------------------------------------------------------------


def test_series_completes_only_after_the_quiet_period(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """A series is left RECEIVING until quiet_seconds pass, then completed and selected."""
    uid = _feed(store, _series(tmp_path, _spec()), clock.now, tmp_path)
    clock.now += QUIET - 0.1
    result = assembler.tick()
    assert (result.completed, result.selected, result.rejected) == ([], [], {})
    assert _state(store, uid) == (SeriesState.RECEIVING, None, 1)

    clock.now += 0.1
    result = assembler.tick()
    assert result.completed == [uid]
    assert result.selected == [uid]
    assert _state(store, uid) == (SeriesState.SELECTED, None, 1)
    row = store.series_row(uid)
    assert row is not None
    assert (row.completion, row.instance_count) == ("quiet", 10)


def test_quiet_period_counts_from_the_last_instance(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """An instance arriving during the quiet period restarts it."""
    headers = _series(tmp_path, _spec())
    uid = _feed(store, headers[:5], clock.now, tmp_path)
    clock.now += 20
    _feed(store, headers[5:], clock.now, tmp_path)
    clock.now += 20  # 40 s after the first instance, 20 s after the last
    assert assembler.tick().completed == []
    clock.now += 10
    assert assembler.tick().completed == [uid]


def test_series_that_never_goes_quiet_is_forced_at_the_ceiling(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """A series receiving an instance every 10 s completes at force_complete_seconds anyway."""
    headers = _series(tmp_path, _spec(slices=40))
    start = clock.now
    for header in headers[:31]:  # one every 10 s from start to start + 300
        _record(store, header, clock.now, tmp_path)
        result = assembler.tick()
        if clock.now - start < CEILING:
            assert result.completed == []
        clock.now += 10
    row = store.series_row(headers[0].series_instance_uid)
    assert row is not None
    assert row.state == SeriesState.SELECTED
    assert row.completion == "forced"
    assert row.completed_at == start + CEILING
    assert row.instance_count == 31


# -- selection within a study ----------------------------------------------------------------------


def test_larger_head_series_is_selected(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """Of a thick (10 slices) and a thin (30 slices) head series, the thin one is SELECTED."""
    thick = _spec(slices=10, slice_thickness_mm=5.0, slice_step_mm=5.0, series_number=2)
    thin = _spec(slices=30, slice_thickness_mm=1.5, slice_step_mm=1.5, series_number=3,
                 study_instance_uid=thick.study_instance_uid,
                 frame_of_reference_uid=thick.frame_of_reference_uid)
    thick_uid = _feed(store, _series(tmp_path, thick), clock.now, tmp_path)
    thin_uid = _feed(store, _series(tmp_path, thin), clock.now, tmp_path)
    clock.now += QUIET
    result = assembler.tick()
    assert sorted(result.completed) == sorted([thick_uid, thin_uid])
    assert result.selected == [thin_uid]
    assert result.rejected == {thick_uid: "not_largest"}
    assert _state(store, thin_uid) == (SeriesState.SELECTED, None, 1)
    assert _state(store, thick_uid) == (SeriesState.REJECTED, "not_largest", 1)


def test_study_waits_for_a_receiving_sibling(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """A complete series is not decided while another series of its study still receives."""
    first = _spec(slices=10)
    second = _spec(slices=20, slice_thickness_mm=2.5, slice_step_mm=2.5,
                   study_instance_uid=first.study_instance_uid)
    first_uid = _feed(store, _series(tmp_path, first), clock.now, tmp_path)
    second_headers = _series(tmp_path, second)
    second_uid = _feed(store, second_headers[:10], clock.now + 20, tmp_path)
    clock.now += QUIET
    result = assembler.tick()
    assert result.completed == [first_uid]
    assert (result.selected, result.rejected) == ([], {})
    assert _state(store, first_uid)[0] == SeriesState.COMPLETE

    _feed(store, second_headers[10:], clock.now, tmp_path)
    clock.now += QUIET
    result = assembler.tick()
    assert result.completed == [second_uid]
    assert result.selected == [second_uid]
    assert result.rejected == {first_uid: "not_largest"}


def test_other_studies_are_decided_independently(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """A receiving series of one study does not hold back another study."""
    done_uid = _feed(store, _series(tmp_path, _spec()), clock.now, tmp_path)
    _feed(store, _series(tmp_path, _spec()), clock.now + QUIET, tmp_path)
    clock.now += QUIET
    assert assembler.tick().selected == [done_uid]


def test_late_instance_reopens_and_is_decided_again(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """A new instance after the decision reopens the series as revision 2, decided again later."""
    headers = _series(tmp_path, _spec(slices=11))
    uid = _feed(store, headers[:10], clock.now, tmp_path)
    clock.now += QUIET
    assert assembler.tick().selected == [uid]

    clock.now += 100
    assert _record(store, headers[10], clock.now, tmp_path) is True
    assert _state(store, uid) == (SeriesState.RECEIVING, None, 2)
    assert assembler.tick().completed == []

    clock.now += QUIET
    result = assembler.tick()
    assert (result.completed, result.selected) == ([uid], [uid])
    row = store.series_row(uid)
    assert row is not None
    assert (row.state, row.revision, row.instance_count) == (SeriesState.SELECTED, 2, 11)


def test_resent_instance_changes_nothing(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """Sending a known instance again after the decision neither reopens nor re-decides."""
    headers = _series(tmp_path, _spec())
    uid = _feed(store, headers, clock.now, tmp_path)
    clock.now += QUIET
    assembler.tick()
    clock.now += 100
    assert _record(store, headers[0], clock.now, tmp_path) is False
    clock.now += QUIET
    result = assembler.tick()
    assert (result.completed, result.selected, result.rejected) == ([], [], {})
    assert _state(store, uid) == (SeriesState.SELECTED, None, 1)


def test_later_smaller_series_does_not_displace_the_selection(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """A head series arriving after the study was decided, with fewer slices, is 'not_largest'."""
    big = _spec(slices=20)
    big_uid = _feed(store, _series(tmp_path, big), clock.now, tmp_path)
    clock.now += QUIET
    assert assembler.tick().selected == [big_uid]
    small = _spec(slices=10, study_instance_uid=big.study_instance_uid)
    small_uid = _feed(store, _series(tmp_path, small), clock.now, tmp_path)
    clock.now += QUIET
    assert assembler.tick().rejected == {small_uid: "not_largest"}
    assert _state(store, big_uid) == (SeriesState.SELECTED, None, 1)


# -- per-series rejections -------------------------------------------------------------------------


def test_non_head_series_is_rejected(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """A chest CT is REJECTED with reason 'not_head'."""
    chest = _spec(body_part_examined="CHEST", series_description="THORAX 5mm",
                  study_description="CT THORAX", protocol_name="CHEST ROUTINE")
    uid = _feed(store, _series(tmp_path, chest), clock.now, tmp_path)
    clock.now += QUIET
    result = assembler.tick()
    assert (result.selected, result.rejected) == ([], {uid: "not_head"})
    state, reason, _revision = _state(store, uid)
    assert (state, reason) == (SeriesState.REJECTED, "not_head")
    row = store.series_row(uid)
    assert row is not None
    assert row.reason_detail == "neither BodyPartExamined nor the descriptions name the head"


def test_localizer_is_rejected_beside_the_head_series(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """A localizer in the study is REJECTED 'image_type' and the axial series is still SELECTED."""
    axial = _spec()
    axial_uid = _feed(store, _series(tmp_path, axial), clock.now, tmp_path)
    scout = _spec(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), slices=12,
                  study_instance_uid=axial.study_instance_uid)
    scout_uid = _feed(store, _series(tmp_path, scout), clock.now, tmp_path)
    clock.now += QUIET
    result = assembler.tick()
    assert result.selected == [axial_uid]
    assert result.rejected == {scout_uid: "image_type"}
    assert _state(store, scout_uid)[:2] == (SeriesState.REJECTED, "image_type")


def test_decisions_are_logged_without_uids(
    store: StateStore, assembler: SeriesAssembler, clock: Clock, tmp_path: Path
) -> None:
    """Completion and decision are logged with hashed UIDs, never the UIDs themselves."""
    spec = _spec()
    uid = _feed(store, _series(tmp_path, spec), clock.now, tmp_path)
    clock.now += QUIET
    with capture_logs() as logs:
        assembler.tick()
    events = {e["event"]: e for e in logs}
    assert events["series complete"]["completion"] == "quiet"
    assert events["series complete"]["instances"] == 10
    assert events["series decided"]["decision"] == "SELECTED"
    assert events["series decided"]["revision"] == 1
    assert all(uid not in str(e) for e in logs)
    assert all(spec.study_instance_uid not in str(e) for e in logs)


# -- restart ---------------------------------------------------------------------------------------


def test_new_assembler_completes_what_the_previous_left_receiving(
    db_url: str, clock: Clock, tmp_path: Path
) -> None:
    """After a restart (new Database on the same file) series left RECEIVING are completed."""
    first_db = Database(db_url)
    first_store = StateStore(first_db)
    uid = _feed(first_store, _series(tmp_path, _spec()), clock.now, tmp_path)
    clock.now += 5
    assert SeriesAssembler(first_store, SERIES_SETTINGS, RULES, clock=clock).tick().completed == []
    first_db.close()

    second_db = Database(db_url)
    try:
        second_store = StateStore(second_db)
        assert _state(second_store, uid) == (SeriesState.RECEIVING, None, 1)
        clock.now += QUIET
        result = SeriesAssembler(second_store, SERIES_SETTINGS, RULES, clock=clock).tick()
        assert (result.completed, result.selected) == ([uid], [uid])
    finally:
        second_db.close()
