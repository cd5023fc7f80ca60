"""Read the header of a received file and decide whether it can be accepted.

Runs on the association thread, so it never decodes pixel data: large values stay deferred on
disk and only their declared lengths are checked against the file. Every refusal is a
:class:`Refusal` with a DIMSE status, a short reason code and a detail free of patient data.
"""

from __future__ import annotations

import math
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import TEXT_VR_DELIMS
from pydicom.values import convert_string, converters

from neuroscribe.dicom_io.constants import ACCEPTED_TRANSFER_SYNTAXES, CT_SOP_CLASSES, StoreStatus
from neuroscribe.errors import DicomInputError

#: Values longer than this stay on disk while the header is read.
DEFER_BYTES = 16 * 1024
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNDEFINED_LENGTH = 0xFFFFFFFF


class Refusal(DicomInputError):  # noqa: N818 (a refusal is an answer to the sender, not a fault)
    """A received object that is answered with a failure status instead of being stored."""

    def __init__(self, status: StoreStatus, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ReceivedHeader:
    """The identifying UIDs of a received instance and the header fields later stages need.

    ``fields`` holds what selection and volume checks use, and no patient data.
    """

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    fields: dict[str, Any]


def inspect_received(path: Path, affected_sop_instance_uid: str | None = None) -> ReceivedHeader:
    """Check a received file (preamble + file meta + data set) and return its header.

    A plain, valid header is read by :func:`_inspect_fast`; anything it does not accept outright
    is read again by :func:`_inspect_with_pydicom`, which decides every refusal.

    Raises
    ------
    Refusal
        The object is unparseable, truncated, declares impossible lengths, lacks a UID the
        spool needs, or (for CT) lacks pixel data of the size its header promises.
    """
    header = _inspect_fast(path)
    if header is None:
        return _inspect_with_pydicom(path, affected_sop_instance_uid)
    _check_affected_uid(header.sop_instance_uid, affected_sop_instance_uid)
    return header


def _inspect_with_pydicom(path: Path, affected_sop_instance_uid: str | None) -> ReceivedHeader:
    """The reference reading: ``dcmread`` and checks on the data set (about 2 ms a CT slice)."""
    size = path.stat().st_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote values; our checks decide
            ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
            _check_lengths(ds, size)
            sop_class = _uid(ds, "SOPClassUID")
            sop_instance = _uid(ds, "SOPInstanceUID")
            series = _uid(ds, "SeriesInstanceUID")
            study = _uid(ds, "StudyInstanceUID")
            fields = _fields(ds)
    except Refusal:
        raise
    except Exception as exc:  # any parse failure of untrusted bytes is one answer: cannot understand
        raise Refusal(
            StoreStatus.CANNOT_UNDERSTAND, "undecodable",
            f"data set cannot be parsed ({type(exc).__name__})",
        ) from None
    _check_affected_uid(sop_instance, affected_sop_instance_uid)
    if sop_class in CT_SOP_CLASSES:
        _check_pixel_data(ds, fields)
    return ReceivedHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        series_instance_uid=series,
        study_instance_uid=study,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        fields=fields,
    )


def _check_affected_uid(sop_instance: str, affected_sop_instance_uid: str | None) -> None:
    if affected_sop_instance_uid and sop_instance != affected_sop_instance_uid:
        raise Refusal(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "uid_mismatch",
            "SOP Instance UID in the data set differs from the C-STORE request's",
        )


