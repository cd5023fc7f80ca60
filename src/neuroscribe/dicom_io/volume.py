"""Build a float32 Hounsfield-unit volume from the files of one CT series.

The service and the training code both call :func:`build_volume`. It works in two passes:

1. A header pass reads every file up to its Pixel Data (``dcmread(stop_before_pixels=True)``),
   keeps a few numbers per slice and checks the series: one series, one frame of reference, one
   orientation, one matrix and pixel spacing, greyscale single-frame pixels of the right length,
   at least two slices, no duplicate positions and no gaps. A failed check raises
   :class:`VolumeCheckError` whose ``reason`` is a :class:`Reason`.
2. A pixel pass decodes one slice at a time, in order along the slice normal, straight into the
   preallocated ``(z, y, x)`` float32 output, applying that slice's RescaleSlope/Intercept.
   Native (uncompressed) pixel data is read with ``readinto`` from the file offset found in the
   header pass; compressed transfer syntaxes go through pydicom's decoders (pylibjpeg, pyjpegls,
   RLE). Peak memory is the output plus a few slices.

Geometry: the array axes are (normal, column direction, row direction) of ImageOrientationPatient,
so ``hu[k, i, j]`` lies at ``origin + k*dz*normal + i*dy*column + j*dx*row`` (patient LPS, mm).
A tilted-gantry stack (slice positions advancing off the normal) is sheared back onto this
orthogonal grid by shifting each slice in-plane with linear interpolation, as dcm2niix does, and
slightly irregular slice steps are interpolated onto a uniform grid.

Windowing (:func:`window`, :func:`windowed_channels`) and bounded-memory separable resampling
(:func:`resample`, or ``in_plane_shape`` while building) prepare the model input.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from neuroscribe.errors import VolumeError

__all__ = [
    "BONE_WINDOW",
    "BRAIN_WINDOW",
    "MODEL_WINDOWS",
    "SUBDURAL_WINDOW",
    "WINDOWS",
    "Orientation",
    "Plane",
    "Reason",
    "Volume",
    "VolumeCheckError",
    "Window",
    "build_volume",
    "check_recorded_geometry",
    "resample",
    "window",
    "windowed_channels",
]

#: A step between neighbouring slices larger than this many median steps is a gap.
DEFAULT_GAP_TOLERANCE = 1.5
#: Slices closer than this along the normal (mm) are duplicates.
DEFAULT_DUPLICATE_TOLERANCE_MM = 0.01
#: Largest accepted angle between the stacking direction and the slice normal (gantry tilt).
DEFAULT_MAX_TILT_DEG = 45.0
#: HU written where tilt correction shifts a slice beyond its field of view (air).
OUTSIDE_HU = -1024.0

#: Largest difference of an ImageOrientationPatient component between slices.
ORIENTATION_ATOL = 1e-3
#: Relative tolerance for PixelSpacing agreeing between slices.
PIXEL_SPACING_RTOL = 1e-3
#: Positions within this fraction of a step of a uniform grid need no interpolation along z.
UNIFORM_STEP_FRACTION = 0.02
#: In-plane offsets below this many pixels are not corrected (tilt is then exactly 0).
SHIFT_EPSILON_PX = 1e-3
#: In-plane slice offsets may stray this many pixels from a straight (tilted) line.
POSITION_RESIDUAL_PX = 0.5
#: A normal within this angle (degrees) of a patient axis is not called oblique.
OBLIQUE_TOLERANCE_DEG = 1.0

_PIXEL_DATA_TAG = 0x7FE00010
_FLOAT_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009})
_UNDEFINED_LENGTH = 0xFFFFFFFF
_LONG_LENGTH_VRS = frozenset({b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"UN"})
_ELEMENT_HEADER_BYTES = 12  # tag (4) + VR (2) + reserved (2) + length (4), the longest form
_NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian})
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_BITS_ALLOCATED = frozenset({8, 16, 32})


class Reason(StrEnum):
    """Why a series cannot become a volume; the ``reason`` of :class:`VolumeCheckError`."""

    UNREADABLE = "unreadable"
    """A file cannot be read as DICOM."""
    TOO_FEW_SLICES = "too_few_slices"
    """Fewer than two slices: no volume and no slice spacing."""
    MIXED_SERIES = "mixed_series"
    """The files belong to more than one SeriesInstanceUID."""
    MISSING_GEOMETRY = "missing_geometry"
    """ImagePositionPatient, ImageOrientationPatient, PixelSpacing, Rows or Columns is absent or
    malformed."""
    BAD_ORIENTATION = "bad_orientation"
    """ImageOrientationPatient is not two orthogonal unit vectors."""
    MIXED_FRAME_OF_REFERENCE = "mixed_frame_of_reference"
    """More than one FrameOfReferenceUID (or some slices without one)."""
    ORIENTATION_MISMATCH = "orientation_mismatch"
    """ImageOrientationPatient differs between slices."""
    SHAPE_MISMATCH = "shape_mismatch"
    """Rows or Columns differ between slices."""
    SPACING_MISMATCH = "spacing_mismatch"
    """PixelSpacing differs between slices."""
    MULTIFRAME = "multiframe"
    """A file holds more than one frame (enhanced multi-frame CT is not supported here)."""
    UNSUPPORTED_PIXELS = "unsupported_pixels"
    """Not single-sample MONOCHROME1/2 integer pixels (e.g. RGB secondary captures)."""
    BAD_RESCALE = "bad_rescale"
    """RescaleSlope is zero or RescaleSlope/Intercept is not a finite number."""
    MISSING_PIXEL_DATA = "missing_pixel_data"
    """A file has no Pixel Data element."""
    PIXEL_DATA_LENGTH = "pixel_data_length"
    """Pixel Data is shorter or longer than Rows x Columns x BitsAllocated, or the file is
    truncated."""
    UNDECODABLE = "undecodable"
    """Compressed Pixel Data cannot be decoded."""
    DUPLICATE_POSITIONS = "duplicate_positions"
    """Two slices lie at the same position along the normal."""
    GAP = "gap"
    """A step between slices is larger than ``gap_tolerance`` median steps (missing slices)."""
    INCONSISTENT_POSITIONS = "inconsistent_positions"
    """Slice positions do not lie on one straight line (in-plane jumps between slices)."""
    TILT_TOO_LARGE = "tilt_too_large"
    """The stacking direction is further from the slice normal than ``max_tilt_deg``."""


class VolumeCheckError(VolumeError):
    """A check of :func:`build_volume` failed; ``reason`` names it, the message explains it.

    Messages hold no patient data: files are named by their index in the input sequence.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{message} [{reason}]")
        self.reason = reason


