"""Tests for neuroscribe.dicom_io.volume: sorting, checks, tilt, HU, codecs, windows, resampling."""

from __future__ import annotations

import math
import random
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from neuroscribe.dicom_io.volume import (
    BONE_WINDOW,
    BRAIN_WINDOW,
    MODEL_WINDOWS,
    SUBDURAL_WINDOW,
    WINDOWS,
    Orientation,
    Plane,
    Reason,
    Volume,
    VolumeCheckError,
    build_volume,
    resample,
    window,
    windowed_channels,
)
from neuroscribe.dicom_io.writer import CtSeriesSpec, ct_slice_dataset, write_ct_series
from neuroscribe.errors import VolumeError

SMALL = CtSeriesSpec(rows=64, columns=64, slices=12, pixel_spacing_mm=(0.5, 0.7),
                     slice_thickness_mm=2.0, slice_step_mm=2.0)

Mutator = Callable[[int, Dataset], None]


def _stepped(k: int, spec: CtSeriesSpec = SMALL) -> np.ndarray:
    """Slice k filled with 10*k HU."""
    return np.full((spec.rows, spec.columns), 10.0 * k)


def _ramp(k: int, spec: CtSeriesSpec = SMALL) -> np.ndarray:
    """A linear ramp in index space: 10 HU per slice, 2 per row, 3 per column."""
    i, j = np.mgrid[: spec.rows, : spec.columns]
    return 10.0 * k + 2.0 * i + 3.0 * j - 500.0


