"""De-identification of CT instances for the site training store: DICOM PS3.15 Annex E.

The profile is the **Basic Application Level Confidentiality Profile** (PS3.15 E.2, code
``113100``) with one option:

* **Retain Patient Characteristics Option** (E.3.8, code ``113108``): PatientAge, PatientSex,
  PatientSize and PatientWeight are kept (age and sex are context a head-CT report uses: "volume
  loss appropriate for age"). PatientAge is derived from the birth and study dates when the
  instance does not carry it, before the dates are removed.

Not applied, on purpose (docs/learning.md):

* no temporal option: every date and time is removed or emptied
  (LongitudinalTemporalInformationModified = ``REMOVED``); training needs none;
* no Retain UIDs, Device Identity, Institution Identity, Clean Descriptors or Retain Safe Private
  option: UIDs are replaced, equipment and institution identifiers and free-text descriptions
  removed, every private element removed;
* no Clean Pixel Data (113101) and no Clean Recognizable Visual Features (113102): pixel data is
  copied untouched. An instance that declares BurnedInAnnotation ``YES`` is refused, as is any
  SOP class other than CT. A head CT can be rendered into a face: the store stays on site.

The action table (:data:`BASIC_PROFILE`, the rows of PS3.15 Table E.1-1 that occur in CT
headers, with the choice made where the table offers several) is data; three rules by VR cover
attributes the table does not name: a UI value outside the DICOM root ``1.2.840.10008.`` is
replaced (``U``), a PN is removed, a DA, DT or TM is removed. Private elements (odd groups),
curves (50xx) and overlays (60xx) are removed. The table applies inside sequences too.

UIDs are replaced consistently: the new UID is ``2.25.<HMAC-SHA256(secret, old UID) as a
UUID>``, so the instances of a series keep one Series, Study and Frame of Reference UID and
references between them stay valid, and the same series exported twice gets the same UIDs.
PatientName and PatientID become the patient's pseudonym (:func:`patient_pseudonym`), the same
for every study of the patient, so the training split by patient holds.

Files are processed one at a time (:func:`deidentify_file`): no series is held in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from neuroscribe.dicom_io.constants import CT_SOP_CLASSES
from neuroscribe.errors import ConfigError, DicomInputError

__all__ = [
    "BASIC_PROFILE",
    "DICOM_UID_ROOT",
    "PROFILE_OPTIONS",
    "Action",
    "DeidentificationRefused",
    "DeidentifiedFile",
    "Deidentifier",
    "Option",
    "deidentify_file",
    "load_secret",
    "patient_pseudonym",
]

#: UIDs under this root are defined by the standard (SOP classes, transfer syntaxes, coding
#: schemes, well-known frames of reference) and identify nobody: they are kept.
DICOM_UID_ROOT = "1.2.840.10008."
#: The SOP classes exported: CT Image, Enhanced CT, Legacy Converted Enhanced CT.
EXPORTED_SOP_CLASSES = frozenset({*CT_SOP_CLASSES, "1.2.840.10008.5.1.4.1.1.2.2"})
#: Bytes of a site secret, at least.
MIN_SECRET_BYTES = 16
_IMPLEMENTATION_VERSION = "NEUROSCRIBE_DEID"


class DeidentificationRefused(DicomInputError):  # noqa: N818 - reads as the event it names
    """An instance cannot be de-identified safely (burned-in annotation, a non-CT SOP class)."""


class Action(StrEnum):
    """The action codes of PS3.15 Table E.1-1."""

    D = "D"
    """Replace with a dummy value consistent with the VR (here: the patient's pseudonym)."""
    Z = "Z"
    """Replace with a zero-length value (a Type 2 attribute stays present)."""
    X = "X"
    """Remove (a sequence with all its items)."""
    K = "K"
    """Keep (a sequence is kept and its items are de-identified in turn)."""
    U = "U"
    """Replace the UID with a consistent new one (:meth:`Deidentifier.new_uid`)."""


class Option(Enum):
    """De-identification method codes (PS3.16 CID 7050) this module can record."""

    BASIC = ("113100", "Basic Application Confidentiality Profile")
    """The Basic Application Level Confidentiality Profile (always applied)."""
    RETAIN_PATIENT_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
    """Keep age, sex, size and weight (E.3.8)."""

    @property
    def code(self) -> str:
        """The DCM code value."""
        return self.value[0]

    @property
    def meaning(self) -> str:
        """The code meaning."""
        return self.value[1]


#: The options applied, in the order they are recorded.
PROFILE_OPTIONS: tuple[Option, ...] = (Option.BASIC, Option.RETAIN_PATIENT_CHARACTERISTICS)

#: PS3.15 Table E.1-1, the rows that matter for CT (keyword -> action; where the table offers
#: X/Z/D the choice is X for Type 3, Z for Type 2 attributes, D only for the patient's identity).
BASIC_PROFILE: Mapping[str, Action] = {
    # Patient
    "PatientName": Action.D, "PatientID": Action.D, "IssuerOfPatientID": Action.X,
    "IssuerOfPatientIDQualifiersSequence": Action.X, "TypeOfPatientID": Action.X,
    "OtherPatientIDs": Action.X, "OtherPatientIDsSequence": Action.X, "OtherPatientNames": Action.X,
    "PatientBirthName": Action.X, "PatientMotherBirthName": Action.X, "PatientBirthDate": Action.Z,
    "PatientBirthTime": Action.X, "PatientAge": Action.X, "PatientSex": Action.Z,
    "PatientSize": Action.X, "PatientWeight": Action.X, "PatientAddress": Action.X,
    "PatientTelephoneNumbers": Action.X, "PatientTelecomInformation": Action.X,
    "MedicalRecordLocator": Action.X, "MilitaryRank": Action.X, "BranchOfService": Action.X,
    "CountryOfResidence": Action.X, "RegionOfResidence": Action.X, "EthnicGroup": Action.X,
    "Occupation": Action.X, "PatientReligiousPreference": Action.X,
    "PatientInsurancePlanCodeSequence": Action.X, "PatientPrimaryLanguageCodeSequence": Action.X,
    "AdditionalPatientHistory": Action.X, "PatientComments": Action.X, "MedicalAlerts": Action.X,
    "Allergies": Action.X, "SmokingStatus": Action.X, "PregnancyStatus": Action.X,
    "LastMenstrualDate": Action.X, "SpecialNeeds": Action.X, "PatientState": Action.X,
    "PatientSexNeutered": Action.X, "ResponsiblePerson": Action.X, "ResponsiblePersonRole": Action.X,
    "ResponsibleOrganization": Action.X, "ReferencedPatientSequence": Action.X,
    "ReferencedPatientPhotoSequence": Action.X,
    "ConfidentialityConstraintOnPatientDataDescription": Action.X,
    # Visit, order, request
    "AccessionNumber": Action.Z, "IssuerOfAccessionNumberSequence": Action.X, "StudyID": Action.Z,
    "StudyDescription": Action.X, "StudyComments": Action.X, "ReferringPhysicianName": Action.Z,
    "ReferringPhysicianAddress": Action.X, "ReferringPhysicianTelephoneNumbers": Action.X,
    "ReferringPhysicianIdentificationSequence": Action.X, "ConsultingPhysicianName": Action.X,
    "ConsultingPhysicianIdentificationSequence": Action.X, "PhysiciansOfRecord": Action.X,
    "PhysiciansOfRecordIdentificationSequence": Action.X, "NameOfPhysiciansReadingStudy": Action.X,
    "PhysiciansReadingStudyIdentificationSequence": Action.X, "RequestingPhysician": Action.X,
    "RequestingService": Action.X, "ReferencedStudySequence": Action.X,
    "ProcedureCodeSequence": Action.X, "AdmittingDiagnosesDescription": Action.X,
    "AdmittingDiagnosesCodeSequence": Action.X, "AdmissionID": Action.X, "AdmittingDate": Action.X,
    "AdmittingTime": Action.X, "DischargeDiagnosisDescription": Action.X,
    "CurrentPatientLocation": Action.X, "PatientInstitutionResidence": Action.X,
    "VisitComments": Action.X, "ServiceEpisodeID": Action.X, "ServiceEpisodeDescription": Action.X,
    "ReasonForStudy": Action.X, "ReasonForTheRequestedProcedure": Action.X,
    "RequestedProcedureDescription": Action.X, "RequestedProcedureID": Action.X,
    "RequestedProcedureLocation": Action.X, "RequestAttributesSequence": Action.X,
    "RequestedContrastAgent": Action.X, "ImagingServiceRequestComments": Action.X,
    "OrderEnteredBy": Action.X, "OrderEntererLocation": Action.X, "OrderCallbackPhoneNumber": Action.X,
    "PlacerOrderNumberImagingServiceRequest": Action.X,
    "FillerOrderNumberImagingServiceRequest": Action.X,
    # Procedure steps, operators, performing staff
    "OperatorsName": Action.X, "OperatorIdentificationSequence": Action.X,
    "PerformingPhysicianName": Action.X, "PerformingPhysicianIdentificationSequence": Action.X,
    "PerformedProcedureStepID": Action.X, "PerformedProcedureStepDescription": Action.X,
    "PerformedProcedureStepStartDate": Action.X, "PerformedProcedureStepStartTime": Action.X,
    "PerformedProcedureStepEndDate": Action.X, "PerformedProcedureStepEndTime": Action.X,
    "PerformedLocation": Action.X, "PerformedStationAETitle": Action.X,
    "PerformedStationName": Action.X, "PerformedStationNameCodeSequence": Action.X,
    "ReferencedPerformedProcedureStepSequence": Action.X, "ScheduledProcedureStepID": Action.X,
    "ScheduledProcedureStepDescription": Action.X, "ScheduledProcedureStepStartDate": Action.X,
    "ScheduledProcedureStepStartTime": Action.X, "ScheduledPerformingPhysicianName": Action.X,
    "ScheduledStationAETitle": Action.X, "ScheduledStationName": Action.X,
    "ScheduledProcedureStepLocation": Action.X, "CommentsOnThePerformedProcedureStep": Action.X,
    # Study, series, instance: descriptions, dates and times
    "StudyDate": Action.Z, "StudyTime": Action.Z, "SeriesDate": Action.X, "SeriesTime": Action.X,
    "AcquisitionDate": Action.X, "AcquisitionTime": Action.X, "AcquisitionDateTime": Action.X,
    "ContentDate": Action.Z, "ContentTime": Action.Z, "InstanceCreationDate": Action.X,
    "InstanceCreationTime": Action.X, "TimezoneOffsetFromUTC": Action.X,
    "SeriesDescription": Action.X, "ProtocolName": Action.X, "AcquisitionComments": Action.X,
    "ImageComments": Action.X, "FrameComments": Action.X, "DerivationDescription": Action.X,
    "AcquisitionDeviceProcessingDescription": Action.X, "TextComments": Action.X,
    "TextString": Action.X,
    # Equipment and institution
    "InstitutionName": Action.X, "InstitutionAddress": Action.X,
    "InstitutionalDepartmentName": Action.X, "InstitutionCodeSequence": Action.X,
    "InstitutionalDepartmentTypeCodeSequence": Action.X, "StationName": Action.X,
    "DeviceSerialNumber": Action.X, "GantryID": Action.X, "DetectorID": Action.X,
    "GeneratorID": Action.X, "PlateID": Action.X, "CassetteID": Action.X,
    "ContributingEquipmentSequence": Action.X,
    # UIDs
    "StudyInstanceUID": Action.U, "SeriesInstanceUID": Action.U, "SOPInstanceUID": Action.U,
    "FrameOfReferenceUID": Action.U, "SynchronizationFrameOfReferenceUID": Action.U,
    "ReferencedSOPInstanceUID": Action.U, "ReferencedFrameOfReferenceUID": Action.U,
    "RelatedFrameOfReferenceUID": Action.U, "IrradiationEventUID": Action.U,
    "ConcatenationUID": Action.U, "DimensionOrganizationUID": Action.U, "InstanceCreatorUID": Action.U,
    "DeviceUID": Action.U, "StorageMediaFileSetUID": Action.U, "TargetUID": Action.U,
    # Content that may quote anything, and integrity/provenance wrappers of the original
    "ContentSequence": Action.X, "GraphicAnnotationSequence": Action.X, "IconImageSequence": Action.X,
    "PersonName": Action.X, "VerifyingObserverName": Action.X, "VerifyingOrganization": Action.X,
    "VerifyingObserverIdentificationCodeSequence": Action.X, "AuthorObserverSequence": Action.X,
    "ParticipantSequence": Action.X, "CustodialOrganizationSequence": Action.X,
    "DistributionName": Action.X, "DistributionAddress": Action.X,
    "DigitalSignaturesSequence": Action.X, "MACParametersSequence": Action.X,
    "EncryptedAttributesSequence": Action.X, "OriginalAttributesSequence": Action.X,
    "ModifiedAttributesSequence": Action.X, "DataSetTrailingPadding": Action.X,
}

#: What each option changes in :data:`BASIC_PROFILE`.
OPTION_OVERRIDES: Mapping[Option, Mapping[str, Action]] = {
    Option.BASIC: {},
    Option.RETAIN_PATIENT_CHARACTERISTICS: {
        "PatientAge": Action.K, "PatientSex": Action.K, "PatientSize": Action.K, "PatientWeight": Action.K,
    },
}

#: VRs removed when the table does not name the attribute (names; dates and times).
_REMOVED_VRS = frozenset({"PN", "DA", "DT", "TM"})
_DATE = re.compile(r"^\d{8}$")


def _tag_table(options: tuple[Option, ...]) -> dict[BaseTag, Action]:
    table: dict[str, Action] = dict(BASIC_PROFILE)
    for option in options:
        table.update(OPTION_OVERRIDES[option])
    tags: dict[BaseTag, Action] = {}
    for keyword, action in table.items():
        tag = tag_for_keyword(keyword)
        if tag is None:  # a typo in the table is a programming error, caught by the tests
            raise ValueError(f"{keyword!r} in the de-identification table is not a DICOM keyword")
        tags[Tag(tag)] = action
    return tags


def load_secret(path: Path, *, key: str = "learning.secret_file") -> bytes:
    """The site secret in ``path``, created (32 random bytes, hex, mode 0600) when missing.

    Raises
    ------
    ConfigError
        The file cannot be read or created, or holds fewer than 16 bytes; the message names
        ``key`` and the path, never the secret.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(os.urandom(32).hex() + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{key} = {str(path)!r}: cannot read or create the de-identification "
                          f"secret ({exc.strerror or type(exc).__name__})") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"{key} = {str(path)!r}: the secret holds {len(secret)} bytes, "
                          f"at least {MIN_SECRET_BYTES} are needed")
    return secret


def patient_pseudonym(secret: bytes, patient_id: str) -> str:
    """The patient's pseudonym: ``ANON-`` + 16 hex digits of HMAC-SHA256(secret, stripped ID).

    The same for every study of a patient (and for the RIS's PID-3 when it equals the PatientID),
    irreversible without the secret.
    """
    digest = hmac.new(secret, b"patient\0" + patient_id.strip().encode(), hashlib.sha256).hexdigest()
    return "ANON-" + digest[:16].upper()


@dataclass(frozen=True)
class DeidentifiedFile:
    """One de-identified instance as written."""

    path: Path
    sop_instance_uid: str
    size_bytes: int
    #: The pseudonym written as PatientID (for the manifest).
    patient_pseudonym: str
    #: The new StudyInstanceUID.
    study_instance_uid: str


class Deidentifier:
    """Applies the profile with a site secret; one instance per export (it is cheap)."""

    def __init__(self, secret: bytes, options: tuple[Option, ...] = PROFILE_OPTIONS) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"secret must hold at least {MIN_SECRET_BYTES} bytes")
        if Option.BASIC not in options:
            raise ValueError("options must include Option.BASIC: every option modifies the Basic Profile")
        self.secret = secret
        self.options = options
        self._table = _tag_table(options)

    def new_uid(self, uid: str) -> str:
        """The replacement of ``uid``: ``2.25.`` + a UUID from HMAC-SHA256(secret, uid), at most 44 chars."""
        digest = hmac.new(self.secret, b"uid\0" + uid.strip().encode(), hashlib.sha256).digest()
        return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"

    def dataset(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (file meta rebuilt, preamble zeroed) and return it.

        Raises
        ------
        DeidentificationRefused
            BurnedInAnnotation is YES, or the SOP class is not CT.
        """
        burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
        if burned_in == "YES":
            raise DeidentificationRefused("BurnedInAnnotation is YES: the pixels may show patient data")
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if sop_class not in EXPORTED_SOP_CLASSES:
            raise DeidentificationRefused(f"SOP class {sop_class or '(none)'} is not exported (CT only)")
        pseudonym = patient_pseudonym(self.secret, str(ds.get("PatientID", "") or ""))
        age = _age(ds) if Option.RETAIN_PATIENT_CHARACTERISTICS in self.options else None
        self._apply(ds, pseudonym)
        if age is not None and "PatientAge" not in ds:
            ds.PatientAge = age
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [option.meaning for option in self.options]
        ds.DeidentificationMethodCodeSequence = Sequence([_code(option) for option in self.options])
        ds.LongitudinalTemporalInformationModified = "REMOVED"
        ds.file_meta = _file_meta(ds)
        ds.preamble = b"\0" * 128
        return ds

    def _apply(self, ds: Dataset, pseudonym: str) -> None:
        for element in list(ds):
            tag = element.tag
            if tag.is_private or _is_curve_or_overlay(tag) or tag.group == 0x0002:
                del ds[tag]
                continue
            action = self._table.get(tag) or _rule(element)
            if action is Action.X:
                del ds[tag]
            elif action is Action.Z:
                element.value = None if element.VR != "SQ" else Sequence()
            elif action is Action.D:
                element.value = pseudonym
            elif action is Action.U:
                element.value = self._uids(element.value)
            elif element.VR == "SQ":  # K: keep the sequence, de-identify its items
                for item in element.value or ():
                    self._apply(item, pseudonym)

    def _uids(self, value: object) -> object:
        if value is None or value == "":
            return value
        if isinstance(value, list | MultiValue):
            return [self._uid(str(v)) for v in value]
        return self._uid(str(value))

    def _uid(self, uid: str) -> str:
        return uid if uid.startswith(DICOM_UID_ROOT) or not uid else self.new_uid(uid)


def _rule(element: DataElement) -> Action:
    """The action for an attribute the table does not name: by VR."""
    if element.VR == "UI":
        return Action.U  # standard UIDs are kept by Deidentifier._uid
    if element.VR in _REMOVED_VRS:
        return Action.X
    return Action.K


def _is_curve_or_overlay(tag: BaseTag) -> bool:
    return tag.group % 2 == 0 and (0x5000 <= tag.group <= 0x50FF or 0x6000 <= tag.group <= 0x60FF)


def _age(ds: Dataset) -> str | None:
    """PatientAge (``nnnY``) from PatientBirthDate and StudyDate, when both are full dates."""
    birth = str(ds.get("PatientBirthDate", "") or "").strip()
    study = str(ds.get("StudyDate", "") or ds.get("AcquisitionDate", "") or "").strip()
    if not (_DATE.match(birth) and _DATE.match(study)):
        return None
    years = int(study[:4]) - int(birth[:4]) - (study[4:] < birth[4:])
    return f"{years:03d}Y" if 0 <= years <= 999 else None


def _code(option: Option) -> Dataset:
    item = Dataset()
    item.CodeValue = option.code
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = option.meaning
    return item


def _file_meta(ds: Dataset) -> FileMetaDataset:
    """A fresh file meta group: nothing of the original's (its source AE title, private data)."""
    old = getattr(ds, "file_meta", None)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = old.TransferSyntaxUID  # the pixel data stays encoded as received
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    return meta


def deidentify_file(source: Path, out_dir: Path, deidentifier: Deidentifier) -> DeidentifiedFile:
    """Read one instance, de-identify it and write ``out_dir/<new SOP Instance UID>.dcm`` (fsync'd).

    The caller makes the folder durable (the export renames a finished folder into place).

    Raises
    ------
    DeidentificationRefused
        See :meth:`Deidentifier.dataset`.
    DicomInputError
        ``source`` is not a readable DICOM file.
    OSError
        Reading or writing failed (e.g. the spool file was purged meanwhile).
    """
    try:
        ds = pydicom.dcmread(source)
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise DicomInputError(f"{Path(source).name}: not a readable DICOM file "
                              f"({type(exc).__name__})") from None
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise DicomInputError(f"{Path(source).name}: no file meta transfer syntax")
    deidentifier.dataset(ds)
    target = Path(out_dir) / f"{ds.SOPInstanceUID}.dcm"
    with target.open("wb") as handle:
        ds.save_as(handle, enforce_file_format=True)
        handle.flush()
        os.fsync(handle.fileno())
    return DeidentifiedFile(path=target, sop_instance_uid=str(ds.SOPInstanceUID),
                            size_bytes=target.stat().st_size, patient_pseudonym=str(ds.PatientID),
                            study_instance_uid=str(ds.StudyInstanceUID))