class Plane(StrEnum):
    """The patient plane nearest to the slices (by the largest component of the normal)."""

    AXIAL = "axial"
    """Normal nearest the patient's superior-inferior (z) axis."""
    CORONAL = "coronal"
    """Normal nearest the anterior-posterior (y) axis."""
    SAGITTAL = "sagittal"
    """Normal nearest the left-right (x) axis."""


Vector3 = tuple[float, float, float]


@dataclass(frozen=True)
class Orientation:
    """Unit vectors (patient LPS) of the volume's array axes.

    ``row`` is the direction of increasing column index (array x, ImageOrientationPatient's first
    triplet), ``column`` of increasing row index (array y), ``normal = row x column`` of increasing
    slice index (array z).
    """

    row: Vector3
    column: Vector3
    normal: Vector3

    @property
    def plane(self) -> Plane:
        """The nearest patient plane."""
        axis = int(np.argmax(np.abs(self.normal)))
        return (Plane.SAGITTAL, Plane.CORONAL, Plane.AXIAL)[axis]

    @property
    def obliquity_deg(self) -> float:
        """Angle between the normal and the nearest patient axis, in degrees."""
        return math.degrees(math.acos(min(1.0, float(np.max(np.abs(self.normal))))))

    @property
    def is_oblique(self) -> bool:
        """Whether the slices are tilted more than OBLIQUE_TOLERANCE_DEG from their plane."""
        return self.obliquity_deg > OBLIQUE_TOLERANCE_DEG


@dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume in Hounsfield units on an orthogonal grid.

    ``hu[k, i, j]`` lies at ``origin_mm + k*dz*normal + i*dy*column + j*dx*row`` (see
    :attr:`affine`). Treat ``hu`` as read-only; :func:`resample` returns a new Volume.
    """

    hu: np.ndarray  # (z, y, x) float32
    spacing_mm: Vector3  # (dz, dy, dx): along normal, column and row directions
    origin_mm: Vector3  # patient position (LPS) of the centre of voxel (0, 0, 0)
    orientation: Orientation
    sop_instance_uids: tuple[str, ...]  # source instances in order along the normal
    gantry_tilt_deg: float = 0.0  # stack tilt about the row axis that was corrected
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    interpolated_z: bool = False  # slices were interpolated along z (irregular steps, resample)

    def __post_init__(self) -> None:
        """Check shapes and types so that a Volume is always usable."""
        if self.hu.ndim != 3 or self.hu.dtype != np.float32:
            raise ValueError(f"hu must be a 3-D float32 array, got {self.hu.ndim}-D "
                             f"{self.hu.dtype}")
        if len(self.spacing_mm) != 3 or not all(
                s > 0 and math.isfinite(s) for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be three positive numbers, got {self.spacing_mm}")
        if len(self.origin_mm) != 3:
            raise ValueError(f"origin_mm must have three coordinates, got {self.origin_mm}")
        if not self.sop_instance_uids:
            raise ValueError("sop_instance_uids must name at least one source instance")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) voxel counts."""
        z, y, x = self.hu.shape
        return (z, y, x)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix from voxel index ``(k, i, j, 1)`` to patient LPS millimetres."""
        dz, dy, dx = self.spacing_mm
        matrix = np.eye(4)
        matrix[:3, 0] = np.asarray(self.orientation.normal) * dz
        matrix[:3, 1] = np.asarray(self.orientation.column) * dy
        matrix[:3, 2] = np.asarray(self.orientation.row) * dx
        matrix[:3, 3] = self.origin_mm
        return matrix


# --- the header pass -------------------------------------------------------------------------


@dataclass(frozen=True)
class _NativePixels:
    """Where a native (uncompressed) slice's stored values lie in its file."""

    offset: int
    length: int
    dtype: np.dtype


@dataclass(frozen=True)
class _Header:
    """What the pixel pass and the checks need from one file; no pixel data."""

    file_index: int
    path: Path
    sop_instance_uid: str
    series_instance_uid: str | None
    frame_of_reference_uid: str | None
    position: np.ndarray  # (3,) float64, ImagePositionPatient
    orientation: np.ndarray  # (6,) float64, ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int
    samples_per_pixel: int
    photometric: str
    frames: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    slope: float
    intercept: float
    has_pixel_data: bool | None  # None: not known before decoding (deflated syntax)
    pixel_length: int | None  # bytes, for native syntaxes
    pixel_offset: int | None  # file offset of the value, for native syntaxes
    file_size: int
    big_endian: bool

    @property
    def native(self) -> _NativePixels | None:
        """Location and dtype of native pixels, or None where pydicom must decode."""
        if self.pixel_offset is None or self.pixel_length is None:
            return None
        kind = "i" if self.signed else "u"
        dtype = np.dtype(f"{'>' if self.big_endian else '<'}{kind}{self.bits_allocated // 8}")
        return _NativePixels(self.pixel_offset, self.pixel_length, dtype)


def _fail(reason: Reason, message: str) -> VolumeCheckError:
    """Shorthand for the error every check raises."""
    return VolumeCheckError(reason, message)


