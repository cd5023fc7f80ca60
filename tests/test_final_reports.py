"""The final-report listener end to end: real MLLP on 127.0.0.1, real spool files, a real state database."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import structlog
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from neuroscribe.config import Settings, TlsSettings
from neuroscribe.errors import ConfigError
from neuroscribe.reporting import final_reports, site_data
from neuroscribe.reporting.final_reports import FinalReportListener, PairOutcome, strip_names
from neuroscribe.reporting.hl7 import Ack, AckCode, parse_ack
from neuroscribe.reporting.mllp import frame, send_message
from neuroscribe.reporting.site_data import count_pairs, manifest_path
from neuroscribe.store import Database, FinalReportState, FinalReportStore, JobState
from neuroscribe.tls import client_context
from neuroscribe.training.dataset import load_manifest
from tests.conftest import AuditTrail
from tests.peers import make_pki
from tests.site_helpers import (
    ACCESSION,
    CLINICAL,
    PATIENT_ID,
    final_oru,
    learning_settings,
    small_spec,
    store_series,
)

#: Strings of the test patient and staff that must reach no log, audit line or training file.
PHI = ("DOE", "JANE", "Walker", "Alice", "Okonkwo", "Chidi", PATIENT_ID, ACCESSION)


def _send(port: int, er7: str | bytes) -> Ack:
    if isinstance(er7, bytes):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(er7)
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                chunk = sock.recv(65536)
                assert chunk, "the listener closed without an answer"
                answer += chunk
        return parse_ack(answer.decode())
    return parse_ack(send_message("127.0.0.1", port, er7, timeout=10))


def _wait(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _manifest_lines(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Learning enabled, storage in tmp_path."""
    return learning_settings(tmp_path)


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    """The state database of ``settings``."""
    database = Database(settings.storage.resolved_database_url)
    yield database
    database.close()


@pytest.fixture
def listener(settings: Settings, db: Database) -> Iterator[tuple[FinalReportListener, int]]:
    """A started listener and its port."""
    server = FinalReportListener(settings, db)
    _, port = server.start()
    yield server, port
    server.stop()


@pytest.fixture
def fresh_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """structlog caches loggers on first use: give the modules fresh proxies so capture_logs sees them."""
    monkeypatch.setattr(final_reports, "LOG", structlog.get_logger())
    monkeypatch.setattr(site_data, "LOG", structlog.get_logger())


