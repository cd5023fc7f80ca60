"""Plan and write synthetic head-CT studies, and the dataset.jsonl that describes them.

:func:`plan_study` decides everything about one study from ``(seed, index)``: patient, dates,
UIDs, acquisition, head, findings, lesion geometry, midline shift and report. Separate random
streams per concern (case, patient, acquisition, head, lesions, report, noise) keep a change in
one (say, report wording) from changing the others (the pixels). :func:`write_study` renders the
plan through :func:`neuroscribe.dicom_io.writer.write_ct_series`; :func:`generate_dataset` does
both for N studies and writes ``dataset.jsonl`` atomically. Same seed, same bytes in dataset.jsonl
and the same pixel data (SOP Instance UIDs and creation times come from the writer and differ).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.durable import atomic_file
from neuroscribe.errors import NeuroScribeError
from neuroscribe.training.synth.findings import (
    Degree,
    Finding,
    FindingKind,
    Region,
    Scenario,
    Side,
    sample_age,
    sample_findings,
)
from neuroscribe.training.synth.phantom import (
    CEREBRUM_CENTRE,
    CEREBRUM_SEMI_AXES,
    EllipsoidLesion,
    ExtraAxialLesion,
    HeadModel,
    Lesion,
    Phantom,
    SliceGeometry,
    TerritoryLesion,
    apply_mass_effect,
    build_lesion,
    midline_shift_mm,
    sample_head,
)
from neuroscribe.training.synth.profiles import (
    Acquisition,
    Profile,
    SizePreset,
    fit_slices,
    get_profile,
    get_size,
    sample_acquisition,
)
from neuroscribe.training.synth.report import write_report

__all__ = [
    "DATASET_FILE",
    "Patient",
    "StudyPlan",
    "SynthError",
    "generate_dataset",
    "plan_study",
    "study_folder",
    "write_study",
]

#: Name of the dataset index in the output folder.
DATASET_FILE = "dataset.jsonl"
#: Names of study folders (what --overwrite may remove).
_STUDY_FOLDER = re.compile(r"study_\d{5,}")
#: Prefix of the deterministic UIDs (pydicom's, with entropy from the seed and index).
UID_ENTROPY_TAG = "neuroscribe-synth-v1"
#: Study dates are spread over the year after this date.
FIRST_STUDY_DATE = dt.date(2025, 1, 1)

#: Random streams, one per concern: changing how one is used leaves the others unchanged.
_STREAMS = {"case": 1, "patient": 2, "acquisition": 3, "head": 4, "lesions": 5, "report": 6,
            "noise": 7}


class SynthError(NeuroScribeError):
    """Synthetic data cannot be generated as asked (bad output folder, bad parameters)."""


def _rng(seed: int, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, index, _STREAMS[stream]])


def _uid(seed: int, index: int, what: str) -> str:
    return str(generate_uid(entropy_srcs=[UID_ENTROPY_TAG, str(seed), str(index), what]))


@dataclass(frozen=True)
class Patient:
    """The synthetic patient of one study (no real person)."""

    patient_id: str
    patient_name: str
    sex: str
    age: int
    birth_date: str


@dataclass(frozen=True)
class StudyPlan:
    """Everything about one synthetic study, decided before any pixel is made."""

    seed: int
    index: int
    profile: str
    scenario: Scenario
    patient: Patient
    study_date: str
    study_time: str
    accession_number: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    acquisition: Acquisition
    origin_mm: tuple[float, float, float]
    head: HeadModel
    findings: tuple[Finding, ...]
    lesions: tuple[Lesion, ...]
    report: str

    @property
    def geometry(self) -> SliceGeometry:
        """Where the slices lie in patient coordinates."""
        return SliceGeometry.from_acquisition(self.acquisition, self.origin_mm)

    @property
    def midline_shift_mm(self) -> float:
        """Signed midline shift along patient x (negative: to the patient's right)."""
        return self.head.midline_shift_mm

    @property
    def is_normal(self) -> bool:
        """Whether the study has no finding at all."""
        return not self.findings

    def phantom(self) -> Phantom:
        """The phantom that renders this study's slices (noise seeded by seed and index)."""
        return Phantom(self.head, self.lesions, self.geometry, self.acquisition,
                       noise_seed=(self.seed, self.index, _STREAMS["noise"]))

    def series_spec(self) -> CtSeriesSpec:
        """The DICOM header content of the study's series."""
        a = self.acquisition
        return CtSeriesSpec(
            rows=a.rows,
            columns=a.columns,
            slices=a.slices,
            pixel_spacing_mm=(a.pixel_spacing_mm, a.pixel_spacing_mm),
            slice_thickness_mm=a.slice_thickness_mm,
            slice_step_mm=a.slice_step_mm,
            gantry_tilt_deg=a.gantry_tilt_deg,
            origin_mm=self.origin_mm,
            rescale_intercept=a.rescale_intercept,
            pixel_representation=a.pixel_representation,
            patient_name=self.patient.patient_name,
            patient_id=self.patient.patient_id,
            patient_birth_date=self.patient.birth_date,
            patient_sex=self.patient.sex,
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            frame_of_reference_uid=self.frame_of_reference_uid,
            accession_number=self.accession_number,
            study_id=str(self.index + 1),
            study_date=self.study_date,
            study_time=self.study_time,
            study_description="CT HEAD WITHOUT CONTRAST",
            series_description=a.series_description,
            series_number=2,
            protocol_name=a.protocol_name,
            manufacturer=a.manufacturer,
            manufacturer_model_name=a.model_name,
            institution_name=a.institution_name,
            station_name=a.station_name,
            kvp=a.kvp,
            convolution_kernel=a.kernel.name,
        )

    def record(self, series_path: str) -> dict[str, Any]:
        """The study's line of dataset.jsonl (``series_path`` relative to the dataset folder)."""
        a = self.acquisition
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "accession_number": self.accession_number,
            "patient_id": self.patient.patient_id,
            "patient_sex": self.patient.sex,
            "patient_age": self.patient.age,
            "study_date": self.study_date,
            "series_path": series_path,
            "profile": self.profile,
            "seed": self.seed,
            "index": self.index,
            "scenario": self.scenario.value,
            "normal": self.is_normal,
            "report": self.report,
            "findings": [f.to_dict() for f in self.findings],
            "midline_shift_mm": self.midline_shift_mm,
            "slice_thickness_mm": round(a.slice_thickness_mm, 4),
            "pixel_spacing_mm": [a.pixel_spacing_mm, a.pixel_spacing_mm],
            "gantry_tilt_deg": a.gantry_tilt_deg,
            "acquisition": a.to_dict(),
            "head": {"centre_mm": [round(v, 3) for v in self.head.centre_mm],
                     "scale": round(self.head.scale, 4),
                     "evans_index": round(self.head.evans_index, 3)},
        }