def _read_header(path: Path, file_index: int) -> _Header:
    """Read one file up to its Pixel Data and locate the pixel bytes."""
    try:
        with path.open("rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            element_start = fp.tell()
            element_head = fp.read(_ELEMENT_HEADER_BYTES)
            file_size = os.fstat(fp.fileno()).st_size
    except (OSError, EOFError, ValueError, struct.error, InvalidDicomError) as exc:
        raise _fail(Reason.UNREADABLE,
                    f"file #{file_index} cannot be read as DICOM ({type(exc).__name__})") from exc

    name = f"file #{file_index}"
    position = _floats(ds, "ImagePositionPatient", 3, name)
    orientation = _floats(ds, "ImageOrientationPatient", 6, name)
    spacing = _floats(ds, "PixelSpacing", 2, name)
    if np.any(spacing <= 0):
        raise _fail(Reason.MISSING_GEOMETRY, f"{name}: PixelSpacing must be positive")
    rows, columns = _unsigned(ds, "Rows"), _unsigned(ds, "Columns")
    if not rows or not columns:
        raise _fail(Reason.MISSING_GEOMETRY, f"{name}: Rows or Columns is missing or zero")

    try:
        slope = _number(ds, "RescaleSlope", 1.0)
        intercept = _number(ds, "RescaleIntercept", 0.0)
    except ValueError as exc:
        raise _fail(Reason.BAD_RESCALE, f"{name}: RescaleSlope/Intercept is malformed") from exc
    try:
        frames = int(_number(ds, "NumberOfFrames", 1.0))
    except ValueError as exc:
        raise _fail(Reason.MULTIFRAME, f"{name}: NumberOfFrames is malformed") from exc
    if slope == 0 or not (math.isfinite(slope) and math.isfinite(intercept)):
        raise _fail(Reason.BAD_RESCALE, f"{name}: RescaleSlope {slope} / Intercept {intercept} "
                    "must be finite with a non-zero slope")

    syntax = ds.file_meta.get("TransferSyntaxUID")
    implicit, little = ds.original_encoding
    has_pixels: bool | None = None
    length: int | None = None
    offset: int | None = None
    if syntax is None or not syntax.is_deflated:
        # The file object stopped at the pixel element (or at its end): look at that header.
        has_pixels, length, offset = _pixel_element(element_head, element_start,
                                                    bool(implicit), little is not False, name)
    if syntax not in _NATIVE_SYNTAXES or length == _UNDEFINED_LENGTH:
        length = offset = None  # pydicom decodes it

    bits_allocated = _unsigned(ds, "BitsAllocated") or 0
    bits_stored = _unsigned(ds, "BitsStored") or bits_allocated
    return _Header(
        file_index=file_index,
        path=path,
        sop_instance_uid=_text(ds, "SOPInstanceUID") or "",
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        position=position,
        orientation=orientation,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=rows,
        columns=columns,
        samples_per_pixel=_unsigned(ds, "SamplesPerPixel") or 1,
        photometric=(_text(ds, "PhotometricInterpretation") or "").upper(),
        frames=frames,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=_unsigned(ds, "PixelRepresentation") == 1,
        slope=slope,
        intercept=intercept,
        has_pixel_data=has_pixels,
        pixel_length=length,
        pixel_offset=offset,
        file_size=file_size,
        big_endian=little is False,
    )


def _pixel_element(
    head: bytes, start: int, implicit: bool, little: bool, name: str
) -> tuple[bool, int | None, int | None]:
    """Parse the element header where the header read stopped: (present, length, value offset)."""
    if len(head) < 8:  # end of file: the dataset has no Pixel Data
        return False, None, None
    endian = "<" if little else ">"
    group, element = struct.unpack(f"{endian}HH", head[:4])
    tag = group << 16 | element
    if tag in _FLOAT_PIXEL_DATA_TAGS:
        raise _fail(Reason.UNSUPPORTED_PIXELS, f"{name}: float pixel data is not CT HU data")
    if tag != _PIXEL_DATA_TAG:
        return False, None, None
    if implicit:
        (length,) = struct.unpack(f"{endian}L", head[4:8])
        return True, length, start + 8
    if head[4:6] in _LONG_LENGTH_VRS and len(head) >= _ELEMENT_HEADER_BYTES:
        (length,) = struct.unpack(f"{endian}L", head[8:12])
        return True, length, start + _ELEMENT_HEADER_BYTES
    (length,) = struct.unpack(f"{endian}H", head[6:8])
    return True, length, start + 8


# Header values are read from pydicom's raw elements: converting them through pydicom's value
# machinery costs as much as parsing the whole header, and the build must keep up with a bare
# decode.
_TAGS = {keyword: Tag(keyword) for keyword in (
    "SOPInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "SamplesPerPixel",
    "PhotometricInterpretation", "NumberOfFrames", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "RescaleIntercept", "RescaleSlope",
)}


def _strings(ds: pydicom.Dataset, keyword: str) -> list[str] | None:
    """A string element's values (DS, IS, CS, UI), or None when absent."""
    element = ds.get_item(_TAGS[keyword])
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("latin-1").strip(" \x00")
        return [part.strip(" \x00") for part in text.split("\\")] if text else []
    if value is None or value == "":
        return []
    if isinstance(value, str | int | float):
        return [str(value)]
    return [str(v) for v in value]


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    values = _strings(ds, keyword)
    return values[0] if values else None


def _number(ds: pydicom.Dataset, keyword: str, default: float) -> float:
    values = _strings(ds, keyword)
    return float(values[0]) if values else default


def _unsigned(ds: pydicom.Dataset, keyword: str) -> int | None:
    """A US element's value, or None when absent or empty."""
    element = ds.get_item(_TAGS[keyword])
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes | bytearray):
        if len(value) < 2:
            return None
        endian = "<" if getattr(element, "is_little_endian", True) else ">"
        return int(struct.unpack(f"{endian}H", value[:2])[0])
    return int(value) if value not in (None, "") else None


def _floats(ds: pydicom.Dataset, keyword: str, count: int, name: str) -> np.ndarray:
    values = _strings(ds, keyword)
    if not values:
        raise _fail(Reason.MISSING_GEOMETRY, f"{name}: {keyword} is missing")
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except ValueError as exc:
        raise _fail(Reason.MISSING_GEOMETRY, f"{name}: {keyword} is malformed") from exc
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise _fail(Reason.MISSING_GEOMETRY,
                    f"{name}: {keyword} must hold {count} finite numbers, has {numbers.size}")
    return numbers


