"""Write CT series as DICOM files: the one place that builds CT headers from a spec.

Tests, benchmarks, the demo and the synthetic site data all make their series here, so every
producer writes the same realistic headers (patient, study, series and frame-of-reference UIDs,
geometry, rescale to HU). Pixel content comes from the caller: a HU volume or a per-slice function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

#: A function from slice index to a (rows, columns) array of Hounsfield units.
SliceFunction = Callable[[int], np.ndarray]


def _uid() -> str:
    return str(generate_uid())


@dataclass(frozen=True)
class CtSeriesSpec:
    """Everything that goes into the headers of one axial CT series.

    Geometry: slice ``k`` has ImagePositionPatient ``origin + k * slice_step_mm * (0, 0, 1)``
    (the table moves along patient z) and row/column directions tilted about the patient x axis by
    ``gantry_tilt_deg``, as a tilted-gantry head CT has. With zero tilt the slices are orthogonal.
    """

    rows: int = 512
    columns: int = 512
    slices: int = 32
    pixel_spacing_mm: tuple[float, float] = (0.45, 0.45)  # (row spacing, column spacing)
    slice_thickness_mm: float = 5.0
    slice_step_mm: float = 5.0
    gantry_tilt_deg: float = 0.0
    origin_mm: tuple[float, float, float] | None = None  # None centres the field of view
    rescale_slope: float = 1.0
    rescale_intercept: float = -1024.0
    pixel_representation: int = 0  # 0 unsigned, 1 signed (16-bit stored values either way)
    patient_name: str = "PHANTOM^HEAD"
    patient_id: str = "PH0001"
    patient_birth_date: str = "19600101"
    patient_sex: str = "O"
    issuer_of_patient_id: str = "NEUROSCRIBE-SYNTH"
    specific_character_set: str | None = None  # e.g. "ISO_IR 192" for UTF-8 names
    study_instance_uid: str = field(default_factory=_uid)
    series_instance_uid: str = field(default_factory=_uid)
    frame_of_reference_uid: str = field(default_factory=_uid)
    accession_number: str = "ACC0001"
    study_id: str = "1"
    study_date: str = "20260101"
    study_time: str = "080000"
    study_description: str = "CT HEAD WITHOUT CONTRAST"
    series_description: str = "HEAD 5mm AXIAL"
    series_number: int = 2
    body_part_examined: str = "HEAD"
    protocol_name: str = "HEAD ROUTINE"
    modality: str = "CT"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    manufacturer: str = "NeuroScribe synthetic phantom"
    manufacturer_model_name: str = "PHANTOM-CT"
    institution_name: str = "Synthetic General Hospital"
    station_name: str = "CT01"
    kvp: float = 120.0
    convolution_kernel: str = "H30s"
    sop_class_uid: str = CTImageStorage

    def sop_instance_uid(self, index: int) -> str:
        """SOP Instance UID of slice ``index``: derived from the series UID, so a series written
        twice from the same spec has the same UIDs (and synthetic data is reproducible)."""
        return str(generate_uid(entropy_srcs=[self.series_instance_uid, str(index)]))

    def with_(self, **changes: object) -> CtSeriesSpec:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def orientation(self) -> tuple[float, ...]:
        """ImageOrientationPatient: row direction, then column direction (tilted about x)."""
        t = math.radians(self.gantry_tilt_deg)
        return (1.0, 0.0, 0.0, 0.0, math.cos(t), -math.sin(t))

    def position(self, index: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``index`` (0 is the most inferior)."""
        origin = self.origin_mm
        if origin is None:
            origin = (
                -self.columns * self.pixel_spacing_mm[1] / 2,
                -self.rows * self.pixel_spacing_mm[0] / 2,
                0.0,
            )
        return (origin[0], origin[1], origin[2] + index * self.slice_step_mm)


def hu_to_stored(hu: np.ndarray, spec: CtSeriesSpec) -> np.ndarray:
    """Hounsfield units to stored 16-bit values, clipped to what the pixel representation holds."""
    dtype = np.int16 if spec.pixel_representation else np.uint16
    info = np.iinfo(dtype)
    stored = np.rint((np.asarray(hu, dtype=np.float64) - spec.rescale_intercept) / spec.rescale_slope)
    return np.clip(stored, info.min, info.max).astype(dtype)


