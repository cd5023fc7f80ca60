"""The whole service, end to end and through crashes: scanner -> NeuroScribe -> Orthanc and the RIS.

Real peers only: DCMTK ``storescu`` is the scanner, Orthanc the PACS, hl7apy's MLLP server the RIS,
``neuroscribe serve`` runs as a subprocess with the demo model (synthetic phantoms only) and its
drafting worker. Crashes are real ``kill -9``s: from the test (mid-ingest) or at named crash points
(:mod:`neuroscribe.failpoints`) that SIGKILL the service and its worker at an exact step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless
from sqlalchemy import text

from neuroscribe.daemon.service import SHUTDOWN_GRACE_SECONDS
from neuroscribe.daemon.worker import DEMO_BUNDLE
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.inference.bundle import MANIFEST_FILE, write_manifest
from neuroscribe.reporting.mllp import send_message
from neuroscribe.store import JobRow, JobState, JobStore, OutboxStore, StateStore
from neuroscribe.training.registry import Registry
from tests.conftest import DCMTK_ENV, SERVER_AE, Server, ServerFactory, send_files_raw, storescu
from tests.orthanc import ORTHANC_AET, Orthanc
from tests.peers import Ris, free_port
from tests.site_helpers import final_oru

SLICES = 24
#: Distinctive patient data that must never reach a log line, the audit trail or a metrics label.
PATIENT_NAME = "ZZTESTPATIENT^QUINCE"
PATIENT_ID = "PIDQ7731"
ACCESSION = "ACCQ5519"


def make_study(folder: Path) -> tuple[CtSeriesSpec, list[Path]]:
    spec = CtSeriesSpec(rows=128, columns=128, slices=SLICES, patient_name=PATIENT_NAME,
                        patient_id=PATIENT_ID, accession_number=ACCESSION)
    return spec, write_ct_series(spec, folder)


def peer_env(orthanc: Orthanc, ris: Ris) -> dict[str, str]:
    """Settings that deliver to the test's Orthanc and RIS, retrying fast."""
    return {
        "NEUROSCRIBE_PACS": json.dumps([{"name": "orthanc", "ae_title": ORTHANC_AET, "host": "127.0.0.1",
                                         "port": orthanc.dicom_port, "timeout_seconds": 5}]),
        "NEUROSCRIBE_RIS": json.dumps([{"name": "ris", "host": "127.0.0.1", "port": ris.port,
                                        "timeout_seconds": 5}]),
        "NEUROSCRIBE_OUTBOX__POLL_SECONDS": "0.5",
        "NEUROSCRIBE_OUTBOX__BACKOFF_BASE_SECONDS": "1",
        "NEUROSCRIBE_INFERENCE__POLL_SECONDS": "0.5",
    }


def job_of(series_uid: str) -> Any:
    """A :meth:`Server.wait_for` predicate: the series' job once delivered (or dead)."""

    def predicate(store: StateStore) -> JobRow | None:
        found = JobStore(store.db).jobs(series_instance_uid=series_uid)
        return found[-1] if found and found[-1].state in (JobState.DELIVERED, JobState.DEAD) else None

    return predicate


def control_ids(ris: Ris) -> list[str]:
    """MSH-10 of every message the RIS received."""
    return [er7.split("\r")[0].split("|")[9] for er7 in ris.received]


def assert_exactly_one_report(server: Server, orthanc: Orthanc, ris: Ris, spec: CtSeriesSpec,
                              files: list[Path]) -> JobRow:
    """One delivered job, one report, one SR in Orthanc (its UID), one control ID at the RIS."""
    job = server.wait_for(job_of(spec.series_instance_uid), timeout=120)
    assert job.state == JobState.DELIVERED, job
    store = server.state()
    try:
        reports = OutboxStore(store.db).reports_for_series(spec.series_instance_uid)
        jobs = JobStore(store.db).jobs(series_instance_uid=spec.series_instance_uid)
        recorded = {h["sop_instance_uid"] for h in store.instance_headers(spec.series_instance_uid)}
    finally:
        store.db.close()
    assert len(reports) == 1
    assert [j.state for j in jobs] == [JobState.DELIVERED]
    assert recorded == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    ct_uids = recorded
    in_pacs = set(orthanc.study_instance_uids(spec.study_instance_uid)) - ct_uids
    assert in_pacs == {reports[0].sr_sop_instance_uid}
    assert set(control_ids(ris)) == {reports[0].control_id}
    return job