# --- the checks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stack:
    """The checked, sorted series and the geometry of its output grid."""

    headers: tuple[_Header, ...]  # sorted along the normal
    row: np.ndarray  # (3,) unit
    column: np.ndarray  # (3,) unit
    normal: np.ndarray  # (3,) unit
    positions_mm: np.ndarray  # (n,) source positions along the normal, ascending
    dz: float  # output step along the normal
    n_out: int  # output slices
    shifts_px: np.ndarray  # (n, 2) in-plane offset of each source slice, (rows, columns) pixels
    origin: np.ndarray  # (3,) centre of output voxel (0, 0, 0) at full in-plane resolution
    tilt_deg: float
    interpolate_z: bool


def _check_pixel_format(h: _Header) -> None:
    name = f"file #{h.file_index}"
    if h.frames != 1:
        raise _fail(Reason.MULTIFRAME, f"{name} holds {h.frames} frames, one is expected")
    if h.samples_per_pixel != 1 or h.photometric not in _MONOCHROME:
        raise _fail(Reason.UNSUPPORTED_PIXELS,
                    f"{name}: SamplesPerPixel {h.samples_per_pixel}, PhotometricInterpretation "
                    f"{h.photometric or 'missing'}; CT needs 1 sample, MONOCHROME1/2")
    if h.bits_allocated not in _BITS_ALLOCATED or not 0 < h.bits_stored <= h.bits_allocated:
        raise _fail(Reason.UNSUPPORTED_PIXELS,
                    f"{name}: BitsAllocated {h.bits_allocated} / BitsStored {h.bits_stored} "
                    "is not 8, 16 or 32 bit integer pixels")
    if h.has_pixel_data is False:
        raise _fail(Reason.MISSING_PIXEL_DATA, f"{name} has no Pixel Data")
    if h.pixel_length is not None and h.pixel_offset is not None:
        expected = h.rows * h.columns * h.bits_allocated // 8
        padded = expected + expected % 2
        if h.pixel_length not in (expected, padded):
            raise _fail(Reason.PIXEL_DATA_LENGTH, f"{name}: Pixel Data has {h.pixel_length} "
                        f"bytes, Rows x Columns x BitsAllocated needs {expected}")
        if h.pixel_offset + expected > h.file_size:
            raise _fail(Reason.PIXEL_DATA_LENGTH, f"{name} is truncated inside its Pixel Data")


def _single(values: set[object], reason: Reason, what: str) -> None:
    if len(values) > 1:
        raise _fail(reason, f"the files have {len(values)} different {what}")


def _check_series(
    headers: Sequence[_Header],
    *,
    gap_tolerance: float,
    duplicate_tolerance_mm: float,
    max_tilt_deg: float,
) -> _Stack:
    """Run every series check and work out the output grid; raise VolumeCheckError on failure."""
    if len(headers) < 2:
        raise _fail(Reason.TOO_FEW_SLICES, f"{len(headers)} slice(s); a volume needs at least 2")
    for h in headers:
        _check_pixel_format(h)
    _single({h.series_instance_uid for h in headers}, Reason.MIXED_SERIES, "SeriesInstanceUIDs")
    _single({h.frame_of_reference_uid for h in headers}, Reason.MIXED_FRAME_OF_REFERENCE,
            "FrameOfReferenceUIDs (or some have none)")
    _single({(h.rows, h.columns) for h in headers}, Reason.SHAPE_MISMATCH, "Rows x Columns")

    first = headers[0]
    spacings = np.array([h.pixel_spacing for h in headers])
    if not np.allclose(spacings, spacings[0], rtol=PIXEL_SPACING_RTOL, atol=0):
        raise _fail(Reason.SPACING_MISMATCH, "PixelSpacing differs between slices "
                    f"({spacings.min():.4g} to {spacings.max():.4g} mm)")
    orientations = np.array([h.orientation for h in headers])
    if np.max(np.abs(orientations - first.orientation)) > ORIENTATION_ATOL:
        raise _fail(Reason.ORIENTATION_MISMATCH, "ImageOrientationPatient differs between slices")

    row, column = first.orientation[:3], first.orientation[3:]
    if (abs(np.linalg.norm(row) - 1) > ORIENTATION_ATOL
            or abs(np.linalg.norm(column) - 1) > ORIENTATION_ATOL
            or abs(float(row @ column)) > ORIENTATION_ATOL):
        raise _fail(Reason.BAD_ORIENTATION,
                    "ImageOrientationPatient is not two orthogonal unit vectors")
    row = row / np.linalg.norm(row)
    column = column - (column @ row) * row
    column = column / np.linalg.norm(column)
    normal = np.cross(row, column)

    positions = np.array([h.position for h in headers])  # (n, 3)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    steps = np.diff(along)
    if np.min(steps) < duplicate_tolerance_mm:
        raise _fail(Reason.DUPLICATE_POSITIONS, f"{int(np.sum(steps < duplicate_tolerance_mm))} "
                    f"pair(s) of slices closer than {duplicate_tolerance_mm} mm along the normal")
    median_step = float(np.median(steps))
    if np.max(steps) > gap_tolerance * median_step:
        raise _fail(Reason.GAP, f"a step of {np.max(steps):.4g} mm is more than {gap_tolerance} "
                    f"x the median step {median_step:.4g} mm (missing slices?)")

    # In-plane offsets of each slice from the middle one: a line through them is the tilt.
    dy, dx = first.pixel_spacing
    middle = len(headers) // 2
    offset_col = (positions - positions[middle]) @ column  # mm along the column direction
    offset_row = (positions - positions[middle]) @ row
    rel = along - along[middle]
    fit_col = np.polyfit(rel, offset_col, 1)
    fit_row = np.polyfit(rel, offset_row, 1)
    residual_px = max(np.max(np.abs(np.polyval(fit_col, rel) - offset_col)) / dy,
                      np.max(np.abs(np.polyval(fit_row, rel) - offset_row)) / dx)
    if residual_px > POSITION_RESIDUAL_PX:
        raise _fail(Reason.INCONSISTENT_POSITIONS, "slice positions stray "
                    f"{residual_px:.3g} pixels in-plane from a straight line")
    stack_angle = math.degrees(math.atan(math.hypot(fit_col[0], fit_row[0])))
    if stack_angle > max_tilt_deg:
        raise _fail(Reason.TILT_TOO_LARGE, f"stacking direction is {stack_angle:.3g} degrees off "
                    f"the slice normal, more than {max_tilt_deg}")
    shifts = np.stack([offset_col / dy, offset_row / dx], axis=1)
    if np.max(np.abs(shifts)) < SHIFT_EPSILON_PX:
        shifts[:] = 0.0
        tilt = 0.0
    else:
        # Signed as CtSeriesSpec.gantry_tilt_deg: positive when the slices' positions fall
        # back along their column direction as the stack advances along the normal.
        tilt = math.degrees(math.atan(-fit_col[0]))

    extent = float(along[-1] - along[0])
    uniform_dz = extent / (len(headers) - 1)
    deviation = np.max(np.abs(along - along[0] - uniform_dz * np.arange(len(headers))))
    interpolate = bool(deviation > UNIFORM_STEP_FRACTION * uniform_dz)
    n_out = round(extent / median_step) + 1 if interpolate else len(headers)
    dz = extent / (n_out - 1)
    origin = positions[middle] + (along[0] - along[middle]) * normal
    return _Stack(
        headers=tuple(headers[i] for i in order),
        row=row,
        column=column,
        normal=normal,
        positions_mm=along,
        dz=dz,
        n_out=n_out,
        shifts_px=shifts,
        origin=origin,
        tilt_deg=tilt,
        interpolate_z=interpolate,
    )