def ct_slice_dataset(
    spec: CtSeriesSpec,
    index: int,
    hu: np.ndarray | None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """One CT image as a pydicom Dataset with file meta (Explicit VR Little Endian).

    ``hu`` is a (rows, columns) array in Hounsfield units; None writes a header with no pixel data.
    ``sop_instance_uid`` defaults to :meth:`CtSeriesSpec.sop_instance_uid`.
    """
    sop_uid = sop_instance_uid or spec.sop_instance_uid(index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(spec.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    if spec.specific_character_set:
        ds.SpecificCharacterSet = spec.specific_character_set
    ds.SOPClassUID = spec.sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = list(spec.image_type)
    ds.InstanceCreationDate = spec.study_date
    ds.InstanceCreationTime = spec.study_time
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = spec.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = spec.study_time
    ds.AccessionNumber = spec.accession_number
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.InstitutionName = spec.institution_name
    ds.ReferringPhysicianName = ""
    ds.StationName = spec.station_name
    ds.StudyDescription = spec.study_description
    ds.SeriesDescription = spec.series_description
    ds.ManufacturerModelName = spec.manufacturer_model_name
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.IssuerOfPatientID = spec.issuer_of_patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = spec.patient_sex
    ds.BodyPartExamined = spec.body_part_examined
    ds.SliceThickness = _ds(spec.slice_thickness_mm)
    ds.KVP = _ds(spec.kvp)
    ds.ProtocolName = spec.protocol_name
    ds.GantryDetectorTilt = _ds(spec.gantry_tilt_deg)
    ds.ConvolutionKernel = spec.convolution_kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = spec.study_instance_uid
    ds.SeriesInstanceUID = spec.series_instance_uid
    ds.StudyID = spec.study_id
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [_ds(v) for v in spec.position(index)]
    ds.ImageOrientationPatient = [_ds(v) for v in spec.orientation]
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(spec.position(index)[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = [_ds(v) for v in spec.pixel_spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = spec.pixel_representation
    ds.RescaleIntercept = _ds(spec.rescale_intercept)
    ds.RescaleSlope = _ds(spec.rescale_slope)
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    if hu is not None:
        if hu.shape != (spec.rows, spec.columns):
            raise ValueError(f"hu has shape {hu.shape}, spec wants {(spec.rows, spec.columns)}")
        ds.add_new("PixelData", "OW", hu_to_stored(hu, spec).tobytes())
    return ds


def write_ct_series(
    spec: CtSeriesSpec,
    out_dir: Path,
    pixels: np.ndarray | SliceFunction | None = None,
    order: Sequence[int] | None = None,
) -> list[Path]:
    """Write the series to ``out_dir`` as ``IMG00001.dcm``...; return the paths in slice order.

    Parameters
    ----------
    pixels
        A (slices, rows, columns) HU volume, a function from slice index to a HU slice, or None
        for a uniform water phantom (0 HU) with air corners.
    order
        File numbering order (e.g. shuffled), so file order need not follow anatomy.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slice_of = _slice_source(spec, pixels)
    numbering = list(order) if order is not None else list(range(spec.slices))
    paths = [out_dir / f"IMG{numbering[k] + 1:05d}.dcm" for k in range(spec.slices)]
    encoder = _SeriesEncoder(ct_slice_dataset(spec, 0, None))
    for k, path in enumerate(paths):
        path.write_bytes(encoder.encode(ct_slice_dataset_changes(spec, k, slice_of(k))))
    return paths


#: The elements that differ between the slices of a series written by :func:`write_ct_series`.
_PER_SLICE_KEYWORDS = ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation",
                       "PixelData")


def ct_slice_dataset_changes(spec: CtSeriesSpec, index: int, hu: np.ndarray) -> Dataset:
    """The per-slice elements of slice ``index`` (what :func:`ct_slice_dataset` varies by index)."""
    if hu.shape != (spec.rows, spec.columns):
        raise ValueError(f"hu has shape {hu.shape}, spec wants {(spec.rows, spec.columns)}")
    ds = Dataset()
    ds.SOPInstanceUID = spec.sop_instance_uid(index)
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [_ds(v) for v in spec.position(index)]
    ds.SliceLocation = _ds(spec.position(index)[2])
    ds.add_new("PixelData", "OW", hu_to_stored(hu, spec).tobytes())
    return ds


class _SeriesEncoder:
    """Encodes the slices of one series from a template: the elements every slice shares are
    encoded once, so a slice costs only its few per-slice elements (pydicom's ``save_as`` spends
    most of its time re-encoding the ~70 shared header elements)."""

    def __init__(self, template: Dataset) -> None:
        self.meta = template.file_meta
        varying = sorted(Tag(keyword) for keyword in _PER_SLICE_KEYWORDS)
        runs: list[Dataset] = [Dataset() for _ in range(len(varying) + 1)]
        for element in template:
            if element.tag in varying:
                continue
            runs[sum(element.tag > tag for tag in varying)].add(element)
        self.varying = varying
        self.encoding = template._character_set  # runs without SpecificCharacterSet inherit it
        self.runs = [_encode(run, self.encoding) for run in runs]

    def encode(self, changes: Dataset) -> bytes:
        """Preamble, file meta and data set of one slice with ``changes`` applied."""
        meta = FileMetaDataset(self.meta)
        meta.MediaStorageSOPInstanceUID = changes.SOPInstanceUID
        head = DicomBytesIO()
        head.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=True)
        parts = [head.getvalue(), self.runs[0]]
        for tag, run in zip(self.varying, self.runs[1:], strict=True):
            single = Dataset()
            single.add(changes[tag])
            parts += [_encode(single, self.encoding), run]
        return b"".join(parts)


def _encode(ds: Dataset, encoding: list[str]) -> bytes:
    """Explicit VR Little Endian encoding of a data set's elements, text in ``encoding``."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds, parent_encoding=encoding)
    return fp.getvalue()


def _slice_source(spec: CtSeriesSpec, pixels: np.ndarray | SliceFunction | None) -> SliceFunction:
    if pixels is None:
        disc = _water_disc(spec.rows, spec.columns)
        return lambda _k: disc
    if callable(pixels):
        return pixels
    volume = np.asarray(pixels)
    if volume.shape != (spec.slices, spec.rows, spec.columns):
        raise ValueError(f"pixels has shape {volume.shape}, spec wants "
                         f"{(spec.slices, spec.rows, spec.columns)}")
    return lambda k: volume[k]


def _water_disc(rows: int, columns: int) -> np.ndarray:
    y, x = np.ogrid[:rows, :columns]
    r2 = ((y - rows / 2) / (rows / 2)) ** 2 + ((x - columns / 2) / (columns / 2)) ** 2
    return np.where(r2 < 0.8, 0.0, -1000.0)


def _ds(value: float) -> str:
    """A decimal string (DS) of at most 16 characters."""
    text = f"{value:.6g}"
    return "0" if text == "-0" else text
