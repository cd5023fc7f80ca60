"""The drafted report as a DICOM Structured Report: TID 2000 in Enhanced or Comprehensive SR.

:func:`build_sr` turns a :class:`~neuroscribe.reporting.draft.DraftReport` and the headers of the CT
instances the model read into one SR document (highdicom), filed into the source study;
:func:`write_sr` stores it durably. The content tree, as ``dsrdump`` prints it::

    <CONTAINER:(18748-4,LN,"Diagnostic Imaging Report")=SEPARATE>            TID 2000, DCMR
      <has concept mod CODE:(121058,DCM,"Procedure reported")=(77477000,SCT,"Computed tomography")>
      <has concept mod CODE:(123014,DCM,"Target Region")=(69536005,SCT,"Head")>
      <has concept mod CODE:(121049,DCM,"Language of Content Item and Descendants")=(en-US,RFC5646,..)>
      <has obs context CODE:(121005,DCM,"Observer Type")=(121007,DCM,"Device")>   TID 1002
      <has obs context UIDREF:(121012,DCM,"Device Observer UID")="<ModelIdentity.uid>">  TID 1004
      <has obs context TEXT:(121013,DCM,"Device Observer Name")="<name>">
      <has obs context TEXT:(121014,DCM,"Device Observer Manufacturer")="<manufacturer>">
      <has obs context TEXT:(121015,DCM,"Device Observer Model Name")="<name> <version>">
      <has obs context TEXT:(111001,DCM,"Algorithm Name")="<name>">             TID 4019
      <has obs context TEXT:(111003,DCM,"Algorithm Version")="<version>">
      <contains CONTAINER:(59776-5,LN,"Findings")=SEPARATE>                     CID 7001
        <contains TEXT:(121106,DCM,"Comment")="AI-GENERATED DRAFT - NOT A DIAGNOSIS. ...">
        <contains TEXT:(121071,DCM,"Finding")="<first line of the findings>">  TID 2002
        <contains TEXT:(121071,DCM,"Finding")="<next line>">
      <contains CONTAINER:(19005-8,LN,"Impressions")=SEPARATE>
        <contains TEXT:(121106,DCM,"Comment")="AI-GENERATED DRAFT - NOT A DIAGNOSIS. ...">
        <contains TEXT:(121073,DCM,"Impression")="<each line of the impression>">

Decisions, with the standard's reasons (PS3.16):

* **One TEXT item per non-empty line**, stripped: the model writes one statement per line, and
  TID 2002 items are single report elements. Sections are SEPARATE, so viewers keep the lines
  apart. A section with no text is left out (TID 2000 row 8 is 1-n, user optional).
* **The disclaimer** (:data:`~neuroscribe.reporting.draft.DISCLAIMER`) is the first TEXT item of
  every section, named (121106, DCM, "Comment"). TID 2000 and TID 2002 are non-extensible, so no
  extra item may hang off the root; TID 2002's TEXT concept names come from *baseline* CID 7002,
  which allows other codes, so a Comment inside a section conforms. It is repeated in each section
  because RIS and viewers often lift one section (the impression) out on its own.
* **TID 4019** Algorithm Name/Version extend TID 1004 (Device Observer Identifying Attributes,
  the only extensible template on the path) as HAS OBS CONTEXT items after the device rows.
* **Contributing Equipment**: the model, with purpose (109102, DCM, "Processing Equipment"),
  manufacturer, model name, software version and Device UID = ``ModelIdentity.uid``. IHE AIR's
  ``99IHE`` "Processing Algorithm" code is still a placeholder (``Newcode1``) and highdicom
  accepts only DCM purposes. highdicom adds the scanner (from the first instance) and itself.
* **Reproducible**: every date and time (content, instance creation, series, contributions) is
  ``DraftReport.created`` in UTC with ``TimezoneOffsetFromUTC`` +0000 and the caller gives the
  UIDs, so building again with the same arguments gives the same bytes: a retry resends the very
  same instance.
* **Character set**: the source's Specific Character Set, unless a text of the report (or model,
  institution) cannot be encoded in it; then ISO_IR 192 (UTF-8), which holds every name exactly.
* **Requests**: ``ReferencedRequestSequence`` is copied from the sources that have one, or made
  from their ``RequestAttributesSequence`` (what a modality puts in images from the worklist).

Errors are :class:`ValueError` naming the argument, the position in ``evidence`` and the rule;
they never hold patient data or UIDs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import highdicom as hd
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import RE_VALID_UID
from pydicom.valuerep import DA, DT, TM

from neuroscribe import __version__
from neuroscribe.durable import atomic_file
from neuroscribe.reporting.draft import DISCLAIMER, DraftReport, ModelIdentity

__all__ = [
    "DIAGNOSTIC_IMAGING_REPORT",
    "SERIES_DESCRIPTION",
    "SrKind",
    "build_sr",
    "write_sr",
]

#: Which SR IOD: both hold this tree; Comprehensive also allows by-reference relationships.
SrKind = Literal["enhanced", "comprehensive"]

#: Document title, CID 7000.
DIAGNOSTIC_IMAGING_REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
#: Section headings, CID 7001 (the LOINC codes that replaced the retired DCM 121070/121072).
FINDINGS = hd.sr.CodedConcept("59776-5", "LN", "Findings")
IMPRESSIONS = hd.sr.CodedConcept("19005-8", "LN", "Impressions")
#: Report elements, CID 7002.
FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
IMPRESSION = hd.sr.CodedConcept("121073", "DCM", "Impression")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
PROCEDURE_REPORTED = hd.sr.CodedConcept("121058", "DCM", "Procedure reported")
COMPUTED_TOMOGRAPHY = hd.sr.CodedConcept("77477000", "SCT", "Computed tomography")
TARGET_REGION = hd.sr.CodedConcept("123014", "DCM", "Target Region")
HEAD = hd.sr.CodedConcept("69536005", "SCT", "Head")
ENGLISH_US = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
#: TID 4019 Algorithm Identification.
ALGORITHM_NAME = hd.sr.CodedConcept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = hd.sr.CodedConcept("111003", "DCM", "Algorithm Version")

#: Series Description of every NeuroScribe SR (LO, at most 64 characters).
SERIES_DESCRIPTION = "AI DRAFT - NOT FOR DIAGNOSIS"
#: General Equipment of the SR: the service that wrote it (the model is the Device observer).
MANUFACTURER = "NeuroScribe"
MANUFACTURER_MODEL_NAME = "NeuroScribe"
#: Character set used when the source's cannot encode the report text.
UTF8 = "ISO_IR 192"

_SR_CLASSES: dict[str, type[hd.sr.EnhancedSR] | type[hd.sr.ComprehensiveSR]] = {
    "enhanced": hd.sr.EnhancedSR,
    "comprehensive": hd.sr.ComprehensiveSR,
}
#: Identify an instance; every evidence dataset must have them.
_REFERENCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: Describe the scanner; highdicom lists it as acquisition Contributing Equipment.
_EQUIPMENT_KEYWORDS = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
                       "InstitutionName", "InstitutionalDepartmentName", "InstitutionAddress",
                       "StationName", "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime")
#: Type 2 elements highdicom reads from the first evidence dataset; the real ones are copied later.
_PATIENT_STUDY_PLACEHOLDERS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                               "AccessionNumber", "StudyID", "StudyDate", "StudyTime")
_LO_MAX = 64
_UI_MAX = 64


def build_sr(
    report: DraftReport,
    evidence: Sequence[Dataset],
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
    institution_name: str | None = None,
    kind: SrKind = "enhanced",
) -> hd.sr.EnhancedSR | hd.sr.ComprehensiveSR:
    """The SR document of ``report``, filed into the study of ``evidence``; ready to save or send.

    Parameters
    ----------
    report
        The draft: findings, impression, model and creation time (all times in the SR come from it).
    evidence
        Headers (pixel data not needed) of every instance the model read, all of one study, any
        number of series. Patient and study attributes come from the first.
    sop_instance_uid, series_instance_uid
        The SR's UIDs, chosen by the caller so that a retry rebuilds the very same instance. The
        series must be new: not one of the evidence series.
    series_number, instance_number
        Positive integers.
    institution_name
        The reading site (General Equipment); None leaves it out.
    kind
        ``"enhanced"`` (Enhanced SR Storage) or ``"comprehensive"`` (Comprehensive SR Storage).

    Raises
    ------
    ValueError
        Empty or inconsistent evidence (several studies, a repeated instance, a missing UID), bad
        UIDs or numbers, an unknown ``kind``, or a model name too long for its DICOM field.
    """
    sr_class = _SR_CLASSES.get(kind)
    if sr_class is None:
        raise ValueError(f"kind must be one of {sorted(_SR_CLASSES)}, got {kind!r}")
    _check_evidence(evidence)
    _check_uid("sop_instance_uid", sop_instance_uid)
    _check_uid("series_instance_uid", series_instance_uid)
    if sop_instance_uid in {str(ds.SOPInstanceUID) for ds in evidence}:
        raise ValueError("sop_instance_uid is the SOP Instance UID of an evidence instance; the SR "
                         "needs its own")
    if series_instance_uid in {str(ds.SeriesInstanceUID) for ds in evidence}:
        raise ValueError("series_instance_uid is the Series Instance UID of an evidence series; the "
                         "SR goes into a series of its own (one modality per series)")
    for name, number in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{name} must be a positive integer, got {number!r}")
    _check_model(report.model)
    if institution_name is not None and len(institution_name) > _LO_MAX:
        raise ValueError(f"institution_name has {len(institution_name)} characters; Institution Name "
                         f"(LO) holds at most {_LO_MAX}")

    source = evidence[0]
    created = report.created.astimezone(UTC)
    findings, impressions = _lines(report.findings), _lines(report.impression)
    requests = _requested_procedures(evidence)
    texts = [DISCLAIMER, *findings, *impressions, report.model.name, report.model.version,
             report.model.manufacturer, institution_name or "", *_strings(requests)]
    character_set = _character_set(source.get("SpecificCharacterSet"), texts)

    references = [_reference(ds, with_header=index == 0) for index, ds in enumerate(evidence)]
    content = _content(report.model, findings, impressions)
    equipment = [_model_equipment(report.model, created)]
    try:
        sr = sr_class(
            evidence=references,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER_MODEL_NAME,
            software_versions=__version__,
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=institution_name,
            requested_procedures=requests or None,
            contributing_equipment=equipment,
            series_description=SERIES_DESCRIPTION,
            content_date=DA(created.date()),
            content_time=TM(created.time()),
            series_date=DA(created.date()),
            series_time=TM(created.time()),
            specific_character_set=character_set,
        )
        # highdicom saw placeholders (so it had no patient name to warn about); now the real Patient
        # and Study modules, deep-copied so that the SR shares no element with the caller's header.
        sr.copy_patient_and_study_information(_without_pixels(source))
    except KeyError:  # highdicom finds those modules through the IOD of evidence[0]'s SOP Class
        raise ValueError("evidence[0] has a SOP Class UID highdicom has no IOD for; its Patient and "
                         "Study modules cannot be copied") from None
    sr.InstanceCreationDate = DA(created.date())
    sr.InstanceCreationTime = TM(created.time())
    sr.TimezoneOffsetFromUTC = "+0000"
    for item in sr.ContributingEquipmentSequence:
        if item.get("ManufacturerModelName") == "highdicom":  # stamped with "now" by highdicom
            item.ContributionDateTime = DT(created)
    return sr


def write_sr(ds: Dataset, path: Path | str) -> Path:
    """Write ``ds`` as a DICOM file (PS3.10) at ``path`` through :func:`~neuroscribe.durable.atomic_file`.

    The file is either absent, the old version or complete, even across a crash. Returns the path.
    """
    path = Path(path)
    with atomic_file(path, "wb") as handle:
        ds.save_as(handle, enforce_file_format=True)
    return path


def _content(model: ModelIdentity, findings: list[str], impressions: list[str]) -> hd.sr.ContainerContentItem:
    """The root CONTAINER with the TID 2000 rows in the template's (significant) order."""
    root = hd.sr.ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT, is_content_continuous=False,
                                      template_id="2000")
    has_concept_mod = hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(PROCEDURE_REPORTED, COMPUTED_TOMOGRAPHY, has_concept_mod),
        hd.sr.CodeContentItem(TARGET_REGION, HEAD, has_concept_mod),
        *hd.sr.LanguageOfContentItemAndDescendants(ENGLISH_US),
        *_observation_context(model),
    ]
    for heading, concept, lines in ((FINDINGS, FINDING, findings), (IMPRESSIONS, IMPRESSION, impressions)):
        if lines:
            items.append(_section(heading, concept, lines))
    root.ContentSequence = hd.sr.ContentSequence(items)
    return root


