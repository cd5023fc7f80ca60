"""The Storage SCU against a real Orthanc on loopback (and a few pynetdicom/socket stand-ins)."""

from __future__ import annotations

import io
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, evt

from neuroscribe.dicom_io.scu import (
    InstanceResult,
    Outcome,
    PacsPeer,
    PeerStatus,
    StoreResult,
    Timeouts,
    classify_status,
    echo,
    store,
)
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.log import configure_logging
from tests.conftest import OrthancFactory, free_port, logging_restored
from tests.orthanc import LOOPBACK, ORTHANC_AET, Orthanc

#: Short timeouts: everything is on loopback, and the failure tests wait for them.
FAST = Timeouts(connect=2, acse=2, dimse=5, network=5)
PATIENT_NAME = "DOE^JANE^SECRET"
PATIENT_ID = "PID-SECRET-42"
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.9999.1"  # a storage class no PACS knows
SR_CLASSES = (BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage)


def small_ct(**changes: object) -> CtSeriesSpec:
    """A 3-slice 32x32 CT series with fresh UIDs and our test patient."""
    fields = {"rows": 32, "columns": 32, "slices": 3, "patient_name": PATIENT_NAME, "patient_id": PATIENT_ID}
    return CtSeriesSpec(**{**fields, **changes})  # type: ignore[arg-type]


def minimal_sr(spec: CtSeriesSpec | None = None, sop_class_uid: str = BasicTextSRStorage,
               file_meta: bool = True) -> Dataset:
    """A small valid SR document (one TEXT finding) in the study of ``spec``.

    The real builder is :mod:`neuroscribe.reporting.sr`; this one only needs what a PACS indexes.
    """
    spec = spec or small_ct()
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = spec.patient_name, spec.patient_id
    ds.PatientBirthDate, ds.PatientSex = spec.patient_birth_date, spec.patient_sex
    ds.StudyInstanceUID, ds.StudyID = spec.study_instance_uid, spec.study_id
    ds.StudyDate, ds.StudyTime = spec.study_date, spec.study_time
    ds.AccessionNumber, ds.ReferringPhysicianName = spec.accession_number, ""
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "SR", generate_uid(), 900
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.Manufacturer = "NeuroScribe"
    ds.InstanceNumber, ds.ContentDate, ds.ContentTime = 1, spec.study_date, "090000"
    ds.CompletionFlag, ds.VerificationFlag = "PARTIAL", "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
    finding.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
    finding.TextValue = "No acute intracranial abnormality."
    ds.ContentSequence = [finding]
    if file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def peer_of(orthanc: Orthanc, **changes: object) -> PacsPeer:
    """Our peer settings for ``orthanc``, optionally changed."""
    fields = {"ae_title": orthanc.aet, "host": LOOPBACK, "port": orthanc.dicom_port}
    return PacsPeer(**{**fields, **changes})  # type: ignore[arg-type]


def down_peer() -> PacsPeer:
    """A peer on a loopback port where nothing listens."""
    return PacsPeer(ORTHANC_AET, LOOPBACK, free_port())


# -- peer settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("ae_title", ""), ("ae_title", "   "), ("ae_title", "A" * 17), ("ae_title", "BAD\\AE"),
     ("calling_ae_title", "TAB\tAE"), ("host", ""), ("port", 0), ("port", 70000), ("port", True)],
)
def test_peer_rejects_bad_settings(field: str, value: object) -> None:
    """Each bad AE title, host or port raises ValueError naming the field."""
    fields: dict[str, object] = {"ae_title": "PACS", "host": LOOPBACK, "port": 104, field: value}
    with pytest.raises(ValueError, match=field):
        PacsPeer(**fields)  # type: ignore[arg-type]


def test_peer_rejects_a_non_ssl_context() -> None:
    """ssl_context must be an ssl.SSLContext."""
    with pytest.raises(TypeError, match="ssl_context"):
        PacsPeer("PACS", LOOPBACK, 104, ssl_context="yes")  # type: ignore[arg-type]


def test_timeouts_from_a_number_and_bad_values() -> None:
    """A number sets every timeout; zero or negative values raise."""
    assert Timeouts(3, 3, 3, 3) == Timeouts.of(3)
    with pytest.raises(ValueError, match="dimse"):
        Timeouts(dimse=0)


