"""Tests for neuroscribe.training.synth: phantoms, findings, reports, profiles and the CLI."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from neuroscribe.cli import main
from neuroscribe.dicom_io.volume import Volume, build_volume
from neuroscribe.training.synth import (
    DATASET_FILE,
    Finding,
    FindingKind,
    StudyPlan,
    SynthError,
    Tissue,
    generate_dataset,
    plan_study,
    report_template,
    write_study,
)
from tests.conftest import logging_restored

#: CSF-like voxels: below this (HU) and above -10 (white matter is ~27 HU).
CSF_BELOW_HU = 18.0


# --- helpers -------------------------------------------------------------------------------------


def _volume(plan: StudyPlan, folder: Path) -> Volume:
    return build_volume(write_study(plan, folder))


def _patient_grid(volume: Volume) -> np.ndarray:
    """Patient (LPS) coordinates of every voxel, shape (3, z, y, x)."""
    k, i, j = np.indices(volume.shape, dtype=np.float64)
    affine = volume.affine
    return np.einsum("ab,bzyx->azyx", affine[:3, :3], np.stack([k, i, j])) + affine[:3, 3, None, None, None]


def _model_grid(plan: StudyPlan, volume: Volume) -> np.ndarray:
    """Head-model coordinates of every voxel, shape (3, z, y, x)."""
    grid = _patient_grid(volume)
    centre = np.asarray(plan.head.centre_mm)[:, None, None, None]
    return (grid - centre) / plan.head.scale


def _voxel(volume: Volume, point: tuple[float, float, float]) -> tuple[int, int, int]:
    k, i, j, _ = np.linalg.inv(volume.affine) @ np.array([*point, 1.0])
    return round(k), round(i), round(j)


def _median_near(volume: Volume, point: tuple[float, float, float]) -> float:
    k, i, j = _voxel(volume, point)
    return float(np.median(volume.hu[k, i - 1:i + 2, j - 1:j + 2]))


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.:])\s+|\n", text) if s.strip()]


# --- determinism and geometry --------------------------------------------------------------------


def test_same_seed_gives_identical_dataset_and_pixels(tmp_path: Path) -> None:
    """Two runs with one seed write identical dataset.jsonl and DICOM bytes; another seed differs."""
    runs = {}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        generate_dataset(tmp_path / name, 2, seed, "standard", "small")
        text = (tmp_path / name / DATASET_FILE).read_bytes()
        files = sorted((tmp_path / name).glob("study_*/IMG*.dcm"))
        pixels = [pydicom.dcmread(p).pixel_array for p in files]
        runs[name] = (text, pixels, [p.read_bytes() for p in files])
    assert runs["a"][0] == runs["b"][0]
    assert runs["a"][2] == runs["b"][2]  # every DICOM file byte for byte, UIDs included
    assert len(runs["a"][1]) == len(runs["b"][1])
    assert all(np.array_equal(x, y) for x, y in zip(runs["a"][1], runs["b"][1], strict=True))
    assert runs["a"][0] != runs["c"][0]
    assert not all(np.array_equal(x, y) for x, y in zip(runs["a"][1], runs["c"][1], strict=False))


def test_standard_series_has_the_geometry_its_headers_promise(tmp_path: Path) -> None:
    """build_volume reads a standard study back with the matrix, spacing and slice count of its plan."""
    plan = plan_study(3, 0, "standard", "small")
    volume = _volume(plan, tmp_path / "s")
    a = plan.acquisition
    assert (a.slices, a.rows, a.columns) == volume.shape
    assert volume.spacing_mm == pytest.approx((a.slice_thickness_mm, a.pixel_spacing_mm, a.pixel_spacing_mm),
                                              rel=1e-3)
    assert volume.gantry_tilt_deg == pytest.approx(0.0, abs=1e-3)
    assert 20 <= a.slices <= 28


def test_tilted_shifted_series_is_read_back_consistently(tmp_path: Path) -> None:
    """A shifted study with 15 degrees of gantry tilt has that tilt, its thin slices, and anatomy in place."""
    plan = plan_study(5, 1, "shifted", "small", gantry_tilt_deg=15.0)
    volume = _volume(plan, tmp_path / "t")
    a = plan.acquisition
    assert volume.gantry_tilt_deg == pytest.approx(15.0, abs=0.05)
    assert volume.spacing_mm[0] == pytest.approx(a.slice_thickness_mm, rel=1e-3)
    assert a.slice_thickness_mm < 4.0
    marks = plan.head.landmarks()
    assert _median_near(volume, marks["sphenoid_sinus"]) < -900
    assert -5 < _median_near(volume, marks["left_frontal_horn"]) < 18


def test_tissue_densities_at_known_points(tmp_path: Path) -> None:
    """Skull is bright, ventricles CSF-like, white matter ~28 HU, sinuses and mastoid cells hold air."""
    plan = plan_study(7, 2, "standard", "small", findings=[])
    volume = _volume(plan, tmp_path / "n")
    marks = plan.head.landmarks()
    for name in ("left_frontal_horn", "right_frontal_horn", "fourth_ventricle"):
        assert -5 < _median_near(volume, marks[name]) < 18, name
    for name in ("left_centrum_semiovale", "right_centrum_semiovale"):
        assert 20 < _median_near(volume, marks[name]) < 34, name
    for name in ("sphenoid_sinus", "frontal_sinus"):
        assert _median_near(volume, marks[name]) < -900, name
    k, i, j = _voxel(volume, marks["left_mastoid"])
    cells = volume.hu[k, i - 3:i + 4, j - 3:j + 4]
    assert (cells < -500).mean() > 0.2 and (cells > 400).mean() > 0.1  # air cells in bone
    # The skull ring: along a row through the brain centre, bone (> +1000 HU) on both sides.
    k, i, j = _voxel(volume, marks["left_centrum_semiovale"])
    row = volume.hu[k, i]
    centre = volume.shape[2] // 2
    assert row[:centre].max() > 1000 and row[centre:].max() > 1000
    assert (row[centre - 10:centre + 10] < 100).all()  # no bone in the middle of the brain


# --- findings in the image and the report ---------------------------------------------------------


def _side_counts(volume: Volume, mask: np.ndarray, head_x: float) -> tuple[int, int]:
    """Voxels of ``mask`` on the patient's left (x > head centre) and right."""
    x = _patient_grid(volume)[0]
    return int(np.count_nonzero(mask & (x > head_x))), int(np.count_nonzero(mask & (x < head_x)))