def _observation_context(model: ModelIdentity) -> hd.sr.ObservationContext:
    """TID 1001: the model as Device observer (TID 1004), extended by TID 4019 name and version."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.uid,
        name=model.name,
        manufacturer_name=model.manufacturer,
        model_name=f"{model.name} {model.version}",
    )
    has_obs_context = hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT
    device.extend([
        hd.sr.TextContentItem(ALGORITHM_NAME, model.name, has_obs_context),
        hd.sr.TextContentItem(ALGORITHM_VERSION, model.version, has_obs_context),
    ])
    observer = hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                     observer_identifying_attributes=device)
    return hd.sr.ObservationContext(observer_device_context=observer)


def _section(heading: hd.sr.CodedConcept, concept: hd.sr.CodedConcept,
             lines: list[str]) -> hd.sr.ContainerContentItem:
    """A CID 7001 section: the disclaimer, then TID 2002 TEXT items, one per line."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    section = hd.sr.ContainerContentItem(name=heading, is_content_continuous=False,
                                         relationship_type=contains)
    section.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(COMMENT, DISCLAIMER, contains),
        *(hd.sr.TextContentItem(concept, line, contains) for line in lines),
    ])
    return section


def _model_equipment(model: ModelIdentity, created: datetime) -> hd.ContributingEquipment:
    """The Contributing Equipment item of the report model (Device UID names the exact model)."""
    item = hd.ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        contribution_datetime=DT(created),
        contribution_description="Report model that drafted the text of this document",
    )
    item.DeviceUID = model.uid
    return item