def plan_study(
    seed: int,
    index: int,
    profile: str | Profile = "standard",
    size: str | SizePreset = "small",
    *,
    rows: int | None = None,
    columns: int | None = None,
    slices: int | None = None,
    findings: Sequence[Finding] | None = None,
    scenario: Scenario | str | None = None,
    gantry_tilt_deg: float | None = None,
    noise_sigma_hu: float | None = None,
) -> StudyPlan:
    """Decide one study from ``(seed, index)``.

    Parameters
    ----------
    seed, index
        Non-negative integers; the same pair (and arguments) gives the same plan.
    profile, size
        Site profile and size preset (names or objects).
    rows, columns, slices
        Override the preset's matrix and the slice count (the slices then divide the head's
        coverage evenly).
    findings
        Use these findings instead of sampling (scenario ``custom``); geometry fields left None
        are filled in, and a midline shift is derived from them.
    scenario
        Force a scenario (findings are sampled from it).
    gantry_tilt_deg, noise_sigma_hu
        Override the acquisition's tilt and noise.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    prof = get_profile(profile)
    preset = get_size(size)

    case = _rng(seed, index, "case")
    if findings is not None:
        chosen = Scenario.CUSTOM
    elif scenario is not None:
        chosen = Scenario(scenario)
    else:
        chosen = prof.sample_scenario(case)
    age = sample_age(case, chosen)
    if findings is None:
        primary = sample_findings(case, chosen, age)
    else:
        primary = [f for f in findings if f.kind is not FindingKind.MIDLINE_SHIFT]

    patient_rng = _rng(seed, index, "patient")
    sex = "M" if patient_rng.random() < 0.5 else "F"
    study_day = FIRST_STUDY_DATE + dt.timedelta(days=int(patient_rng.integers(0, 365)))
    minutes = int(patient_rng.integers(7 * 60, 24 * 60))
    birth = _birth_date(study_day, age, int(patient_rng.integers(0, 365)))
    patient = Patient(
        patient_id=f"SYN{seed}-{index:05d}",
        patient_name=f"SYNTH^{index:04d}",
        sex=sex,
        age=age,
        birth_date=birth.strftime("%Y%m%d"),
    )

    acquisition = sample_acquisition(_rng(seed, index, "acquisition"), prof, preset, rows=rows,
                                     columns=columns)
    if gantry_tilt_deg is not None:
        acquisition = acquisition.with_(gantry_tilt_deg=float(gantry_tilt_deg))
    if noise_sigma_hu is not None:
        acquisition = acquisition.with_(noise_sigma_hu=float(noise_sigma_hu))

    head = sample_head(_rng(seed, index, "head"), sex=sex, findings=primary)
    lesion_rng = _rng(seed, index, "lesions")
    lesions: list[Lesion] = []
    resolved: list[Finding] = []
    for i, finding in enumerate(primary):
        made = build_lesion(head, finding, i, lesion_rng)
        lesions += made
        resolved.append(_describe(head, finding, made))

    shift = midline_shift_mm(resolved)
    head = apply_mass_effect(head, shift)
    resolved = [f.with_(evans_index=round(head.evans_index, 3))
                if f.kind in (FindingKind.HYDROCEPHALUS, FindingKind.ATROPHY) else f for f in resolved]
    if shift:
        magnitude = abs(shift)
        degree = Degree.MILD if magnitude < 5 else Degree.MODERATE if magnitude < 10 else Degree.MARKED
        resolved.append(Finding(FindingKind.MIDLINE_SHIFT, Side.RIGHT if shift < 0 else Side.LEFT,
                                Region.MIDLINE, size_mm=magnitude, degree=degree,
                                centre_mm=_displaced_septum(head)))

    low, high = head.coverage_mm(acquisition.gantry_tilt_deg)
    acquisition = fit_slices(acquisition, high - low, slices)
    origin = _origin(acquisition, low)
    geometry = SliceGeometry.from_acquisition(acquisition, origin)
    lesions, resolved = _snap_small_lesions(head, geometry, lesions, resolved)

    report = write_report(resolved, _rng(seed, index, "report"))
    return StudyPlan(
        seed=seed,
        index=index,
        profile=prof.name,
        scenario=chosen,
        patient=patient,
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{minutes // 60:02d}{minutes % 60:02d}00",
        accession_number=f"SA{seed % 1_000_000:06d}{index % 1_000_000:06d}",
        study_instance_uid=_uid(seed, index, "study"),
        series_instance_uid=_uid(seed, index, "series"),
        frame_of_reference_uid=_uid(seed, index, "frame-of-reference"),
        acquisition=acquisition,
        origin_mm=origin,
        head=head,
        findings=tuple(resolved),
        lesions=tuple(lesions),
        report=report,
    )


def _displaced_septum(head: HeadModel) -> tuple[float, float, float]:
    """Patient position of the septum pellucidum after the midline shift."""
    x, y, z = head.landmarks()["septum_pellucidum"]
    return _round3((x + head.midline_shift_mm, y, z))


def _birth_date(study_day: dt.date, age: int, extra_days: int) -> dt.date:
    year = study_day.year - age
    day = min(study_day.day, 28)
    return dt.date(year, study_day.month, day) - dt.timedelta(days=extra_days)


def _origin(acquisition: Acquisition, low: float) -> tuple[float, float, float]:
    """ImagePositionPatient of slice 0: field of view centred on the table, first slice half a
    thickness above the lowest point to cover."""
    t = math.radians(acquisition.gantry_tilt_deg)
    px = acquisition.pixel_spacing_mm
    ox = -acquisition.columns * px / 2
    oy = -acquisition.rows * px * math.cos(t) / 2
    first = low + acquisition.slice_thickness_mm / 2
    oz = (first - math.sin(t) * oy) / math.cos(t)
    return (round(ox, 4), round(oy, 4), round(oz, 4))


def _describe(head: HeadModel, finding: Finding, lesions: Sequence[Lesion]) -> Finding:
    """The finding with the geometry its lesions got: centre, density, volume, extent."""
    if not lesions:
        return finding
    first = lesions[0]
    changes: dict[str, Any] = {}
    if isinstance(first, EllipsoidLesion):
        changes["hu"] = round(first.hu, 1)
        if len(lesions) == 1:
            changes["centre_mm"] = _round3(head.to_patient(first.centre))
    elif isinstance(first, ExtraAxialLesion | TerritoryLesion):
        changes["hu"] = round(first.hu, 1)
        changes["extent_deg"] = round(math.degrees(first.max_angle), 1)
        if len(lesions) == 1:
            depth = first.thickness_mm / 2 if isinstance(first, ExtraAxialLesion) else first.depth_mm / 2
            changes["centre_mm"] = _round3(head.to_patient(_surface_point(first.u0, depth)))
    elif hasattr(first, "hu"):
        changes["hu"] = round(float(first.hu), 1)
    if finding.is_space_occupying:
        changes["volume_ml"] = round(sum(lesion.volume_ml(head) for lesion in lesions), 1)
    return finding.with_(**changes)


def _surface_point(u0: Sequence[float], depth: float) -> np.ndarray:
    centre = np.asarray(CEREBRUM_CENTRE)
    surface = centre + np.asarray(u0) * np.asarray(CEREBRUM_SEMI_AXES)
    inward = centre - surface
    return surface + inward / np.linalg.norm(inward) * depth


def _round3(p: Sequence[float]) -> tuple[float, float, float]:
    return (round(float(p[0]), 2), round(float(p[1]), 2), round(float(p[2]), 2))


def _snap_small_lesions(head: HeadModel, geometry: SliceGeometry, lesions: Sequence[Lesion],
                        findings: Sequence[Finding]) -> tuple[list[Lesion], list[Finding]]:
    """Centre lesions thinner than about a slice on a slice plane, so each one is seen.

    A synthetic slice samples its centre plane (no partial-volume averaging), so a 4 mm lacune
    between two 5 mm slice planes would vanish while the report still names it.
    """
    spacing = geometry.slice_step_mm * math.cos(math.radians(geometry.gantry_tilt_deg))
    out_lesions: list[Lesion] = []
    moved: dict[int, tuple[float, float, float]] = {}
    for lesion in lesions:
        if isinstance(lesion, EllipsoidLesion) and 2 * min(lesion.semi) * head.scale < 1.6 * spacing:
            patient = geometry.nearest_slice_point(head.to_patient(lesion.centre))
            model = head.to_model(patient)
            lesion = replace(lesion, centre=(float(model[0]), float(model[1]), float(model[2])))
            moved[lesion.index] = _round3(patient)
        out_lesions.append(lesion)
    out_findings = [f.with_(centre_mm=moved[i]) if i in moved and f.centre_mm is not None else f
                    for i, f in enumerate(findings)]
    return out_lesions, out_findings


# --- writing -----------------------------------------------------------------------------------


def study_folder(index: int) -> str:
    """The folder name of study ``index`` inside the dataset folder."""
    return f"study_{index:05d}"


def write_study(plan: StudyPlan, out_dir: Path) -> list[Path]:
    """Render and write the plan's series into ``out_dir``; return the files in slice order."""
    return write_ct_series(plan.series_spec(), Path(out_dir), pixels=plan.phantom().slice_hu)