def _write(
    directory: Path,
    spec: CtSeriesSpec = SMALL,
    pixels: Callable[[int], np.ndarray] | None = None,
    mutate: Mutator | None = None,
) -> list[Path]:
    """Write a series slice by slice with ct_slice_dataset, letting a test edit each header."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(spec.slices):
        hu = pixels(k) if pixels is not None else np.zeros((spec.rows, spec.columns))
        ds = ct_slice_dataset(spec, k, hu)
        if mutate is not None:
            mutate(k, ds)
        path = directory / f"IMG{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _reason(paths: list[Path], **kwargs: object) -> Reason:
    """Build the volume, expecting a VolumeCheckError, and return its reason."""
    with pytest.raises(VolumeError) as caught:
        build_volume(paths, **kwargs)  # type: ignore[arg-type]
    assert isinstance(caught.value, VolumeCheckError)
    return caught.value.reason


def _stepped_expected(spec: CtSeriesSpec = SMALL) -> np.ndarray:
    return np.stack([_stepped(k, spec) for k in range(spec.slices)]).astype(np.float32)


# --- sorting and geometry ---------------------------------------------------------------------


def test_shuffled_files_are_sorted_along_the_normal(tmp_path: Path) -> None:
    """Shuffled file names and a shuffled path list still give slice k = 10*k HU."""
    order = list(range(SMALL.slices))
    random.Random(1).shuffle(order)
    paths = write_ct_series(SMALL, tmp_path, _stepped, order=order)
    written_uids = [pydicom.dcmread(p).SOPInstanceUID for p in paths]
    shuffled = paths[:]
    random.Random(2).shuffle(shuffled)

    volume = build_volume(shuffled)

    np.testing.assert_array_equal(volume.hu, _stepped_expected())
    assert tuple(written_uids) == volume.sop_instance_uids


def test_instance_numbers_do_not_matter(tmp_path: Path) -> None:
    """Scrambled InstanceNumbers leave the order to the positions."""
    numbers = list(range(1, SMALL.slices + 1))
    random.Random(3).shuffle(numbers)

    def scramble(k: int, ds: Dataset) -> None:
        ds.InstanceNumber = numbers[k]

    volume = build_volume(_write(tmp_path, pixels=_stepped, mutate=scramble))

    np.testing.assert_array_equal(volume.hu, _stepped_expected())


def test_descending_positions_are_sorted_ascending(tmp_path: Path) -> None:
    """A stack written top-down comes out ordered along +normal, origin at the lowest slice."""
    spec = SMALL.with_(slice_step_mm=-2.0)
    paths = write_ct_series(spec, tmp_path, _stepped)

    volume = build_volume(paths)

    np.testing.assert_array_equal(volume.hu, _stepped_expected()[::-1])
    np.testing.assert_allclose(volume.origin_mm, spec.position(spec.slices - 1))


def test_geometry_is_reported(tmp_path: Path) -> None:
    """Spacing is (dz, row spacing, column spacing); origin, orientation and affine follow."""
    paths = write_ct_series(SMALL, tmp_path, _stepped)

    volume = build_volume(paths)

    assert volume.shape == (12, 64, 64)
    np.testing.assert_allclose(volume.spacing_mm, (2.0, 0.5, 0.7))
    np.testing.assert_allclose(volume.origin_mm, SMALL.position(0))
    assert volume.orientation.plane == Plane.AXIAL
    assert not volume.orientation.is_oblique
    assert volume.gantry_tilt_deg == 0.0
    assert not volume.interpolated_z
    assert SMALL.series_instance_uid == volume.series_instance_uid
    assert SMALL.frame_of_reference_uid == volume.frame_of_reference_uid
    voxel = volume.affine @ np.array([3, 5, 7, 1.0])
    expected = np.array(SMALL.position(3)) + 5 * 0.5 * np.array([0, 1, 0]) + 7 * 0.7 * np.array(
        [1, 0, 0])
    np.testing.assert_allclose(voxel[:3], expected, atol=1e-6)


def test_coronal_stack_is_accepted_and_reported(tmp_path: Path) -> None:
    """A coronal stack sorts along its normal (+y) and reports its plane."""
    order = list(range(SMALL.slices))
    random.Random(4).shuffle(order)

    def coronal(k: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-20, 3.0 * order[k], 40]

    volume = build_volume(_write(tmp_path, pixels=_stepped, mutate=coronal))

    assert volume.orientation.plane == Plane.CORONAL
    np.testing.assert_allclose(volume.orientation.normal, (0, 1, 0), atol=1e-12)
    np.testing.assert_array_equal(volume.hu[:, 0, 0], [10.0 * order.index(k) for k in range(12)])
    assert pytest.approx(volume.spacing_mm[0]) == 3.0


def _gaussian_rod(spec: CtSeriesSpec, point: np.ndarray, sigma_mm: float) -> Callable[
        [int], np.ndarray]:
    """Slices of a Gaussian rod through ``point`` along the slice normal, in physical space."""
    orientation = np.array(spec.orientation)
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    dy, dx = spec.pixel_spacing_mm

    def slice_of(k: int) -> np.ndarray:
        i, j = np.mgrid[: spec.rows, : spec.columns]
        where = (np.array(spec.position(k))[:, None, None] + j * dx * row[:, None, None]
                 + i * dy * column[:, None, None])
        offset = where - point[:, None, None]
        across = offset - np.tensordot(normal, offset, 1) * normal[:, None, None]
        return 400.0 * np.exp(-np.sum(across**2, axis=0) / (2 * sigma_mm**2))

    return slice_of


def _centroids(hu: np.ndarray) -> np.ndarray:
    """(slices, 2) intensity centroids (row, column) of each slice."""
    i, j = np.mgrid[: hu.shape[1], : hu.shape[2]]
    weight = np.clip(hu, 0, None)
    total = weight.sum(axis=(1, 2))
    return np.stack([(weight * i).sum(axis=(1, 2)) / total,
                     (weight * j).sum(axis=(1, 2)) / total], axis=1)


TILTED = CtSeriesSpec(rows=64, columns=64, slices=12, pixel_spacing_mm=(1.0, 1.0),
                      slice_thickness_mm=2.0, slice_step_mm=2.0)


@pytest.mark.parametrize("tilt_deg", [15.0, -20.0])
def test_gantry_tilt_is_corrected(tmp_path: Path, tilt_deg: float) -> None:
    """A rod along the tilted normal ends up straight, where the affine says, tilt reported."""
    spec = TILTED.with_(gantry_tilt_deg=tilt_deg)
    orientation = np.array(spec.orientation)
    point = np.array(spec.position(6)) + 30.0 * orientation[:3] + 33.0 * orientation[3:]
    rod = _gaussian_rod(spec, point, sigma_mm=3.0)
    raw_drift = _centroids(np.stack([rod(0), rod(11)]))
    assert abs(raw_drift[1, 0] - raw_drift[0, 0]) > 5  # uncorrected, the rod leans

    volume = build_volume(write_ct_series(spec, tmp_path, rod))

    assert tilt_deg == pytest.approx(volume.gantry_tilt_deg, abs=1e-3)
    assert volume.orientation.is_oblique
    assert abs(tilt_deg) == pytest.approx(volume.orientation.obliquity_deg, abs=1e-3)
    assert 2.0 * math.cos(math.radians(tilt_deg)) == pytest.approx(volume.spacing_mm[0])
    k, i, j, _ = np.linalg.inv(volume.affine) @ np.append(point, 1.0)
    assert pytest.approx(k, abs=1e-3) == 6.0
    np.testing.assert_allclose(_centroids(volume.hu), np.tile([i, j], (12, 1)), atol=0.1)


def test_tilt_correction_at_reduced_in_plane_size(tmp_path: Path) -> None:
    """Tilt correction folded into in-plane downsampling puts the rod where the affine says."""
    spec = TILTED.with_(gantry_tilt_deg=15.0)
    orientation = np.array(spec.orientation)
    point = np.array(spec.position(6)) + 30.0 * orientation[:3] + 33.0 * orientation[3:]
    paths = write_ct_series(spec, tmp_path, _gaussian_rod(spec, point, sigma_mm=3.0))

    volume = build_volume(paths, in_plane_shape=(32, 32))

    assert volume.shape == (12, 32, 32)
    np.testing.assert_allclose(volume.spacing_mm[1:], (2.0, 2.0))
    _, i, j, _ = np.linalg.inv(volume.affine) @ np.append(point, 1.0)
    np.testing.assert_allclose(_centroids(volume.hu), np.tile([i, j], (12, 1)), atol=0.1)


def test_sphere_lands_where_the_geometry_says(tmp_path: Path) -> None:
    """A blob centred at a physical point has its corrected centroid at that point."""
    spec = TILTED.with_(gantry_tilt_deg=15.0, slices=16)
    orientation = np.array(spec.orientation)
    centre = np.array(spec.position(8)) + 28.0 * orientation[:3] + 36.0 * orientation[3:]

    def blob(k: int) -> np.ndarray:
        i, j = np.mgrid[: spec.rows, : spec.columns]
        where = (np.array(spec.position(k))[:, None, None] + j * orientation[:3, None, None]
                 + i * orientation[3:, None, None])
        return 400.0 * np.exp(-np.sum((where - centre[:, None, None]) ** 2, axis=0) / (2 * 9.0))

    volume = build_volume(write_ct_series(spec, tmp_path, blob))

    k, i, j = np.mgrid[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
    weight = np.clip(volume.hu, 0, None)
    index = np.array([(weight * a).sum() for a in (k, i, j)]) / weight.sum()
    found = volume.affine @ np.append(index, 1.0)
    np.testing.assert_allclose(found[:3], centre, atol=0.2)


# --- checks -------------------------------------------------------------------------------------


def test_gap_is_detected(tmp_path: Path) -> None:
    """A missing middle slice is a gap."""
    paths = write_ct_series(SMALL, tmp_path, _stepped)
    del paths[5]

    assert _reason(paths) == Reason.GAP


def test_gap_tolerance_is_a_parameter(tmp_path: Path) -> None:
    """With a looser tolerance the missing slice is interpolated on the uniform grid."""
    paths = write_ct_series(SMALL, tmp_path, _stepped)
    del paths[5]

    volume = build_volume(paths, gap_tolerance=2.5)

    assert volume.interpolated_z
    assert len(volume.sop_instance_uids) == 11
    np.testing.assert_allclose(volume.hu, _stepped_expected(), atol=1e-4)
    assert pytest.approx(volume.spacing_mm[0]) == 2.0


def test_irregular_steps_are_interpolated_onto_a_uniform_grid(tmp_path: Path) -> None:
    """Steps of 2, 2.6, 1.4 mm... become a uniform grid whose values follow the z ramp."""
    jitter = [0.0, 0.0, 0.6, 0.0, -0.4, 0.3, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]
    z = [2.0 * k + jitter[k] for k in range(SMALL.slices)]

    def move(k: int, ds: Dataset) -> None:
        x, y, _ = SMALL.position(k)
        ds.ImagePositionPatient = [x, y, z[k]]

    paths = _write(tmp_path, pixels=lambda k: np.full((64, 64), 10.0 * z[k]), mutate=move)

    volume = build_volume(paths)

    assert volume.interpolated_z
    assert volume.shape[0] == 12
    assert pytest.approx(volume.spacing_mm[0]) == 2.0
    grid = np.arange(12) * 2.0
    expected = np.interp(grid, z, [10.0 * v for v in z])
    np.testing.assert_allclose(volume.hu[:, 10, 10], expected, atol=1e-3)


@pytest.mark.parametrize("offset_mm", [0.0, 0.004])
def test_duplicate_positions_are_rejected(tmp_path: Path, offset_mm: float) -> None:
    """A second instance at (nearly) the same position is a duplicate."""
    paths = write_ct_series(SMALL, tmp_path, _stepped)
    ds = pydicom.dcmread(paths[4])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + offset_mm]
    ds.save_as(tmp_path / "copy.dcm", enforce_file_format=True)

    assert _reason([*paths, tmp_path / "copy.dcm"]) == Reason.DUPLICATE_POSITIONS


def _replace_slice(paths: list[Path], k: int, spec: CtSeriesSpec) -> None:
    """Overwrite slice k with one written from a different spec (same UIDs)."""
    ct_slice_dataset(spec, k, np.zeros((spec.rows, spec.columns))).save_as(
        paths[k], enforce_file_format=True)


def test_inconsistent_rows_and_columns_are_rejected(tmp_path: Path) -> None:
    """One slice with a different matrix is a shape mismatch."""
    paths = write_ct_series(SMALL, tmp_path)
    _replace_slice(paths, 3, SMALL.with_(rows=32))

    assert _reason(paths) == Reason.SHAPE_MISMATCH


def test_inconsistent_pixel_spacing_is_rejected(tmp_path: Path) -> None:
    """One slice with a different PixelSpacing is a spacing mismatch."""
    paths = write_ct_series(SMALL, tmp_path)
    _replace_slice(paths, 3, SMALL.with_(pixel_spacing_mm=(0.5, 0.5)))

    assert _reason(paths) == Reason.SPACING_MISMATCH


def test_inconsistent_orientation_is_rejected(tmp_path: Path) -> None:
    """One slice with a different ImageOrientationPatient is an orientation mismatch."""
    paths = write_ct_series(SMALL, tmp_path)
    _replace_slice(paths, 3, SMALL.with_(gantry_tilt_deg=10.0))

    assert _reason(paths) == Reason.ORIENTATION_MISMATCH


def test_non_orthogonal_orientation_is_rejected(tmp_path: Path) -> None:
    """Row and column vectors that are not orthogonal units are rejected."""
    def skew(_k: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [1, 0, 0, 0.5, 1, 0]

    assert _reason(_write(tmp_path, mutate=skew)) == Reason.BAD_ORIENTATION


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient",
                                     "PixelSpacing", "Rows"])
def test_missing_geometry_is_rejected(tmp_path: Path, keyword: str) -> None:
    """A slice without a geometry attribute cannot be placed."""
    def drop(k: int, ds: Dataset) -> None:
        if k == 2:
            delattr(ds, keyword)

    assert _reason(_write(tmp_path, mutate=drop)) == Reason.MISSING_GEOMETRY


def test_malformed_position_is_rejected(tmp_path: Path) -> None:
    """An ImagePositionPatient with two values is malformed geometry."""
    def short(k: int, ds: Dataset) -> None:
        if k == 2:
            ds.ImagePositionPatient = [0, 0]

    assert _reason(_write(tmp_path, mutate=short)) == Reason.MISSING_GEOMETRY


def test_two_frames_of_reference_are_rejected(tmp_path: Path) -> None:
    """Slices in two frames of reference cannot share one grid."""
    paths = write_ct_series(SMALL, tmp_path)
    _replace_slice(paths, 7, SMALL.with_(frame_of_reference_uid=generate_uid()))

    assert _reason(paths) == Reason.MIXED_FRAME_OF_REFERENCE


def test_two_series_are_rejected(tmp_path: Path) -> None:
    """Files of two series are not one volume."""
    paths = write_ct_series(SMALL, tmp_path)
    _replace_slice(paths, 7, SMALL.with_(series_instance_uid=generate_uid()))

    assert _reason(paths) == Reason.MIXED_SERIES


@pytest.mark.parametrize("count", [0, 1])
def test_fewer_than_two_slices_are_rejected(tmp_path: Path, count: int) -> None:
    """No files or a single slice give no volume."""
    paths = write_ct_series(SMALL.with_(slices=1), tmp_path)

    assert _reason(paths[:count]) == Reason.TOO_FEW_SLICES


def test_rgb_is_rejected(tmp_path: Path) -> None:
    """A three-sample RGB image is not CT."""
    def rgb(_k: int, ds: Dataset) -> None:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = bytes(64 * 64 * 3)

    assert _reason(_write(tmp_path, mutate=rgb)) == Reason.UNSUPPORTED_PIXELS


def test_multiframe_is_rejected(tmp_path: Path) -> None:
    """A multi-frame object is not a slice."""
    def frames(_k: int, ds: Dataset) -> None:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    assert _reason(_write(tmp_path, mutate=frames)) == Reason.MULTIFRAME


def test_short_pixel_data_is_rejected(tmp_path: Path) -> None:
    """Pixel Data shorter than Rows x Columns x 2 bytes is a length error."""
    def shorten(k: int, ds: Dataset) -> None:
        if k == 5:
            ds.PixelData = ds.PixelData[:-128]

    assert _reason(_write(tmp_path, mutate=shorten)) == Reason.PIXEL_DATA_LENGTH


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    """A file cut inside its Pixel Data is a length error, found in the header pass."""
    paths = write_ct_series(SMALL, tmp_path)
    data = paths[5].read_bytes()
    paths[5].write_bytes(data[:-1000])

    assert _reason(paths) == Reason.PIXEL_DATA_LENGTH


def test_missing_pixel_data_is_rejected(tmp_path: Path) -> None:
    """A header-only instance has no pixels to stack."""
    paths = write_ct_series(SMALL, tmp_path)
    ct_slice_dataset(SMALL, 4, None).save_as(paths[4], enforce_file_format=True)

    assert _reason(paths) == Reason.MISSING_PIXEL_DATA


def test_unreadable_file_is_rejected(tmp_path: Path) -> None:
    """A file that is not DICOM is unreadable."""
    paths = write_ct_series(SMALL, tmp_path)
    paths[3].write_bytes(b"not a dicom file" * 20)

    assert _reason(paths) == Reason.UNREADABLE


def test_undecodable_pixel_data_is_rejected(tmp_path: Path) -> None:
    """An RLE fragment of garbage cannot be decoded."""
    def garbage(_k: int, ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + bytes(60) + b"\xff" * 16])

    assert _reason(_write(tmp_path, mutate=garbage)) == Reason.UNDECODABLE


def test_positions_off_a_straight_line_are_rejected(tmp_path: Path) -> None:
    """A slice jumping sideways in-plane is not a tilt, it is inconsistent."""
    def jump(k: int, ds: Dataset) -> None:
        if k == 6:
            x, y, z = SMALL.position(k)
            ds.ImagePositionPatient = [x + 10.0, y, z]

    assert _reason(_write(tmp_path, mutate=jump)) == Reason.INCONSISTENT_POSITIONS


def test_tilt_beyond_the_limit_is_rejected(tmp_path: Path) -> None:
    """A stack tilted more than max_tilt_deg is refused."""
    paths = write_ct_series(TILTED.with_(gantry_tilt_deg=15.0), tmp_path)

    assert _reason(paths, max_tilt_deg=10.0) == Reason.TILT_TOO_LARGE


def test_error_message_names_no_patient_data(tmp_path: Path) -> None:
    """Messages name files by index, never by name, ID or UID."""
    paths = write_ct_series(SMALL, tmp_path)
    _replace_slice(paths, 3, SMALL.with_(rows=32))

    with pytest.raises(VolumeCheckError) as caught:
        build_volume(paths)

    message = str(caught.value)
    for secret in (SMALL.patient_name, SMALL.patient_id, SMALL.series_instance_uid, "IMG"):
        assert secret not in message


# --- Hounsfield units and decoding --------------------------------------------------------------


@pytest.mark.parametrize(("representation", "slope", "intercept"), [
    (0, 1.0, -1024.0),
    (1, 1.0, 0.0),
    (0, 0.5, -1024.0),
    (1, 2.0, -1000.0),
])
def test_rescale_gives_hounsfield_units(
    tmp_path: Path, representation: int, slope: float, intercept: float
) -> None:
    """Signed and unsigned stored values with unit and non-unit slopes come back as HU."""
    spec = SMALL.with_(pixel_representation=representation, rescale_slope=slope,
                       rescale_intercept=intercept)
    hu = np.stack([np.full((64, 64), -1000.0 + 2.0 * k) for k in range(12)])
    hu[:, :8, :8] = 1500.0

    volume = build_volume(write_ct_series(spec, tmp_path, hu))

    np.testing.assert_array_equal(volume.hu, hu.astype(np.float32))


def test_rescale_may_differ_per_slice(tmp_path: Path) -> None:
    """Each slice's own RescaleSlope/Intercept is applied."""
    def own_rescale(k: int, ds: Dataset) -> None:
        stored = 1000 + 7 * k
        slope = 1.0 + k % 3
        ds.RescaleSlope, ds.RescaleIntercept = slope, 10.0 * k - slope * stored
        ds.PixelData = np.full((64, 64), stored, dtype=np.uint16).tobytes()

    volume = build_volume(_write(tmp_path, mutate=own_rescale))

    np.testing.assert_array_equal(volume.hu, _stepped_expected())


