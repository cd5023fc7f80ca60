"""De-identification (PS3.15 Basic Profile + Retain Patient Characteristics) of real CT files."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from neuroscribe.dicom_io.deidentify import (
    BASIC_PROFILE,
    Action,
    DeidentificationRefused,
    Deidentifier,
    deidentify_file,
    load_secret,
    patient_pseudonym,
)
from neuroscribe.dicom_io.model_input import DEFAULT_GRID, series_to_input
from neuroscribe.dicom_io.writer import CtSeriesSpec, ct_slice_dataset, write_ct_series
from neuroscribe.errors import ConfigError
from tests.site_helpers import ACCESSION, PATIENT_ID, small_spec

SECRET = b"0123456789abcdef0123456789abcdef"


def _identifying(spec: CtSeriesSpec) -> list[bytes]:
    """Values of the source that must appear in no de-identified byte."""
    values = [spec.patient_id, ACCESSION, spec.patient_birth_date, spec.study_date, spec.institution_name,
              spec.station_name, spec.study_instance_uid, spec.series_instance_uid,
              spec.frame_of_reference_uid, spec.study_description, spec.series_description, "DOE", "JANE"]
    values += [spec.sop_instance_uid(k) for k in range(spec.slices)]
    return [v.encode() for v in values]


def _export(tmp_path: Path, spec: CtSeriesSpec, secret: bytes = SECRET) -> list[Path]:
    source = write_ct_series(spec, tmp_path / "source")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    deid = Deidentifier(secret)
    return [deidentify_file(path, out, deid).path for path in source]


class TestDeidentifier:
    def test_no_identifying_value_is_left_in_any_byte(self, tmp_path: Path) -> None:
        """Names, IDs, dates, institution and every original UID are gone from the written files."""
        spec = small_spec()
        for path in _export(tmp_path, spec):
            data = path.read_bytes()
            for value in _identifying(spec):
                assert value not in data, value

    def test_profile_is_recorded(self, tmp_path: Path) -> None:
        """PatientIdentityRemoved, the method text and codes 113100 and 113108 are written."""
        ds = pydicom.dcmread(_export(tmp_path, small_spec())[0])
        assert ds.PatientIdentityRemoved == "YES"
        assert [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence] == [
            ("113100", "DCM"), ("113108", "DCM")]
        assert "Basic Application Confidentiality Profile" in ds.DeidentificationMethod
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"

    def test_patient_becomes_a_pseudonym_with_characteristics_kept(self, tmp_path: Path) -> None:
        """PatientName and PatientID hold the pseudonym; sex is kept and age derived from the dates."""
        ds = pydicom.dcmread(_export(tmp_path, small_spec())[0])
        assert ds.PatientID == patient_pseudonym(SECRET, PATIENT_ID)
        assert str(ds.PatientName) == ds.PatientID
        assert ds.PatientSex == "O"
        assert ds.PatientAge == "066Y"
        assert ds.PatientBirthDate == "" and ds.StudyDate == "" and ds.AccessionNumber == ""
        assert "InstitutionName" not in ds and "StationName" not in ds and "SeriesDescription" not in ds

    def test_uids_are_replaced_consistently(self, tmp_path: Path) -> None:
        """One new study, series and frame of reference for the series; new distinct SOP UIDs; standard
        UIDs kept; the same secret gives the same UIDs, another secret others."""
        spec = small_spec()
        first = [pydicom.dcmread(p) for p in _export(tmp_path / "a", spec)]
        assert len({d.SeriesInstanceUID for d in first}) == 1
        assert len({d.StudyInstanceUID for d in first}) == 1
        assert len({d.FrameOfReferenceUID for d in first}) == 1
        assert len({d.SOPInstanceUID for d in first}) == spec.slices
        assert all(d.SOPInstanceUID.startswith("2.25.") and len(d.SOPInstanceUID) <= 64 for d in first)
        assert first[0].SOPClassUID == spec.sop_class_uid
        assert first[0].file_meta.MediaStorageSOPInstanceUID == first[0].SOPInstanceUID
        again = [pydicom.dcmread(p) for p in _export(tmp_path / "b", spec)]
        assert {d.SOPInstanceUID for d in again} == {d.SOPInstanceUID for d in first}
        other = [pydicom.dcmread(p) for p in _export(tmp_path / "c", spec, b"another secret, 16+ bytes")]
        assert other[0].SeriesInstanceUID != first[0].SeriesInstanceUID

    def test_pixels_are_untouched_and_the_series_still_builds(self, tmp_path: Path) -> None:
        """Pixel data is byte-identical, and the model input builds from the de-identified folder."""
        spec = small_spec(slices=6)
        source = write_ct_series(spec, tmp_path / "source")
        out = tmp_path / "out"
        out.mkdir()
        deid = Deidentifier(SECRET)
        for path in source:
            written = deidentify_file(path, out, deid)
            assert pydicom.dcmread(written.path).PixelData == pydicom.dcmread(path).PixelData
        assert series_to_input(out, DEFAULT_GRID).shape == DEFAULT_GRID.shape
        before, after = series_to_input(tmp_path / "source", DEFAULT_GRID), series_to_input(out, DEFAULT_GRID)
        assert np.array_equal(before, after)

    def test_private_overlay_curve_and_nested_attributes_are_cleaned(self) -> None:
        """Private elements, overlays and curves go; inside sequences names go and UIDs are remapped."""
        spec = small_spec()
        ds = ct_slice_dataset(spec, 0, np.zeros((32, 32)))
        ds.add_new(0x00091010, "LO", "VENDOR PRIVATE DOE")
        ds.add_new(0x60003000, "OW", b"\x00" * 128)
        ds.add_new(0x60004000, "LT", "overlay comment DOE")
        ds.add_new(0x50000005, "US", 1)
        ref = Dataset()
        ref.ReferencedSOPClassUID = spec.sop_class_uid
        ref.ReferencedSOPInstanceUID = spec.sop_instance_uid(1)
        ref.add_new(0x0040A123, "PN", "DOE^JANE")
        ds.ReferencedImageSequence = Sequence([ref])
        other = Dataset()
        other.PatientID = "OTHER-ID"
        ds.OtherPatientIDsSequence = Sequence([other])
        deid = Deidentifier(SECRET)
        deid.dataset(ds)
        assert not [e for e in ds if e.tag.is_private]
        assert not [e for e in ds if e.tag.group in (0x6000, 0x5000)]
        assert "OtherPatientIDsSequence" not in ds
        (item,) = ds.ReferencedImageSequence
        assert item.ReferencedSOPInstanceUID == deid.new_uid(spec.sop_instance_uid(1))
        assert item.ReferencedSOPClassUID == spec.sop_class_uid
        assert "PersonName" not in item
        assert ds.preamble == b"\0" * 128

    def test_burned_in_annotation_is_refused(self) -> None:
        """An instance that declares burned-in annotation is not exported."""
        ds = ct_slice_dataset(small_spec(), 0, None)
        ds.BurnedInAnnotation = "YES"
        with pytest.raises(DeidentificationRefused, match="BurnedInAnnotation"):
            Deidentifier(SECRET).dataset(ds)

    def test_non_ct_sop_class_is_refused(self) -> None:
        """Only CT SOP classes are exported (a secondary capture may show text)."""
        ds = ct_slice_dataset(small_spec(sop_class_uid="1.2.840.10008.5.1.4.1.1.7"), 0, None)
        with pytest.raises(DeidentificationRefused, match="not exported"):
            Deidentifier(SECRET).dataset(ds)

    def test_short_secret_is_refused(self) -> None:
        """A secret under 16 bytes is a programming error."""
        with pytest.raises(ValueError, match="16 bytes"):
            Deidentifier(b"short")


class TestActionTable:
    def test_table_names_real_keywords_and_actions(self) -> None:
        """Every keyword of the table is a DICOM keyword; patient identity is D, UIDs U."""
        Deidentifier(SECRET)  # builds the tag table, raising on an unknown keyword
        assert BASIC_PROFILE["PatientName"] is Action.D
        assert BASIC_PROFILE["SeriesInstanceUID"] is Action.U
        assert BASIC_PROFILE["AccessionNumber"] is Action.Z
        assert set(BASIC_PROFILE.values()) <= set(Action)


class TestSecret:
    def test_secret_file_is_created_private_and_reused(self, tmp_path: Path) -> None:
        """A missing secret is created with mode 0600 and read back the same next time."""
        path = tmp_path / "secrets" / "deid.key"
        first = load_secret(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert load_secret(path) == first and len(first) >= 16

    def test_short_secret_file_names_the_key(self, tmp_path: Path) -> None:
        """A secret file with too few bytes is a ConfigError naming the key and path."""
        path = tmp_path / "deid.key"
        path.write_text("abc")
        with pytest.raises(ConfigError, match=r"learning\.secret_file.*deid\.key.*at least 16"):
            load_secret(path)

    def test_pseudonym_is_stable_and_keyed(self) -> None:
        """The same ID gives the same pseudonym; another secret another one; the ID is not in it."""
        assert patient_pseudonym(SECRET, " P-0042 ") == patient_pseudonym(SECRET, "P-0042")
        assert patient_pseudonym(SECRET, "P-0042") != patient_pseudonym(b"x" * 32, "P-0042")
        assert "0042" not in patient_pseudonym(SECRET, "P-0042")
