"""The SR of a draft report: valid for dciodvfy and DCMTK, reproducible, in the source's character set."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.reporting.draft import DISCLAIMER, DraftReport, ModelIdentity
from neuroscribe.reporting.sr import SERIES_DESCRIPTION, build_sr, write_sr
from tests.conftest import require_tool

MODEL = ModelIdentity(name="neuroscribe-demo-cvit", version="2026.11.29",
                      uid="1.2.826.0.1.3680043.8.498.4242")
CREATED = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
FINDINGS = "No intracranial haemorrhage.\n\n  Ventricles and sulci are normal for age.  \nNo midline shift."
IMPRESSION = "No acute intracranial abnormality."
SR_SOP_INSTANCE_UID = str(generate_uid(entropy_srcs=["test_sr", "instance"]))
SR_SERIES_INSTANCE_UID = str(generate_uid(entropy_srcs=["test_sr", "series"]))
NAME = "Müller^Jürgen"

HeaderFactory = Callable[..., list[Dataset]]


@pytest.fixture
def report() -> DraftReport:
    """A two-section draft with a blank line and padding in the findings."""
    return DraftReport(FINDINGS, IMPRESSION, MODEL, CREATED)


@pytest.fixture
def headers(tmp_path: Path) -> HeaderFactory:
    """Write a small CT series with the project's writer; return its headers as read (by default
    without pixel data, as the daemon keeps them)."""
    count = 0

    def make(*, with_pixels: bool = False, **changes: object) -> list[Dataset]:
        nonlocal count
        count += 1
        spec = CtSeriesSpec(rows=8, columns=8, slices=3).with_(**changes)
        paths = write_ct_series(spec, tmp_path / f"ct{count}")
        return [pydicom.dcmread(path, stop_before_pixels=not with_pixels) for path in paths]

    return make


def build(report: DraftReport, evidence: list[Dataset], **options: object) -> hd.sr.EnhancedSR:
    """``build_sr`` with the test's fixed UIDs."""
    arguments: dict[str, object] = {"sop_instance_uid": SR_SOP_INSTANCE_UID,
                                    "series_instance_uid": SR_SERIES_INSTANCE_UID, **options}
    return build_sr(report, evidence, **arguments)  # type: ignore[arg-type]


def text_items(sr: Dataset) -> dict[str, list[tuple[str, str]]]:
    """Section heading -> [(concept meaning, text)] of the SR's TEXT items."""
    sections: dict[str, list[tuple[str, str]]] = {}
    for item in sr.ContentSequence:
        if item.ValueType == "CONTAINER":
            sections[item.ConceptNameCodeSequence[0].CodeMeaning] = [
                (child.ConceptNameCodeSequence[0].CodeMeaning, child.TextValue)
                for child in item.ContentSequence
            ]
    return sections