# -- status classification -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [(0x0000, Outcome.DELIVERED), (0xB000, Outcome.DELIVERED), (0xB007, Outcome.DELIVERED),
     (0x0001, Outcome.DELIVERED), (PeerStatus.DUPLICATE_SOP_INSTANCE, Outcome.DELIVERED),
     (0xA700, Outcome.RETRY), (0xA7FF, Outcome.RETRY), (0x0213, Outcome.RETRY), (0x0110, Outcome.RETRY),
     (0x0124, Outcome.RETRY), (0xFE00, Outcome.RETRY),
     (0xA900, Outcome.DEAD), (0xA9FF, Outcome.DEAD), (0xC000, Outcome.DEAD), (0xCFFF, Outcome.DEAD),
     (0x0122, Outcome.DEAD), (0x0117, Outcome.DEAD), (0x0211, Outcome.DEAD), (0x1234, Outcome.DEAD)],
)
def test_classify_status(status: int, expected: Outcome) -> None:
    """Each C-STORE status maps to the outcome the module table gives, with the code in the reason."""
    outcome, reason = classify_status(status)
    assert expected == outcome
    assert status == 0 or f"0x{status:04X}" in reason


def test_overall_outcome_is_the_worst() -> None:
    """DEAD beats RETRY beats DELIVERED; reasons list what was not delivered."""

    def result(*outcomes: Outcome) -> StoreResult:
        return StoreResult("P@h:1", tuple(InstanceResult(i, str(i), o, None, f"r{o}") for i, o in
                                          enumerate(outcomes)))

    assert Outcome.DELIVERED == result().outcome == result(Outcome.DELIVERED).outcome
    assert result(Outcome.DELIVERED, Outcome.RETRY).outcome == Outcome.RETRY
    assert result(Outcome.RETRY, Outcome.DEAD, Outcome.DELIVERED).outcome == Outcome.DEAD
    assert result(Outcome.RETRY, Outcome.DEAD, Outcome.DELIVERED).reason == "rretry; rdead"


# -- C-ECHO ----------------------------------------------------------------------------------------


def test_echo_true_when_up(orthanc: Orthanc) -> None:
    """C-ECHO to a running Orthanc succeeds."""
    result = echo(peer_of(orthanc), timeout=FAST)
    assert result
    assert result.status == PeerStatus.SUCCESS


def test_echo_false_and_retry_when_down() -> None:
    """C-ECHO to a closed port is false, RETRY, with a reason naming the peer."""
    peer = down_peer()
    result = echo(peer, timeout=FAST)
    assert not result
    assert result.outcome == Outcome.RETRY
    assert peer.describe() in result.reason


# -- C-STORE to Orthanc ----------------------------------------------------------------------------


def test_store_delivers_sr_and_ct_under_the_right_study(orthanc: Orthanc, tmp_path: Path) -> None:
    """CT files and SR data sets of each SR class arrive and sit under their StudyInstanceUID."""
    spec = small_ct()
    ct_paths = write_ct_series(spec, tmp_path / "ct")
    reports = [minimal_sr(spec, uid) for uid in SR_CLASSES]
    sr_path = tmp_path / "sr.dcm"
    reports[0].save_as(sr_path, enforce_file_format=True)

    result = store(peer_of(orthanc), [*ct_paths, sr_path, *reports[1:]], timeout=FAST)

    assert result.outcome == Outcome.DELIVERED, result.reason
    assert result.statuses == (0,) * 6
    sent = [str(dcmread(p).SOPInstanceUID) for p in ct_paths] + [str(r.SOPInstanceUID) for r in reports]
    assert sent == [r.sop_instance_uid for r in result.instances]
    assert sorted(sent) == sorted(orthanc.study_instance_uids(spec.study_instance_uid))
    for report in reports:
        assert spec.study_instance_uid == orthanc.study_of_instance(str(report.SOPInstanceUID))
        tags = orthanc.instance_tags(orthanc.find_instance(str(report.SOPInstanceUID)) or "")
        assert str(report.SOPClassUID) == tags["SOPClassUID"]


def test_dataset_without_file_meta_is_sent_and_left_unchanged(orthanc: Orthanc) -> None:
    """A data set built without file meta goes as Explicit VR LE; the caller's object is untouched."""
    report = minimal_sr(file_meta=False)
    assert store(peer_of(orthanc), [report], timeout=FAST).outcome == Outcome.DELIVERED
    assert not hasattr(report, "file_meta")
    assert orthanc.find_instance(str(report.SOPInstanceUID))