def _lines(text: str) -> list[str]:
    """The non-empty lines of a section, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_evidence(evidence: Sequence[Dataset]) -> None:
    """Non-empty, every item identified, one study, no instance twice."""
    if len(evidence) == 0:
        raise ValueError("evidence is empty: the SR must list the instances the model read")
    seen: dict[str, int] = {}
    for index, ds in enumerate(evidence):
        for keyword in _REFERENCE_KEYWORDS:
            if not str(ds.get(keyword, "") or "").strip():
                raise ValueError(f"evidence[{index}] has no {keyword}")
        if ds.StudyInstanceUID != evidence[0].StudyInstanceUID:
            raise ValueError(f"evidence[{index}] belongs to another study than evidence[0]; one SR "
                             "reports on one study")
        first = seen.setdefault(str(ds.SOPInstanceUID), index)
        if first != index:
            raise ValueError(f"evidence[{index}] repeats the instance of evidence[{first}]")


def _check_uid(name: str, value: str) -> None:
    if not isinstance(value, str) or len(value) > _UI_MAX or not RE_VALID_UID.match(value):
        raise ValueError(f"{name} is not a valid DICOM UID (digits and dots, at most 64 characters)")


def _check_model(model: ModelIdentity) -> None:
    """UIDREF and LO limits of the fields the model fills."""
    _check_uid("report.model.uid", model.uid)
    for name in ("name", "version", "manufacturer"):
        value = getattr(model, name)
        if len(value) > _LO_MAX or "\\" in value:
            raise ValueError(f"ModelIdentity.{name} must have at most {_LO_MAX} characters and no "
                             "backslash (it fills LO elements of Contributing Equipment)")


def _character_set(source: str | Iterable[str] | None, texts: Iterable[str]) -> str | list[str] | None:
    """The source's Specific Character Set if it can encode ``texts``, else ISO_IR 192 (UTF-8)."""
    terms = [source] if isinstance(source, str) else list(source or [])
    terms = [str(term).strip() for term in terms]
    if not any(terms):
        terms = []
    codecs = convert_encodings(terms) if terms else []
    if not terms or terms[0] in ("", "ISO_IR 6", "ISO 2022 IR 6"):
        codecs[:1] = ["ascii"]  # the default repertoire is ASCII (pydicom reads it as Latin-1)
    characters = set("".join(texts))
    if all(any(_encodes(char, codec) for codec in codecs) for char in characters):
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else terms
    return UTF8