def test_monochrome1_is_accepted_without_inversion(tmp_path: Path) -> None:
    """MONOCHROME1 only changes display; the rescale still gives HU."""
    def monochrome1(_k: int, ds: Dataset) -> None:
        ds.PhotometricInterpretation = "MONOCHROME1"

    volume = build_volume(_write(tmp_path, pixels=_stepped, mutate=monochrome1))

    np.testing.assert_array_equal(volume.hu, _stepped_expected())


def test_bits_stored_below_bits_allocated_are_sign_extended(tmp_path: Path) -> None:
    """12-bit signed values with clear high bits decode as pydicom decodes them."""
    def twelve_bit(_k: int, ds: Dataset) -> None:
        values = np.array([-5, 0, 7, -2048, 2047] * 820)[: 64 * 64].astype(np.int16)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 1
        ds.RescaleIntercept = 0
        ds.PixelData = (values.view(np.uint16) & 0x0FFF).tobytes()

    paths = _write(tmp_path, mutate=twelve_bit)

    volume = build_volume(paths)

    reference = pydicom.dcmread(paths[0]).pixel_array
    np.testing.assert_array_equal(volume.hu[0], reference.astype(np.float32))
    assert volume.hu[0, 0, :5].tolist() == [-5.0, 0.0, 7.0, -2048.0, 2047.0]