@pytest.fixture
def peers(orthanc_factory: Any, ris: Ris) -> tuple[Orthanc, Ris]:
    orthanc = orthanc_factory(modalities={"NEUROSCRIBE": 0}).start()
    return orthanc, ris


def test_scanner_to_pacs_and_ris_end_to_end(server_factory: ServerFactory, peers: tuple[Orthanc, Ris],
                                            tmp_path: Path) -> None:
    """storescu push -> SR in Orthanc -> ORU acknowledged by the RIS; health, metrics and logs say so."""
    orthanc, ris = peers
    server = server_factory(**peer_env(orthanc, ris)).start()
    spec, files = make_study(tmp_path / "ct")
    assert storescu(server.port, files).returncode == 0
    job = assert_exactly_one_report(server, orthanc, ris, spec, files)
    assert job.accession_hash is not None and ACCESSION not in job.accession_hash

    sr_uid = next(iter(set(orthanc.study_instance_uids(spec.study_instance_uid))
                       - {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}))
    tags = orthanc.instance_tags(orthanc.find_instance(sr_uid) or "")
    assert tags["Modality"] == "SR" and tags["PatientID"] == PATIENT_ID
    oru = ris.received[0]
    assert "ORU^R01" in oru and ACCESSION in oru

    http = f"http://127.0.0.1:{server.env['NEUROSCRIBE_HTTP__PORT']}"
    ready = _get_json(f"{http}/readyz")
    assert ready["ok"] is True, ready
    checks = ready["checks"]
    assert checks["model"]["name"] == "neuroscribe-demo-cvit" and checks["model"]["synthetic"] is True
    assert checks["execution_provider"]["providers"][-1] == "CPUExecutionProvider"
    assert {d["destination"]: d["ok"] for d in checks["destinations"]["each"]} == {"pacs:orthanc": True,
                                                                                 "ris:ris": True}
    assert _get_json(f"{http}/healthz")["ok"] is True
    metrics = urllib.request.urlopen(f"{http}/metrics", timeout=10).read().decode()  # noqa: S310 (loopback http)
    assert f"neuroscribe_instances_received_total {float(SLICES)}" in metrics
    assert 'neuroscribe_jobs{state="delivered"} 1.0' in metrics
    assert 'neuroscribe_outbox_items{state="delivered"} 2.0' in metrics
    assert "neuroscribe_time_to_report_seconds_count 1.0" in metrics
    assert "neuroscribe_time_to_delivery_seconds_count 1.0" in metrics
    assert 'neuroscribe_model_info{device="cpu",name="neuroscribe-demo-cvit"' in metrics

    assert server.stop() == 0  # SIGTERM: a clean exit
    logs = server.logs() + metrics
    audit_file = server.root / "logs" / "audit.jsonl"
    logs += audit_file.read_text() if audit_file.exists() else ""
    for secret in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, ACCESSION,
                   spec.study_instance_uid, spec.series_instance_uid):
        assert secret not in logs


def _get_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback http)
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:  # 503 still has the JSON body
        return dict(json.loads(exc.read()))


@pytest.mark.parametrize("crash_point", [
    "assembler.after_select",  # after completion and selection, before the job is queued
    "worker.claimed",  # mid-inference: the job is claimed, the model is about to run
    "worker.after_report",  # the report is queued, the job not yet marked reported
    "outbox.after_send.pacs",  # mid-delivery: Orthanc has the SR, the outbox has not recorded it
    "outbox.after_send.ris",  # mid-delivery: the RIS acknowledged, the outbox has not recorded it
])
def test_kill_9_at_each_stage_then_restart_gives_exactly_one_report(
    crash_point: str, server_factory: ServerFactory, peers: tuple[Orthanc, Ris], tmp_path: Path
) -> None:
    orthanc, ris = peers
    server = server_factory(**peer_env(orthanc, ris), NEUROSCRIBE_FAILPOINTS=crash_point).start()
    spec, files = make_study(tmp_path / "ct")
    assert storescu(server.port, files).returncode == 0
    assert server.proc is not None
    assert server.proc.wait(timeout=90) == -9  # SIGKILL at the crash point
    worker_pids = [int(pid) for pid in re.findall(r'"drafting worker spawned".*?"pid": ?(\d+)',
                                                   server.logs())]
    server.env.pop("NEUROSCRIBE_FAILPOINTS")
    server.start()
    assert_exactly_one_report(server, orthanc, ris, spec, files)
    for pid in worker_pids[:1]:  # the first run's worker died with its service
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    if crash_point == "outbox.after_send.ris":
        assert len(ris.received) == 2  # sent again after the restart: same control ID, the RIS dedupes
    else:
        assert len(ris.received) == 1


