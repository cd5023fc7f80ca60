"""Tests for neuroscribe.training.dataset: model input, manifests, cache, patient split, digest."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from neuroscribe.dicom_io.volume import (
    BRAIN_WINDOW,
    MODEL_WINDOWS,
    Reason,
    build_volume,
    resample,
    windowed_channels,
)
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.training.dataset import (
    CACHE_DTYPE,
    INDEX_FILE,
    MISSING_SERIES,
    SAMPLES_DIR,
    CacheIndex,
    DatasetError,
    ManifestError,
    ModelGrid,
    ModelGridError,
    Split,
    SplitSpec,
    StudyEntry,
    assign_split,
    build_cache,
    data_digest,
    load_manifest,
    series_files,
    series_to_input,
)
from neuroscribe.training.synth import DATASET_FILE, generate_dataset

#: A small grid keeps the tests fast; the default grid is tested once.
GRID = ModelGrid(slices=10, height=48, width=48)
#: float16 rounding of values in [0, 1] is at most 2**-12.
FLOAT16_ATOL = 2.0**-12
STUDIES = 4


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synth dataset of four small 8-slice studies, generated once per module."""
    out = tmp_path_factory.mktemp("synth") / "site"
    generate_dataset(out, STUDIES, 11, "standard", "small", slices=8)
    return out