def _recode(syntax: str) -> Mutator:
    def recode(_k: int, ds: Dataset) -> None:
        if syntax == ExplicitVRBigEndian:
            dtype = "<i2" if ds.PixelRepresentation else "<u2"
            ds.PixelData = np.frombuffer(ds.PixelData, dtype).byteswap().tobytes()
            ds.file_meta.TransferSyntaxUID = syntax
        elif syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds.compress(syntax)
    return recode


@pytest.mark.parametrize("syntax", [
    RLELossless, JPEGLSLossless, JPEG2000Lossless,
    ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
], ids=lambda uid: uid.name)
@pytest.mark.parametrize("representation", [0, 1])
def test_other_transfer_syntaxes_decode_to_the_same_hu(
    tmp_path: Path, syntax: str, representation: int
) -> None:
    """Compressed and other native encodings give exactly the uncompressed HU."""
    spec = SMALL.with_(pixel_representation=representation,
                       rescale_intercept=0.0 if representation else -1024.0)
    plain = build_volume(write_ct_series(spec, tmp_path / "plain", _ramp))
    try:
        paths = _write(tmp_path / "coded", spec, _ramp, _recode(syntax))
    except (RuntimeError, NotImplementedError) as exc:  # no encoder plugin here
        pytest.skip(f"cannot encode {syntax.name}: {exc}")
    assert syntax == pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID

    coded = build_volume(paths)

    np.testing.assert_array_equal(coded.hu, plain.hu)


