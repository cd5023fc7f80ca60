"""Read the header of a received file and decide whether it can be accepted.

Runs on the association thread, so it never decodes pixel data: large values stay deferred on
disk and only their declared lengths are checked against the file. Every refusal is a
:class:`Refusal` with a DIMSE status, a short reason code and a detail free of patient data.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from neuroscribe.dicom_io.constants import CT_SOP_CLASSES, StoreStatus
from neuroscribe.errors import DicomInputError

#: Values longer than this stay on disk while the header is read.
DEFER_BYTES = 16 * 1024
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNDEFINED_LENGTH = 0xFFFFFFFF


class Refusal(DicomInputError):
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

    Raises
    ------
    Refusal
        The object is unparseable, truncated, declares impossible lengths, lacks a UID the
        spool needs, or (for CT) lacks pixel data of the size its header promises.
    """
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
            StoreStatus.CANNOT_UNDERSTAND, "undecodable", f"data set cannot be parsed ({type(exc).__name__})"
        ) from None
    if affected_sop_instance_uid and sop_instance != affected_sop_instance_uid:
        raise Refusal(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "uid_mismatch",
            "SOP Instance UID in the data set differs from the C-STORE request's",
        )
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
        raise Refusal(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "no_pixel_data", "CT image without pixel data")
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return  # compressed: the volume builder decodes (off this thread) and rejects bad frames
    rows, columns = fields.get("rows"), fields.get("columns")
    bits = fields.get("bits_allocated")
    if not rows or not columns or not bits:
        raise Refusal(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "no_image_geometry", "Rows, Columns or BitsAllocated missing"
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