def test_acute_subdural_is_hyperdense_along_the_inner_table_on_its_side(tmp_path: Path) -> None:
    """A left acute subdural shows as hyperdense voxels next to the left inner table; the report says so."""
    sdh = Finding("subdural_hematoma", "left", "frontoparietal", size_mm=12.0, acuity="acute")
    plan = plan_study(2, 4, "standard", "small", findings=[sdh])
    volume = _volume(plan, tmp_path / "sdh")
    mx, my, mz = _model_grid(plan, volume)
    depth = -plan.head.cavity_distance(mx, my, mz)  # mm inside the inner table (ground-truth geometry)
    intracranial = (depth > 1.5) & (np.abs(mx) > 4.0)  # away from bone edges and the falx
    hyper = intracranial & (volume.hu > 55) & (volume.hu < 100)
    left, right = _side_counts(volume, hyper, plan.head.centre_mm[0])
    assert left > 300
    assert left > 10 * right
    left_hyper = hyper & (mx > 0)
    along_table = left_hyper & (depth < 12.0 / plan.head.scale + 3.0)
    assert np.count_nonzero(along_table) > 0.9 * np.count_nonzero(left_hyper)
    report = plan.report.lower()
    assert "subdural" in report
    assert "left" in report
    assert "12 mm" in report