# --- windows ------------------------------------------------------------------------------------


def test_window_maps_linearly_and_clips() -> None:
    """The brain window sends 0, 40, 80 HU to 0, 0.5, 1 and clips outside."""
    hu = np.array([-1000.0, 0.0, 20.0, 40.0, 80.0, 1000.0])

    result = window(hu, BRAIN_WINDOW.center, BRAIN_WINDOW.width)

    assert np.float32 == result.dtype
    np.testing.assert_allclose(result, [0.0, 0.0, 0.25, 0.5, 1.0, 1.0], atol=1e-7)


def test_named_windows() -> None:
    """Brain 40/80, subdural 80/200, bone 600/2800, in that channel order."""
    assert (WINDOWS["brain"].center, WINDOWS["brain"].width) == (40.0, 80.0)
    assert (WINDOWS["subdural"].center, WINDOWS["subdural"].width) == (80.0, 200.0)
    assert (WINDOWS["bone"].center, WINDOWS["bone"].width) == (600.0, 2800.0)
    assert (BRAIN_WINDOW, SUBDURAL_WINDOW, BONE_WINDOW) == MODEL_WINDOWS
    assert pytest.approx(float(window(np.array(600.0), 600.0, 2800.0))) == 0.5
    assert pytest.approx(float(window(np.array(80.0), 80.0, 200.0))) == 0.5