def _strings(datasets: Iterable[Dataset]) -> list[str]:
    """Every text value in ``datasets`` and their sequences (the request items may come from
    evidence other than the first, in another character set)."""
    return [str(element.value) for ds in datasets for element in ds.iterall()
            if element.VR in {"LO", "LT", "PN", "SH", "ST", "UC", "UT"} and element.value]


def _encodes(char: str, codec: str) -> bool:
    try:
        char.encode(codec)
    except (UnicodeError, LookupError):
        return False
    return True


def _reference(ds: Dataset, *, with_header: bool) -> Dataset:
    """What highdicom needs of one evidence instance: its UIDs; for the first also the scanner and
    empty patient/study placeholders (real values are copied after construction)."""
    out = Dataset()
    for keyword in _REFERENCE_KEYWORDS:
        setattr(out, keyword, str(ds[keyword].value))
    if with_header:
        for keyword in _PATIENT_STUDY_PLACEHOLDERS:
            setattr(out, keyword, "")
        for keyword in _EQUIPMENT_KEYWORDS:
            if keyword in ds:
                out.add(copy.deepcopy(ds[keyword]))
    return out


def _without_pixels(ds: Dataset) -> Dataset:
    """A deep copy of ``ds`` without pixel data (the group 7FE0 and later elements)."""
    out = Dataset()
    for element in ds:
        if element.tag.group < 0x7FE0:
            out.add(copy.deepcopy(element))
    return out


