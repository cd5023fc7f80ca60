"""The audit trail: events of the SCP (DCMTK storescu pushes) and of the outbox, the configuration
digest at start, and the rules that keep patient data out of it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from neuroscribe import audit
from neuroscribe.audit import audit_configuration
from neuroscribe.config import load_settings
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.log import hash_uid
from neuroscribe.reporting.outbox import Outbox
from neuroscribe.store import Database, OutboxState
from tests.conftest import SERVER_AE, AuditTrail, ScpFactory, queue_report, require_tool, storescu
from tests.peers import LOOPBACK, StoreScp, free_port
from tests.test_scu import minimal_sr

PATIENT_NAME = "AUDITOVA^ZELDA^SECRET"
PATIENT_ID = "PID-AUDIT-7731"
ACCESSION = "ACC-AUDIT-9"


class TestScpEvents:
    """``association`` and ``instances_received`` from the Storage SCP."""

    def test_push_is_audited_without_patient_data(
        self, scp_factory: ScpFactory, tmp_path: Path, audit_trail: AuditTrail
    ) -> None:
        """A storescu push writes one accepted association and one instances_received, no PHI."""
        require_tool("storescu")
        scp = scp_factory()
        spec = CtSeriesSpec(rows=16, columns=16, slices=4, patient_name=PATIENT_NAME, patient_id=PATIENT_ID,
                            accession_number=ACCESSION)
        files = write_ct_series(spec, tmp_path / "ct")
        assert storescu(scp.port, files, calling_ae="CT_AUDIT").returncode == 0

        received = audit_trail.wait_for("instances_received")
        association = audit_trail.events("association")
        assert [(e["outcome"], e["calling_ae"], e["called_ae"], e["peer"]) for e in association] == [
            ("success", "CT_AUDIT", SERVER_AE, LOOPBACK)]
        assert association[0]["tls"] is None
        event = received[0]
        assert (event["outcome"], event["count"], event["failed"]) == ("success", 4, 0)
        assert event["ended"] == "released"
        assert event["bytes"] == sum(p.stat().st_size for p in (scp.root / "spool").rglob("*.dcm"))
        assert event["study_uid_hashes"] == [hash_uid(spec.study_instance_uid)]
        text = audit_trail.path.read_text()
        for secret in (PATIENT_NAME, "AUDITOVA", PATIENT_ID, ACCESSION, spec.study_instance_uid,
                       spec.series_instance_uid):
            assert secret not in text

    def test_refused_calling_ae_is_audited(
        self, scp_factory: ScpFactory, tmp_path: Path, audit_trail: AuditTrail
    ) -> None:
        """A calling AE title not in dicom.allowed_calling_aes: ``association`` refused, with the titles."""
        scp = scp_factory(allowed_calling_aes=["CT_ALLOWED"])
        files = write_ct_series(CtSeriesSpec(rows=8, columns=8, slices=1), tmp_path / "ct")
        assert storescu(scp.port, files, calling_ae="CT_ROGUE").returncode != 0
        refused = audit_trail.wait_for("association")
        assert [(e["outcome"], e["reason"], e["calling_ae"], e["called_ae"], e["peer"]) for e in refused] == [
            ("refused", "calling AE not allowed", "CT_ROGUE", SERVER_AE, LOOPBACK)]
        assert audit_trail.events("instances_received") == []

    def test_refused_address_is_audited(
        self, scp_factory: ScpFactory, tmp_path: Path, audit_trail: AuditTrail
    ) -> None:
        """A source outside dicom.allowed_networks gives ``association`` refused before any DICOM."""
        scp = scp_factory(allowed_networks=["10.0.0.0/8"])
        files = write_ct_series(CtSeriesSpec(rows=8, columns=8, slices=1), tmp_path / "ct")
        assert storescu(scp.port, files).returncode != 0
        refused = audit_trail.wait_for("association")
        assert [(e["outcome"], e["reason"], e["peer"]) for e in refused] == [
            ("refused", "address not allowed", LOOPBACK)]
        assert scp.store.instance_count() == 0


class TestOutboxEvents:
    """``report_sent`` and ``report_dead`` from the outbox."""

    def test_sent_and_dead_letters_are_audited(self, tmp_path: Path, audit_trail: AuditTrail) -> None:
        """A delivered item is ``report_sent``; one that gives up is ``report_dead`` with its reason."""
        require_tool("storescp")
        with StoreScp(tmp_path / "pacs") as pacs:
            settings = load_settings(
                None, storage={"root": str(tmp_path / "root")}, outbox={"max_attempts": 1},
                pacs=[{"name": "main", "ae_title": pacs.ae_title, "host": LOOPBACK, "port": pacs.port,
                       "timeout_seconds": 5},
                      {"name": "gone", "ae_title": "GONE", "host": LOOPBACK, "port": free_port(),
                       "timeout_seconds": 2}],
            )
            db = Database(settings.storage.resolved_database_url)
            try:
                outbox = Outbox(settings, db, rng=random.Random(1))
                sr = minimal_sr()
                report_id = queue_report(outbox, sr, with_oru=False)
                states = {str(r.destination): r.state for r in outbox.deliver_due()}
            finally:
                db.close()
        assert states == {"pacs:main": OutboxState.DELIVERED, "pacs:gone": OutboxState.DEAD}
        expected = {"destination_kind": "pacs", "report_id": report_id, "attempts": 1,
                    "sr_uid_hash": hash_uid(sr.SOPInstanceUID)}
        (sent,) = audit_trail.events("report_sent")
        assert (sent["outcome"], sent["destination"]) == ("success", "main")
        assert expected.items() <= sent.items()
        (dead,) = audit_trail.events("report_dead")
        assert (dead["outcome"], dead["destination"]) == ("failure", "gone")
        assert expected.items() <= dead.items()
        assert "gave up after 1 attempts" in dead["reason"]
        assert str(sr.PatientName) not in audit_trail.path.read_text()


class TestConfiguration:
    """``configuration`` at start: the settings digest and the keys that changed."""

    def test_first_start_then_unchanged_then_changed(self, tmp_path: Path, audit_trail: AuditTrail) -> None:
        """Digest recorded; a restart with the same settings is unchanged; changed keys are listed."""
        state = tmp_path / "root" / audit.CONFIG_STATE_FILE_NAME
        secret_path = tmp_path / "SECRET-CA-PATH.pem"
        base = {"storage": {"root": str(tmp_path / "root")}}
        first = load_settings(None, **base)
        assert audit_configuration(first, state) is False
        assert audit_configuration(first, state) is False
        changed = load_settings(
            None, **base, dicom={"port": 104, "allowed_calling_aes": ["CT1"]},
            pacs=[{"name": "main", "ae_title": "PACS", "host": "10.0.0.1", "port": 104,
                   "tls": {"enabled": True, "ca_file": str(secret_path)}}],
        )
        assert audit_configuration(changed, state) is True

        events = audit_trail.events("configuration")
        assert [(e["changed"], e.get("first_start", False)) for e in events] == [
            (False, True), (False, False), (True, False)]
        assert events[0]["sha256"] == events[1]["sha256"] != events[2]["sha256"]
        assert events[1]["changed_keys"] == []
        keys = events[2]["changed_keys"]
        assert {"dicom.port", "dicom.allowed_calling_aes", "pacs", "pacs[0].tls.ca_file",
                "pacs[0].host"} <= set(keys)
        assert "storage.root" not in keys
        for text in (audit_trail.path.read_text(), state.read_text()):  # keys, never values
            assert "SECRET-CA-PATH" not in text
            assert "10.0.0.1" not in text
        assert json.loads(state.read_text())["sha256"] == events[2]["sha256"]


class TestRecord:
    """audit.record itself."""

    def test_patient_keys_are_refused(self, audit_trail: AuditTrail) -> None:
        """A field named like patient data is a programming error, raised before anything is written."""
        with pytest.raises(ValueError, match="patient_name"):
            audit.record("association", patient_name="DOE^JANE")
        assert audit_trail.events() == []

    def test_unconfigured_trail_drops_events(self, tmp_path: Path) -> None:
        """Without configure() nothing is written anywhere (tests, one-shot commands)."""
        audit.configure(None)
        audit.record("association", peer=LOOPBACK)
        assert audit.path() is None

    def test_write_failure_does_not_raise(self, tmp_path: Path) -> None:
        """A trail that cannot be written is logged, and the caller goes on."""
        target = tmp_path / "audit.jsonl"
        audit.configure(target)
        try:
            target.mkdir()  # appending to a folder fails
            audit.record("association", peer=LOOPBACK)
        finally:
            audit.configure(None)
