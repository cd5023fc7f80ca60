"""Bad input: every damaged or unsuitable object gets a defined answer, and the SCP keeps serving.

Two kinds of answer: a C-STORE failure status with a recorded reason (the object never reaches the
spool), or storage followed by a rejection of its series from reporting, with a reason.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from neuroscribe.dicom_io.constants import StoreStatus
from neuroscribe.dicom_io.writer import CtSeriesSpec, ct_slice_dataset, write_ct_series
from neuroscribe.store import SeriesState
from tests.conftest import Server, decided, echoscu, make_server, send_datasets, send_files_raw, storescu

ROWS = COLS = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for every bad input: it must survive all of them."""
    srv = make_server(tmp_path_factory.mktemp("bad-input") / "root").start()
    yield srv
    srv.ensure_stopped()


def spec(**changes: object) -> CtSeriesSpec:
    """A small head CT spec with fresh UIDs."""
    return CtSeriesSpec(**{"rows": ROWS, "columns": COLS, "slices": 6, **changes})  # type: ignore[arg-type]


def slice_ds(s: CtSeriesSpec, index: int = 0) -> Dataset:
    """One valid slice of ``s`` with water-ish pixels."""
    return ct_slice_dataset(s, index, np.zeros((s.rows, s.columns)))


def save(ds: Dataset, path: Path) -> Path:
    """Write a dataset as a DICOM file with preamble and the file meta it carries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --- refused at C-STORE -----------------------------------------------------------------------


def truncated(tmp: Path) -> Path:
    """The first half of a valid slice."""
    full = save(slice_ds(spec()), tmp / "full.dcm").read_bytes()
    return _write(tmp / "truncated.dcm", full[: len(full) // 2])


def huge_length(tmp: Path) -> Path:
    """Pixel Data declaring 0xFFFFFFF0 bytes."""
    data = save(slice_ds(spec()), tmp / "full.dcm").read_bytes()
    at = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) OW, 4-byte length after 2 reserved bytes
    return _write(tmp / "huge.dcm", data[: at + 8] + struct.pack("<I", 0xFFFFFFF0) + data[at + 12 :])


def non_dicom(tmp: Path) -> Path:
    """Valid file meta followed by random bytes instead of a data set."""
    ds = slice_ds(spec())
    meta_only = Dataset()
    meta_only.file_meta = ds.file_meta
    head = save(meta_only, tmp / "meta.dcm").read_bytes()
    return _write(tmp / "junk.dcm", head + np.random.default_rng(7).bytes(4000))


def missing_sop_instance_uid(tmp: Path) -> Path:
    """A slice whose data set lacks SOPInstanceUID (the file meta still names one)."""
    ds = slice_ds(spec())
    del ds.SOPInstanceUID
    return save(ds, tmp / "no-sop.dcm")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "reason", "statuses"),
    [
        (truncated, "truncated", {StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS}),
        (huge_length, "truncated", {StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS}),
        (non_dicom, None, {StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, StoreStatus.CANNOT_UNDERSTAND}),
        (missing_sop_instance_uid, "missing_uid", {StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS}),
    ],
    ids=["truncated-file", "huge-element-length", "non-dicom-bytes", "missing-sop-instance-uid"],
)
def test_damaged_files_are_refused_with_a_reason(
    server: Server, tmp_path: Path, make: Callable[[Path], Path], reason: str | None, statuses: set[int]
) -> None:
    """Damaged bytes get a failure status and an ingest-failure row; nothing is spooled."""
    path = make(tmp_path)
    before = len(server.state().failures())
    [status] = send_files_raw(server.port, [path])
    assert status in statuses
    failures = server.state().failures()
    assert len(failures) == before + 1
    assert failures[-1]["status"] == status
    if reason is not None:
        assert failures[-1]["reason"] == reason
    assert not (server.root / "incoming").exists() or not any((server.root / "incoming").iterdir())
    assert echoscu(server.port)


def _without(keyword: str) -> Callable[[], Dataset]:
    def make() -> Dataset:
        ds = slice_ds(spec())
        delattr(ds, keyword)
        return ds
    return make


def _short_pixels() -> Dataset:
    ds = slice_ds(spec())
    ds.PixelData = ds.PixelData[:-100]
    return ds


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_short_pixels, "pixel_length_mismatch"),
        (_without("PixelData"), "no_pixel_data"),
        (_without("SeriesInstanceUID"), "missing_uid"),
    ],
    ids=["pixel-length-mismatch", "no-pixel-data", "missing-series-instance-uid"],
)
def test_inconsistent_datasets_are_refused(server: Server, make: Callable[[], Dataset], reason: str) -> None:
    """A data set that contradicts its own header is refused with 0xA900 and its reason."""
    [status] = send_datasets(server.port, [make()])
    assert status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert server.state().failures()[-1]["reason"] == reason
    assert echoscu(server.port)


# --- stored, then rejected from reporting ------------------------------------------------------


def _series(s: CtSeriesSpec, tmp: Path, edit: Callable[[int, Dataset], None] | None = None) -> list[Path]:
    paths = []
    for k in range(s.slices):
        ds = slice_ds(s, k)
        if edit is not None:
            edit(k, ds)
        paths.append(save(ds, tmp / f"s{k:03d}.dcm"))
    return paths


def mr_series(tmp: Path) -> tuple[str, list[Path]]:
    """An MR series (MR Image Storage, Modality MR)."""
    s = spec(modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.4")
    return s.series_instance_uid, _series(s, tmp)


def localizer(tmp: Path) -> tuple[str, list[Path]]:
    """A scout: ImageType ORIGINAL\\PRIMARY\\LOCALIZER."""
    s = spec(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    return s.series_instance_uid, _series(s, tmp)


def duplicate_positions(tmp: Path) -> tuple[str, list[Path]]:
    """Slices 2 and 3 at the same position."""
    s = spec()

    def edit(k: int, ds: Dataset) -> None:
        if k == 3:
            ds.ImagePositionPatient = list(s.position(2))
    return s.series_instance_uid, _series(s, tmp, edit)


def inconsistent_matrix(tmp: Path) -> tuple[str, list[Path]]:
    """One slice with a different Rows x Columns."""
    s = spec()
    paths = _series(s, tmp)
    other = ct_slice_dataset(s.with_(rows=ROWS * 2, columns=ROWS * 2), 5,
                             np.zeros((ROWS * 2, ROWS * 2)))
    save(other, paths[5])
    return s.series_instance_uid, paths


def missing_position(tmp: Path) -> tuple[str, list[Path]]:
    """One slice without ImagePositionPatient."""
    s = spec()

    def edit(k: int, ds: Dataset) -> None:
        if k == 1:
            del ds.ImagePositionPatient
    return s.series_instance_uid, _series(s, tmp, edit)


def gap(tmp: Path) -> tuple[str, list[Path]]:
    """Slice 3 of 7 missing."""
    s = spec(slices=7)
    paths = _series(s, tmp)
    paths.pop(3)
    return s.series_instance_uid, paths


def one_slice(tmp: Path) -> tuple[str, list[Path]]:
    """A series of one slice."""
    s = spec(slices=1)
    return s.series_instance_uid, _series(s, tmp)


def rgb_ct(tmp: Path) -> tuple[str, list[Path]]:
    """CT Image Storage holding 8-bit RGB pixels."""
    s = spec()

    def edit(_k: int, ds: Dataset) -> None:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = bytes(ROWS * COLS * 3)
    return s.series_instance_uid, _series(s, tmp, edit)


def two_frames_of_reference(tmp: Path) -> tuple[str, list[Path]]:
    """Half the slices in another frame of reference."""
    s = spec()
    other = str(generate_uid())

    def edit(k: int, ds: Dataset) -> None:
        if k >= 3:
            ds.FrameOfReferenceUID = other
    return s.series_instance_uid, _series(s, tmp, edit)


def structured_report(tmp: Path) -> tuple[str, list[Path]]:
    """A Basic Text SR sent to the SCP (as a PACS forwarding a whole study would)."""
    series_uid, sop_uid = str(generate_uid()), str(generate_uid())
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = str(generate_uid())
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "SR"
    ds.PatientName = "SR^PATIENT"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    return series_uid, [save(ds, tmp / "sr.dcm")]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (mr_series, "modality"),
        (localizer, "image_type"),
        (duplicate_positions, "duplicate_positions"),
        (inconsistent_matrix, "shape_mismatch"),
        (missing_position, "missing_geometry"),
        (gap, "gap"),
        (one_slice, "single_slice"),
        (rgb_ct, "not_grayscale"),
        (two_frames_of_reference, "mixed_frame_of_reference"),
        (structured_report, "modality"),
    ],
    ids=["mr", "localizer", "duplicate-positions", "inconsistent-rows-columns", "missing-ipp", "gap",
         "one-slice", "rgb-ct", "two-frames-of-reference", "structured-report"],
)
def test_unsuitable_series_are_stored_then_rejected(
    server: Server, tmp_path: Path, make: Callable[[Path], tuple[str, list[Path]]], reason: str
) -> None:
    """DCMTK stores them successfully; the series is kept and rejected with its reason."""
    series_uid, paths = make(tmp_path)
    result = storescu(server.port, paths)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Received Store Response (Success)") == len(paths)

    row = server.wait_for(decided(series_uid))
    assert (row.state, row.reason) == (SeriesState.REJECTED, reason)
    assert row.reason_detail
    assert row.instance_count == len(paths)
    assert len(list((server.root / "spool" / series_uid).iterdir())) == len(paths)
    assert echoscu(server.port)


def test_utf8_names_are_accepted(server: Server, tmp_path: Path) -> None:
    """SpecificCharacterSet ISO_IR 192 with non-ASCII names is stored and selected."""
    s = spec(specific_character_set="ISO_IR 192", patient_name="Müller^Zoë^José",
             series_description="Schädel nativ", body_part_examined="")
    paths = write_ct_series(s, tmp_path / "utf8", np.zeros((s.slices, ROWS, COLS)))
    assert storescu(server.port, paths).returncode == 0
    row = server.wait_for(decided(s.series_instance_uid))
    assert row.state == SeriesState.SELECTED
    stored = pydicom.dcmread(next((server.root / "spool" / s.series_instance_uid).iterdir()))
    assert str(stored.PatientName) == "Müller^Zoë^José"
    assert os.fsdecode(b"M\xc3\xbcller") not in server.logs()