def _requested_procedures(evidence: Sequence[Dataset]) -> list[Dataset]:
    """Referenced Request Sequence items: copied, or made from Request Attributes; no duplicates."""
    items: list[Dataset] = []
    keys: set[tuple[str, ...]] = set()
    for ds in evidence:
        candidates = [copy.deepcopy(item) for item in ds.get("ReferencedRequestSequence", [])]
        if not candidates:
            candidates = [_request_from_attributes(ds, item)
                          for item in ds.get("RequestAttributesSequence", [])]
        for item in candidates:
            key = tuple(str(item.get(keyword, "")) for keyword in (
                "StudyInstanceUID", "AccessionNumber", "RequestedProcedureID",
                "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest"))
            if key not in keys:
                keys.add(key)
                items.append(item)
    return items


def _request_from_attributes(ds: Dataset, attributes: Dataset) -> Dataset:
    """A Referenced Request Sequence item (SR Document General) from a Request Attributes item."""
    item = Dataset()
    item.StudyInstanceUID = ds.StudyInstanceUID
    item.AccessionNumber = attributes.get("AccessionNumber", ds.get("AccessionNumber", ""))
    for keyword in ("IssuerOfAccessionNumberSequence", "ReasonForTheRequestedProcedure",
                    "ReasonForRequestedProcedureCodeSequence"):
        if keyword in attributes:
            item.add(copy.deepcopy(attributes[keyword]))
    item.ReferencedStudySequence = copy.deepcopy(attributes.get("ReferencedStudySequence", []))
    item.RequestedProcedureDescription = attributes.get("RequestedProcedureDescription", "")
    item.RequestedProcedureCodeSequence = copy.deepcopy(attributes.get("RequestedProcedureCodeSequence", []))
    item.RequestedProcedureID = attributes.get("RequestedProcedureID", "")
    item.PlacerOrderNumberImagingServiceRequest = attributes.get("PlacerOrderNumberImagingServiceRequest", "")
    item.FillerOrderNumberImagingServiceRequest = attributes.get("FillerOrderNumberImagingServiceRequest", "")
    return item