class TestValidators:
    """dicom3tools and DCMTK read the SR as the standard describes it."""

    @pytest.mark.parametrize("kind", ["enhanced", "comprehensive"])
    def test_dciodvfy_finds_no_errors(self, tmp_path: Path, report: DraftReport,
                                      headers: HeaderFactory, kind: str) -> None:
        """dciodvfy reports no Error for either IOD.

        Its only warnings: "Attribute is not present in standard DICOM IOD - (0x0018,0x1002) Device
        UID" and the "Standard Extended SOP Class" note that follows from it. Device UID in the
        Contributing Equipment Sequence is Type 3 in current PS3.3 (and in highdicom's tables); this
        dicom3tools build (2022) predates it. Avoidable only by dropping the model's Device UID.
        """
        require_tool("dciodvfy")
        evidence = headers(specific_character_set="ISO_IR 100", patient_name=NAME)
        path = write_sr(build(report, evidence, kind=kind, institution_name="Reading Site"),
                        tmp_path / "sr.dcm")
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                                encoding="latin-1", check=False)
        lines = (result.stdout + result.stderr).splitlines()
        assert {"enhanced": "EnhancedSR", "comprehensive": "ComprehensiveSR"}[kind] in lines
        assert [line for line in lines if line.startswith("Error")] == []
        warned = [line for line in lines if line.startswith("Warning")]
        assert all("Device UID" in line or "Standard Extended SOP Class" in line for line in warned), warned

    def test_dciodvfy_with_two_series_a_request_and_utf8(self, tmp_path: Path,
                                                         headers: HeaderFactory) -> None:
        """The fuller case (two series, one with pixels, a derived request, a switch to UTF-8) too."""
        require_tool("dciodvfy")
        first = headers(specific_character_set="ISO_IR 100", patient_name=NAME)
        second = headers(specific_character_set="ISO_IR 100", patient_name=NAME, with_pixels=True,
                         study_instance_uid=first[0].StudyInstanceUID, series_number=3)
        attributes = Dataset()
        attributes.RequestedProcedureID = "RP1"
        attributes.RequestedProcedureDescription = "CT Schädel nativ"
        for ds in first + second:
            ds.RequestAttributesSequence = [attributes]
        report = DraftReport("Hyperdensity ≥ 60 HU, right frontal.", "", MODEL, CREATED)
        sr = build(report, first + second)
        assert sr.SpecificCharacterSet == "ISO_IR 192"
        result = subprocess.run(["dciodvfy", str(write_sr(sr, tmp_path / "sr.dcm"))], capture_output=True,
                                text=True, encoding="latin-1", check=False)
        lines = (result.stdout + result.stderr).splitlines()
        assert [line for line in lines if line.startswith("Error")] == []

    def test_dsrdump_renders_the_tree(self, tmp_path: Path, report: DraftReport,
                                      headers: HeaderFactory) -> None:
        """dsrdump shows title, template, headings, every line, the disclaimer, the device and flags."""
        require_tool("dsrdump")
        path = write_sr(build(report, headers()), tmp_path / "sr.dcm")
        result = subprocess.run(["dsrdump", "+U8", "+Pl", "+Pc", "+Pt", str(path)], capture_output=True,
                                text=True, encoding="utf-8", check=False)
        assert result.returncode == 0, result.stderr
        dump = result.stdout
        for expected in (
            '<CONTAINER:(18748-4,LN,"Diagnostic Imaging Report")=SEPARATE>  # TID 2000 (DCMR)',
            '<has concept mod CODE:(121058,DCM,"Procedure reported")=(77477000,SCT,',
            '<has concept mod CODE:(121049,DCM,"Language of Content Item and Descendants")=(en-US,',
            '<has obs context CODE:(121005,DCM,"Observer Type")=(121007,DCM,"Device")>',
            f'<has obs context UIDREF:(121012,DCM,"Device Observer UID")="{MODEL.uid}">',
            '<has obs context TEXT:(121015,DCM,"Device Observer Model Name")='
            '"neuroscribe-demo-cvit 2026.11.29">',
            '<has obs context TEXT:(111001,DCM,"Algorithm Name")="neuroscribe-demo-cvit">',
            '<has obs context TEXT:(111003,DCM,"Algorithm Version")="2026.11.29">',
            '<contains CONTAINER:(59776-5,LN,"Findings")=SEPARATE>',
            '<contains CONTAINER:(19005-8,LN,"Impressions")=SEPARATE>',
            f'<contains TEXT:(121106,DCM,"Comment")="{DISCLAIMER}">',
            '<contains TEXT:(121071,DCM,"Finding")="No intracranial haemorrhage.">',
            '<contains TEXT:(121071,DCM,"Finding")="Ventricles and sulci are normal for age.">',
            '<contains TEXT:(121071,DCM,"Finding")="No midline shift.">',
            '<contains TEXT:(121073,DCM,"Impression")="No acute intracranial abnormality.">',
            "Completion Flag     : COMPLETE",
            "Verification Flag   : UNVERIFIED",
            "Preliminary Flag    : PRELIMINARY",
            f"Series              : {SERIES_DESCRIPTION} (#9901)",
        ):
            assert expected in dump, f"{expected!r} not in\n{dump}"


