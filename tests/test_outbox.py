"""The durable outbox against real peers: Orthanc as the PACS, hl7apy's MLLPServer as the RIS."""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from neuroscribe.cli import main
from neuroscribe.config import Hl7Settings, OutboxSettings, Settings, load_settings
from neuroscribe.dicom_io.scu import Outcome
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.errors import ConfigError, StoreError
from neuroscribe.log import configure_logging
from neuroscribe.reporting import outbox as outbox_module
from neuroscribe.reporting.draft import DraftReport, ModelIdentity
from neuroscribe.reporting.hl7 import OruOptions, build_oru, control_id_of, is_control_id
from neuroscribe.reporting.outbox import (
    ER7_FILE_NAME,
    SR_FILE_NAME,
    Outbox,
    backoff_delay,
    new_control_id,
    new_sr_uids,
    reports_dir,
)
from neuroscribe.reporting.sr import build_sr
from neuroscribe.store import Database, Destination, DestinationKind, OutboxState, OutboxStore
from tests.conftest import Clock, OrthancFactory, free_port
from tests.orthanc import LOOPBACK, Orthanc
from tests.peers import Ris

MODEL = ModelIdentity(name="neuroscribe-demo-cvit", version="2026.11.29",
                      uid="1.2.826.0.1.3680043.8.498.4242")
CREATED = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
PATIENT_NAME = "DOE^JANE^SECRET"
PATIENT_ID = "PID-SECRET-42"
ACCESSION = "ACC-SECRET-7"
FINDINGS = "Hyperdense focus in the left basal ganglia."
#: Backoff of the tests: 60 s, doubling, capped at 1 h, 10 % jitter; dead letters after 1 day.
POLICY = {"backoff_base_seconds": 60.0, "backoff_factor": 2.0, "backoff_ceiling_seconds": 3600.0,
          "jitter": 0.1, "dead_letter_after_seconds": 86400.0, "poll_seconds": 0.05}
PACS = Destination(DestinationKind.PACS, "main")
RIS = Destination(DestinationKind.RIS, "ris")


# -- service side ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(isolated_root: Path) -> Path:
    """Every test: no NEUROSCRIBE_* variable of the shell, storage under tmp_path (conftest)."""
    return isolated_root


def settings_for(root: Path, *, pacs_port: int | None = None, ris_port: int | None = None,
                 **policy: Any) -> Settings:
    """Settings with one PACS named ``main`` and one RIS named ``ris`` (nowhere, unless ports given)."""
    return load_settings(
        storage={"root": str(root)},
        pacs=[{"name": "main", "ae_title": "ORTHANC", "host": LOOPBACK, "port": pacs_port or free_port(),
               "timeout_seconds": 5}],
        ris=[{"name": "ris", "host": LOOPBACK, "port": ris_port or free_port(), "timeout_seconds": 5}],
        outbox={**POLICY, **policy},
    )


@dataclass
class Made:
    """A made report: the draft, its SR and ORU, and the CT headers they came from."""

    report: DraftReport
    sr: Dataset
    er7: str
    control_id: str
    ct: list[Dataset]

    @property
    def sr_uid(self) -> str:
        return str(self.sr.SOPInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.ct[0].StudyInstanceUID)


@pytest.fixture
def make_report(tmp_path: Path) -> Callable[[], Made]:
    """Make a real report: CT headers from the project's writer, build_sr and build_oru."""
    count = 0

    def make() -> Made:
        nonlocal count
        count += 1
        spec = CtSeriesSpec(rows=8, columns=8, slices=3, patient_name=PATIENT_NAME, patient_id=PATIENT_ID,
                            accession_number=ACCESSION)
        paths = write_ct_series(spec, tmp_path / f"ct{count}")
        ct = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
        report = DraftReport(FINDINGS, "Suspected acute haemorrhage.", MODEL, CREATED)
        uids = new_sr_uids()
        sr = build_sr(report, ct, sop_instance_uid=uids.sop_instance_uid,
                      series_instance_uid=uids.series_instance_uid)
        control_id = new_control_id()
        er7 = build_oru(report, ct[0], control_id, OruOptions(**Hl7Settings().oru_options()), CREATED)
        return Made(report, sr, er7, control_id, ct)

    return make