@pytest.fixture
def site(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the synth dataset that a test may change."""
    return Path(shutil.copytree(pristine, tmp_path / "site"))


def _records(site: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (site / DATASET_FILE).read_text().splitlines()]


def _sample_mtimes(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (cache / SAMPLES_DIR).glob("*.npy")}


def _bump_last_byte(path: Path) -> None:
    """Change the last pixel's high byte: still a valid slice, different content."""
    data = bytearray(path.read_bytes())
    data[-1] = (data[-1] + 1) % 256
    path.write_bytes(bytes(data))


# --- model input -------------------------------------------------------------------------------


class TestSeriesToInput:
    """series_to_input and ModelGrid."""

    def test_default_grid_shape_dtype_and_range(self, pristine: Path) -> None:
        """A synth series becomes float32 (24, 3, 128, 128) in [0, 1] with real contrast."""
        x = series_to_input(pristine / "study_00000")
        assert x.shape == (24, 3, 128, 128)
        assert np.float32 == x.dtype
        assert x.min() == 0.0
        assert x.max() == 1.0
        assert len(np.unique(x[:, 0])) > 100

    def test_equals_the_manual_volume_pipeline(self, pristine: Path) -> None:
        """The folder gives exactly build_volume -> resample -> windowed_channels on its files."""
        paths = series_files(pristine / "study_00001")
        volume = build_volume(paths, in_plane_shape=(GRID.height, GRID.width))
        volume = resample(volume, shape=(GRID.slices, GRID.height, GRID.width))
        expected = windowed_channels(volume.hu, MODEL_WINDOWS)
        assert np.array_equal(expected, series_to_input(pristine / "study_00001", GRID))
        assert np.array_equal(expected, series_to_input(list(reversed(paths)), GRID))

    def test_tilted_series_gives_the_grid_shape(self, tmp_path: Path) -> None:
        """A 15-degree gantry-tilt series of another matrix lands on the same grid."""
        spec = CtSeriesSpec(rows=80, columns=64, slices=9, pixel_spacing_mm=(0.5, 0.6),
                            slice_thickness_mm=3.0, slice_step_mm=3.0, gantry_tilt_deg=15.0)
        write_ct_series(spec, tmp_path / "tilted")
        x = series_to_input(tmp_path / "tilted", GRID)
        assert GRID.shape == x.shape
        assert x.min() >= 0.0 and x.max() <= 1.0

    def test_grid_round_trips_and_windows_set_channels(self) -> None:
        """to_dict/from_dict round-trip, and the channel count follows the windows."""
        grid = ModelGrid(slices=6, height=32, width=40, windows=(BRAIN_WINDOW,))
        assert grid == ModelGrid.from_dict(json.loads(json.dumps(grid.to_dict())))
        assert grid.shape == (6, 1, 32, 40)

    @pytest.mark.parametrize("kwargs", [{"slices": 0}, {"height": -1}, {"width": 2.5},
                                        {"windows": ()}, {"windows": ("brain",)}])
    def test_bad_grid_is_rejected(self, kwargs: dict[str, object]) -> None:
        """A grid with a non-positive size or no real windows raises ModelGridError."""
        with pytest.raises(ModelGridError, match="ModelGrid"):
            ModelGrid(**kwargs)  # type: ignore[arg-type]


# --- manifests ---------------------------------------------------------------------------------


class TestLoadManifest:
    """load_manifest for synth folders, JSONL and CSV, and its errors."""

    def test_synth_folder(self, pristine: Path) -> None:
        """A synth folder's dataset.jsonl gives one entry per study with its UID and folder."""
        entries = load_manifest(pristine)
        records = _records(pristine)
        assert [r["study_instance_uid"] for r in records] == [e.study_id for e in entries]
        assert [r["patient_id"] for r in records] == [e.patient_id for e in entries]
        assert [r["report"] for r in records] == [e.report for e in entries]
        assert [(pristine / str(r["series_path"])).resolve() for r in records] == [
            e.series_dir for e in entries]
        assert f"{pristine / DATASET_FILE}:2" == entries[1].source

    def test_jsonl_with_relative_and_absolute_paths(self, pristine: Path, tmp_path: Path) -> None:
        """series_path may be relative to the manifest's folder or absolute."""
        manifest = pristine.parent / "site.jsonl"
        lines = [{"study_id": "S1", "patient_id": "P1", "series_path": "site/study_00000",
                  "report": "Normal."},
                 {"study_id": "S2", "patient_id": "P1", "series_path": str(pristine / "study_00001"),
                  "report": "Also normal.", "extra": 1}]
        manifest.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
        entries = load_manifest(manifest)
        assert [StudyEntry("S1", "P1", (pristine / "study_00000").resolve(), "Normal.",
                           f"{manifest}:1"),
                StudyEntry("S2", "P1", (pristine / "study_00001").resolve(), "Also normal.",
                           f"{manifest}:2")] == entries

    def test_csv_with_multiline_report_and_bom(self, pristine: Path) -> None:
        """A CSV (UTF-8 with BOM, quoted multi-line report) reads like the JSONL."""
        manifest = pristine.parent / "site.csv"
        with manifest.open("w", encoding="utf-8-sig", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["patient_id", "study_id", "series_path", "report", "note"])
            writer.writerow(["P7", "S1", "site/study_00002", "Findings:\nNormal.\nImpression:\nNone.",
                             "x"])
            writer.writerow(["P8", "S2", "site/study_00003", "Normal.", ""])
        entries = load_manifest(manifest)
        assert [e.study_id for e in entries] == ["S1", "S2"]
        assert entries[0].report == "Findings:\nNormal.\nImpression:\nNone."
        assert (pristine / "study_00003").resolve() == entries[1].series_dir
        assert f"{manifest}:2-5" == entries[0].source
        assert f"{manifest}:6" == entries[1].source

    @pytest.mark.parametrize(("line", "message"), [
        ({"patient_id": "P", "series_path": "site/study_00000", "report": "r"},
         "missing key 'study_id'"),
        ({"study_id": "S9", "series_path": "site/study_00000", "report": "r"},
         "missing key 'patient_id'"),
        ({"study_id": "S9", "patient_id": "P", "series_path": "site/study_00000", "report": "  \n"},
         "empty 'report'"),
        ({"study_id": "S9", "patient_id": 12, "series_path": "site/study_00000", "report": "r"},
         "'patient_id' must be a string, got int"),
        ({"study_id": "S9", "patient_id": "P", "series_path": "site/nowhere", "report": "r"},
         "series_path 'site/nowhere' is not a folder"),
        ({"study_id": "S1", "patient_id": "P", "series_path": "site/study_00000", "report": "r"},
         "duplicate study_id (first at"),
        ("{not json", "not valid JSON"),
        ([1, 2], "a line must be a JSON object"),
    ])
    def test_jsonl_problem_names_file_and_line(
        self, pristine: Path, line: object, message: str
    ) -> None:
        """Each bad record is reported as file:line with what is wrong."""
        manifest = pristine.parent / "bad.jsonl"
        good = {"study_id": "S1", "patient_id": "P", "series_path": "site/study_00000",
                "report": "r"}
        bad = line if isinstance(line, str) else json.dumps(line)
        manifest.write_text(json.dumps(good) + "\n\n" + bad + "\n")
        with pytest.raises(ManifestError) as caught:
            load_manifest(manifest)
        assert f"{manifest}:3: {message}" in str(caught.value)

    def test_all_problems_are_listed(self, pristine: Path) -> None:
        """Two bad lines give one error that names both."""
        manifest = pristine.parent / "two-bad.jsonl"
        manifest.write_text('{"study_id": "A"}\n{"study_id": "B"}\n')
        with pytest.raises(ManifestError, match=r"2 problem\(s\)") as caught:
            load_manifest(manifest)
        for line in (1, 2):
            assert f"{manifest}:{line}: missing keys 'patient_id', 'series_path', 'report'" in str(
                caught.value)

    def test_csv_missing_column_and_empty_cell(self, pristine: Path) -> None:
        """A CSV header without 'report' fails at line 1; an empty cell names its line."""
        manifest = pristine.parent / "bad.csv"
        manifest.write_text("study_id,patient_id,series_path\nS1,P1,site/study_00000\n")
        with pytest.raises(ManifestError, match=rf"{manifest}:1: header lacks column\(s\) 'report'"):
            load_manifest(manifest)
        manifest.write_text("study_id,patient_id,series_path,report\nS1,P1,site/study_00000,ok\n"
                            "S2,,site/study_00001,ok\n")
        with pytest.raises(ManifestError, match=rf"{manifest}:3: empty 'patient_id'"):
            load_manifest(manifest)

    def test_unusable_paths(self, tmp_path: Path) -> None:
        """A folder without dataset.jsonl, a missing file and an unknown suffix are rejected."""
        with pytest.raises(ManifestError, match=f"without {DATASET_FILE}"):
            load_manifest(tmp_path)
        with pytest.raises(ManifestError, match="does not exist"):
            load_manifest(tmp_path / "none.jsonl")
        (tmp_path / "m.txt").write_text("x")
        with pytest.raises(ManifestError, match=r"unknown suffix '\.txt'"):
            load_manifest(tmp_path / "m.txt")
        (tmp_path / "empty.jsonl").write_text("\n")
        with pytest.raises(ManifestError, match="lists no studies"):
            load_manifest(tmp_path / "empty.jsonl")


# --- cache -------------------------------------------------------------------------------------


class TestBuildCache:
    """build_cache and CacheIndex."""

    def test_writes_samples_and_index(self, pristine: Path, tmp_path: Path) -> None:
        """One float16 sample per study, equal to series_to_input within float16 rounding."""
        entries = load_manifest(pristine)
        index = build_cache(entries, tmp_path / "cache", GRID)
        assert index.stats is not None
        assert (index.stats.built, index.stats.reused, index.stats.skipped) == (STUDIES, 0, 0)
        assert len(list((tmp_path / "cache" / SAMPLES_DIR).glob("*.npy"))) == STUDIES
        on_disk = json.loads((tmp_path / "cache" / INDEX_FILE).read_text())
        assert index.digest == on_disk["digest"]
        assert GRID.to_dict() == on_disk["grid"]
        assert sorted(e.study_id for e in entries) == [s["study_id"] for s in on_disk["studies"]]
        assert index == CacheIndex.load(tmp_path / "cache")
        by_id = {e.study_id: e for e in entries}
        for sample in index.samples():
            assert isinstance(sample.array, np.memmap)
            assert sample.array.dtype == CACHE_DTYPE
            assert by_id[sample.study_id].report == sample.report
            fresh = series_to_input(by_id[sample.study_id].series_dir, GRID)
            np.testing.assert_allclose(sample.array.astype(np.float32), fresh, rtol=0,
                                       atol=FLOAT16_ATOL)
        assert not list((tmp_path / "cache" / SAMPLES_DIR).glob(".*"))

    def test_split_views_partition_the_samples(self, pristine: Path, tmp_path: Path) -> None:
        """The split views are indexable, disjoint and together hold every sample."""
        index = build_cache(load_manifest(pristine), tmp_path / "cache", GRID)
        views = [index.split(s) for s in Split]
        assert sum(len(v) for v in views) == STUDIES
        seen = [view[i].study_id for view in views for i in range(len(view))]
        assert sorted(seen) == sorted(s.study_id for s in index.studies)
        assert {str(s): len(v) for s, v in zip(Split, views, strict=True)} | {"skipped": 0} == \
            index.counts()

    def test_broken_series_is_skipped_with_its_reason(self, site: Path, tmp_path: Path) -> None:
        """A series with a missing middle slice is recorded as skipped ('gap'), not a crash."""
        (site / "study_00001" / "IMG00004.dcm").unlink()
        entries = load_manifest(site)
        index = build_cache(entries, tmp_path / "cache", GRID)
        assert [(entries[1].study_id, str(Reason.GAP))] == [(s.study_id, s.reason)
                                                          for s in index.skipped]
        assert "[gap]" in index.skipped[0].message
        assert len(index.studies) == STUDIES - 1
        assert entries[1].study_id not in {s.study_id for s in index.studies}
        assert index.counts()["skipped"] == 1
        again = build_cache(entries, tmp_path / "cache", GRID)
        assert again.stats is not None
        assert (again.stats.built, again.stats.reused, again.stats.skipped) == (0, STUDIES - 1, 1)
        retried = build_cache(entries, tmp_path / "cache", GRID, retry_skipped=True)
        assert retried.stats is not None
        assert (index.skipped, 1) == (retried.skipped, retried.stats.skipped)

    def test_missing_series_folder_is_skipped(self, site: Path, tmp_path: Path) -> None:
        """A folder removed after the manifest was read is skipped as missing_series."""
        entries = load_manifest(site)
        shutil.rmtree(site / "study_00002")
        index = build_cache(entries, tmp_path / "cache", GRID)
        assert [(entries[2].study_id, MISSING_SERIES)] == [(s.study_id, s.reason)
                                                          for s in index.skipped]

    def test_rebuild_is_incremental(self, pristine: Path, tmp_path: Path) -> None:
        """A rebuild reuses unchanged samples untouched and decodes only the added study."""
        entries = load_manifest(pristine)
        cache = tmp_path / "cache"
        first = build_cache(entries[:3], cache, GRID)
        mtimes = _sample_mtimes(cache)
        second = build_cache(entries, cache, GRID)
        assert second.stats is not None
        assert (second.stats.built, second.stats.reused) == (1, 3)
        after = _sample_mtimes(cache)
        assert mtimes == {name: after[name] for name in mtimes}
        assert len(after) == STUDIES
        assert first.digest != second.digest
        third = build_cache(entries, cache, GRID)
        assert third.stats is not None
        assert (third.stats.built, third.stats.reused) == (0, STUDIES)
        assert second.digest == third.digest

    def test_removed_studies_are_pruned_and_grid_is_keyed(
        self, pristine: Path, tmp_path: Path
    ) -> None:
        """Dropping studies prunes their samples; another grid gives new keys and samples."""
        entries = load_manifest(pristine)
        cache = tmp_path / "cache"
        full = build_cache(entries, cache, GRID)
        fewer = build_cache(entries[:2], cache, GRID)
        assert fewer.stats is not None
        assert fewer.stats.pruned == 2
        assert len(_sample_mtimes(cache)) == 2
        other = build_cache(entries, cache, ModelGrid(slices=4, height=16, width=16))
        assert other.stats is not None
        assert (other.stats.built, other.stats.reused) == (STUDIES, 0)
        assert full.digest != other.digest
        assert other.split(other.studies[0].split)[0].array.shape == (4, 3, 16, 16)

    def test_workers_do_not_change_the_result(self, pristine: Path, tmp_path: Path) -> None:
        """Two worker processes give the same index as one."""
        entries = load_manifest(pristine)
        one = build_cache(entries, tmp_path / "one", GRID)
        two = build_cache(entries, tmp_path / "two", GRID, workers=2)
        assert one.digest == two.digest
        assert one.studies == two.studies
        with pytest.raises(DatasetError, match="workers"):
            build_cache(entries, tmp_path / "three", GRID, workers=0)

    def test_logs_hold_no_patient_data(self, pristine: Path, tmp_path: Path) -> None:
        """The build's log lines carry counts and hashes, never patient ids or report text."""
        entries = load_manifest(pristine)
        with capture_logs() as logs:
            build_cache(entries, tmp_path / "cache", GRID)
        assert [e["event"] for e in logs] == ["site_cache_built"]
        text = repr(logs)
        for entry in entries:
            assert entry.patient_id not in text
            assert entry.study_id not in text
            assert entry.report.splitlines()[1] not in text

    def test_bad_index_is_rejected(self, tmp_path: Path) -> None:
        """Loading a missing or foreign index raises DatasetError."""
        with pytest.raises(DatasetError, match="cannot read"):
            CacheIndex.load(tmp_path)
        (tmp_path / INDEX_FILE).write_text('{"format": 999}')
        with pytest.raises(DatasetError, match="not format"):
            CacheIndex.load(tmp_path)


# --- split by patient ----------------------------------------------------------------------------


class TestSplit:
    """assign_split and SplitSpec."""

    def test_fractions_and_determinism_on_200_patients(self) -> None:
        """200 patients fall about 80/10/10, identically on every call."""
        ids = [f"PAT{i:04d}" for i in range(200)]
        splits = [assign_split(p) for p in ids]
        counts = Counter(splits)
        assert 140 <= counts[Split.TRAIN] <= 180
        assert 6 <= counts[Split.VAL] <= 34
        assert 6 <= counts[Split.TEST] <= 34
        assert splits == [assign_split(p, SplitSpec()) for p in ids]

    def test_salt_and_fractions_change_the_split(self) -> None:
        """Another salt reshuffles patients; all-train fractions put everyone in train."""
        ids = [f"PAT{i:04d}" for i in range(200)]
        salted = SplitSpec(salt="site-b")
        assert [assign_split(p) for p in ids] != [assign_split(p, salted) for p in ids]
        everyone = SplitSpec(train=1.0, val=0.0, test=0.0)
        assert {Split.TRAIN} == {assign_split(p, everyone) for p in ids}

    @pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.2), (1.2, -0.1, -0.1), (0.5, 0.5, 0.5)])
    def test_bad_fractions_are_rejected(self, fractions: tuple[float, float, float]) -> None:
        """Fractions outside [0, 1] or not adding up to 1 raise DatasetError."""
        with pytest.raises(DatasetError, match="split fractions"):
            SplitSpec(*fractions)

    def test_a_patients_studies_share_one_split(self, pristine: Path, tmp_path: Path) -> None:
        """Studies of one patient land in one split in the index, whatever the salt."""
        base = load_manifest(pristine)
        entries = [StudyEntry(e.study_id, f"P{i % 2}", e.series_dir, e.report, e.source)
                   for i, e in enumerate(base)]
        for salt in ("a", "b", "c"):
            index = build_cache(entries, tmp_path / "cache", GRID, split_spec=SplitSpec(salt=salt))
            by_patient: dict[str, set[Split]] = {}
            for study in index.studies:
                by_patient.setdefault(study.patient_id, set()).add(study.split)
            assert {"P0", "P1"} == set(by_patient)
            assert all(len(splits) == 1 for splits in by_patient.values())
            assert {s.patient_id: s.split for s in index.studies} == {
                p: assign_split(p, SplitSpec(salt=salt)) for p in ("P0", "P1")}