class TestBuildSr:
    """What the built SR holds, read back from disk with highdicom and pydicom."""

    @pytest.mark.parametrize("kind", ["enhanced", "comprehensive"])
    def test_read_back_with_highdicom(self, tmp_path: Path, report: DraftReport,
                                      headers: HeaderFactory, kind: str) -> None:
        """UIDs, flags, evidence, template, equipment and times survive the file round trip."""
        evidence = headers()
        path = write_sr(build(report, evidence, kind=kind, series_number=42, instance_number=3),
                        tmp_path / "sr.dcm")
        sr = hd.sr.srread(path)
        expected_class = {"enhanced": hd.sr.EnhancedSR, "comprehensive": hd.sr.ComprehensiveSR}[kind]
        assert isinstance(sr, expected_class)
        assert sr.SOPInstanceUID == sr.file_meta.MediaStorageSOPInstanceUID == SR_SOP_INSTANCE_UID
        assert sr.SeriesInstanceUID == SR_SERIES_INSTANCE_UID
        assert sr.StudyInstanceUID == evidence[0].StudyInstanceUID
        assert (sr.SeriesNumber, sr.InstanceNumber, sr.Modality) == (42, 3, "SR")
        flags = (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag)
        assert flags == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
        assert "VerifyingObserverSequence" not in sr
        assert sr.SeriesDescription == SERIES_DESCRIPTION
        assert sr.get_evidence() == [
            (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID) for ds in evidence
        ]
        assert "PertinentOtherEvidenceSequence" not in sr
        template = sr.ContentTemplateSequence[0]
        assert (template.TemplateIdentifier, template.MappingResource) == ("2000", "DCMR")
        title = sr.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator) == ("18748-4", "LN")
        times = (sr.ContentDate, sr.ContentTime, sr.TimezoneOffsetFromUTC)
        assert times == ("20260304", "050607.890123", "+0000")
        assert (sr.InstanceCreationDate, sr.InstanceCreationTime) == (sr.ContentDate, sr.ContentTime)
        (item,) = [item for item in sr.ContributingEquipmentSequence if item.get("DeviceUID") == MODEL.uid]
        equipment = (item.Manufacturer, item.ManufacturerModelName, item.SoftwareVersions)
        assert equipment == (MODEL.manufacturer, MODEL.name, MODEL.version)
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")

    def test_content_tree(self, report: DraftReport, headers: HeaderFactory) -> None:
        """One TEXT item per non-empty line, stripped, after the disclaimer in each section."""
        sr = build(report, headers())
        assert text_items(sr) == {
            "Findings": [("Comment", DISCLAIMER), ("Finding", "No intracranial haemorrhage."),
                         ("Finding", "Ventricles and sulci are normal for age."),
                         ("Finding", "No midline shift.")],
            "Impressions": [("Comment", DISCLAIMER), ("Impression", "No acute intracranial abnormality.")],
        }
        observer = {item.ConceptNameCodeSequence[0].CodeValue: item for item in sr.ContentSequence
                    if item.RelationshipType == "HAS OBS CONTEXT"}
        device_observer_uid = observer["121012"].UID
        assert device_observer_uid == MODEL.uid
        text = {code: item.get("TextValue") for code, item in observer.items()}
        assert (text["121013"], text["121014"]) == (MODEL.name, MODEL.manufacturer)
        assert (text["111001"], text["111003"]) == (MODEL.name, MODEL.version)

    def test_an_empty_section_is_left_out(self, headers: HeaderFactory) -> None:
        """A report with findings only has no Impressions container."""
        sr = build(DraftReport("Small old lacune, left basal ganglia.", "  \n", MODEL, CREATED), headers())
        assert list(text_items(sr)) == ["Findings"]

    def test_building_twice_gives_the_same_bytes(self, tmp_path: Path, report: DraftReport,
                                                 headers: HeaderFactory) -> None:
        """Nothing random or clock-dependent: a retry rebuilds and resends the identical instance."""
        evidence = headers()
        first = write_sr(build(report, evidence), tmp_path / "first.dcm").read_bytes()
        again = write_sr(build(report, evidence), tmp_path / "again.dcm").read_bytes()
        assert again == first
        later = DraftReport(FINDINGS, IMPRESSION, MODEL, CREATED + timedelta(seconds=1))
        assert first != write_sr(build(later, evidence), tmp_path / "later.dcm").read_bytes()

    def test_times_are_utc(self, headers: HeaderFactory) -> None:
        """A report created in another time zone gets its UTC time and offset +0000."""
        local = DraftReport(FINDINGS, IMPRESSION, MODEL,
                            datetime(2026, 3, 4, 7, 6, 7, tzinfo=timezone(timedelta(hours=2))))
        sr = build(local, headers())
        times = (str(sr.ContentDate), str(sr.ContentTime), sr.TimezoneOffsetFromUTC)
        assert times == ("20260304", "050607", "+0000")

    @pytest.mark.parametrize(("character_set", "encoded"), [("ISO_IR 100", NAME.encode("latin-1")),
                                                            ("ISO_IR 192", NAME.encode("utf-8"))])
    def test_patient_name_round_trips_in_the_source_character_set(
        self, tmp_path: Path, report: DraftReport, headers: HeaderFactory, character_set: str,
        encoded: bytes,
    ) -> None:
        """The SR keeps the source's Specific Character Set and decodes to the same patient name."""
        evidence = headers(specific_character_set=character_set, patient_name=NAME)
        path = write_sr(build(report, evidence), tmp_path / "sr.dcm")
        assert encoded in path.read_bytes()
        sr = pydicom.dcmread(path)
        assert sr.SpecificCharacterSet == character_set
        assert str(sr.PatientName) == str(evidence[0].PatientName) == NAME
        for keyword in ("PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyID",
                        "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber"):
            assert sr[keyword].value == evidence[0][keyword].value, keyword

    def test_text_the_source_set_cannot_hold_switches_to_utf8(self, tmp_path: Path,
                                                              headers: HeaderFactory) -> None:
        """Report text outside the source repertoire makes the SR UTF-8; nothing is lost."""
        evidence = headers(specific_character_set="ISO_IR 100", patient_name=NAME)
        findings = "Hyperdensity ≥ 60 HU in the left Sylvian fissure."
        sr_path = write_sr(build(DraftReport(findings, IMPRESSION, MODEL, CREATED), evidence),
                           tmp_path / "sr.dcm")
        sr = pydicom.dcmread(sr_path)
        assert sr.SpecificCharacterSet == "ISO_IR 192"
        assert str(sr.PatientName) == NAME
        assert ("Finding", findings) in text_items(sr)["Findings"]

    def test_ascii_source_stays_without_character_set(self, report: DraftReport,
                                                      headers: HeaderFactory) -> None:
        """An ASCII source and ASCII report give an SR in the default repertoire."""
        assert "SpecificCharacterSet" not in build(report, headers())

    def test_several_series_of_one_study(self, report: DraftReport, headers: HeaderFactory) -> None:
        """Evidence from two series of the study is listed per series, all of it (with pixels or not)."""
        first = headers()
        second = headers(study_instance_uid=first[0].StudyInstanceUID, series_number=3,
                         series_description="HEAD 1mm AXIAL", with_pixels=True)
        assert "PixelData" in second[0] and "PixelData" not in first[0]
        sr = build(report, first + second)
        series = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        assert [s.SeriesInstanceUID for s in series] == [first[0].SeriesInstanceUID,
                                                         second[0].SeriesInstanceUID]
        assert {uids[2] for uids in sr.get_evidence()} == {ds.SOPInstanceUID for ds in first + second}

    def test_accession_and_referenced_request_are_carried_over(self, report: DraftReport,
                                                               headers: HeaderFactory) -> None:
        """AccessionNumber and a source Referenced Request Sequence reach the SR."""
        evidence = headers(accession_number="A123456")
        request = Dataset()
        request.StudyInstanceUID = evidence[0].StudyInstanceUID
        request.AccessionNumber = "A123456"
        request.ReferencedStudySequence = []
        request.RequestedProcedureDescription = "CT HEAD"
        request.RequestedProcedureCodeSequence = []
        request.RequestedProcedureID = "RP1"
        request.PlacerOrderNumberImagingServiceRequest = "P1"
        request.FillerOrderNumberImagingServiceRequest = "F1"
        for ds in evidence:
            ds.ReferencedRequestSequence = [request]
        sr = build(report, evidence)
        assert sr.AccessionNumber == "A123456"
        assert list(sr.ReferencedRequestSequence) == [request]

    def test_referenced_request_is_made_from_request_attributes(self, tmp_path: Path,
                                                                report: DraftReport,
                                                                headers: HeaderFactory) -> None:
        """An image's Request Attributes Sequence becomes one Referenced Request item (Type 2 present)."""
        evidence = headers(accession_number="A77")
        attributes = Dataset()
        attributes.RequestedProcedureID = "RP7"
        attributes.ScheduledProcedureStepID = "SPS7"
        for ds in evidence:
            ds.RequestAttributesSequence = [attributes]
        sr = pydicom.dcmread(write_sr(build(report, evidence), tmp_path / "sr.dcm"))
        (item,) = sr.ReferencedRequestSequence
        request = (item.StudyInstanceUID, item.AccessionNumber, item.RequestedProcedureID)
        assert request == (evidence[0].StudyInstanceUID, "A77", "RP7")
        assert item.PlacerOrderNumberImagingServiceRequest == ""
        assert "ScheduledProcedureStepID" not in item

    def test_no_patient_data_in_warnings_or_logs(self, report: DraftReport, headers: HeaderFactory,
                                                 caplog: pytest.LogCaptureFixture) -> None:
        """A one-component name (highdicom warns with such names) appears in no warning or log."""
        evidence = headers(patient_name="ZEBEDEE", patient_id="SECRET-ID-9")
        caplog.set_level("DEBUG")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sr = build(report, evidence)
        assert str(sr.PatientName) == "ZEBEDEE"
        said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
        assert [s for s in said if "ZEBEDEE" in s or "SECRET-ID-9" in s] == []

    def test_callers_headers_are_not_changed_or_shared(self, report: DraftReport,
                                                       headers: HeaderFactory) -> None:
        """The SR copies elements; changing it leaves the evidence as it was."""
        evidence = headers(specific_character_set="ISO_IR 192", patient_name=NAME)
        before = [Dataset(ds) for ds in evidence]
        sr = build(report, evidence)
        sr.PatientName = "OTHER^NAME"
        assert evidence == before
        assert str(evidence[0].PatientName) == NAME