def check_recorded_geometry(
    fields: Sequence[Mapping[str, Any]],
    *,
    gap_tolerance: float = DEFAULT_GAP_TOLERANCE,
    duplicate_tolerance_mm: float = DEFAULT_DUPLICATE_TOLERANCE_MM,
    max_tilt_deg: float = DEFAULT_MAX_TILT_DEG,
) -> None:
    """Run :func:`build_volume`'s series checks on header fields recorded at receive time.

    ``fields`` are the dicts :func:`neuroscribe.dicom_io.inspect.inspect_received` keeps (plus
    ``sop_instance_uid``). Pixel bytes are not read, so this is cheap enough for series selection;
    :func:`build_volume` repeats every check on the files and adds the pixel ones.

    Raises
    ------
    VolumeCheckError
        The same reasons as :func:`build_volume`'s header checks.
    """
    headers = []
    for index, f in enumerate(fields):
        name = f"file #{index}"
        geometry = {}
        for key, count in (("image_position_patient", 3), ("image_orientation_patient", 6),
                           ("pixel_spacing", 2)):
            values = f.get(key)
            if not values or len(values) != count:
                raise _fail(Reason.MISSING_GEOMETRY, f"{name}: {key} is missing or malformed")
            geometry[key] = np.asarray(values, dtype=np.float64)
        if not f.get("rows") or not f.get("columns"):
            raise _fail(Reason.MISSING_GEOMETRY, f"{name}: Rows or Columns is missing or zero")
        bits = int(f.get("bits_allocated") or 16)
        headers.append(_Header(
            file_index=index, path=Path(str(f.get("path", ""))),
            sop_instance_uid=str(f.get("sop_instance_uid", "")),
            series_instance_uid=None, frame_of_reference_uid=f.get("frame_of_reference_uid"),
            position=geometry["image_position_patient"],
            orientation=geometry["image_orientation_patient"],
            pixel_spacing=(float(geometry["pixel_spacing"][0]), float(geometry["pixel_spacing"][1])),
            rows=int(f["rows"]), columns=int(f["columns"]),
            samples_per_pixel=int(f.get("samples_per_pixel") or 1),
            photometric=str(f.get("photometric_interpretation") or "").upper(),
            frames=int(f.get("number_of_frames") or 1), bits_allocated=bits, bits_stored=bits,
            signed=False, slope=1.0, intercept=0.0, has_pixel_data=None, pixel_length=None,
            pixel_offset=None, file_size=0, big_endian=False,
        ))
    _check_series(headers, gap_tolerance=gap_tolerance,
                  duplicate_tolerance_mm=duplicate_tolerance_mm, max_tilt_deg=max_tilt_deg)


# --- linear interpolation along one axis -------------------------------------------------------


@dataclass(frozen=True)
class _Taps:
    """Separable resampling along one axis: ``out[o] = sum_t weight[o, t] * src[index[o, t]]``."""

    index: np.ndarray  # (n_out, taps) intp, clipped into the source
    weight: np.ndarray  # (n_out, taps) float32, rows sum to 1
    outside: np.ndarray  # (n_out,) bool: sample beyond the source's edge pixels by > half a pixel

    @property
    def is_identity(self) -> bool:
        """Whether output sample o is exactly source sample o."""
        n_out = self.index.shape[0]
        return bool(
            self.index.shape[1] == 1
            and np.array_equal(self.index[:, 0], np.arange(n_out))
            and np.all(self.weight == 1)
            and not self.outside.any()
        )