@pytest.fixture
def open_db(_isolated: Path) -> Iterator[Callable[[Settings], Database]]:
    """Open the state database of some settings (as often as a test restarts); all closed at the end."""
    opened: list[Database] = []

    def open_(settings: Settings) -> Database:
        opened.append(Database(settings.storage.resolved_database_url))
        return opened[-1]

    yield open_
    for db in opened:
        db.close()


@pytest.fixture
def outbox_for(open_db: Callable[[Settings], Database]) -> Callable[..., Outbox]:
    """A new Outbox over the settings' database (a process start), with a seeded RNG."""

    def make(settings: Settings, clock: Clock) -> Outbox:
        return Outbox(settings, open_db(settings), clock=clock, rng=random.Random(1234))

    return make


def enqueue(outbox: Outbox, made: Made, *destinations: Destination) -> str:
    """Queue a made report; returns its report ID."""
    record = outbox.enqueue_report(made.report, made.sr, made.er7, made.control_id, destinations or None)
    return record.report_id


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run ``neuroscribe outbox ARGS`` in-process; returns the exit code and stdout without log lines."""
    capsys.readouterr()
    code = main(["outbox", *args])
    out = capsys.readouterr().out.splitlines(keepends=True)
    return code, "".join(line for line in out if not line.startswith('{"'))


def only(results: list[Any]) -> Any:
    assert len(results) == 1, results
    return results[0]


# -- settings --------------------------------------------------------------------------------------


class TestSettings:
    """The [[pacs]], [[ris]], [hl7] and [outbox] settings."""

    def test_toml_arrays_of_tables_and_sections(self, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
        """[[pacs]]/[[ris]] tables and [hl7]/[outbox] load; the environment still wins for scalars."""
        config = tmp_path / "ns.toml"
        config.write_text(
            '[dicom]\nae_title = "NS_SITE"\n'
            '[hl7]\nsending_facility = "SITE"\npatient_class = ""\n'
            'findings_code = { code = "59776-5", text = "Procedure findings", system = "LN" }\n'
            "[outbox]\nbackoff_base_seconds = 45\n"
            '[[pacs]]\nname = "main"\nae_title = "PACS1"\nhost = "10.0.0.1"\nport = 104\n'
            '[[pacs]]\nname = "archive"\nae_title = "ARCH"\nhost = "10.0.0.2"\nport = 11112\n'
            'calling_ae_title = "NS_ARCH"\n'
            '[[ris]]\nname = "ris"\nhost = "10.0.0.3"\nport = 2575\n'
        )
        monkeypatch.setenv("NEUROSCRIBE_OUTBOX__JITTER", "0.25")
        settings = load_settings(config)
        assert [p.name for p in settings.pacs] == ["main", "archive"]
        assert settings.pacs[1].calling_ae_title == "NS_ARCH"
        assert (settings.ris[0].port, settings.ris[0].timeout_seconds) == (2575, 30.0)
        assert (settings.outbox.backoff_base_seconds, settings.outbox.jitter) == (45.0, 0.25)
        outbox = Outbox(settings, Database(settings.storage.resolved_database_url))
        try:
            assert outbox.pacs_peer(settings.pacs[0]).calling_ae_title == "NS_SITE"
            assert outbox.pacs_peer(settings.pacs[1]).calling_ae_title == "NS_ARCH"
            assert outbox.destinations() == [PACS, Destination(DestinationKind.PACS, "archive"), RIS]
        finally:
            outbox.store.db.close()
        options = OruOptions(**settings.hl7.oru_options())
        assert (options.sending_facility, options.patient_class, options.findings_code.system) == (
            "SITE", None, "LN")

    @pytest.mark.parametrize(
        ("overrides", "expected"),
        [
            ({"pacs": [{"name": "a", "ae_title": "X", "host": "h", "port": 104},
                       {"name": "b", "ae_title": "X", "host": "h", "port": 70000}]},
             "pacs[1].port = 70000: Input should be less than or equal to 65535"),
            ({"pacs": [{"name": "a", "ae_title": "A" * 17, "host": "h", "port": 104}]},
             "pacs[0].ae_title = 'AAAAAAAAAAAAAAAAA'"),
            ({"ris": [{"name": "bad name", "host": "h", "port": 2575}]}, "ris[0].name = 'bad name'"),
            ({"pacs": [{"name": "a", "ae_title": "X", "host": "h", "port": 1},
                       {"name": "a", "ae_title": "Y", "host": "h", "port": 2}]},
             "pacs[1].name 'a' is already the name of pacs[0]"),
            ({"ris": [{"name": "r", "host": "h", "port": 1, "encoding": "ascii"}]},
             "ris[0].encoding 'ascii' differs from hl7.charset"),
            ({"outbox": {"backoff_base_seconds": 100, "backoff_ceiling_seconds": 10}},
             "outbox.backoff_ceiling_seconds = 10: is below backoff_base_seconds"),
            ({"outbox": {"jitter": 1.5}}, "outbox.jitter = 1.5"),
            ({"hl7": {"patient_class": "Z"}}, "hl7.patient_class = 'Z'"),
        ],
    )
    def test_invalid_values_name_key_and_value(self, overrides: dict[str, Any], expected: str) -> None:
        """Each bad destination or policy value fails with the key (array index included) and value."""
        with pytest.raises(ConfigError) as info:
            load_settings(**overrides)
        assert expected in str(info.value)
        section = next(iter(overrides))
        assert f"NEUROSCRIBE_{section.upper()}" in str(info.value)

    def test_hl7_section_mirrors_oru_options(self) -> None:
        """[hl7] has exactly OruOptions' fields, and its defaults are OruOptions' defaults."""
        assert set(Hl7Settings.model_fields) == set(OruOptions.model_fields)
        assert OruOptions(**Hl7Settings().oru_options()) == OruOptions()


# -- pure parts ------------------------------------------------------------------------------------


class TestBackoffAndIds:
    """backoff_delay, control IDs and SR UIDs."""

    def test_backoff_grows_caps_and_stays_within_jitter(self) -> None:
        """Delays double from the base, stop at the ceiling, and jitter stays inside its bounds."""
        policy = OutboxSettings(**{**POLICY, "jitter": 0.2})
        rng = random.Random(7)
        for attempts in range(1, 40):
            nominal = min(3600.0, 60.0 * 2.0 ** (attempts - 1))
            for _ in range(50):
                delay = backoff_delay(attempts, policy, rng)
                assert nominal * 0.8 <= delay <= min(3600.0, nominal * 1.2)
        exact = OutboxSettings(**{**POLICY, "jitter": 0.0})
        expected = [60, 120, 240, 480, 960, 1920, 3600, 3600]
        assert [backoff_delay(n, exact, rng) for n in range(1, 9)] == expected
        assert backoff_delay(100_000, policy, rng) <= 3600.0  # no overflow
        with pytest.raises(ValueError, match="attempts = 0"):
            backoff_delay(0, policy, rng)

    def test_jitter_is_seeded(self) -> None:
        """The same seed gives the same delays (tests can pin them); the delays do vary."""
        policy = OutboxSettings(**POLICY)
        first = [backoff_delay(1, policy, random.Random(3)) for _ in range(3)]
        assert first == [backoff_delay(1, policy, random.Random(3)) for _ in range(3)]
        assert len({backoff_delay(1, policy, random.Random(seed)) for seed in range(10)}) > 1

    def test_control_ids_and_sr_uids_are_unique_and_valid(self) -> None:
        """Control IDs fit MSH-10 (<= 20 printable characters) and sort by time; SR UIDs are fresh."""
        ids = [new_control_id() for _ in range(2000)]
        assert len(set(ids)) == len(ids)
        assert all(len(i) <= 20 and is_control_id(i) and i.startswith("NS") for i in ids)
        assert ids[0][:10] <= ids[-1][:10]
        uids = new_sr_uids()
        assert uids.sop_instance_uid != uids.series_instance_uid
        assert all(len(u) <= 64 for u in (uids.sop_instance_uid, uids.series_instance_uid))


# -- schema ----------------------------------------------------------------------------------------


def test_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    """A database made before the outbox (schema 1) gains the outbox tables and keeps its rows."""
    from sqlalchemy import create_engine, text

    from neuroscribe.store.migrations import LATEST_VERSION, MIGRATIONS

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
                          "description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"))
        for statement in MIGRATIONS[0].statements:
            conn.execute(text(statement))
        conn.execute(text("INSERT INTO schema_version VALUES (1, 'v1', 0)"))
        conn.execute(text("INSERT INTO series (series_instance_uid, study_instance_uid, state, "
                          "first_received_at, last_received_at) VALUES ('1.2.3', '1.2', 'RECEIVING', 1, 2)"))
    engine.dispose()
    db = Database(url)
    try:
        assert db.schema_version == LATEST_VERSION  # every later migration applied
        with db.read() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM series")).scalar() == 1
        assert OutboxStore(db).counts() == dict.fromkeys(OutboxState, 0)
    finally:
        db.close()


# -- enqueue ---------------------------------------------------------------------------------------


class TestEnqueue:
    """enqueue_report: files first, then rows; idempotent; nothing half-made after a crash."""

    def test_files_and_rows(self, _isolated: Path, make_report: Callable[[], Made],
                            outbox_for: Callable[..., Outbox]) -> None:
        """The SR and ER7 are on disk as made, and each destination has one pending item due now."""
        clock = Clock()
        outbox = outbox_for(settings_for(_isolated), clock)
        made = make_report()
        record = outbox.enqueue_report(made.report, made.sr, made.er7, made.control_id)
        folder = reports_dir(outbox.settings) / record.report_id
        assert (folder / ER7_FILE_NAME).read_bytes() == made.er7.encode("utf-8")
        assert hashlib.sha256((folder / ER7_FILE_NAME).read_bytes()).hexdigest() == record.er7_sha256
        assert hashlib.sha256((folder / SR_FILE_NAME).read_bytes()).hexdigest() == record.sr_sha256
        assert pydicom.dcmread(folder / SR_FILE_NAME).SOPInstanceUID == made.sr_uid
        assert (record.control_id, record.sr_sop_instance_uid) == (made.control_id, made.sr_uid)
        assert record.series_instance_uid == made.ct[0].SeriesInstanceUID
        assert record.study_instance_uid == made.study_uid
        items = outbox.store.items()
        assert {i.destination for i in items} == {PACS, RIS}
        assert all(i.state is OutboxState.PENDING and i.next_attempt_at == clock.now for i in items)

    def test_same_report_twice_is_one_report_and_one_item_per_destination(
        self, _isolated: Path, make_report: Callable[[], Made], outbox_for: Callable[..., Outbox]
    ) -> None:
        """Enqueueing the same SR again (e.g. after a crash) adds nothing but missing destinations."""
        outbox = outbox_for(settings_for(_isolated), Clock())
        made = make_report()
        first = outbox.enqueue_report(made.report, made.sr, made.er7, made.control_id, [PACS])
        again = outbox.enqueue_report(made.report, made.sr, made.er7, made.control_id, [PACS])
        assert again == first
        assert [i.destination for i in outbox.store.items()] == [PACS]
        outbox.enqueue_report(made.report, made.sr, made.er7, made.control_id)
        assert sorted(str(i.destination) for i in outbox.store.items()) == ["pacs:main", "ris:ris"]
        assert [p.name for p in reports_dir(outbox.settings).iterdir()] == [first.report_id]

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"control_id": "NSOTHER"}, "MSH-10"),
            ({"destinations": [Destination(DestinationKind.PACS, "nowhere")]}, "not configured"),
            ({"er7": None, "control_id": None, "destinations": [RIS]}, "needs an ORU"),
            ({"er7": None}, "go together"),
        ],
    )
    def test_bad_input_is_refused_before_anything_is_written(
        self, _isolated: Path, make_report: Callable[[], Made], outbox_for: Callable[..., Outbox],
        change: dict[str, Any], message: str,
    ) -> None:
        """A mismatched control ID, an unknown destination or a RIS without ORU raise ValueError."""
        outbox = outbox_for(settings_for(_isolated), Clock())
        made = make_report()
        arguments = {"er7": made.er7, "control_id": made.control_id, "destinations": None, **change}
        with pytest.raises(ValueError, match=message):
            outbox.enqueue_report(made.report, made.sr, **arguments)
        assert outbox.store.items() == []
        assert not reports_dir(outbox.settings).exists() or not any(reports_dir(outbox.settings).iterdir())

    def test_no_oru_queues_the_pacs_only(self, _isolated: Path, make_report: Callable[[], Made],
                                        outbox_for: Callable[..., Outbox]) -> None:
        """A report without an ORU (e.g. no accession number) still goes to every PACS."""
        outbox = outbox_for(settings_for(_isolated), Clock())
        made = make_report()
        record = outbox.enqueue_report(made.report, made.sr, None, None)
        assert (record.control_id, record.er7_file) == (None, None)
        assert [i.destination for i in outbox.store.items()] == [PACS]

    def test_crash_between_files_and_commit_leaves_no_half_report(
        self, _isolated: Path, make_report: Callable[[], Made], outbox_for: Callable[..., Outbox],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Files written, rows not committed: nothing is listed, and the restart removes the files."""
        settings = settings_for(_isolated)
        outbox = outbox_for(settings, Clock())
        made = make_report()

        def fail(*_args: object, **_kwargs: object) -> None:
            raise StoreError("state database write failed: OperationalError")

        with monkeypatch.context() as patch:
            patch.setattr(OutboxStore, "add_report", fail)
            with pytest.raises(StoreError):
                outbox.enqueue_report(made.report, made.sr, made.er7, made.control_id)
            assert not any(reports_dir(settings).iterdir())  # cleaned up at once
            patch.setattr(outbox_module.shutil, "rmtree", lambda *_a, **_k: None)  # the process died instead
            with pytest.raises(StoreError):
                outbox.enqueue_report(made.report, made.sr, made.er7, made.control_id)
        [orphan] = list(reports_dir(settings).iterdir())
        assert (orphan / SR_FILE_NAME).is_file() and (orphan / ER7_FILE_NAME).is_file()
        assert outbox.store.items() == [] and outbox.store.report_by_sr_uid(made.sr_uid) is None
        assert cli(capsys, "list") == (0, "no outbox items\n")
        restarted = outbox_for(settings, Clock())
        assert restarted.recover() == 1
        assert not orphan.exists()
        record = restarted.enqueue_report(made.report, made.sr, made.er7, made.control_id)
        assert restarted.recover() == 0
        assert (reports_dir(settings) / record.report_id / SR_FILE_NAME).is_file()