class TestPairing:
    def test_final_report_becomes_a_de_identified_pair(self, settings: Settings, db: Database,
                                                       listener: tuple[FinalReportListener, int],
                                                       audit_trail: AuditTrail) -> None:
        """ORU F with a known accession: AA, a pair folder without patient data, a manifest line."""
        _, port = listener
        stored = store_series(settings, db, small_spec(), time.time())
        kept = _metric("neuroscribe_final_reports_total", outcome="kept")
        pairs = _metric("neuroscribe_training_pairs_total")
        ack = _send(port, final_oru("RIS0001"))
        assert (ack.code, ack.control_id) == (AckCode.AA, "RIS0001")
        manifest = manifest_path(settings)
        _wait(lambda: len(_manifest_lines(manifest)) == 1)
        (line,) = _manifest_lines(manifest)
        assert set(line) == {"study_id", "patient_id", "series_path", "report"}
        pair = manifest.parent / line["series_path"]
        files = sorted(pair.glob("*.dcm"))
        assert len(files) == stored.spec.slices
        forbidden = [v.encode() for v in (*PHI, stored.spec.study_date, stored.spec.patient_birth_date,
                                          stored.spec.study_instance_uid, stored.spec.series_instance_uid,
                                          stored.spec.frame_of_reference_uid)]
        forbidden += [stored.spec.sop_instance_uid(k).encode() for k in range(stored.spec.slices)]
        for path in files:
            data = path.read_bytes()
            assert not [v for v in forbidden if v in data], path.name
        report = (pair.parent / "report.txt").read_text(encoding="utf-8")
        assert report == line["report"]
        assert CLINICAL in report
        assert not [v for v in PHI if v in report], report
        assert "Dictated" not in report and "signed" not in report
        assert line["patient_id"] == str(pydicom.dcmread(files[0]).PatientID) != PATIENT_ID
        (entry,) = load_manifest(manifest)  # what `neuroscribe train --data` reads
        assert entry.patient_id == line["patient_id"]
        assert count_pairs(db) == 1
        assert _metric("neuroscribe_final_reports_total", outcome="kept") == kept + 1
        assert _metric("neuroscribe_training_pairs_total") == pairs + 1
        (received,) = audit_trail.wait_for("final_report_received")
        (exported,) = audit_trail.wait_for("export_for_training")
        assert received["control_id"] == "RIS0001" and received["ack"] == "AA"
        assert exported["job_id"] == stored.job_id and exported["profile"] == ["113100", "113108"]
        assert not [v for v in PHI if v in audit_trail.path.read_text()]
        assert not list((manifest.parent / "inbox").iterdir())

    def test_report_before_its_series_waits_then_pairs(self, settings: Settings, db: Database,
                                                       listener: tuple[FinalReportListener, int]) -> None:
        """An accession nobody reported yet is kept unpaired (AA) and paired once the job appears."""
        server, port = listener
        assert _send(port, final_oru("RIS0002", "ACC-LATE")).code is AckCode.AA
        store = FinalReportStore(db)
        _wait(lambda: len(store.rows(states=(FinalReportState.UNPAIRED,))) == 1)
        assert server.pair_pending(time.time()) == 0
        store_series(settings, db, small_spec(accession_number="ACC-LATE"), time.time())
        assert server.pair_pending(time.time()) == 1
        (row,) = store.rows()
        assert row.state is FinalReportState.PAIRED and row.report_file is None
        assert len(_manifest_lines(manifest_path(settings))) == 1

    def test_unpaired_report_is_given_up_after_the_timeout(self, settings: Settings, db: Database,
                                                           listener: tuple[FinalReportListener, int]) -> None:
        """pair_timeout_hours after arrival an unpaired report is discarded and its text deleted."""
        server, port = listener
        _send(port, final_oru("RIS0003", "ACC-NEVER"))
        store = FinalReportStore(db)
        _wait(lambda: len(store.rows()) == 1)
        (row,) = store.rows()
        inbox = Path(row.report_file or "")
        assert inbox.is_file()
        server.pair_pending(row.received_at + 71 * 3600)
        assert store.get(row.final_report_id).state is FinalReportState.UNPAIRED  # type: ignore[union-attr]
        server.pair_pending(row.received_at + 73 * 3600)
        gone = store.get(row.final_report_id)
        assert gone is not None and gone.state is FinalReportState.DISCARDED
        assert (gone.reason or "").startswith("no_series")
        assert not inbox.exists()

    def test_duplicate_message_is_kept_once(self, settings: Settings, db: Database,
                                            listener: tuple[FinalReportListener, int]) -> None:
        """The same control ID twice: AA both times, one row, one pair."""
        _, port = listener
        store_series(settings, db, small_spec(), time.time())
        assert _send(port, final_oru("RIS0004")).code is AckCode.AA
        assert _send(port, final_oru("RIS0004")).code is AckCode.AA
        _wait(lambda: len(_manifest_lines(manifest_path(settings))) == 1)
        assert len(FinalReportStore(db).rows()) == 1
        assert count_pairs(db) == 1

    def test_correction_replaces_the_earlier_final_report(self, settings: Settings, db: Database,
                                                          listener: tuple[FinalReportListener, int]) -> None:
        """A C after an F for one accession: the pair holds the corrected text; the F is discarded."""
        _, port = listener
        store_series(settings, db, small_spec(), time.time())
        _send(port, final_oru("RIS0005", text=["Findings: small old infarct."]))
        _wait(lambda: count_pairs(db) == 1)
        _send(port, final_oru("RIS0006", status="C", text=["Findings: no infarct (corrected)."]))
        store = FinalReportStore(db)
        _wait(lambda: [r.control_id for r in store.rows(states=(FinalReportState.PAIRED,))] == ["RIS0006"])
        _wait(lambda: ["corrected" in line["report"] for line in _manifest_lines(manifest_path(settings))]
              == [True])
        (old,) = store.rows(states=(FinalReportState.DISCARDED,))
        assert (old.reason or "").startswith("superseded") and not Path(old.pair_dir or "x").exists()

    def test_report_of_another_patient_is_not_paired(self, settings: Settings, db: Database,
                                                     listener: tuple[FinalReportListener, int]) -> None:
        """PID-3 differing from the series' PatientID discards the report (check_patient_id)."""
        _, port = listener
        store_series(settings, db, small_spec(), time.time())
        _send(port, final_oru("RIS0007", patient_id="P-9999"))
        store = FinalReportStore(db)
        _wait(lambda: store.rows()[0].state is FinalReportState.DISCARDED if store.rows() else False)
        assert (store.rows()[0].reason or "").startswith("patient_mismatch")
        assert count_pairs(db) == 0

    def test_series_that_cannot_be_de_identified_is_not_exported(self, settings: Settings, db: Database,
                                                                 tmp_path: Path) -> None:
        """Burned-in annotation: the report is discarded, no pair folder is left."""
        stored = store_series(settings, db, small_spec(), time.time())
        for path in stored.paths:
            ds = pydicom.dcmread(path)
            ds.BurnedInAnnotation = "YES"
            ds.save_as(path)
        intake = final_reports.FinalReportIntake(settings, db)
        answer = intake.receive(final_oru("RIS0008"))
        assert answer.code is AckCode.AA and answer.final_report_id is not None
        assert intake.pair(answer.final_report_id) is PairOutcome.DISCARDED
        assert (FinalReportStore(db).rows()[0].reason or "").startswith("deid_refused")
        assert [p.name for p in manifest_path(settings).parent.iterdir() if p.is_dir()] == ["inbox"]


