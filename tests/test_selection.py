"""Tests for neuroscribe.dicom_io.selection: the per-series rules and the choice within a study."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, SecondaryCaptureImageStorage

from neuroscribe.config import SelectionSettings
from neuroscribe.dicom_io.selection import Rejection, SeriesSummary, check_series, choose

RULES = SelectionSettings()
STUDY = "1.2.826.0.1.3680043.8.498.7"


def _headers(n: int = 20, **fields: Any) -> list[dict[str, Any]]:
    """n header dicts of a clean axial head CT (5 mm steps), shaped like inspect_received's fields."""
    base: dict[str, Any] = {
        "modality": "CT",
        "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "body_part_examined": "HEAD",
        "series_description": "HEAD 5mm AXIAL",
        "study_description": "CT HEAD WITHOUT CONTRAST",
        "protocol_name": "HEAD ROUTINE",
        "series_number": 2.0,
        "slice_thickness": 5.0,
        "rows": 32,
        "columns": 32,
        "samples_per_pixel": 1,
        "photometric_interpretation": "MONOCHROME2",
        "bits_allocated": 16,
        "number_of_frames": 1,
        "frame_of_reference_uid": "1.2.826.0.1.3680043.8.498.99",
        "image_orientation_patient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        "pixel_spacing": [0.5, 0.5],
        "sop_class_uid": str(CTImageStorage),
        **fields,
    }
    return [
        {**base, "instance_number": float(k + 1), "image_position_patient": [-8.0, -8.0, 5.0 * k],
         "sop_instance_uid": f"1.2.3.{k}", "path": f"/spool/{k}.dcm"}
        for k in range(n)
    ]


def _summary(headers: list[dict[str, Any]], uid: str = "1.2.3.100") -> SeriesSummary:
    return SeriesSummary(uid, STUDY, tuple(headers))


def _reason(headers: list[dict[str, Any]], rules: SelectionSettings = RULES) -> str | None:
    rejection = check_series(_summary(headers), rules)
    return None if rejection is None else rejection.reason


# -- a clean series --------------------------------------------------------------------------------


def test_clean_head_series_passes() -> None:
    """A 20-slice axial head CT with consistent geometry passes every rule."""
    assert check_series(_summary(_headers()), RULES) is None


def test_summary_helpers() -> None:
    """slice_count counts headers; values and most_common count field values, lists as tuples."""
    headers = _headers(3)
    headers[0]["slice_thickness"] = 2.0
    summary = _summary(headers)
    assert summary.slice_count == 3
    assert summary.most_common("slice_thickness") == 5.0
    assert summary.values("image_type") == {("ORIGINAL", "PRIMARY", "AXIAL"): 3}
    assert summary.most_common("no_such_field") is None
    assert _summary([]).most_common("modality") is None


# -- modality and SOP class ------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["MR", "SR", None])
def test_other_modality_is_rejected(modality: str | None) -> None:
    """A series that is not CT (or names no modality) is rejected as 'modality'."""
    rejection = check_series(_summary(_headers(modality=modality)), RULES)
    assert rejection is not None
    assert rejection.reason == "modality"
    assert "CT" in rejection.detail


def test_mixed_modalities_are_rejected() -> None:
    """One MR object among CT objects is enough to reject the series as 'modality'."""
    headers = _headers()
    headers[3]["modality"] = "MR"
    assert _reason(headers) == "modality"


def test_modality_is_case_insensitive() -> None:
    """A lower-case modality value is accepted."""
    assert _reason(_headers(modality="ct")) is None


def test_enhanced_ct_is_rejected() -> None:
    """Enhanced CT (multi-frame) is stored but rejected as 'enhanced_ct_unsupported'."""
    assert _reason(_headers(sop_class_uid=str(EnhancedCTImageStorage))) == "enhanced_ct_unsupported"


def test_non_ct_sop_class_is_rejected() -> None:
    """A CT-modality secondary capture is rejected as 'sop_class'."""
    assert _reason(_headers(sop_class_uid=str(SecondaryCaptureImageStorage))) == "sop_class"


# -- image type ------------------------------------------------------------------------------------


