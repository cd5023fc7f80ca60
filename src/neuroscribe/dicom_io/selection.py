"""Which completed series is the study's head CT: rules in the spirit of MONAI's series selector.

A series is first checked on its own (modality, SOP class, ImageType, slice thickness, slice count,
head by body part or description, pixel format, geometry from the recorded headers); of the series
of one study that pass, the one with the most slices is chosen when ``prefer_largest`` is set.
Every series that is not chosen gets a reason code and a detail free of patient data.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from neuroscribe.config import SelectionSettings
from neuroscribe.dicom_io.constants import CT_SOP_CLASSES, ENHANCED_CT_SOP_CLASSES
from neuroscribe.dicom_io.volume import VolumeCheckError, check_recorded_geometry


@dataclass(frozen=True)
class Rejection:
    """Why a series is not reported on: a stable ``reason`` code and a readable ``detail``."""

    reason: str
    detail: str


@dataclass(frozen=True)
class SeriesSummary:
    """What selection needs to know about a series, from the headers recorded at receive time."""

    series_instance_uid: str
    study_instance_uid: str
    headers: tuple[dict[str, Any], ...]

    @property
    def slice_count(self) -> int:
        """Number of instances received."""
        return len(self.headers)

    def values(self, key: str) -> Counter[Any]:
        """How often each value of a header field occurs (lists become tuples)."""
        return Counter(
            tuple(v) if isinstance(v, list) else v for v in (h.get(key) for h in self.headers)
        )

    def most_common(self, key: str) -> Any:
        """The most frequent value of a header field."""
        counts = self.values(key)
        return counts.most_common(1)[0][0] if counts else None


def check_series(summary: SeriesSummary, rules: SelectionSettings) -> Rejection | None:
    """Apply the per-series rules in order; the first that fails is the answer.

    The last rule is the volume builder's own series checks (orientation, matrix, frame of
    reference, duplicate positions, gaps, tilt), run on the recorded headers, so a selected series
    is one the volume builder will accept as far as headers can tell.
    """
    modalities = {str(m).upper() for m in summary.values("modality") if m}
    wanted = {m.upper() for m in rules.modalities}
    if not modalities & wanted or modalities - wanted:
        return Rejection("modality", f"modality {sorted(modalities) or ['(none)']} is not {sorted(wanted)}")
    sop_classes = set(summary.values("sop_class_uid"))
    if sop_classes & ENHANCED_CT_SOP_CLASSES:
        return Rejection("enhanced_ct_unsupported",
                         "Enhanced CT (multi-frame) is stored but not yet reported on")
    if not sop_classes <= CT_SOP_CLASSES:
        return Rejection("sop_class", "series holds objects that are not CT images")
    for image_type in summary.values("image_type"):
        values = {str(v).upper() for v in image_type or ()}
        missing = [v for v in rules.image_type_required if v.upper() not in values]
        excluded = [v for v in rules.image_type_excluded if v.upper() in values]
        if excluded:
            return Rejection("image_type", f"ImageType has {excluded} (localizer or derived image)")
        if missing:
            return Rejection("image_type", f"ImageType lacks {missing}")
    if summary.slice_count < rules.min_slices:
        reason = "single_slice" if summary.slice_count == 1 else "too_few_slices"
        return Rejection(reason, f"{summary.slice_count} slices, at least {rules.min_slices} needed")
    thickness = summary.most_common("slice_thickness")
    if thickness is None:
        return Rejection("slice_thickness", "SliceThickness missing")
    if not rules.slice_thickness_min_mm <= thickness <= rules.slice_thickness_max_mm:
        return Rejection(
            "slice_thickness",
            f"slice thickness {thickness:g} mm outside "
            f"{rules.slice_thickness_min_mm:g}-{rules.slice_thickness_max_mm:g} mm",
        )
    if not _is_head(summary, rules.head_pattern):
        return Rejection("not_head", "neither BodyPartExamined nor the descriptions name the head")
    if set(summary.values("samples_per_pixel")) != {1} or not set(
        summary.values("photometric_interpretation")
    ) <= {"MONOCHROME1", "MONOCHROME2"}:
        return Rejection("not_grayscale", "CT with colour (RGB) or unknown photometric pixels")
    try:
        check_recorded_geometry(summary.headers)
    except VolumeCheckError as exc:
        return Rejection(str(exc.reason), str(exc))
    return None


def choose(candidates: Sequence[SeriesSummary], rules: SelectionSettings) -> SeriesSummary | None:
    """The series to report on among those of one study that passed :func:`check_series`."""
    if not candidates:
        return None
    if not rules.prefer_largest:
        return candidates[0]
    # Most slices wins; ties go to the thinner slices, then to the lower series number (a series
    # without one comes last).
    def rank(s: SeriesSummary) -> tuple[int, float, float]:
        number = s.most_common("series_number")
        return (s.slice_count, -(s.most_common("slice_thickness") or 0.0),
                -(math.inf if number is None else number))

    return max(candidates, key=rank)


def _is_head(summary: SeriesSummary, pattern: str) -> bool:
    regex = re.compile(pattern, re.IGNORECASE)
    for key in ("body_part_examined", "series_description", "study_description", "protocol_name"):
        value = summary.most_common(key)
        if value and regex.search(str(value)):
            return True
    return False