class TestAcknowledgments:
    def test_garbage_is_rejected(self, listener: tuple[FinalReportListener, int]) -> None:
        """A frame that is not HL7: AR with an empty MSA-2."""
        _, port = listener
        ack = _send(port, "this is not an HL7 message")
        assert (ack.code, ack.control_id) == (AckCode.AR, "")

    def test_other_message_types_are_refused(self, listener: tuple[FinalReportListener, int]) -> None:
        """ADT^A01: AE with error 200 at MSH-9; MSA-2 echoes MSH-10."""
        _, port = listener
        ack = _send(port, final_oru("RIS0010", message_type="ADT^A01^ADT_A01"))
        assert (ack.code, ack.control_id, ack.error_code, ack.error_location) == (
            AckCode.AE, "RIS0010", "200", "MSH-9")

    def test_missing_accession_or_obr_is_refused(self, listener: tuple[FinalReportListener, int]) -> None:
        """No accession number: AE 101; no OBR at all: AE 100."""
        _, port = listener
        ack = _send(port, final_oru("RIS0011", accession=""))
        assert (ack.code, ack.control_id, ack.error_code) == (AckCode.AE, "RIS0011", "101")
        ack = _send(port, final_oru("RIS0012", obr=False))
        assert (ack.code, ack.error_code) == (AckCode.AE, "100")

    def test_preliminary_result_is_acknowledged_and_ignored(
            self, db: Database, listener: tuple[FinalReportListener, int]) -> None:
        """OBR-25 P: AA (the RIS's queue moves on), nothing kept."""
        _, port = listener
        ignored = _metric("neuroscribe_final_reports_total", outcome="ignored")
        assert _send(port, final_oru("RIS0013", status="P")).code is AckCode.AA
        assert FinalReportStore(db).rows() == []
        assert _metric("neuroscribe_final_reports_total", outcome="ignored") == ignored + 1

    def test_listener_survives_bad_input(self, listener: tuple[FinalReportListener, int]) -> None:
        """Bytes outside frames are skipped, a half frame then a hang-up is dropped, and one connection
        carries several messages, each answered."""
        _, port = listener
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"\x0bMSH|^~\\&|half a message")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"noise before the frame\r\n" + frame(final_oru("RIS0014", status="P"))
                         + frame("\x00\xff garbage"))
            answers = b""
            while answers.count(b"\x1c\r") < 2:
                chunk = sock.recv(65536)
                assert chunk
                answers += chunk
        first, second = (parse_ack(part.lstrip(b"\x0b").decode()) for part in answers.split(b"\x1c\r")[:2])
        assert (first.code, first.control_id, second.code) == (AckCode.AA, "RIS0014", AckCode.AR)
        assert _send(port, final_oru("RIS0015", status="P")).code is AckCode.AA

    def test_latin1_message_is_read_in_its_charset(self, db: Database,
                                                   listener: tuple[FinalReportListener, int]) -> None:
        """MSH-18 8859/1: the text is decoded as Latin-1 and kept."""
        _, port = listener
        er7 = final_oru("RIS0016", text=["Findings: Läsion frontal."]).replace("UNICODE UTF-8", "8859/1")
        assert _send(port, er7.encode("latin-1").join([b"\x0b", b"\x1c\r"])).code is AckCode.AA
        store = FinalReportStore(db)
        _wait(lambda: bool(store.rows()))
        assert "Läsion" in Path(store.rows()[0].report_file or "").read_text(encoding="utf-8")