def test_image_type_without_axial_is_rejected() -> None:
    """ImageType lacking AXIAL is rejected as 'image_type' and says what is missing."""
    rejection = check_series(_summary(_headers(image_type=["ORIGINAL", "PRIMARY"])), RULES)
    assert rejection == Rejection("image_type", "ImageType lacks ['AXIAL']")


@pytest.mark.parametrize("extra", ["LOCALIZER", "DERIVED", "SECONDARY"])
def test_excluded_image_type_is_rejected(extra: str) -> None:
    """A localizer or derived image is rejected as 'image_type' even if AXIAL is present."""
    rejection = check_series(
        _summary(_headers(image_type=["ORIGINAL", "PRIMARY", "AXIAL", extra])), RULES
    )
    assert rejection is not None
    assert rejection.reason == "image_type"
    assert extra in rejection.detail


def test_image_type_check_is_case_insensitive() -> None:
    """Lower-case ImageType values satisfy the required values."""
    assert _reason(_headers(image_type=["original", "primary", "axial"])) is None


def test_missing_image_type_is_rejected() -> None:
    """An empty ImageType lacks every required value."""
    assert _reason(_headers(image_type=[])) == "image_type"


# -- slices and thickness --------------------------------------------------------------------------


def test_too_few_slices_are_rejected() -> None:
    """One slice fewer than min_slices is 'too_few_slices'; exactly min_slices passes."""
    assert _reason(_headers(RULES.min_slices - 1)) == "too_few_slices"
    assert _reason(_headers(RULES.min_slices)) is None


def test_single_slice_is_rejected() -> None:
    """A single image is 'single_slice'."""
    rejection = check_series(_summary(_headers(1)), RULES)
    assert rejection is not None
    assert rejection.reason == "single_slice"
    assert "1 slices" in rejection.detail


@pytest.mark.parametrize("thickness", [0.3, 6.5, 10.0])
def test_slice_thickness_outside_range_is_rejected(thickness: float) -> None:
    """Slices thinner or thicker than the configured range are 'slice_thickness'."""
    rejection = check_series(_summary(_headers(slice_thickness=thickness)), RULES)
    assert rejection is not None
    assert rejection.reason == "slice_thickness"
    assert "0.5-6 mm" in rejection.detail


@pytest.mark.parametrize("thickness", [0.5, 6.0])
def test_slice_thickness_range_is_inclusive(thickness: float) -> None:
    """The range limits themselves are accepted."""
    assert _reason(_headers(slice_thickness=thickness)) is None


def test_missing_slice_thickness_is_rejected() -> None:
    """A series without SliceThickness is 'slice_thickness' with 'missing' in the detail."""
    rejection = check_series(_summary(_headers(slice_thickness=None)), RULES)
    assert rejection == Rejection("slice_thickness", "SliceThickness missing")


# -- head ------------------------------------------------------------------------------------------


def test_non_head_series_is_rejected() -> None:
    """A chest series with no head words anywhere is 'not_head'."""
    headers = _headers(body_part_examined="CHEST", series_description="THORAX 5mm",
                       study_description="CT THORAX", protocol_name="CHEST ROUTINE")
    assert _reason(headers) == "not_head"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("body_part_examined", "BRAIN"),
        ("series_description", "Schädel nativ"),
        ("series_description", "SCHÄDEL NATIV"),
        ("study_description", "CCT Kopf"),
        ("protocol_name", "Cranial routine"),
        ("series_description", "Tête sans injection"),
    ],
)
def test_head_found_in_any_field(key: str, value: str) -> None:
    """The head pattern is searched in body part, descriptions and protocol, case-insensitively."""
    fields = {"body_part_examined": "", "series_description": "AXIAL 5mm",
              "study_description": "CT", "protocol_name": "ROUTINE", key: value}
    assert _reason(_headers(**fields)) is None


def test_head_pattern_is_configurable() -> None:
    """A site pattern replaces the default one."""
    headers = _headers(body_part_examined="", series_description="NCCT", study_description="",
                       protocol_name="")
    assert _reason(headers) == "not_head"
    assert _reason(headers, SelectionSettings(head_pattern="ncct")) is None


# -- pixels ----------------------------------------------------------------------------------------


