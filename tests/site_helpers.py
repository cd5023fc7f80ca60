"""Helpers for the learning and retention tests: settings, a reported series in the spool, a final report.

A series is written as real DICOM files into the spool folder of ``settings``, recorded instance by
instance in the state database, completed, selected and given a job that made a report with the
accession's key, as the receiver, the assembler and the drafting worker would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroscribe.config import Settings, load_settings
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.store import (
    Database,
    InstanceRecord,
    JobState,
    JobStore,
    SeriesState,
    StateStore,
    accession_key,
)

#: The patient of the test series and reports (names that must never leave the message or the spool).
PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "P-0042"
ACCESSION = "ACC-1001"
ORDERING = "Walker^Alice"
READER = "Okonkwo^Chidi"
CLINICAL = "No intracranial haemorrhage. Ventricles and sulci normal for age."


def learning_settings(tmp_path: Path, **learning: Any) -> Settings:
    """Settings with storage under ``tmp_path/var`` and the learning listener on a free loopback port."""
    return load_settings(storage={"root": tmp_path / "var"},
                         learning={"enabled": True, "bind": "127.0.0.1", "port": 0, **learning})


def small_spec(**changes: Any) -> CtSeriesSpec:
    """A small head CT of the test patient (fast to write and de-identify)."""
    values: dict[str, Any] = {"rows": 32, "columns": 32, "slices": 4, "patient_name": PATIENT_NAME,
                              "patient_id": PATIENT_ID, "accession_number": ACCESSION}
    return CtSeriesSpec(**{**values, **changes})


@dataclass(frozen=True)
class StoredSeries:
    """A series in the spool with its rows."""

    spec: CtSeriesSpec
    paths: list[Path]
    job_id: str | None


def store_series(settings: Settings, db: Database, spec: CtSeriesSpec, now: float, *,
                 job: JobState | None = JobState.DELIVERED, rejected: bool = False) -> StoredSeries:
    """Write ``spec`` into the spool and record it; then REJECTED, or SELECTED with a job in ``job``.

    ``job`` may be REPORTED, DELIVERED (no destinations: delivered at ``now``), INFERRING or None
    (selected, no job yet). The job's report carries ``accession_key(spec.accession_number)``.
    """
    folder = settings.storage.spool_dir / spec.series_instance_uid
    paths = [p.resolve() for p in write_ct_series(spec, folder)]
    state = StateStore(db)
    for index, path in enumerate(paths):
        state.record_instance(InstanceRecord(
            sop_instance_uid=spec.sop_instance_uid(index), series_instance_uid=spec.series_instance_uid,
            study_instance_uid=spec.study_instance_uid, sop_class_uid=spec.sop_class_uid,
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=path, size_bytes=path.stat().st_size,
            received_at=now - 100, calling_ae="SCANNER1", header={"instance_number": index + 1},
        ))
    state.complete_quiet_series(now - 50, quiet_seconds=10, force_complete_seconds=3600)
    decision = SeriesState.REJECTED if rejected else SeriesState.SELECTED
    assert state.decide_series(spec.series_instance_uid, 1, decision, now - 40, reason="test")
    if rejected or job is None:
        return StoredSeries(spec, paths, None)
    jobs = JobStore(db)
    new = jobs.queue_selected(now - 30)
    (queued,) = [j for j in new if j.series_instance_uid == spec.series_instance_uid]
    claimed = jobs.claim("test-worker", now - 20)
    assert claimed is not None and claimed.job_id == queued.job_id
    if job is not JobState.INFERRING:
        assert jobs.mark_reported(queued.job_id, report_id=f"rep-{queued.job_id}",
                                  accession_hash=accession_key(spec.accession_number), model_id="demo",
                                  inference_seconds=1.0, now=now - 10)
    if job is JobState.DELIVERED:
        moved = jobs.sync_deliveries(now)
        assert any(j.job_id == queued.job_id and s is JobState.DELIVERED for j, s in moved)
    return StoredSeries(spec, paths, queued.job_id)


def final_oru(control_id: str = "RIS0001", accession: str = ACCESSION, *, status: str = "F",
              patient_id: str = PATIENT_ID, message_type: str = "ORU^R01^ORU_R01",
              text: list[str] | None = None, obr: bool = True) -> str:
    """A radiologist's final report as a RIS sends it: names in PID-5, OBR-16, OBR-32, signature lines."""
    lines = text if text is not None else [
        "CT HEAD WITHOUT CONTRAST",
        "Clinical details: headache. Mrs Doe is known to Dr. Walker.",
        f"Findings: {CLINICAL}",
        f"Impression: normal study. Accession {accession} for patient {patient_id}.",
        "Dictated by: Chidi Okonkwo, MD",
        "Electronically signed by Dr Chidi Okonkwo on 20260102 0930",
    ]
    segments = [
        f"MSH|^~\\&|RIS|HOSPITAL|NEUROSCRIBE|HOSPITAL|20260102093000||{message_type}|{control_id}|P|2.5.1"
        "||||||UNICODE UTF-8",
        f"PID|1||{patient_id}^^^HOSP^MR||{PATIENT_NAME}||19600101|F",
        f"ORC|RE||{accession}",
    ]
    if obr:
        segments.append(f"OBR|1||{accession}|CTHEAD^CT HEAD^L|||20260101080000|||||||||"
                        f"D123^{ORDERING}^^^^^Dr||||||20260102093000|||{status}|||||||"
                        f"R456&{READER.replace('^', '&')}")
    segments += [f"OBX|{n}|TX|REPORT^Report^L||{line}||||||{status}" for n, line in enumerate(lines, 1)]
    return "\r".join(segments) + "\r"