def test_chronic_subdural_is_hypodense(tmp_path: Path) -> None:
    """The voxels of a chronic subdural hematoma are darker than white matter (about +5 to +20 HU)."""
    sdh = Finding("subdural_hematoma", "right", "frontotemporoparietal", size_mm=14.0, acuity="chronic")
    plan = plan_study(2, 5, "standard", "small", findings=[sdh], noise_sigma_hu=3.0)
    volume = _volume(plan, tmp_path / "csdh")
    phantom = plan.phantom()
    rendered = [phantom.render(k) for k in range(plan.acquisition.slices)]
    lesion = np.stack([r.lesion == 0 for r in rendered])
    white = np.stack([r.tissue == Tissue.WHITE_MATTER for r in rendered])
    assert np.count_nonzero(lesion) > 200
    lesion_hu = float(volume.hu[lesion].mean())
    assert 5.0 < lesion_hu < 20.0
    assert lesion_hu < float(volume.hu[white].mean()) - 8
    assert plan.findings[0].hu is not None and plan.findings[0].hu <= 20
    left, right = _side_counts(volume, lesion, plan.head.centre_mm[0])
    assert right > 0 and left == 0
    assert "chronic" in plan.report.lower() and "right" in plan.report.lower()


def _ventricle_centroid_x(plan: StudyPlan, volume: Volume) -> float:
    """Mean patient x (relative to the head centre) of CSF-like voxels around the lateral ventricles."""
    mx, my, mz = _model_grid(plan, volume)
    box = (np.abs(mx) < 35) & (np.abs(my) < 40) & (mz > 8) & (mz < 30)
    csf = box & (volume.hu < CSF_BELOW_HU) & (volume.hu > -10)
    return float(mx[csf].mean() * plan.head.scale)


def test_midline_shift_grows_with_volume_and_points_away(tmp_path: Path) -> None:
    """Bigger left subdurals push the midline further to the right, in the image and in the report."""
    shifts, volumes, centroids = [], [], []
    for thickness in (6.0, 12.0, 20.0):
        sdh = Finding("subdural_hematoma", "left", "frontoparietal", size_mm=thickness, acuity="acute")
        plan = plan_study(4, 0, "standard", "small", findings=[sdh], noise_sigma_hu=2.0)
        volume = _volume(plan, tmp_path / f"t{thickness:g}")
        shifts.append(plan.midline_shift_mm)
        volumes.append(plan.findings[0].volume_ml)
        centroids.append(_ventricle_centroid_x(plan, volume))
        if plan.midline_shift_mm:
            shift = next(f for f in plan.findings if f.kind is FindingKind.MIDLINE_SHIFT)
            assert shift.side.value == "right"
            assert f"{abs(plan.midline_shift_mm):g} mm" in plan.report
            assert "to the right" in plan.report or "rightward" in plan.report
    assert volumes[0] < volumes[1] < volumes[2]
    assert 0 >= shifts[0] > shifts[1] > shifts[2]
    assert shifts[2] <= -5.0
    assert centroids[2] < centroids[1] - 1.0
    assert centroids[2] < -2.0


def _csf_fractions(plan: StudyPlan, volume: Volume) -> tuple[float, float]:
    """CSF-like fraction of voxels around the ventricles and under the convexity."""
    mx, my, mz = _model_grid(plan, volume)
    dcav = plan.head.cavity_distance(mx, my, mz)
    csf = (volume.hu < CSF_BELOW_HU) & (volume.hu > -10)
    central = (np.abs(mx) < 35) & (np.abs(my) < 45) & (mz > 0) & (mz < 32)
    peripheral = (dcav > -14) & (dcav < -1) & (mz > 15)
    return float(csf[central].mean()), float(csf[peripheral].mean())


def test_hydrocephalus_enlarges_ventricles_but_not_sulci_unlike_atrophy(tmp_path: Path) -> None:
    """Hydrocephalus raises central CSF only; atrophy raises central and peripheral (sulcal) CSF."""
    cases = {
        "normal": [],
        "hydrocephalus": [Finding("hydrocephalus", "bilateral", "ventricular_system", acuity="chronic",
                                  degree="moderate")],
        "atrophy": [Finding("atrophy", "bilateral", "generalized", degree="moderate")],
    }
    fractions = {}
    for name, findings in cases.items():
        plan = plan_study(6, 3, "standard", "small", findings=findings, noise_sigma_hu=2.0)
        fractions[name] = _csf_fractions(plan, _volume(plan, tmp_path / name))
    normal_c, normal_p = fractions["normal"]
    hydro_c, hydro_p = fractions["hydrocephalus"]
    atrophy_c, atrophy_p = fractions["atrophy"]
    assert hydro_c > 1.5 * normal_c
    assert hydro_p <= normal_p * 1.05
    assert atrophy_c > 1.2 * normal_c
    assert atrophy_p > 1.5 * normal_p
    assert atrophy_p > 1.5 * hydro_p