def test_kill_9_mid_ingest_then_the_scanner_resends(server_factory: ServerFactory,
                                                    peers: tuple[Orthanc, Ris], tmp_path: Path) -> None:
    """Killed while the series streams in: nothing acknowledged is lost, and one report comes out."""
    orthanc, ris = peers
    # A quiet period longer than the restart, so the half series is not reported before the resend
    # (it would be a report of its own: a late instance opens a new revision, see docs/series.md).
    server = server_factory(**peer_env(orthanc, ris), NEUROSCRIBE_SERIES__QUIET_SECONDS="8").start()
    spec, files = make_study(tmp_path / "ct")
    scanner = subprocess.Popen(
        ["storescu", "-v", "-aec", SERVER_AE, "127.0.0.1", str(server.port), *map(str, files)],
        env=DCMTK_ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    assert scanner.stderr is not None
    acknowledged = 0
    for line in scanner.stderr:
        if "Received Store Response (Success)" in line:
            acknowledged += 1
            if acknowledged == 10:
                server.kill()
                break
    scanner.wait(timeout=60)
    assert acknowledged == 10
    server.start()
    assert storescu(server.port, files).returncode == 0  # the scanner sends the study again
    assert_exactly_one_report(server, orthanc, ris, spec, files)
    assert len(ris.received) == 1


def test_a_failing_series_is_recorded_failed_and_the_queue_moves_on(server_factory: ServerFactory,
                                                                    tmp_path: Path) -> None:
    """A series the volume checks refuse ends ``failed`` with its reason; the next series is reported."""
    server = server_factory().start()
    bad = CtSeriesSpec(rows=64, columns=64, slices=8)
    bad_files = write_ct_series(bad, tmp_path / "bad")
    broken = pydicom.dcmread(bad_files[3])  # a JPEG-LS slice whose code stream is garbage
    broken.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(100)])
    broken["PixelData"].VR = "OB"
    broken.file_meta.TransferSyntaxUID = JPEGLSLossless
    broken.save_as(bad_files[3], enforce_file_format=True)
    good, good_files = make_study(tmp_path / "good")
    plain = bad_files[:3] + bad_files[4:]
    assert send_files_raw(server.port, plain) == [0x0000] * len(plain)
    assert send_files_raw(server.port, [bad_files[3]]) == [0x0000]  # its own transfer syntax
    assert storescu(server.port, good_files).returncode == 0

    def finished(store: StateStore) -> list[JobRow] | None:
        jobs = JobStore(store.db).jobs()
        done = [j for j in jobs if j.state in (JobState.FAILED, JobState.DELIVERED)]
        return jobs if len(jobs) == 2 and len(done) == 2 else None

    jobs = {j.series_instance_uid: j for j in server.wait_for(finished, timeout=90)}
    assert jobs[bad.series_instance_uid].state == JobState.FAILED
    assert "cannot be decoded" in (jobs[bad.series_instance_uid].reason or "")
    assert jobs[bad.series_instance_uid].attempts == 1  # a refused volume is not retried
    assert jobs[good.series_instance_uid].state == JobState.DELIVERED  # no destinations: nowhere to wait
    assert os.environ.get("NEUROSCRIBE_FAILPOINTS") is None


def test_a_promoted_model_is_swapped_in_without_a_restart(server_factory: ServerFactory,
                                                          tmp_path: Path) -> None:
    """The worker serves the demo model, then the registry's newly promoted one; the service never stops."""
    server = server_factory(NEUROSCRIBE_INFERENCE__POLL_SECONDS="0.3").start()
    assert server.proc is not None
    pid = server.proc.pid

    def report_version(spec: CtSeriesSpec) -> str:
        server.wait_for(job_of(spec.series_instance_uid), timeout=90)
        store = server.state()
        try:
            return OutboxStore(store.db).reports_for_series(spec.series_instance_uid)[0].model_version
        finally:
            store.db.close()

    first, first_files = make_study(tmp_path / "first")
    assert storescu(server.port, first_files).returncode == 0
    assert report_version(first) == json.loads((DEMO_BUNDLE / MANIFEST_FILE).read_text())["version"]

    candidate = tmp_path / "candidate"
    shutil.copytree(DEMO_BUNDLE, candidate)
    manifest = json.loads((candidate / MANIFEST_FILE).read_text())
    for key in ("format", "files"):
        manifest.pop(key)
    write_manifest(candidate, {**manifest, "version": "0.2.0-swap-test"})
    Registry(server.root / "models").promote(candidate, margin=0.01)  # no current model: it passes

    second, second_files = make_study(tmp_path / "second")
    assert storescu(server.port, second_files).returncode == 0
    assert report_version(second) == "0.2.0-swap-test"
    assert server.proc.poll() is None and server.proc.pid == pid
    assert '"model swapped in"' in server.logs()