def _make_taps(n_src: int, positions: np.ndarray, support: float = 1.0) -> _Taps:
    """Triangle-filter taps sampling ``n_src`` points at fractional ``positions``.

    ``support`` 1 is linear interpolation; a larger support (the downsampling ratio) averages
    over each output sample's footprint so that downsampling does not alias. Weights that fall
    outside the source are dropped and the rest renormalised, so edges are clamped.
    """
    positions = np.asarray(positions, dtype=np.float64)
    slots = math.ceil(2 * support) + 1
    index = np.floor(positions - support).astype(np.intp)[:, None] + 1 + np.arange(slots)
    weight = np.maximum(0.0, 1.0 - np.abs(index - positions[:, None]) / support)
    weight[(index < 0) | (index >= n_src)] = 0.0
    total = weight.sum(axis=1)
    empty = total == 0
    if empty.any():  # far outside: take the nearest edge sample
        nearest = np.clip(np.rint(positions[empty]), 0, n_src - 1).astype(np.intp)
        index[empty, 0], weight[empty, 0], total[empty] = nearest, 1.0, 1.0
    weight /= total[:, None]
    used = np.flatnonzero(weight.any(axis=0))
    keep = slice(0, int(used[-1]) + 1)
    outside = (positions < -0.5) | (positions > n_src - 0.5)
    return _Taps(np.clip(index[:, keep], 0, n_src - 1), weight[:, keep].astype(np.float32), outside)


def _centred_positions(n_src: int, n_out: int, ratio: float) -> np.ndarray:
    """Source coordinates of ``n_out`` samples ``ratio`` source steps apart, centred."""
    return (n_src - 1) / 2 + (np.arange(n_out) - (n_out - 1) / 2) * ratio


class _Buffers:
    """Reusable scratch arrays, so the per-slice loop allocates nothing large."""

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 buffer called ``name`` of this shape, made on first use."""
        key = (name, shape)
        if key not in self._arrays:
            self._arrays[key] = np.empty(shape, dtype=np.float32)
        return self._arrays[key]


def _apply_taps(
    src: np.ndarray, taps: _Taps, axis: int, out: np.ndarray, buffers: _Buffers, fill: float
) -> None:
    """Resample a 2-D ``src`` along ``axis`` into ``out``."""
    tmp = buffers.get(f"tap{axis}", out.shape)
    shape = (-1, 1) if axis == 0 else (1, -1)
    for t in range(taps.index.shape[1]):
        np.take(src, taps.index[:, t], axis=axis, out=tmp, mode="clip")
        if t == 0:
            np.multiply(tmp, taps.weight[:, t].reshape(shape), out=out)
        else:
            tmp *= taps.weight[:, t].reshape(shape)
            out += tmp
    if taps.outside.any():
        if axis == 0:
            out[taps.outside, :] = fill
        else:
            out[:, taps.outside] = fill


def _map_plane(
    src: np.ndarray,
    y_taps: _Taps | None,
    x_taps: _Taps | None,
    out: np.ndarray,
    buffers: _Buffers,
    fill: float,
) -> None:
    """Resample a (rows, columns) slice in-plane into ``out``; None taps leave that axis alone."""
    if y_taps is not None and x_taps is not None:
        middle = buffers.get("plane", (out.shape[0], src.shape[1]))
        _apply_taps(src, y_taps, 0, middle, buffers, fill)
        _apply_taps(middle, x_taps, 1, out, buffers, fill)
    elif y_taps is not None:
        _apply_taps(src, y_taps, 0, out, buffers, fill)
    elif x_taps is not None:
        _apply_taps(src, x_taps, 1, out, buffers, fill)
    else:
        out[...] = src


def _assemble(
    out: np.ndarray, z_taps: _Taps | None, make_plane: Callable[[int, np.ndarray], None]
) -> None:
    """Fill ``out[k] = sum_j w[k, j] * plane(j)``, making each needed source plane once, in order.

    Only the planes one output slice needs are held at a time, so memory stays bounded.
    """
    if z_taps is None:
        for k in range(out.shape[0]):
            make_plane(k, out[k])
        return
    cache: dict[int, np.ndarray] = {}
    spare: list[np.ndarray] = []
    tmp = np.empty(out.shape[1:], dtype=np.float32)
    for k in range(out.shape[0]):
        live = z_taps.weight[k] != 0
        needed = z_taps.index[k][live]
        weights = z_taps.weight[k][live]
        for j in [j for j in cache if j < needed.min()]:
            spare.append(cache.pop(j))
        for j in needed:
            if j not in cache:
                plane = spare.pop() if spare else np.empty(out.shape[1:], dtype=np.float32)
                make_plane(int(j), plane)
                cache[int(j)] = plane
        np.multiply(cache[int(needed[0])], weights[0], out=out[k])
        for j, w in zip(needed[1:], weights[1:], strict=True):
            np.multiply(cache[int(j)], w, out=tmp)
            out[k] += tmp


# --- the pixel pass ----------------------------------------------------------------------------


def _rescale_into(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> None:
    """HU = stored * slope + intercept, written into the float32 ``out`` in at most two passes."""
    if slope == 1.0:
        np.add(stored, np.float32(intercept), out=out)
    else:
        np.multiply(stored, np.float32(slope), out=out)
        if intercept != 0.0:
            out += np.float32(intercept)


class _SliceReader:
    """Decodes one slice at a time into a float32 (rows, columns) array of HU."""

    def __init__(self, max_bytes: int) -> None:
        self._raw = np.empty(max_bytes, dtype=np.uint8)

    def read(self, h: _Header, out: np.ndarray) -> None:
        """Decode the slice of ``h`` as HU into ``out``; native pixels bypass pydicom."""
        native = h.native
        if native is None:
            self._read_with_pydicom(h, out)
            return
        expected = h.rows * h.columns * native.dtype.itemsize
        with h.path.open("rb", buffering=0) as fp:
            fp.seek(native.offset)
            got = fp.readinto(memoryview(self._raw)[:expected])
        if got != expected:
            raise _fail(Reason.PIXEL_DATA_LENGTH,
                        f"file #{h.file_index} changed or shrank after its header was read")
        stored = self._raw[:expected].view(native.dtype).reshape(h.rows, h.columns)
        if native.dtype.byteorder == ">":
            stored = stored.byteswap(inplace=True).view(native.dtype.newbyteorder("="))
        if h.bits_stored < h.bits_allocated:
            _fix_high_bits(stored, h.bits_stored, h.bits_allocated, h.signed)
        _rescale_into(stored, h.slope, h.intercept, out)

    @staticmethod
    def _read_with_pydicom(h: _Header, out: np.ndarray) -> None:
        """Decode compressed (or deflated) pixel data through pydicom's plugins."""
        name = f"file #{h.file_index}"
        try:
            ds = pydicom.dcmread(h.path)
            if "PixelData" not in ds:
                raise _fail(Reason.MISSING_PIXEL_DATA, f"{name} has no Pixel Data")
            stored = ds.pixel_array
        except VolumeCheckError:
            raise
        except Exception as exc:  # decoder plugins raise anything; all mean "cannot decode"
            raise _fail(Reason.UNDECODABLE,
                        f"{name}: Pixel Data cannot be decoded ({type(exc).__name__})") from exc
        if stored.shape != (h.rows, h.columns):
            raise _fail(Reason.PIXEL_DATA_LENGTH, f"{name}: decoded {stored.shape}, "
                        f"header says {(h.rows, h.columns)}")
        _rescale_into(stored, h.slope, h.intercept, out)