def test_chunked_rendering_equals_slice_by_slice() -> None:
    """Rendering many slices at once gives exactly the slices rendered one by one (tilted, with lesions)."""
    findings = [
        Finding("intraparenchymal_hemorrhage", "left", "frontal", size_mm=40.0, acuity="acute"),
        Finding("subdural_hematoma", "right", "frontotemporoparietal", size_mm=8.0, acuity="chronic"),
        Finding("white_matter_hypodensity", "bilateral", "periventricular", size_mm=11.0, degree="marked"),
        Finding("subarachnoid_hemorrhage", "bilateral", "basal_cisterns", acuity="acute"),
    ]
    plan = plan_study(3, 1, "shifted", "small", findings=findings, gantry_tilt_deg=12.0)
    phantom = plan.phantom()
    block = phantom.render_block(0, plan.acquisition.slices)
    for k in range(plan.acquisition.slices):
        single = phantom.render(k)
        assert np.array_equal(single.hu, block.hu[k]), k
        assert np.array_equal(single.tissue, block.tissue[k]), k
        assert np.array_equal(single.lesion, block.lesion[k]), k


def test_pineal_calcification_is_a_dense_dot(tmp_path: Path) -> None:
    """A 4 mm pineal calcification is visible (>= +150 HU) where its ground truth says."""
    calc = Finding("calcification", "midline", "pineal", size_mm=4.0)
    plan = plan_study(8, 0, "standard", "small", findings=[calc])
    volume = _volume(plan, tmp_path / "calc")
    centre = plan.findings[0].centre_mm
    assert centre is not None
    k, i, j = _voxel(volume, centre)
    assert volume.hu[k, i - 1:i + 2, j - 1:j + 2].max() >= 150
    assert "pineal" in plan.report.lower()


def test_normal_study_report_has_pertinent_negatives_only() -> None:
    """Normal studies get a normal report: negatives, a normal impression, no positive finding."""
    positive = re.compile(r"hemorrhage|haemorrhage|hematoma|haematoma|infarct|shift|hydrocephalus|atrophy|"
                          r"hypodensity|low density|hyperdense|mass effect|calcification", re.IGNORECASE)
    negation = re.compile(r"\b(no|without|normal|preserved|maintained|central)\b", re.IGNORECASE)
    for index in range(6):
        plan = plan_study(9, index, "standard", "small", findings=[])
        report = plan.report
        assert plan.findings == ()
        assert report.startswith("Findings:\n") and "\nImpression:\n" in report
        assert re.search(r"No (acute )?intracranial ha?emorrhage|no evidence of intracranial ha?emorrhage",
                         report, re.IGNORECASE)
        assert re.search(r"midline", report, re.IGNORECASE)
        for sentence in _sentences(report):
            if positive.search(sentence):
                assert negation.search(sentence), sentence
        impression = report.split("Impression:\n")[1]
        assert re.search(r"No acute|Normal|Unremarkable", impression)


def test_sampled_normal_scenario_has_no_findings() -> None:
    """Studies drawn as 'normal' carry no finding and say so in dataset terms."""
    plans = [plan_study(13, i, "standard", "small", scenario="normal") for i in range(4)]
    assert all(p.findings == () and p.is_normal for p in plans)


def test_report_is_deterministic_and_follows_the_template() -> None:
    """The same (seed, index) gives the same report; it has Findings and Impression like the template."""
    first = plan_study(21, 7, "shifted", "small")
    again = plan_study(21, 7, "shifted", "small")
    assert first.report == again.report
    assert report_template.startswith("Findings:\n") and "\nImpression:\n" in report_template
    assert first.report.startswith("Findings:\n") and "\nImpression:\n" in first.report


# --- profiles, findings, CLI ----------------------------------------------------------------------