# --- digest ------------------------------------------------------------------------------------


class TestDigest:
    """The data digest recorded in the index."""

    def test_stable_across_folders_and_order(self, pristine: Path, tmp_path: Path) -> None:
        """The same data in another cache folder and manifest order gives the same digest."""
        entries = load_manifest(pristine)
        one = build_cache(entries, tmp_path / "a", GRID)
        two = build_cache(list(reversed(entries)), tmp_path / "b", GRID)
        assert one.digest == two.digest
        assert len(one.digest) == 64
        assert one.digest == data_digest(one.studies, GRID, SplitSpec())

    def test_a_report_edit_changes_it(self, pristine: Path, tmp_path: Path) -> None:
        """Editing one report changes the digest but reuses every sample."""
        entries = load_manifest(pristine)
        before = build_cache(entries, tmp_path / "cache", GRID)
        edited = [*entries[:-1], StudyEntry(entries[-1].study_id, entries[-1].patient_id,
                                            entries[-1].series_dir, entries[-1].report + " ",
                                            entries[-1].source)]
        after = build_cache(edited, tmp_path / "cache", GRID)
        assert before.digest != after.digest
        assert after.stats is not None
        assert (after.stats.built, after.stats.reused) == (0, STUDIES)

    def test_a_pixel_change_changes_it(self, site: Path, tmp_path: Path) -> None:
        """Changing one byte of one slice's pixels changes the digest and rebuilds that sample."""
        entries = load_manifest(site)
        before = build_cache(entries, tmp_path / "cache", GRID)
        _bump_last_byte(site / "study_00002" / "IMG00005.dcm")
        after = build_cache(entries, tmp_path / "cache", GRID)
        assert before.digest != after.digest
        assert after.stats is not None
        assert (after.stats.built, after.stats.reused) == (1, STUDIES - 1)
        changed = {s.study_id for s in before.studies} ^ {s.study_id for s in after.studies}
        assert not changed
        keys = {s.study_id: s.key for s in before.studies}
        assert [entries[2].study_id] == [s.study_id for s in after.studies
                                         if keys[s.study_id] != s.key]