def _check_lengths(ds: Dataset, file_size: int) -> None:
    """Every top-level value must lie inside the file: catches truncation and absurd lengths."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
            continue
        if raw.value is None:  # deferred: only its position and declared length were read
            if raw.value_tell + raw.length > file_size:
                raise Refusal(
                    StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "truncated",
                    f"element {tag} declares {raw.length} bytes, past the end of the data",
                )
        elif len(raw.value) != raw.length:
            raise Refusal(
                StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "truncated",
                f"element {tag} declares {raw.length} bytes but {len(raw.value)} arrived",
            )


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or not str(value).strip():
        raise Refusal(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "missing_uid", f"no {keyword}")
    text = str(value).strip().rstrip("\x00")
    if len(text) > 64 or not _UID_PATTERN.match(text):
        raise Refusal(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "invalid_uid", f"{keyword} is not a valid UID"
        )
    return str(UID(text))


def _check_pixel_data(ds: Dataset, fields: dict[str, Any]) -> None:
    raw = ds.get_item("PixelData", keep_deferred=True)
    if raw is None:
        raise Refusal(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "no_pixel_data", "CT image without pixel data"
        )
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return  # compressed: the volume builder decodes (off this thread) and rejects bad frames
    rows, columns = fields.get("rows"), fields.get("columns")
    bits = fields.get("bits_allocated")
    if not rows or not columns or not bits:
        raise Refusal(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "no_image_geometry",
            "Rows, Columns or BitsAllocated missing",
        )
    expected = rows * columns * (fields.get("samples_per_pixel") or 1) * fields["number_of_frames"]
    expected = math.ceil(expected * bits / 8)
    length = raw.length if isinstance(raw, RawDataElement) else len(raw.value)
    if length not in (expected, expected + 1):
        raise Refusal(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "pixel_length_mismatch",
            f"pixel data has {length} bytes, the header promises {expected}",
        )


def _fields(ds: Dataset) -> dict[str, Any]:
    """Header values for selection and geometry checks: technical fields only, no patient data."""

    def number(keyword: str) -> float | None:
        value = ds.get(keyword)
        try:
            return float(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None

    def values(keyword: str) -> list[Any]:
        value = ds.get(keyword)
        if value is None or value == "":
            return []
        return list(value) if isinstance(value, MultiValue | list | tuple) else [value]

    def numbers(keyword: str) -> list[float] | None:
        try:
            return [float(v) for v in values(keyword)] or None
        except (TypeError, ValueError):
            return None

    def string(keyword: str) -> str | None:
        value = ds.get(keyword)
        return None if value is None else str(value).strip()

    frames = number("NumberOfFrames")
    return {
        "modality": string("Modality"),
        "image_type": [str(v).strip().upper() for v in values("ImageType")],
        "body_part_examined": string("BodyPartExamined"),
        "series_description": string("SeriesDescription"),
        "study_description": string("StudyDescription"),
        "protocol_name": string("ProtocolName"),
        "series_number": number("SeriesNumber"),
        "instance_number": number("InstanceNumber"),
        "slice_thickness": number("SliceThickness"),
        "rows": int(ds.Rows) if ds.get("Rows") is not None else None,
        "columns": int(ds.Columns) if ds.get("Columns") is not None else None,
        "samples_per_pixel": int(ds.SamplesPerPixel) if ds.get("SamplesPerPixel") is not None else None,
        "photometric_interpretation": string("PhotometricInterpretation"),
        "bits_allocated": int(ds.BitsAllocated) if ds.get("BitsAllocated") is not None else None,
        "number_of_frames": int(frames) if frames else 1,
        "frame_of_reference_uid": string("FrameOfReferenceUID"),
        "image_position_patient": numbers("ImagePositionPatient"),
        "image_orientation_patient": numbers("ImageOrientationPatient"),
        "pixel_spacing": numbers("PixelSpacing"),
    }


# -- the fast path ------------------------------------------------------------------------------
#
# ``dcmread`` plus pydicom's per-element conversion costs about 2 ms per CT slice, a fifth of the
# time the SCP spends on one C-STORE. The fast path walks the same raw elements with pydicom's own
# parser (``data_element_generator``, so lengths, VRs and deferral are read identically) and
# decodes only the ~25 values it needs. It accepts only what it fully understands: anything
# unusual (a multi-valued UID, an unexpected VR, an odd transfer syntax, a refusal of any kind)
# returns None and the file is read again by ``_inspect_with_pydicom``, which stays the reference
# for every refusal. So it may only ever be stricter, and when it accepts, its header must equal
# the reference's (a test should compare the two on valid and on randomly mutated files).

#: Transfer syntaxes whose data set follows the file meta unchanged (deflate needs inflating).
_FAST_SYNTAXES = frozenset(ACCEPTED_TRANSFER_SYNTAXES) - {DeflatedExplicitVRLittleEndian}
_CHARSET_TAG = 0x00080005
_PIXEL_DATA_TAG = 0x7FE00010
_DS_PATTERN = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_IS_PATTERN = re.compile(r"[+-]?\d+")
_UID_BYTES = re.compile(rb"[0-9]+(\.[0-9]+)*")
_US = {True: struct.Struct("<H").unpack, False: struct.Struct(">H").unpack}

# (tag, VR) of every value the header needs; an explicit VR that differs means "not fast".
_SOP_CLASS = (0x00080016, "UI")
_SOP_INSTANCE = (0x00080018, "UI")
_STUDY = (0x0020000D, "UI")
_SERIES = (0x0020000E, "UI")
_FRAME_OF_REFERENCE = (0x00200052, "UI")
_IMAGE_TYPE = (0x00080008, "CS")
_MODALITY = (0x00080060, "CS")
_BODY_PART = (0x00180015, "CS")
_PHOTOMETRIC = (0x00280004, "CS")
_STUDY_DESCRIPTION = (0x00081030, "LO")
_SERIES_DESCRIPTION = (0x0008103E, "LO")
_PROTOCOL = (0x00181030, "LO")
_SLICE_THICKNESS = (0x00180050, "DS")
_SERIES_NUMBER = (0x00200011, "IS")
_INSTANCE_NUMBER = (0x00200013, "IS")
_NUMBER_OF_FRAMES = (0x00280008, "IS")
_POSITION = (0x00200032, "DS")
_ORIENTATION = (0x00200037, "DS")
_PIXEL_SPACING = (0x00280030, "DS")
_SAMPLES = (0x00280002, "US")
_ROWS = (0x00280010, "US")
_COLUMNS = (0x00280011, "US")
_BITS_ALLOCATED = (0x00280100, "US")


class _FallbackError(Exception):
    """The fast path does not decide this file; the reference reading will."""


def _inspect_fast(path: Path) -> ReceivedHeader | None:
    """The header of a plain, valid file, or None to let ``_inspect_with_pydicom`` decide."""
    if (
        pydicom_config.settings.reading_validation_mode == pydicom_config.RAISE
        or pydicom_config.use_none_as_empty_text_VR_value
    ):
        return None  # the reference would convert differently; keep one source of truth
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with path.open("rb") as fp:
                size = os.fstat(fp.fileno()).st_size
                elements, transfer_syntax, little = _read_raw(fp)
            return _fast_header(elements, transfer_syntax, little, size)
    except Exception:  # _FallbackError, or anything pydicom's parser raised: the reference decides
        return None


def _read_raw(fp: Any) -> tuple[dict[int, Any], str, bool]:
    """Preamble, file meta and the top-level raw elements, as ``dcmread`` would find them."""
    if fp.read(132)[128:] != b"DICM":
        raise _FallbackError
    meta = {}
    for elem in data_element_generator(fp, False, True, stop_when=_after_meta):
        if elem.VR not in converters or elem.value is None:  # pydicom would stumble converting it
            raise _FallbackError
        meta[elem.tag] = elem
    group_length, syntax_elem = meta.get(0x00020000), meta.get(0x00020010)
    if (
        next(iter(meta), None) != 0x00020000  # pydicom converts the first element as a probe
        or group_length.VR != "UL"
        or group_length.length != 4
        or syntax_elem is None
        or syntax_elem.VR != "UI"
    ):
        raise _FallbackError
    transfer_syntax = syntax_elem.value.decode("latin-1").rstrip("\0 ")
    if transfer_syntax not in _FAST_SYNTAXES:
        raise _FallbackError
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    start = fp.tell()
    first = fp.read(6)
    # pydicom switches VR mode when the first element disagrees with the transfer syntax, and
    # reads a command set (group 0000) separately: leave both to the reference reading.
    if len(first) < 6 or first[:2] == b"\0\0":
        raise _FallbackError
    if implicit == (0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B):
        raise _FallbackError
    fp.seek(start)
    elements = {
        elem.tag: elem
        for elem in data_element_generator(fp, implicit, little, defer_size=DEFER_BYTES)
    }
    return elements, transfer_syntax, little


def _after_meta(tag: int, _vr: str | None, _length: int) -> bool:
    return tag >> 16 != 2  # as pydicom's _read_file_meta_info


def _fast_header(
    elements: dict[int, Any], transfer_syntax: str, little: bool, size: int
) -> ReceivedHeader:
    for raw in elements.values():  # as _check_lengths, but refusing nothing itself
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
            continue
        if (raw.value_tell + raw.length > size) if raw.value is None else len(raw.value) != raw.length:
            raise _FallbackError
    values = _FastValues(elements, little)
    sop_class = values.uid(_SOP_CLASS)
    fields = values.fields()
    if sop_class in CT_SOP_CLASSES:
        _fast_pixel_check(elements, transfer_syntax, fields)
    return ReceivedHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=values.uid(_SOP_INSTANCE),
        series_instance_uid=values.uid(_SERIES),
        study_instance_uid=values.uid(_STUDY),
        transfer_syntax_uid=transfer_syntax,
        fields=fields,
    )


def _fast_pixel_check(elements: dict[int, Any], transfer_syntax: str, fields: dict[str, Any]) -> None:
    raw = elements.get(_PIXEL_DATA_TAG)
    if not isinstance(raw, RawDataElement):
        raise _FallbackError
    if UID(transfer_syntax).is_encapsulated:
        return
    rows, columns, bits = fields["rows"], fields["columns"], fields["bits_allocated"]
    if not rows or not columns or not bits:
        raise _FallbackError
    expected = rows * columns * (fields["samples_per_pixel"] or 1) * fields["number_of_frames"]
    expected = math.ceil(expected * bits / 8)
    if raw.length not in (expected, expected + 1):
        raise _FallbackError


class _FastValues:
    """Decodes single values from raw elements the way pydicom's converters do, or raises."""

    def __init__(self, elements: dict[int, Any], little: bool) -> None:
        self.elements = elements
        self.little = little
        charset = self._bytes((_CHARSET_TAG, "CS"))
        if charset is None or not charset:
            self.encodings: list[str] = [default_encoding]
        else:
            names = convert_string(charset, little)
            if not names:
                raise _FallbackError
            self.encodings = convert_encodings(names)

    def _bytes(self, key: tuple[int, str]) -> bytes | None:
        raw = self.elements.get(key[0])
        if raw is None:
            return None
        if not isinstance(raw, RawDataElement) or raw.VR not in (None, key[1]):
            raise _FallbackError
        if raw.value is None:  # deferred, or empty with no VR to name its empty value (implicit)
            if raw.length:
                raise _FallbackError
            return b""
        return bytes(raw.value)

    def uid(self, key: tuple[int, str]) -> str:
        """A required UID: digits and dots, at most 64 characters, else the reference decides."""
        value = self._bytes(key)
        if value is None:
            raise _FallbackError
        value = value.rstrip(b"\0 ").lstrip(b" ")
        if len(value) > 64 or not _UID_BYTES.fullmatch(value):
            raise _FallbackError
        return value.decode("ascii")

    def text(self, key: tuple[int, str]) -> str | None:
        """One string value, stripped (``_fields`` ``string()``)."""
        items = self.texts(key)
        if items is None:
            return None
        if len(items) != 1:
            raise _FallbackError  # the reference would give str() of a MultiValue
        return items[0].strip()

    def texts(self, key: tuple[int, str]) -> list[str] | None:
        """The values of a string element, unstripped (pydicom's MultiValue items)."""
        value = self._bytes(key)
        if value is None:
            return None
        if key[1] == "LO":
            decoded = decode_bytes(value, self.encodings, TEXT_VR_DELIMS)
            if "\\" in decoded:
                raise _FallbackError
            return [decoded.rstrip("\0 ")]
        return value.decode(default_encoding).rstrip(" \0").split("\\")

    def number(self, key: tuple[int, str]) -> float | None:
        """One IS or DS value as a float; None when absent or empty (``_fields`` ``number()``)."""
        items = self.texts(key)
        if items is None or items == [""]:
            return None
        if len(items) != 1:
            raise _FallbackError
        return self._float(items[0], key[1])

    def numbers(self, key: tuple[int, str]) -> list[float] | None:
        """Every DS value as a float; None when absent or empty (``_fields`` ``numbers()``)."""
        items = self.texts(key)
        if items is None or items == [""]:
            return None
        return [self._float(item, key[1]) for item in items]

    @staticmethod
    def _float(text: str, vr: str) -> float:
        text = text.strip()
        if not (_IS_PATTERN if vr == "IS" else _DS_PATTERN).fullmatch(text):
            raise _FallbackError
        return float(int(text)) if vr == "IS" else float(text)

    def us(self, key: tuple[int, str]) -> int | None:
        """One US value; None when absent or empty."""
        value = self._bytes(key)
        if value is None or not value:
            return None
        if len(value) != 2:
            raise _FallbackError
        return int(_US[self.little](value)[0])

    def fields(self) -> dict[str, Any]:
        """The same dict as ``_fields``, key for key."""
        frames = self.number(_NUMBER_OF_FRAMES)
        image_type = self.texts(_IMAGE_TYPE)
        return {
            "modality": self.text(_MODALITY),
            "image_type": [] if image_type in (None, [""]) else [v.strip().upper() for v in image_type],
            "body_part_examined": self.text(_BODY_PART),
            "series_description": self.text(_SERIES_DESCRIPTION),
            "study_description": self.text(_STUDY_DESCRIPTION),
            "protocol_name": self.text(_PROTOCOL),
            "series_number": self.number(_SERIES_NUMBER),
            "instance_number": self.number(_INSTANCE_NUMBER),
            "slice_thickness": self.number(_SLICE_THICKNESS),
            "rows": self.us(_ROWS),
            "columns": self.us(_COLUMNS),
            "samples_per_pixel": self.us(_SAMPLES),
            "photometric_interpretation": self.text(_PHOTOMETRIC),
            "bits_allocated": self.us(_BITS_ALLOCATED),
            "number_of_frames": int(frames) if frames else 1,
            "frame_of_reference_uid": self.text(_FRAME_OF_REFERENCE),
            "image_position_patient": self.numbers(_POSITION),
            "image_orientation_patient": self.numbers(_ORIENTATION),
            "pixel_spacing": self.numbers(_PIXEL_SPACING),
        }