def test_shifted_profile_differs_from_standard() -> None:
    """Shifted studies have thinner slices, more noise, other kernels/vendor/rescale and some tilt."""
    standard = [plan_study(1, i, "standard", "small").acquisition for i in range(20)]
    shifted = [plan_study(1, i, "shifted", "small").acquisition for i in range(20)]
    assert max(a.slice_thickness_mm for a in shifted) < min(a.slice_thickness_mm for a in standard)
    assert min(a.noise_sigma_hu for a in shifted) > max(a.noise_sigma_hu for a in standard)
    assert {a.kernel.name for a in shifted}.isdisjoint({a.kernel.name for a in standard})
    assert {a.manufacturer for a in shifted}.isdisjoint({a.manufacturer for a in standard})
    assert all(a.gantry_tilt_deg == 0 for a in standard)
    assert any(a.gantry_tilt_deg >= 8 for a in shifted)
    assert {a.rescale_intercept for a in shifted} != {a.rescale_intercept for a in standard}
    assert len({a.pixel_spacing_mm for a in shifted}) > 1


def test_finding_round_trips_through_json_and_validates() -> None:
    """A Finding survives to_dict/json/from_dict; impossible combinations raise naming the field."""
    finding = Finding("intraparenchymal_hemorrhage", "left", "thalamus", size_mm=20.0, acuity="acute",
                      centre_mm=(1.0, 2.0, 3.0))
    assert Finding.from_dict(json.loads(json.dumps(finding.to_dict()))) == finding
    with pytest.raises(ValueError, match="side"):
        Finding("hydrocephalus", "left", "ventricular_system", acuity="acute", degree="mild")
    with pytest.raises(ValueError, match="size_mm"):
        Finding("subdural_hematoma", "left", "frontal", acuity="acute")
    with pytest.raises(ValueError, match="region"):
        Finding("lacunar_infarct", "left", "frontal", size_mm=5.0, acuity="old")


def test_generate_refuses_a_non_empty_folder_unless_overwriting(tmp_path: Path) -> None:
    """A non-empty output folder is refused; overwrite replaces only a previous run's studies and index."""
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SynthError, match="not empty"):
        generate_dataset(tmp_path, 1, 0, "standard", "small")
    generate_dataset(tmp_path, 2, 0, "standard", "small", slices=4, overwrite=True)
    generate_dataset(tmp_path, 1, 0, "standard", "small", slices=4, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET_FILE, "keep.txt", "study_00000"]
    assert len((tmp_path / DATASET_FILE).read_text(encoding="utf-8").splitlines()) == 1


@pytest.fixture
def _isolated_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings under tmp_path; logging restored after main() configured it."""
    for name in list(os.environ):
        if name.startswith("NEUROSCRIBE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NEUROSCRIBE_STORAGE__ROOT", str(tmp_path / "root"))
    with logging_restored():
        yield


@pytest.mark.usefixtures("_isolated_cli")
def test_cli_synth_writes_studies_and_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`neuroscribe synth` writes N study folders of DICOM files and one dataset.jsonl line per study."""
    out = tmp_path / "synth"
    code = main(["synth", "--out", str(out), "--studies", "2", "--seed", "5", "--size", "small",
                 "--profile", "shifted"])
    assert code == 0
    assert "wrote 2 studies" in capsys.readouterr().out
    lines = (out / DATASET_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["study_00000", "study_00001"]
    for line in lines:
        record = json.loads(line)
        files = sorted((out / record["series_path"]).glob("IMG*.dcm"))
        assert len(files) == record["acquisition"]["slices"]
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.StudyInstanceUID == record["study_instance_uid"]
        assert ds.SeriesInstanceUID == record["series_instance_uid"]
        assert ds.AccessionNumber == record["accession_number"]
        assert ds.PatientID == record["patient_id"]
        assert str(ds.PatientName).startswith("SYNTH^")
        assert record["profile"] == "shifted" and record["seed"] == 5
        assert float(ds.SliceThickness) == pytest.approx(record["slice_thickness_mm"])
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(record["pixel_spacing_mm"])
        assert float(ds.GantryDetectorTilt) == pytest.approx(record["gantry_tilt_deg"])
        assert record["report"].startswith("Findings:")
        assert all(Finding.from_dict(f) for f in record["findings"])