@dataclass(frozen=True)
class _Job:
    out_dir: Path
    seed: int
    index: int
    profile: str
    size: str | SizePreset
    rows: int | None
    columns: int | None
    slices: int | None


def _make_study(job: _Job) -> dict[str, Any]:
    plan = plan_study(job.seed, job.index, job.profile, job.size, rows=job.rows, columns=job.columns,
                      slices=job.slices)
    folder = study_folder(job.index)
    write_study(plan, job.out_dir / folder)
    return plan.record(folder)


def generate_dataset(
    out_dir: Path,
    studies: int,
    seed: int,
    profile: str = "standard",
    size: str | SizePreset = "clinical",
    *,
    rows: int | None = None,
    columns: int | None = None,
    slices: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Write ``studies`` studies under ``out_dir`` (``study_00000/``...) and ``dataset.jsonl``.

    Parameters
    ----------
    out_dir
        Created if absent. It must be empty unless ``overwrite``, which first removes the
        ``study_NNNNN`` folders and dataset.jsonl of a previous run (nothing else).
    studies, seed
        How many studies, and the seed that decides them all.
    workers
        Processes to render in parallel (the output does not depend on it).

    Returns
    -------
    list of dict
        The dataset.jsonl records, in index order.
    """
    if studies < 1:
        raise SynthError(f"studies must be >= 1, got {studies}")
    if seed < 0:
        raise SynthError(f"seed must be >= 0, got {seed}")
    if workers < 1:
        raise SynthError(f"workers must be >= 1, got {workers}")
    try:
        prof = get_profile(profile)
        get_size(size)
    except ValueError as exc:
        raise SynthError(str(exc)) from exc
    out_dir = Path(out_dir)
    _prepare(out_dir, overwrite)
    jobs = [_Job(out_dir, seed, i, prof.name, size, rows, columns, slices) for i in range(studies)]
    try:
        if workers == 1:
            records = [_make_study(job) for job in jobs]
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                records = list(pool.map(_make_study, jobs))
    except ValueError as exc:  # bad sizes or slice counts from the caller
        raise SynthError(str(exc)) from exc
    _write_jsonl(out_dir / DATASET_FILE, records)
    return records


def _prepare(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SynthError(f"--out {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise SynthError(f"--out {out_dir} is not empty (use --overwrite to replace a previous run)")
    for path in out_dir.iterdir():  # only what a previous run wrote: study_NNNNN/ and dataset.jsonl
        if path.is_dir() and _STUDY_FOLDER.fullmatch(path.name):
            shutil.rmtree(path)
    (out_dir / DATASET_FILE).unlink(missing_ok=True)


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write ``records`` as JSON lines, durably (see :func:`neuroscribe.durable.atomic_file`)."""
    with atomic_file(path, "w") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