def test_sigterm_mid_inference_exits_in_bounds_and_the_restart_finishes_the_job(
    server_factory: ServerFactory, peers: tuple[Orthanc, Ris], tmp_path: Path
) -> None:
    """SIGTERM while a job is inferring: exit 0 within the grace period; the next start reports it once."""
    orthanc, ris = peers
    server = server_factory(**peer_env(orthanc, ris)).start()
    spec, files = make_study(tmp_path / "ct")
    assert storescu(server.port, files).returncode == 0

    def inferring(store: StateStore) -> JobRow | None:
        found = JobStore(store.db).jobs(series_instance_uid=spec.series_instance_uid)
        return found[0] if found and found[0].state != JobState.QUEUED else None

    server.wait_for(inferring, timeout=60, interval=0.05)
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < SHUTDOWN_GRACE_SECONDS + 10
    server.start()
    assert_exactly_one_report(server, orthanc, ris, spec, files)
    assert len(ris.received) == 1


def test_the_sites_final_report_becomes_a_training_pair(server_factory: ServerFactory,
                                                        peers: tuple[Orthanc, Ris], tmp_path: Path) -> None:
    """Reported series + the RIS's final ORU (status F) on the learning port = a de-identified pair."""
    orthanc, ris = peers
    learning_port = free_port()
    server = server_factory(**peer_env(orthanc, ris), NEUROSCRIBE_LEARNING__ENABLED="true",
                            NEUROSCRIBE_LEARNING__PORT=str(learning_port)).start()
    spec, files = make_study(tmp_path / "ct")
    assert storescu(server.port, files).returncode == 0
    assert_exactly_one_report(server, orthanc, ris, spec, files)

    final = final_oru("RISFINAL1", ACCESSION, patient_id=PATIENT_ID)
    result = send_message("127.0.0.1", learning_port, final, timeout=10)
    assert "MSA|AA|RISFINAL1" in result.replace("\r", "\n")

    manifest = server.root / "site-data" / "manifest.jsonl"

    def paired(_store: StateStore) -> list[dict[str, Any]] | None:
        lines = manifest.read_text().splitlines() if manifest.exists() else []
        return [json.loads(line) for line in lines] or None

    (pair,) = server.wait_for(paired, timeout=60)
    series_dir = Path(pair["series_path"])
    if not series_dir.is_absolute():
        series_dir = manifest.parent / series_dir
    copies = sorted(series_dir.iterdir())
    assert len(copies) == SLICES
    for path in copies[:3]:
        data = path.read_bytes()
        for secret in (PATIENT_NAME.encode(), PATIENT_ID.encode(), ACCESSION.encode(),
                       spec.study_instance_uid.encode()):
            assert secret not in data
    assert "Okonkwo" not in pair["report"] and "Findings" in pair["report"]

    http = f"http://127.0.0.1:{server.env['NEUROSCRIBE_HTTP__PORT']}"
    metrics = urllib.request.urlopen(f"{http}/metrics", timeout=10).read().decode()  # noqa: S310 (loopback http)
    assert "neuroscribe_training_pairs_total" in metrics
    audit_lines = (server.root / "logs" / "audit.jsonl").read_text()
    assert '"event":"export_for_training"' in audit_lines
    assert PATIENT_ID not in audit_lines and ACCESSION not in audit_lines
    store = server.state()
    try:
        with store.db.read() as conn:
            scheduled = {row[0] for row in conn.execute(text("SELECT id FROM apscheduler_jobs"))}
    finally:
        store.db.close()
    assert {"retention", "final-report-pairing"} <= scheduled


def test_a_port_in_use_stops_the_start_with_the_key_named(server_factory: ServerFactory) -> None:
    """HTTP port taken: exit 1 with 'http.port = N: ... in use', no traceback, no worker left behind."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        server = server_factory(NEUROSCRIBE_HTTP__PORT=str(port))
        result = subprocess.run([sys.executable, "-m", "neuroscribe", "serve"], env=server.env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"http.port = {port}: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert '"drafting worker stopped"' in result.stdout or '"drafting worker spawned"' not in result.stdout