class TestPrivacy:
    def test_nothing_of_the_patient_reaches_the_log(self, settings: Settings, db: Database,
                                                    fresh_logs: None) -> None:
        """A pair made, a refusal and garbage: no name, ID, accession or report text in any log event."""
        store_series(settings, db, small_spec(), time.time())
        with capture_logs() as logs:
            server = FinalReportListener(settings, db)
            _, port = server.start()
            try:
                _send(port, final_oru("RIS0020"))
                _wait(lambda: len(_manifest_lines(manifest_path(settings))) == 1)
                _send(port, final_oru("RIS0021", message_type="ADT^A01"))
                _send(port, "garbage DOE^JANE")
            finally:
                server.stop()
        text = json.dumps(logs, default=str)
        assert any(e.get("event") == "training pair made" for e in logs)
        assert not [v for v in (*PHI, CLINICAL) if v in text]

    def test_strip_names_keeps_clinical_words(self) -> None:
        """Lower-case words equal to a name stay; titled names and signature lines go."""
        text = ("Mass effect: none. No mass.\nDiscussed with Dr. J. Smith at 14:00.\n"
                "Reported by: Dr Who\nImpression: normal.")
        assert strip_names(text, ["Mass"], ["X-1"]) == (
            "[name] effect: none. No mass.\nDiscussed with Dr. [name] at 14:00.\nImpression: normal.")


class TestListener:
    def test_mllp_over_tls(self, tmp_path: Path, db: Database) -> None:
        """With learning.tls the listener speaks TLS only; a client trusting the CA gets its ACK."""
        pki = make_pki(tmp_path / "pki")
        settings = learning_settings(tmp_path, tls={"enabled": True, "cert_file": pki.server_cert,
                                                    "key_file": pki.server_key})
        server = FinalReportListener(settings, db)
        _, port = server.start()
        try:
            context = client_context(TlsSettings(ca_file=pki.ca_cert))
            answer = send_message("127.0.0.1", port, final_oru("RIS0030", status="P"), timeout=10,
                                  ssl_context=context)
            assert parse_ack(answer).code is AckCode.AA
        finally:
            server.stop()

    def test_allowed_networks_refuse_other_sources(self, tmp_path: Path, db: Database) -> None:
        """A source outside learning.allowed_networks is closed without an answer."""
        server = FinalReportListener(learning_settings(tmp_path, allowed_networks=["10.0.0.0/8"]), db)
        _, port = server.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(frame(final_oru("RIS0031")))
                assert sock.recv(100) == b""
        finally:
            server.stop()

    def test_bad_learning_settings_name_the_key(self, tmp_path: Path) -> None:
        """An unknown result status or a TLS listener without a certificate fails naming the key."""
        with pytest.raises(ConfigError, match=r"learning\.accepted_statuses.*'Q'"):
            learning_settings(tmp_path, accepted_statuses=["F", "Q"])
        with pytest.raises(ConfigError, match=r"learning\.tls"):
            learning_settings(tmp_path, tls={"enabled": True})

    def test_restart_removes_half_written_pairs(self, settings: Settings, db: Database) -> None:
        """A crash mid-export leaves .tmp-* and orphan folders; the next start removes them."""
        root = manifest_path(settings).parent
        (root / ".tmp-fr000").mkdir(parents=True)
        (root / "fr-orphan" / "series").mkdir(parents=True)
        server = FinalReportListener(settings, db)
        server.start()
        server.stop()
        assert sorted(p.name for p in root.iterdir()) == ["inbox", "manifest.jsonl"]

    def test_dead_job_series_is_still_paired(self, settings: Settings, db: Database) -> None:
        """A reported job (not yet delivered) pairs too."""
        store_series(settings, db, small_spec(), time.time(), job=JobState.REPORTED)
        intake = final_reports.FinalReportIntake(settings, db)
        answer = intake.receive(final_oru("RIS0032"))
        assert answer.final_report_id is not None
        assert intake.pair(answer.final_report_id) is PairOutcome.PAIRED