def test_window_rejects_non_positive_width() -> None:
    """A zero width cannot map to [0, 1]."""
    with pytest.raises(ValueError, match="width"):
        window(np.zeros(3), 40.0, 0.0)


def test_windowed_channels_stack_three_windows_per_slice() -> None:
    """A (z, y, x) volume becomes (z, 3, y, x); a slice becomes (3, y, x)."""
    hu = np.full((4, 8, 6), 60.0, dtype=np.float32)

    channels = windowed_channels(hu)
    one = windowed_channels(hu[0])

    assert channels.shape == (4, 3, 8, 6)
    assert one.shape == (3, 8, 6)
    expected = [window(np.array(60.0), w.center, w.width) for w in MODEL_WINDOWS]
    np.testing.assert_allclose(channels[2, :, 3, 3], expected)
    np.testing.assert_array_equal(one, channels[0])


# --- resampling ---------------------------------------------------------------------------------


def _physical_ramp(volume: Volume, source: Volume) -> np.ndarray:
    """The ramp the source was written with, evaluated at every voxel centre of ``volume``."""
    k, i, j = np.indices(volume.shape).reshape(3, -1)
    where = volume.affine @ np.stack([k, i, j, np.ones_like(k)])
    ks, is_, js, _ = np.linalg.inv(source.affine) @ where
    return (10.0 * ks + 2.0 * is_ + 3.0 * js - 500.0).reshape(volume.shape)