# -- delivery to real peers ------------------------------------------------------------------------


class TestDelivery:
    """deliver_due against Orthanc and the MLLP RIS."""

    def test_sr_reaches_the_study_in_orthanc_and_oru_the_ris(
        self, _isolated: Path, orthanc: Orthanc, ris: Ris, make_report: Callable[[], Made],
        outbox_for: Callable[..., Outbox],
    ) -> None:
        """One pass delivers both; Orthanc files the SR under the CT's study; the RIS gets our ER7."""
        clock = Clock()
        outbox = outbox_for(settings_for(_isolated, pacs_port=orthanc.dicom_port, ris_port=ris.port), clock)
        made = make_report()
        enqueue(outbox, made)
        results = outbox.deliver_due()
        assert {(r.destination, r.outcome, r.state) for r in results} == {
            (PACS, Outcome.DELIVERED, OutboxState.DELIVERED), (RIS, Outcome.DELIVERED, OutboxState.DELIVERED)}
        assert orthanc.study_of_instance(made.sr_uid) == made.study_uid
        assert made.sr_uid in orthanc.study_instance_uids(made.study_uid)
        assert ris.received == [made.er7]
        assert all(i.delivered_at == clock.now and i.attempts == 1 for i in outbox.store.items())
        clock.now += 3600
        assert outbox.deliver_due() == []

    def test_pacs_down_then_back_gets_the_sr_once(
        self, _isolated: Path, orthanc_factory: OrthancFactory, make_report: Callable[[], Made],
        outbox_for: Callable[..., Outbox],
    ) -> None:
        """PACS down: RETRY with growing backoff; back up: delivered once, same SOP Instance UID."""
        own_orthanc = orthanc_factory().start()  # this test's alone: it stops and restarts it
        clock = Clock()
        outbox = outbox_for(settings_for(_isolated, pacs_port=own_orthanc.dicom_port), clock)
        made = make_report()
        enqueue(outbox, made, PACS)
        own_orthanc.kill()
        first = only(outbox.deliver_due())
        assert (first.outcome, first.state, first.attempts) == (Outcome.RETRY, OutboxState.PENDING, 1)
        assert clock.now + 54 <= first.next_attempt_at <= clock.now + 66
        assert outbox.deliver_due() == []  # not due yet
        clock.now = first.next_attempt_at
        second = only(outbox.deliver_due())
        assert second.outcome is Outcome.RETRY
        assert clock.now + 108 <= second.next_attempt_at <= clock.now + 132
        own_orthanc.start()
        assert outbox.deliver_due() == []
        clock.now = second.next_attempt_at
        third = only(outbox.deliver_due())
        assert (third.outcome, third.state, third.attempts) == (Outcome.DELIVERED, OutboxState.DELIVERED, 3)
        assert len(own_orthanc.find_instances(made.sr_uid)) == 1
        assert own_orthanc.statistics()["CountInstances"] == 1
        assert own_orthanc.study_of_instance(made.sr_uid) == made.study_uid

    def test_report_made_before_a_crash_is_delivered_after_restart(
        self, _isolated: Path, orthanc: Orthanc, ris: Ris, make_report: Callable[[], Made],
        outbox_for: Callable[..., Outbox],
    ) -> None:
        """A new Outbox on the same database (a restart) sends what the old one queued."""
        settings = settings_for(_isolated, pacs_port=orthanc.dicom_port, ris_port=ris.port)
        made = make_report()
        before = outbox_for(settings, Clock())
        enqueue(before, made)
        before.store.db.close()  # the process ends here
        clock = Clock()
        after = outbox_for(settings, clock)
        assert after.recover() == 0
        results = after.deliver_due()
        assert {r.state for r in results} == {OutboxState.DELIVERED}
        assert orthanc.find_instance(made.sr_uid) is not None
        assert ris.received == [made.er7]

    def test_ris_reject_is_resent_later_unchanged(
        self, _isolated: Path, ris: Ris, make_report: Callable[[], Made], outbox_for: Callable[..., Outbox],
    ) -> None:
        """AR: retry with backoff; the resend is byte-identical, with the same control ID."""
        clock = Clock()
        outbox = outbox_for(settings_for(_isolated, ris_port=ris.port), clock)
        made = make_report()
        enqueue(outbox, made, RIS)
        ris.script = ["AR"]
        first = only(outbox.deliver_due())
        assert (first.outcome, first.state) == (Outcome.RETRY, OutboxState.PENDING)
        assert "AR" in first.reason and "DOE" not in first.reason
        assert first.next_attempt_at is not None
        clock.now = first.next_attempt_at
        assert only(outbox.deliver_due()).state is OutboxState.DELIVERED
        assert ris.received == [made.er7, made.er7]
        assert {control_id_of(m) for m in ris.received} == {made.control_id}

    def test_ris_error_is_a_dead_letter_listed_retried_and_delivered(
        self, _isolated: Path, ris: Ris, make_report: Callable[[], Made], outbox_for: Callable[..., Outbox],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """AE: dead letter with a reason, in ``outbox list --state dead``; ``retry ID`` sends it again."""
        clock = Clock()
        outbox = outbox_for(settings_for(_isolated, ris_port=ris.port), clock)
        made = make_report()
        enqueue(outbox, made, RIS)
        ris.script = ["AE"]
        dead = only(outbox.deliver_due())
        assert (dead.outcome, dead.state, dead.next_attempt_at) == (Outcome.DEAD, OutboxState.DEAD, None)
        assert "application error (AE)" in dead.reason and "DOE" not in dead.reason
        clock.now += 7 * 86400
        assert outbox.deliver_due() == []  # dead letters wait for an operator

        code, out = cli(capsys, "list", "--state", "dead")
        assert code == 0
        [line] = [row for row in out.splitlines() if row.startswith(dead.item_id)]
        assert "dead" in line and "ris:ris" in line and "application error (AE)" in line
        code, out = cli(capsys, "list", "--state", "dead", "--json")
        [row] = json.loads(out)
        assert (row["item_id"], row["state"], row["destination"]) == (dead.item_id, "dead", "ris:ris")
        assert cli(capsys, "list", "--state", "pending")[1] == "no outbox items in state pending\n"

        assert cli(capsys, "retry", dead.item_id) == (0, f"retrying {dead.item_id}\n")
        item = outbox.store.item(dead.item_id)
        assert item is not None
        assert (item.state, item.attempts, item.dead_at) == (OutboxState.PENDING, 0, None)
        delivered = only(outbox.deliver_due())
        assert (delivered.state, delivered.attempts) == (OutboxState.DELIVERED, 1)
        assert ris.received == [made.er7, made.er7]
        code, out = cli(capsys, "retry", dead.item_id)
        assert code == 1 and "unchanged" in out  # delivered items are not sent again

    def test_retry_all_dead_and_drop(
        self, _isolated: Path, make_report: Callable[[], Made], outbox_for: Callable[..., Outbox],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``retry --all-dead`` revives every dead letter; ``drop`` keeps the item but never sends it."""
        clock = Clock()
        outbox = outbox_for(settings_for(_isolated, max_attempts=1), clock)  # RIS and PACS are down
        for _ in range(2):
            enqueue(outbox, make_report(), RIS)
        assert {r.state for r in outbox.deliver_due()} == {OutboxState.DEAD}
        code, out = cli(capsys, "retry", "--all-dead")
        assert code == 0 and out.count("retrying") == 2
        assert cli(capsys, "retry", "--all-dead") == (0, "no dead letters\n")
        assert cli(capsys, "retry")[0] == 2
        first, second = outbox.store.items()
        assert cli(capsys, "drop", first.item_id) == (0, f"dropped {first.item_id}\n")
        code, out = cli(capsys, "drop", first.item_id, "NOSUCHITEM")
        assert code == 1 and "unchanged NOSUCHITEM" in out
        clock.now += 10
        assert [r.item_id for r in outbox.deliver_due()] == [second.item_id]
        dropped = outbox.store.item(first.item_id)
        assert dropped is not None and dropped.state is OutboxState.DROPPED and dropped.dropped_at
        code, out = cli(capsys, "list", "--state", "dropped")
        assert first.item_id in out and second.item_id not in out

    def test_still_failing_after_the_dead_letter_age_is_dead(
        self, _isolated: Path, make_report: Callable[[], Made], outbox_for: Callable[..., Outbox],
    ) -> None:
        """A RIS down for longer than the age: attempts back off to the ceiling, the last on the deadline."""
        clock = Clock()
        start = clock.now
        outbox = outbox_for(settings_for(_isolated, dead_letter_after_seconds=6 * 3600.0), clock)
        enqueue(outbox, make_report(), RIS)
        delays, results = [], []
        while True:
            result = only(outbox.deliver_due())
            results.append(result)
            if result.state is not OutboxState.PENDING:
                break
            delays.append(result.next_attempt_at - clock.now)
            clock.now = result.next_attempt_at
        assert results[-1].state is OutboxState.DEAD
        assert "MllpConnectionError" in results[-1].reason and "dead-letter age 21600 s" in results[-1].reason
        assert clock.now == start + 6 * 3600.0  # the last attempt fell on the deadline
        assert max(delays) <= 3600.0
        assert delays[0] < delays[1] < delays[2] < delays[3]
        assert all(r.outcome is Outcome.RETRY for r in results)
        assert results[-1].attempts == len(results)

    def test_gives_up_after_max_attempts(
        self, _isolated: Path, make_report: Callable[[], Made], outbox_for: Callable[..., Outbox],
    ) -> None:
        """With max_attempts set, the n-th failure is a dead letter whatever the age."""
        clock = Clock()
        outbox = outbox_for(settings_for(_isolated, max_attempts=2), clock)
        enqueue(outbox, make_report(), PACS)
        first = only(outbox.deliver_due())
        assert first.state is OutboxState.PENDING and first.next_attempt_at is not None
        clock.now = first.next_attempt_at
        second = only(outbox.deliver_due())
        assert second.state is OutboxState.DEAD and "gave up after 2 attempts" in second.reason

    def test_changed_file_or_removed_destination_is_dead(
        self, _isolated: Path, make_report: Callable[[], Made], outbox_for: Callable[..., Outbox],
    ) -> None:
        """A stored SR that changed is never sent; an item whose destination left the config is dead."""
        settings = settings_for(_isolated)
        outbox = outbox_for(settings, Clock())
        record = outbox.enqueue_report(*(lambda m: (m.report, m.sr, m.er7, m.control_id))(make_report()))
        sr_file = reports_dir(settings) / record.sr_file
        sr_file.write_bytes(sr_file.read_bytes() + b"\0\0")
        without_ris = settings.model_copy(update={"ris": ()})
        results = {r.destination: r for r in outbox_for(without_ris, Clock()).deliver_due()}
        assert "SHA-256 differs" in results[PACS].reason and results[PACS].state is OutboxState.DEAD
        assert "no longer configured" in results[RIS].reason and results[RIS].state is OutboxState.DEAD

    def test_an_item_dropped_during_its_attempt_stays_dropped(
        self, _isolated: Path, make_report: Callable[[], Made], outbox_for: Callable[..., Outbox],
    ) -> None:
        """An operator's drop wins over the attempt that was in flight."""
        clock = Clock()
        outbox = outbox_for(settings_for(_isolated), clock)
        enqueue(outbox, make_report(), RIS)
        [item] = outbox.store.claim_due(clock.now, 60)
        assert outbox.store.claim_due(clock.now, 60) == []  # leased: nobody else takes it
        assert outbox.store.drop([item.item_id], clock.now) == [item.item_id]
        assert not outbox.store.record_attempt(item.item_id, now=clock.now, outcome="retry", reason="x",
                                               state=OutboxState.PENDING, next_attempt_at=clock.now)
        stored = outbox.store.item(item.item_id)
        assert stored is not None and stored.state is OutboxState.DROPPED and stored.attempts == 0

    def test_logs_hold_no_patient_data(
        self, _isolated: Path, orthanc: Orthanc, ris: Ris, make_report: Callable[[], Made],
        outbox_for: Callable[..., Outbox],
    ) -> None:
        """Queueing, delivering and dead-lettering log IDs, hashes and reasons; no names, IDs or text."""
        outbox = outbox_for(settings_for(_isolated, pacs_port=orthanc.dicom_port, ris_port=ris.port), Clock())
        made = make_report()
        ris.script = ["AE"]
        stream = io.StringIO()
        configure_logging(level="DEBUG", stream=stream)  # the service's renderer, JSON lines
        enqueue(outbox, made)
        outbox.deliver_due()
        text = stream.getvalue()
        events = {json.loads(line)["event"] for line in text.splitlines()}
        assert {"report queued", "outbox attempt", "outbox dead letter"} <= events
        for secret in ("DOE", "JANE", PATIENT_ID, ACCESSION, FINDINGS, made.sr_uid, made.study_uid):
            assert secret not in text


class TestService:
    """The delivery thread and the health check."""

    def test_run_forever_delivers_and_stops(
        self, _isolated: Path, orthanc: Orthanc, ris: Ris, make_report: Callable[[], Made],
        open_db: Callable[[Settings], Database],
    ) -> None:
        """The ``outbox`` thread delivers what is queued and ends promptly when told to stop."""
        settings = settings_for(_isolated, pacs_port=orthanc.dicom_port, ris_port=ris.port)
        outbox = Outbox(settings, open_db(settings))
        stop = threading.Event()
        thread = outbox.start(stop)
        made = make_report()
        enqueue(outbox, made)
        deadline = time.monotonic() + 20
        while outbox.store.counts()[OutboxState.DELIVERED] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join(5)
        assert not thread.is_alive() and thread.name == "outbox"
        assert outbox.store.counts()[OutboxState.DELIVERED] == 2
        assert ris.received == [made.er7]

    def test_health_check_echoes_the_pacs_and_connects_to_the_ris(
        self, _isolated: Path, orthanc: Orthanc, ris: Ris, open_db: Callable[[Settings], Database],
    ) -> None:
        """Up peers are healthy (C-ECHO, TCP connect); down ones are not, with a reason."""
        up = settings_for(_isolated, pacs_port=orthanc.dicom_port, ris_port=ris.port)
        assert [(h.destination, h.ok) for h in Outbox(up, open_db(up)).check_health()] == [
            (PACS, True), (RIS, True)]
        down = settings_for(_isolated)
        health = Outbox(down, open_db(down)).check_health(timeout=2)
        assert [h.ok for h in health] == [False, False]
        assert "cannot connect" in health[1].reason