class TestWriteSr:
    """``write_sr`` stores the SR durably."""

    def test_writes_a_dicom_file_and_no_temporary_files(self, tmp_path: Path, report: DraftReport,
                                                        headers: HeaderFactory) -> None:
        """The file has a preamble and file meta; only the final name remains in the folder."""
        path = write_sr(build(report, headers()), tmp_path / "out" / "sr.dcm")
        assert list(path.parent.iterdir()) == [path]
        assert path.read_bytes()[128:132] == b"DICM"
        assert pydicom.dcmread(path).SOPInstanceUID == SR_SOP_INSTANCE_UID

    def test_failed_write_leaves_the_old_file(self, tmp_path: Path, report: DraftReport,
                                              headers: HeaderFactory) -> None:
        """A dataset that cannot be written raises and leaves the previous file as it was."""
        path = write_sr(build(report, headers()), tmp_path / "out" / "sr.dcm")
        old = path.read_bytes()
        broken = Dataset()  # no file meta, no SOP UIDs: save_as refuses it
        with pytest.raises((ValueError, AttributeError)):
            write_sr(broken, path)
        assert path.read_bytes() == old
        assert list(path.parent.iterdir()) == [path]


class TestBadInput:
    """Each bad input raises ValueError naming the problem, without patient data or UIDs."""

    def test_empty_evidence(self, report: DraftReport) -> None:
        """No evidence: the SR would list nothing the model read."""
        with pytest.raises(ValueError, match="evidence is empty"):
            build(report, [])

    def test_evidence_from_two_studies(self, report: DraftReport, headers: HeaderFactory) -> None:
        """Instances of another study are refused; the message names the position, not the name."""
        first = headers(specific_character_set="ISO_IR 192", patient_name=NAME)
        other = headers(specific_character_set="ISO_IR 192", patient_name=NAME)
        with pytest.raises(ValueError, match=r"evidence\[3\] belongs to another study") as raised:
            build(report, first + other)
        message = str(raised.value)
        assert "Müller" not in message
        assert first[0].StudyInstanceUID not in message and other[0].StudyInstanceUID not in message

    def test_repeated_instance(self, report: DraftReport, headers: HeaderFactory) -> None:
        """An instance listed twice is a caller bug."""
        evidence = headers()
        with pytest.raises(ValueError, match=r"evidence\[3\] repeats the instance of evidence\[1\]"):
            build(report, [*evidence, evidence[1]])

    @pytest.mark.parametrize("keyword", ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                         "SeriesInstanceUID"])
    def test_evidence_without_uid(self, report: DraftReport, headers: HeaderFactory, keyword: str) -> None:
        """Every evidence instance needs its four identifying UIDs."""
        evidence = headers()
        del evidence[2][keyword]
        with pytest.raises(ValueError, match=rf"evidence\[2\] has no {keyword}"):
            build(report, evidence)

    @pytest.mark.parametrize("option", ["sop_instance_uid", "series_instance_uid"])
    @pytest.mark.parametrize("value", ["", "1.2.abc", "1." + "2" * 70])
    def test_invalid_sr_uid(self, report: DraftReport, headers: HeaderFactory, option: str,
                            value: str) -> None:
        """The SR's own UIDs must be valid DICOM UIDs."""
        with pytest.raises(ValueError, match=f"{option} is not a valid DICOM UID"):
            build(report, headers(), **{option: value})

    def test_sr_uids_must_be_new(self, report: DraftReport, headers: HeaderFactory) -> None:
        """Reusing a source instance or series UID for the SR is refused."""
        evidence = headers()
        with pytest.raises(ValueError, match="sop_instance_uid is the SOP Instance UID of an evidence"):
            build(report, evidence, sop_instance_uid=evidence[1].SOPInstanceUID)
        with pytest.raises(ValueError, match="series_instance_uid is the Series Instance UID of an"):
            build(report, evidence, series_instance_uid=evidence[0].SeriesInstanceUID)

    @pytest.mark.parametrize("option", ["series_number", "instance_number"])
    @pytest.mark.parametrize("value", [0, -1, True, "1"])
    def test_bad_numbers(self, report: DraftReport, headers: HeaderFactory, option: str,
                         value: object) -> None:
        """Series and instance numbers are positive integers."""
        with pytest.raises(ValueError, match=f"{option} must be a positive integer"):
            build(report, headers(), **{option: value})

    def test_first_evidence_of_an_unknown_sop_class(self, report: DraftReport,
                                                     headers: HeaderFactory) -> None:
        """Patient and Study modules are copied by IOD; an unknown SOP Class has none."""
        evidence = headers(sop_class_uid="1.2.826.0.1.3680043.8.498.777")
        with pytest.raises(ValueError, match=r"evidence\[0\] has a SOP Class UID highdicom has no IOD"):
            build(report, evidence)

    def test_unknown_kind(self, report: DraftReport, headers: HeaderFactory) -> None:
        """Only Enhanced and Comprehensive SR are built."""
        with pytest.raises(ValueError, match="kind must be one of"):
            build(report, headers(), kind="basic")

    def test_model_fields_too_long_for_dicom(self, headers: HeaderFactory) -> None:
        """A model name longer than LO allows is refused before highdicom sees it."""
        model = ModelIdentity(name="m" * 65, version="1", uid=MODEL.uid)
        with pytest.raises(ValueError, match=r"ModelIdentity\.name must have at most 64"):
            build(DraftReport(FINDINGS, IMPRESSION, model, CREATED), headers())

    def test_model_uid_must_be_a_uid(self, headers: HeaderFactory) -> None:
        """The model UID becomes Device Observer UID and Device UID: it must be a valid UID."""
        model = ModelIdentity(name="m", version="1", uid="model-7")
        with pytest.raises(ValueError, match=r"report\.model\.uid is not a valid DICOM UID"):
            build(DraftReport(FINDINGS, IMPRESSION, model, CREATED), headers())

    def test_institution_name_too_long(self, report: DraftReport, headers: HeaderFactory) -> None:
        """Institution Name is LO: at most 64 characters."""
        with pytest.raises(ValueError, match="institution_name has 65 characters"):
            build(report, headers(), institution_name="x" * 65)