def test_resending_the_same_instance_is_idempotent(orthanc: Orthanc) -> None:
    """The same SOP Instance UID sent twice (in one call and again later) is stored once."""
    report = minimal_sr()
    first = store(peer_of(orthanc), [report, report], timeout=FAST)
    count = orthanc.statistics()["CountInstances"]
    again = store(peer_of(orthanc), [report], timeout=FAST)

    assert Outcome.DELIVERED == first.outcome == again.outcome
    assert len(orthanc.find_instances(str(report.SOPInstanceUID))) == 1
    assert count == orthanc.statistics()["CountInstances"]


def test_store_to_a_down_pacs_is_retry_with_a_reason() -> None:
    """Nothing listening: every instance is RETRY, no status, and the reason names the peer."""
    peer = down_peer()
    result = store(peer, [minimal_sr(), minimal_sr()], timeout=FAST)
    assert result.outcome == Outcome.RETRY
    assert result.statuses == (None, None)
    assert "no association" in result.reason
    assert peer.describe() in result.reason


def test_pacs_down_then_back_on_the_same_port(orthanc_factory: OrthancFactory) -> None:
    """Stopped: RETRY. Restarted on the same ports and storage: the resend is delivered, old data kept."""
    pacs = orthanc_factory().start()
    before, report = minimal_sr(), minimal_sr()
    assert store(peer_of(pacs), [before], timeout=FAST)

    assert pacs.stop() == 0
    down = store(peer_of(pacs), [report], timeout=FAST)
    assert down.outcome == Outcome.RETRY
    assert not echo(peer_of(pacs), timeout=FAST)

    pacs.start()
    assert echo(peer_of(pacs), timeout=FAST)
    assert store(peer_of(pacs), [report], timeout=FAST).outcome == Outcome.DELIVERED
    assert pacs.find_instance(str(report.SOPInstanceUID))
    assert pacs.find_instance(str(before.SOPInstanceUID))


def test_wrong_called_ae_title_is_rejected_as_retry(orthanc: Orthanc) -> None:
    """Orthanc (DicomCheckCalledAet) rejects the association permanently; we classify it RETRY.

    A rejection is a configuration matter on one side or the other, fixed without touching the
    report, so it stays queued; the caller's retry limit decides when to give up.
    """
    report = minimal_sr()
    result = store(peer_of(orthanc, ae_title="NOT_ORTHANC"), [report], timeout=FAST)
    assert result.outcome == Outcome.RETRY
    assert "rejected" in result.reason
    assert "Called AE title not recognised" in result.reason
    assert orthanc.find_instance(str(report.SOPInstanceUID)) is None


def test_unknown_calling_ae_title_is_rejected_as_retry(orthanc: Orthanc) -> None:
    """Orthanc accepts stores only from AE titles in DicomModalities: others are rejected, RETRY."""
    result = store(peer_of(orthanc, calling_ae_title="STRANGER"), [minimal_sr()], timeout=FAST)
    assert result.outcome == Outcome.RETRY
    assert "Calling AE title not recognised" in result.reason
    assert not echo(peer_of(orthanc, calling_ae_title="STRANGER"), timeout=FAST)


def test_sop_class_not_accepted_is_dead_and_the_rest_delivered(orthanc: Orthanc) -> None:
    """A SOP class Orthanc refuses on the association is DEAD; the SR beside it is delivered."""
    report, odd = minimal_sr(), minimal_sr(sop_class_uid=PRIVATE_SOP_CLASS)
    result = store(peer_of(orthanc), [odd, report], timeout=FAST)
    assert [r.outcome for r in result.instances] == [Outcome.DEAD, Outcome.DELIVERED]
    assert result.outcome == Outcome.DEAD
    assert "not accepted" in result.reason
    assert orthanc.find_instance(str(report.SOPInstanceUID))


def test_orthanc_answers_a700_for_an_incomplete_instance(orthanc: Orthanc) -> None:
    """Orthanc 1.10 answers 0xA700 (Out of Resources) even when a required UID is missing: RETRY.

    Our table follows the standard's meaning; the caller's attempt limit ends such a resend loop.
    """
    report = minimal_sr()
    del report.StudyInstanceUID
    result = store(peer_of(orthanc), [report], timeout=FAST)
    assert result.statuses == (0xA700,)
    assert result.outcome == Outcome.RETRY