@pytest.mark.parametrize("antialias", [False, True])
def test_resample_to_shape_keeps_a_linear_ramp(tmp_path: Path, antialias: bool) -> None:
    """Downsampling to a shape doubles the spacing and keeps the ramp where the affine says."""
    source = build_volume(write_ct_series(SMALL, tmp_path, _ramp))

    small = resample(source, shape=(6, 32, 32), antialias=antialias)

    assert small.shape == (6, 32, 32)
    np.testing.assert_allclose(small.spacing_mm, (4.0, 1.0, 1.4))
    shift = np.array([0.35, 0.25, 1.0])  # half a new voxel minus half an old one, per axis
    np.testing.assert_allclose(small.origin_mm, np.array(source.origin_mm) + shift)
    expected = _physical_ramp(small, source)
    inner = (slice(1, -1), slice(1, -1), slice(1, -1)) if antialias else (slice(None),) * 3
    np.testing.assert_allclose(small.hu[inner], expected[inner], atol=1e-3)


def test_resample_to_spacing_upsamples(tmp_path: Path) -> None:
    """Asking for finer spacing gives the rounded shape and the ramp inside the source's edges."""
    source = build_volume(write_ct_series(SMALL, tmp_path, _ramp))

    fine = resample(source, spacing_mm=(1.0, 0.25, 0.35))

    assert fine.shape == (24, 128, 128)
    np.testing.assert_allclose(fine.spacing_mm, (1.0, 0.25, 0.35))
    expected = _physical_ramp(fine, source)
    inner = (slice(1, -1), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(fine.hu[inner], expected[inner], atol=1e-3)


def test_build_at_reduced_in_plane_size_matches_resample(tmp_path: Path) -> None:
    """Downsampling while decoding equals building at full size and resampling in-plane."""
    paths = write_ct_series(SMALL, tmp_path, _ramp)
    full = build_volume(paths)

    reduced = build_volume(paths, in_plane_shape=(20, 24))
    expected = resample(full, shape=(12, 20, 24))

    np.testing.assert_allclose(reduced.hu, expected.hu, atol=1e-3)
    np.testing.assert_allclose(reduced.spacing_mm, expected.spacing_mm)
    np.testing.assert_allclose(reduced.origin_mm, expected.origin_mm)


def test_resample_needs_exactly_one_target(tmp_path: Path) -> None:
    """Neither or both of shape and spacing_mm is an error."""
    volume = build_volume(write_ct_series(SMALL, tmp_path))

    with pytest.raises(ValueError, match="exactly one"):
        resample(volume)
    with pytest.raises(ValueError, match="exactly one"):
        resample(volume, shape=(2, 2, 2), spacing_mm=(1.0, 1.0, 1.0))


def test_volume_rejects_a_non_float32_array() -> None:
    """A Volume holds float32 HU or is not made."""
    with pytest.raises(ValueError, match="float32"):
        Volume(hu=np.zeros((2, 2, 2)), spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0),
               orientation=Orientation((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
               sop_instance_uids=("1.2",))


# --- memory -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tilt_deg", [0.0, 12.0])
def test_peak_memory_is_the_output_plus_a_few_slices(tmp_path: Path, tilt_deg: float) -> None:
    """Building holds the output and a few slices, never all 40 decoded slices."""
    spec = SMALL.with_(rows=256, columns=256, slices=40, gantry_tilt_deg=tilt_deg)
    paths = write_ct_series(spec, tmp_path)
    slice_bytes = 256 * 256 * 4
    build_volume(paths[:2])  # first use imports codecs and tables lazily; keep them out

    tracemalloc.start()
    try:
        volume = build_volume(paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak - volume.hu.nbytes < 6 * slice_bytes


def test_paths_may_be_strings(tmp_path: Path) -> None:
    """str paths work as well as Path objects."""
    paths = write_ct_series(SMALL, tmp_path, _stepped)
    copy = tmp_path / "copy"
    copy.mkdir()
    names = [str(shutil.copy(p, copy)) for p in paths]

    np.testing.assert_array_equal(build_volume(names).hu, _stepped_expected())