def _fix_high_bits(stored: np.ndarray, bits_stored: int, bits_allocated: int, signed: bool) -> None:
    """Keep only the BitsStored low bits, sign-extended for signed pixels (PS3.5 8.1.1)."""
    unused = bits_allocated - bits_stored
    if signed:
        np.left_shift(stored, unused, out=stored)
        np.right_shift(stored, unused, out=stored)  # arithmetic shift on a signed dtype
    else:
        np.bitwise_and(stored, (1 << bits_stored) - 1, out=stored)


def build_volume(
    paths: Sequence[Path | str],
    *,
    gap_tolerance: float = DEFAULT_GAP_TOLERANCE,
    duplicate_tolerance_mm: float = DEFAULT_DUPLICATE_TOLERANCE_MM,
    max_tilt_deg: float = DEFAULT_MAX_TILT_DEG,
    in_plane_shape: tuple[int, int] | None = None,
    antialias: bool = True,
    fill_hu: float = OUTSIDE_HU,
) -> Volume:
    """Read the files of one CT series (any order) into a checked float32 HU volume.

    Parameters
    ----------
    paths
        The series' files. Order and InstanceNumber do not matter: slices are sorted by position
        along the slice normal.
    gap_tolerance
        A step between neighbouring slices larger than this many median steps raises
        ``Reason.GAP``. Smaller irregularities are interpolated onto a uniform grid.
    duplicate_tolerance_mm
        Slices closer than this along the normal raise ``Reason.DUPLICATE_POSITIONS``.
    max_tilt_deg
        Largest accepted angle between the stacking direction and the slice normal.
    in_plane_shape
        (rows, columns) to resample each slice to as it is decoded, so a long series can feed a
        model without a full-resolution copy. None keeps the acquired matrix.
    antialias
        When ``in_plane_shape`` downsamples, average over each output pixel's footprint
        (triangle filter) rather than sample two neighbours.
    fill_hu
        Value for pixels that tilt correction moves in from beyond the field of view.

    Returns
    -------
    Volume
        ``hu`` is (slices, rows, columns) float32 in slice-normal order.

    Raises
    ------
    VolumeCheckError
        A check failed; ``reason`` (a :class:`Reason`) says which.
    """
    if gap_tolerance <= 1:
        raise ValueError(f"gap_tolerance must be > 1 median step, got {gap_tolerance}")
    headers = [_read_header(Path(p), i) for i, p in enumerate(paths)]
    stack = _check_series(headers, gap_tolerance=gap_tolerance,
                          duplicate_tolerance_mm=duplicate_tolerance_mm, max_tilt_deg=max_tilt_deg)
    first = stack.headers[0]
    rows, columns = first.rows, first.columns
    dy, dx = first.pixel_spacing
    out_rows, out_columns = in_plane_shape or (rows, columns)
    if out_rows <= 0 or out_columns <= 0:
        raise ValueError(f"in_plane_shape must be two positive sizes, got {in_plane_shape}")

    y_ratio, x_ratio = rows / out_rows, columns / out_columns
    y_base = _centred_positions(rows, out_rows, y_ratio)
    x_base = _centred_positions(columns, out_columns, x_ratio)
    y_support = max(y_ratio, 1.0) if antialias else 1.0
    x_support = max(x_ratio, 1.0) if antialias else 1.0
    resize = (out_rows, out_columns) != (rows, columns)
    taps_cache: dict[tuple[int, float], _Taps | None] = {}

    def axis_taps(axis: int, shift: float) -> _Taps | None:
        if (axis, shift) not in taps_cache:
            n, base, support = (rows, y_base, y_support) if axis == 0 else (
                columns, x_base, x_support)
            taps_cache[axis, shift] = (
                None if not resize and shift == 0.0 else _make_taps(n, base - shift, support))
        return taps_cache[axis, shift]

    reader = _SliceReader(max(h.rows * h.columns * h.bits_allocated // 8 for h in stack.headers))
    buffers = _Buffers()

    def make_plane(j: int, dst: np.ndarray) -> None:
        h = stack.headers[j]
        shift_y, shift_x = (float(s) for s in stack.shifts_px[j])
        y_taps, x_taps = axis_taps(0, shift_y), axis_taps(1, shift_x)
        if y_taps is None and x_taps is None:
            reader.read(h, dst)
            return
        decoded = buffers.get("decoded", (rows, columns))
        reader.read(h, decoded)
        _map_plane(decoded, y_taps, x_taps, dst, buffers, fill_hu)

    z_taps = None
    if stack.interpolate_z:
        grid = stack.positions_mm[0] + stack.dz * np.arange(stack.n_out)
        fractional = np.interp(grid, stack.positions_mm, np.arange(len(stack.headers)))
        z_taps = _make_taps(len(stack.headers), fractional)
    hu = np.empty((stack.n_out, out_rows, out_columns), dtype=np.float32)
    _assemble(hu, z_taps, make_plane)

    origin = stack.origin + y_base[0] * dy * stack.column + x_base[0] * dx * stack.row
    return Volume(
        hu=hu,
        spacing_mm=(stack.dz, dy * y_ratio, dx * x_ratio),
        origin_mm=_vector(origin),
        orientation=Orientation(_vector(stack.row), _vector(stack.column), _vector(stack.normal)),
        sop_instance_uids=tuple(h.sop_instance_uid for h in stack.headers),
        gantry_tilt_deg=stack.tilt_deg,
        series_instance_uid=first.series_instance_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        interpolated_z=stack.interpolate_z,
    )


def _vector(values: np.ndarray) -> Vector3:
    x, y, z = (float(v) for v in values)
    return (x, y, z)


# --- resampling ---------------------------------------------------------------------------------


def resample(
    volume: Volume,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
    antialias: bool = True,
) -> Volume:
    """Resample a volume to a (z, y, x) ``shape`` or a (dz, dy, dx) ``spacing_mm``.

    Separable linear interpolation (a triangle filter widened by the ratio where ``antialias``
    and downsampling), computed one output slice at a time: memory is the output plus the few
    source slices one output slice needs. The new grid is centred on the old one; with
    ``shape`` it covers the same extent, with ``spacing_mm`` the extent is rounded to whole
    voxels.
    """
    if (shape is None) == (spacing_mm is None):
        raise ValueError("give exactly one of shape or spacing_mm")
    src_shape = volume.shape
    if shape is not None:
        if len(shape) != 3 or any(int(n) <= 0 for n in shape):
            raise ValueError(f"shape must be three positive sizes, got {shape}")
        out_shape = tuple(int(n) for n in shape)
        ratios = [s / n for s, n in zip(src_shape, out_shape, strict=True)]
    else:
        assert spacing_mm is not None
        if len(spacing_mm) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing_mm):
            raise ValueError(f"spacing_mm must be three positive sizes, got {spacing_mm}")
        ratios = [t / s for t, s in zip(spacing_mm, volume.spacing_mm, strict=True)]
        out_shape = tuple(max(1, round(n / r)) for n, r in zip(src_shape, ratios, strict=True))

    taps: list[_Taps | None] = []
    starts: list[float] = []
    for n_src, n_out, ratio in zip(src_shape, out_shape, ratios, strict=True):
        positions = _centred_positions(n_src, n_out, ratio)
        axis_taps = _make_taps(n_src, positions, max(ratio, 1.0) if antialias else 1.0)
        taps.append(None if axis_taps.is_identity else axis_taps)
        starts.append(float(positions[0]))
    z_taps, y_taps, x_taps = taps
    buffers = _Buffers()

    def make_plane(j: int, dst: np.ndarray) -> None:
        _map_plane(volume.hu[j], y_taps, x_taps, dst, buffers, OUTSIDE_HU)

    hu = np.empty(out_shape, dtype=np.float32)
    _assemble(hu, z_taps, make_plane)
    affine = volume.affine
    origin = affine[:3, :3] @ np.array(starts) + affine[:3, 3]
    dz, dy, dx = (s * r for s, r in zip(volume.spacing_mm, ratios, strict=True))
    return replace(volume, hu=hu, spacing_mm=(dz, dy, dx), origin_mm=_vector(origin),
                   interpolated_z=volume.interpolated_z or z_taps is not None)


# --- windowing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A display window in HU: ``center`` (level) and ``width``."""

    center: float
    width: float

    def __post_init__(self) -> None:
        """Reject a window that cannot map HU to [0, 1]."""
        if not (self.width > 0 and math.isfinite(self.width) and math.isfinite(self.center)):
            raise ValueError(f"window width must be positive and finite, got {self.width}")


#: Brain parenchyma, W:80 L:40 (Radiopaedia, "Windowing (CT)").
BRAIN_WINDOW = Window(center=40.0, width=80.0)
#: Subdural, W:200 L:80: inside Radiopaedia's published W:130-300 L:50-100 range and the
#: brain/subdural/bone triple widely used for the RSNA 2019 intracranial haemorrhage challenge.
SUBDURAL_WINDOW = Window(center=80.0, width=200.0)
#: Bone, W:2800 L:600 (Radiopaedia, "Windowing (CT)").
BONE_WINDOW = Window(center=600.0, width=2800.0)
#: Windows by name.
WINDOWS: dict[str, Window] = {
    "brain": BRAIN_WINDOW,
    "subdural": SUBDURAL_WINDOW,
    "bone": BONE_WINDOW,
}
#: The model's three input channels, in order.
MODEL_WINDOWS: tuple[Window, ...] = (BRAIN_WINDOW, SUBDURAL_WINDOW, BONE_WINDOW)


def window(
    hu: np.ndarray, center: float, width: float, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Map HU linearly to [0, 1]: ``center - width/2`` -> 0, ``center + width/2`` -> 1, clipped.

    This is the plain linear window, not the DICOM VOI LUT variant with ``center - 0.5`` and
    ``width - 1``. Returns float32 (``out`` if given).
    """
    Window(center, width)  # validates
    low = np.float32(center - width / 2)
    scale = np.float32(1.0 / width)
    if out is None:
        out = np.empty(np.shape(hu), dtype=np.float32)
    np.subtract(hu, low, out=out)
    out *= scale
    np.clip(out, 0.0, 1.0, out=out)
    return out


def windowed_channels(
    hu: np.ndarray | Volume, windows: Sequence[Window] = MODEL_WINDOWS
) -> np.ndarray:
    """Stack windowed copies as channels just before the last two (in-plane) axes.

    A (z, y, x) volume becomes a stack of multi-channel slices, (z, C, y, x); one (y, x) slice
    becomes (C, y, x). Channels follow ``windows`` (brain, subdural, bone by default).
    """
    array = hu.hu if isinstance(hu, Volume) else np.asarray(hu)
    if array.ndim < 2:
        raise ValueError(f"hu must have at least two (in-plane) axes, got shape {array.shape}")
    lead, plane = array.shape[:-2], array.shape[-2:]
    out = np.empty((*lead, len(windows), *plane), dtype=np.float32)
    for c, w in enumerate(windows):
        window(array, w.center, w.width, out=out[..., c, :, :])
    return out