def test_rgb_series_is_rejected() -> None:
    """Colour (3 samples, RGB) pixels are 'not_grayscale'."""
    assert _reason(_headers(samples_per_pixel=3, photometric_interpretation="RGB")) == "not_grayscale"


def test_unknown_photometric_is_rejected() -> None:
    """A photometric interpretation other than MONOCHROME1/2 is 'not_grayscale'."""
    assert _reason(_headers(photometric_interpretation="PALETTE COLOR")) == "not_grayscale"


def test_monochrome1_is_accepted() -> None:
    """MONOCHROME1 is grayscale."""
    assert _reason(_headers(photometric_interpretation="MONOCHROME1")) is None


# -- geometry (the volume builder's checks on recorded headers) ------------------------------------


def test_duplicate_positions_are_rejected() -> None:
    """Two slices at the same position are 'duplicate_positions'."""
    headers = _headers()
    headers[7]["image_position_patient"] = list(headers[6]["image_position_patient"])
    rejection = check_series(_summary(headers), RULES)
    assert rejection is not None
    assert rejection.reason == "duplicate_positions"
    assert "[duplicate_positions]" in rejection.detail


def test_gap_is_rejected() -> None:
    """A missing slice in the middle (a 10 mm step among 5 mm ones) is a 'gap'."""
    headers = _headers(21)
    del headers[10]
    assert _reason(headers) == "gap"


def test_shape_mismatch_is_rejected() -> None:
    """A slice with other Rows/Columns is 'shape_mismatch'."""
    headers = _headers()
    headers[4]["rows"] = 64
    assert _reason(headers) == "shape_mismatch"


def test_missing_position_is_rejected() -> None:
    """A slice without ImagePositionPatient is 'missing_geometry'."""
    headers = _headers()
    headers[5]["image_position_patient"] = None
    rejection = check_series(_summary(headers), RULES)
    assert rejection is not None
    assert rejection.reason == "missing_geometry"
    assert "image_position_patient" in rejection.detail


def test_two_frames_of_reference_are_rejected() -> None:
    """Slices in two frames of reference are 'mixed_frame_of_reference'."""
    headers = _headers()
    for h in headers[10:]:
        h["frame_of_reference_uid"] = "1.2.826.0.1.3680043.8.498.100"
    assert _reason(headers) == "mixed_frame_of_reference"


def test_unordered_headers_pass() -> None:
    """Headers in any order (as received) are sorted along the normal before the checks."""
    headers = _headers()
    assert _reason(headers[::-1]) is None
    assert _reason(headers[1::2] + headers[::2]) is None


def test_first_failing_rule_wins() -> None:
    """Rules run in order: a localizer MR series is reported as 'modality', the first rule."""
    assert _reason(_headers(3, modality="MR", image_type=["LOCALIZER"])) == "modality"


# -- choosing within a study -----------------------------------------------------------------------


def test_choose_prefers_most_slices() -> None:
    """Of several passing series the one with the most slices is chosen."""
    small = _summary(_headers(20), "1.1")
    large = _summary(_headers(40, slice_thickness=1.0), "1.2")
    medium = _summary(_headers(30), "1.3")
    assert choose([small, large, medium], RULES) is large


def test_choose_ties_go_to_thinner_slices() -> None:
    """Equal slice counts are decided by the thinner slices."""
    thick = _summary(_headers(20, slice_thickness=5.0), "1.1")
    thin = _summary(_headers(20, slice_thickness=2.0), "1.2")
    assert choose([thick, thin], RULES) is thin
    assert choose([thin, thick], RULES) is thin


def test_choose_then_lower_series_number() -> None:
    """Equal counts and thickness go to the lower series number."""
    later = _summary(_headers(20, series_number=5.0), "1.1")
    earlier = _summary(_headers(20, series_number=3.0), "1.2")
    assert choose([later, earlier], RULES) is earlier


def test_choose_without_prefer_largest_returns_first() -> None:
    """With prefer_largest off, the first candidate is chosen whatever its size."""
    small = _summary(_headers(20), "1.1")
    large = _summary(_headers(40), "1.2")
    assert choose([small, large], SelectionSettings(prefer_largest=False)) is small


def test_choose_from_nothing_is_none() -> None:
    """No candidates, no choice."""
    assert choose([], RULES) is None
