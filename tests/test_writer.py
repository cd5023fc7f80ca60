"""The CT series writer: valid DICOM, the same bytes however written, reproducible UIDs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from neuroscribe.dicom_io.writer import CtSeriesSpec, ct_slice_dataset, hu_to_stored, write_ct_series
from tests.conftest import require_tool


@pytest.fixture
def volume() -> np.ndarray:
    """A random HU volume of 5 slices of 32 x 32."""
    return np.random.default_rng(3).normal(20, 200, (5, 32, 32))


def test_written_files_equal_the_slice_datasets(tmp_path: Path, volume: np.ndarray) -> None:
    """The fast series encoder writes exactly what ct_slice_dataset describes, file meta included."""
    spec = CtSeriesSpec(rows=32, columns=32, slices=5, gantry_tilt_deg=12)
    paths = write_ct_series(spec, tmp_path, volume)
    for k, path in enumerate(paths):
        written = pydicom.dcmread(path)
        expected = ct_slice_dataset(spec, k, volume[k])
        assert written == expected
        assert written.file_meta.MediaStorageSOPInstanceUID == expected.SOPInstanceUID
        assert written.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_pixels_round_trip_to_hu(tmp_path: Path, volume: np.ndarray) -> None:
    """Stored values with the rescale give back the HU, rounded and clipped to 16 bits."""
    spec = CtSeriesSpec(rows=32, columns=32, slices=5, rescale_intercept=-1024)
    paths = write_ct_series(spec, tmp_path, volume)
    hu = pydicom.dcmread(paths[2]).pixel_array * spec.rescale_slope + spec.rescale_intercept
    assert np.array_equal(hu, hu_to_stored(volume[2], spec).astype(float) + spec.rescale_intercept)
    assert np.max(np.abs(hu - volume[2])) <= 0.5


def test_uids_are_reproducible_from_the_spec(tmp_path: Path, volume: np.ndarray) -> None:
    """Writing the same spec twice gives the same SOP Instance UIDs; slices differ from each other."""
    spec = CtSeriesSpec(rows=32, columns=32, slices=5)
    first = [pydicom.dcmread(p).SOPInstanceUID for p in write_ct_series(spec, tmp_path / "a", volume)]
    again = [pydicom.dcmread(p).SOPInstanceUID for p in write_ct_series(spec, tmp_path / "b", volume)]
    assert first == again
    assert len(set(first)) == 5
    other = CtSeriesSpec(rows=32, columns=32, slices=5)
    assert other.sop_instance_uid(0) != spec.sop_instance_uid(0)


def test_file_order_can_differ_from_anatomy(tmp_path: Path, volume: np.ndarray) -> None:
    """With ``order`` the file names no longer follow the slice positions."""
    spec = CtSeriesSpec(rows=32, columns=32, slices=5)
    paths = write_ct_series(spec, tmp_path, volume, order=[4, 2, 0, 3, 1])
    assert [p.name for p in paths] == ["IMG00005.dcm", "IMG00003.dcm", "IMG00001.dcm",
                                       "IMG00004.dcm", "IMG00002.dcm"]
    assert pydicom.dcmread(tmp_path / "IMG00001.dcm").InstanceNumber == 3


def test_dciodvfy_finds_no_errors(tmp_path: Path, volume: np.ndarray) -> None:
    """dicom3tools' dciodvfy validates a written slice against the CT Image IOD without errors."""
    require_tool("dciodvfy")
    spec = CtSeriesSpec(rows=32, columns=32, slices=5, specific_character_set="ISO_IR 192",
                        patient_name="Müller^Zoë")
    path = write_ct_series(spec, tmp_path, volume)[0]
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    report = result.stdout + result.stderr
    assert "CTImage" in report
    assert "Error" not in report, report


def test_text_is_encoded_in_the_declared_character_set(tmp_path: Path, volume: np.ndarray) -> None:
    """With ISO_IR 192 every text element is UTF-8 on disk, including those shared by all slices."""
    spec = CtSeriesSpec(rows=32, columns=32, slices=5, specific_character_set="ISO_IR 192",
                        patient_name="Müller^Zoë", series_description="Schädel nativ")
    path = write_ct_series(spec, tmp_path, volume)[3]
    raw = path.read_bytes()
    assert "Müller^Zoë".encode() in raw
    assert "Schädel".encode() in raw
    assert "Müller".encode("latin-1") not in raw
    assert str(pydicom.dcmread(path).PatientName) == "Müller^Zoë"