def test_unreadable_inputs_are_dead_and_the_rest_is_sent(orthanc: Orthanc, tmp_path: Path) -> None:
    """A missing file, a non-DICOM file and a data set without UIDs are DEAD; no path in the reason."""
    missing, garbage = tmp_path / "DOE_JANE" / "gone.dcm", tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom at all")
    no_uid = minimal_sr()
    del no_uid.SOPInstanceUID
    report = minimal_sr()

    result = store(peer_of(orthanc), [missing, str(garbage), no_uid, report], timeout=FAST)

    assert [r.outcome for r in result.instances] == [Outcome.DEAD] * 3 + [Outcome.DELIVERED]
    assert [r.sop_instance_uid for r in result.instances[:3]] == [None, None, None]
    assert "DOE_JANE" not in result.reason
    assert "garbage" not in result.reason
    assert orthanc.find_instance(str(report.SOPInstanceUID))


def test_tls_context_is_used_and_a_plain_peer_is_retry(orthanc: Orthanc) -> None:
    """With an ssl_context the association is TLS; plain Orthanc cannot answer it, so RETRY."""
    context = ssl.create_default_context()
    result = store(peer_of(orthanc, ssl_context=context), [minimal_sr()], timeout=FAST)
    assert result.outcome == Outcome.RETRY
    assert result.statuses == (None,)


# -- stand-in peers: silence, slowness and chosen statuses ----------------------------------------


def test_silent_peer_times_out_as_retry() -> None:
    """A peer that accepts TCP but never answers the association request: RETRY after the ACSE timeout."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        peer = PacsPeer("SILENT", LOOPBACK, listener.getsockname()[1])
        result = store(peer, [minimal_sr()], timeout=Timeouts(connect=1, acse=0.5, dimse=1, network=1))
    assert result.outcome == Outcome.RETRY
    assert "no answer in time" in result.reason


@pytest.fixture
def fake_scp() -> Iterator[Callable[[Callable[[evt.Event], int]], PacsPeer]]:
    """Start pynetdicom Storage SCPs for SR on loopback whose C-STORE handler the test supplies."""
    servers = []

    def start(handler: Callable[[evt.Event], int]) -> PacsPeer:
        ae = AE(ae_title="FAKEPACS")
        for uid in SR_CLASSES:
            ae.add_supported_context(uid, ExplicitVRLittleEndian)
        port = free_port()
        servers.append(ae.start_server((LOOPBACK, port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, handler)]))
        return PacsPeer("FAKEPACS", LOOPBACK, port)

    yield start
    for server in servers:
        server.shutdown()


def test_each_instance_gets_its_own_status(fake_scp: Callable[..., PacsPeer]) -> None:
    """Statuses per instance: warning DELIVERED, out of resources RETRY, cannot understand DEAD."""
    statuses = iter([0xB000, 0xA702, 0xC123, 0x0000])
    peer = fake_scp(lambda event: next(statuses))
    result = store(peer, [minimal_sr() for _ in range(4)], timeout=FAST)
    assert result.statuses == (0xB000, 0xA702, 0xC123, 0x0000)
    outcomes = [r.outcome for r in result.instances]
    assert outcomes == [Outcome.DELIVERED, Outcome.RETRY, Outcome.DEAD, Outcome.DELIVERED]
    assert result.outcome == Outcome.DEAD


def test_no_response_in_time_is_retry_for_the_rest_too(fake_scp: Callable[..., PacsPeer]) -> None:
    """DIMSE timeout on the first instance aborts the association: both instances are RETRY."""
    release = threading.Event()

    def slow(event: evt.Event) -> int:
        release.wait(10)
        return 0x0000

    peer = fake_scp(slow)
    try:
        result = store(peer, [minimal_sr(), minimal_sr()], timeout=Timeouts(connect=2, acse=2, dimse=0.5,
                                                                              network=5))
    finally:
        release.set()
    assert [r.outcome for r in result.instances] == [Outcome.RETRY, Outcome.RETRY]
    assert result.statuses == (None, None)
    assert "no C-STORE response" in result.instances[0].reason


# -- logging ---------------------------------------------------------------------------------------


def test_logs_hold_no_patient_data(orthanc: Orthanc) -> None:
    """With the service's logging at DEBUG, a store logs one summary and no name, ID or UID."""
    report = minimal_sr()
    stream = io.StringIO()
    with logging_restored():
        configure_logging(level="DEBUG", stream=stream)
        store(peer_of(orthanc), [report], timeout=FAST)
        store(peer_of(orthanc, ae_title="NOT_ORTHANC"), [report], timeout=FAST)
        echo(peer_of(orthanc), timeout=FAST)
    text = stream.getvalue()
    assert text.count('"event": "pacs_store"') == 2
    assert '"event": "pacs_echo"' in text
    for secret in (PATIENT_NAME, "DOE", PATIENT_ID, str(report.SOPInstanceUID), str(report.StudyInstanceUID)):
        assert secret not in text
