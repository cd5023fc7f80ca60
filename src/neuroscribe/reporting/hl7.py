"""HL7 v2.5.1 for the RIS: the ORU^R01 of a draft report, its ACK, inbound ORUs, and HL7 escaping.

Message layout (INTEGRATION.md section 6), every text value escaped by :func:`escape`::

    MSH|^~\\&|<sending app>|<facility>|<receiving app>|<facility>|<now>||ORU^R01^ORU_R01|<control id>|P|2.5.1
    PID|||<PatientID>^^^<issuer>^MR||<Family>^<Given>^<Middle>^<Suffix>^<Prefix>||<birth date>|<sex>
    PV1||<patient class>                                     (left out when patient_class is None)
    ORC|RE|<OBR-2>|<OBR-3>
    OBR|1|..|<accession>|<procedure>|||<study time>|...|<report time>||CT|P
    [NTE|1|L|<DISCLAIMER>]                                   (disclaimer_segment="NTE")
    OBX|1|TX|DISCLAIMER^AI draft disclaimer^L||<DISCLAIMER>||||||P|||<study time>|||<model>|<model id>|<time>
    OBX|n|TX|FINDINGS^Findings^L||<one findings line>||||||P|...
    OBX|n|TX|IMPRESSION^Impression^L||<one impression line>||||||P|...

Every result is preliminary (OBR-25 and OBX-11 ``P``): a radiologist's final report replaces it.
OBX-17 (observation method) names the model and its version, OBX-18 (equipment instance) the
model with its DICOM UID; no person is named as interpreter (OBR-32 stays empty).

hl7apy builds the message (and checks its structure) but cannot be trusted with text: it has no
escape API, leaves ``^`` and ``&`` raw, and re-escapes ``\\.br\\``. So every value is escaped here
first, into ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` sequences that hl7apy passes through unchanged, and the
ER7 it writes is read back with a plain split and compared before :func:`build_oru` returns it.
The message is built at hl7apy's TOLERANT level plus an explicit structural validation: its STRICT
level types OBX-5 (``varies``) as a 199-character string, while TX allows 65536, and would refuse
long report lines.

Patient data stays out of exceptions: messages name fields, never their values, and hl7apy
errors (which quote values) are re-raised without their text or chain.

ACKs (:func:`parse_ack`, :func:`classify_ack`): AA/CA delivered, AE/CE dead (the same message would
fail again), AR/CR retry later, and an MSA-2 that does not echo our MSH-10 retry later. The MSA-3
/ ERR text of an ACK is written by the RIS and can echo patient data: it is kept in
:attr:`Ack.text` (out of ``repr``) for the caller's dead-letter record, and never put into reasons
or logs; reasons carry only the ack code and, when they look like codes, ERR-3 and ERR-2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Literal

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.validation import Validator
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from neuroscribe.errors import NeuroScribeError
from neuroscribe.reporting.draft import DISCLAIMER, DraftReport

__all__ = [
    "DEFAULT_DELIMITERS",
    "HL7_VERSION",
    "ORU_MESSAGE_TYPE",
    "AccessionField",
    "Ack",
    "AckCode",
    "Code",
    "Delimiters",
    "Hl7BuildError",
    "Hl7Error",
    "Hl7ParseError",
    "InboundReport",
    "OruOptions",
    "Outcome",
    "ProcedureSource",
    "build_oru",
    "classify_ack",
    "control_id_of",
    "escape",
    "is_control_id",
    "parse_ack",
    "parse_oru",
    "split_segments",
    "unescape",
]

HL7_VERSION = "2.5.1"
#: MSH-9 of the report, with its message structure (the key hl7apy's MLLPServer routes by).
ORU_MESSAGE_TYPE = "ORU^R01^ORU_R01"

#: MSH-18 (HL7 table 0211) for each charset the MLLP client may encode with; ASCII is MSH-18 empty.
CHARSET_MSH18 = {"utf-8": "UNICODE UTF-8", "iso-8859-1": "8859/1", "ascii": ""}

_CONTROL_ID = re.compile(r"^[\x21-\x7e]{1,20}$")  # MSH-10 is ST(20); no spaces
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")
_TZ = re.compile(r"^[+-]\d{4}$")
_CODE_TOKEN = re.compile(r"^[A-Za-z0-9_.-]{1,20}$")
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Hl7Error(NeuroScribeError):
    """An HL7 message cannot be built or read; the message names fields, never patient data."""


class Hl7BuildError(Hl7Error):
    """The source or report cannot become a valid ORU^R01."""


class Hl7ParseError(Hl7Error):
    """An inbound message (ACK or ORU) cannot be read."""


# --- escaping -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delimiters:
    """The encoding characters of a message (MSH-1 and MSH-2)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @classmethod
    def from_msh(cls, segment: str) -> Delimiters:
        """The delimiters an MSH segment declares; raises :class:`Hl7ParseError` if it declares none."""
        if not segment.startswith("MSH") or len(segment) < 8:
            raise Hl7ParseError("first segment is not an MSH with encoding characters")
        chars = segment[3:8]
        if len(set(chars)) != 5 or any(c.isalnum() or c in "\r\n" for c in chars):
            raise Hl7ParseError("MSH-1/MSH-2 encoding characters are invalid")
        return cls(chars[0], chars[1], chars[2], chars[3], chars[4])

    def escapes(self) -> dict[str, str]:
        """Each delimiter and its escape sequence, the escape character first."""
        e = self.escape
        return {e: f"{e}E{e}", self.field: f"{e}F{e}", self.component: f"{e}S{e}",
                self.subcomponent: f"{e}T{e}", self.repetition: f"{e}R{e}"}


DEFAULT_DELIMITERS = Delimiters()


def escape(text: str, delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Text as an HL7 value: ``| ^ & ~ \\`` become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``.

    Control characters other than TAB (CR and LF would end the segment, VT and FS the MLLP frame)
    become spaces; split multi-line text into one value per line first.
    """
    table = delimiters.escapes()
    text = _CONTROL_CHARS.sub(" ", text)
    return "".join(table.get(char, char) for char in text)


def unescape(text: str, delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
    """The text of an HL7 value: the inverse of :func:`escape`, for values from any sender.

    Also ``\\.br\\`` and ``\\.sp\\`` become newlines, ``\\H\\``/``\\N\\`` (highlighting) vanish and
    ``\\Xhh..\\`` is decoded as UTF-8 (Latin-1 if that fails); other sequences are kept as written.
    """
    e = delimiters.escape
    if e not in text:
        return text
    named = {"F": delimiters.field, "S": delimiters.component, "T": delimiters.subcomponent,
             "R": delimiters.repetition, "E": e, ".br": "\n", ".sp": "\n", "H": "", "N": ""}

    def replace(match: re.Match[str]) -> str:
        body = match.group(1)
        if body in named:
            return named[body]
        if body[:1] == "X" and len(body) % 2 == 1 and re.fullmatch(r"[0-9A-Fa-f]*", body[1:]):
            raw = bytes.fromhex(body[1:])
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw.decode("latin-1")
        return match.group(0)

    pattern = re.escape(e) + "([^" + re.escape(e) + "]{1,64})" + re.escape(e)
    return re.sub(pattern, replace, text)


def _join(*components: str, delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Components escaped and joined into one field; trailing empty components dropped."""
    return delimiters.component.join(escape(c, delimiters) for c in components).rstrip(delimiters.component)


# --- options ------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Model):
    """A coded value (CE/CWE): identifier, text and coding system, e.g. ``19005-8^...^LN``."""

    code: str = Field(min_length=1)
    text: str = ""
    system: str = "L"

    def to_er7(self) -> str:
        """``code^text^system``, escaped."""
        return _join(self.code, self.text, self.system)


class AccessionField(StrEnum):
    """Fields of the ORU that can carry the DICOM AccessionNumber (a site's interface spec says which)."""

    OBR_2 = "OBR-2"
    """Placer order number (ORC-2 is set to the same)."""
    OBR_3 = "OBR-3"
    """Filler order number (ORC-3 is set to the same); where many RIS match a report to its order."""
    OBR_18 = "OBR-18"
    """Placer field 1: the accession number in IHE Scheduled Workflow."""
    OBR_19 = "OBR-19"
    """Placer field 2."""


class ProcedureSource(StrEnum):
    """Where OBR-4 (universal service identifier, required) comes from; each falls back to the next."""

    PROCEDURE_CODE = "procedure_code"
    """ProcedureCodeSequence (0008,1032), then StudyDescription as text, then the default code."""
    STUDY_DESCRIPTION = "study_description"
    """StudyDescription as text only (``^CT HEAD WO``), then the default code."""
    DEFAULT = "default"
    """Always :attr:`OruOptions.default_procedure`."""


#: HL7 table 0004 (patient class): emergency, inpatient, outpatient, preadmit, recurring, obstetrics,
#: commercial account, not applicable, unknown.
PATIENT_CLASSES = frozenset("EIOPRBCNU")


class OruOptions(_Model):
    """What goes where in the ORU: per-site configuration from the RIS's interface specification."""

    sending_application: str = "NEUROSCRIBE"  # MSH-3
    sending_facility: str = ""  # MSH-4
    receiving_application: str = "RIS"  # MSH-5
    receiving_facility: str = ""  # MSH-6
    #: MSH-11: P production, T training, D debugging.
    processing_id: Literal["P", "T", "D"] = "P"
    #: PID-3.4 assigning authority when the instance has no IssuerOfPatientID; empty leaves it out.
    patient_id_issuer: str = ""
    #: PID-3.5 identifier type code (HL7 table 0203).
    patient_id_type: str = "MR"
    #: Fields that carry the AccessionNumber, at least one.
    accession_fields: tuple[AccessionField, ...] = Field(
        (AccessionField.OBR_3, AccessionField.OBR_18), min_length=1
    )
    procedure_source: ProcedureSource = ProcedureSource.PROCEDURE_CODE
    #: OBR-4 when the instance names no procedure.
    default_procedure: Code = Code(code="CTHEAD", text="CT HEAD", system="L")
    #: OBX-3 of findings lines; LOINC sites use ``59776-5^Procedure findings^LN``.
    findings_code: Code = Code(code="FINDINGS", text="Findings", system="L")
    #: OBX-3 of impression lines; LOINC sites use ``19005-8^Radiology Imaging study [Impression]^LN``.
    impression_code: Code = Code(code="IMPRESSION", text="Impression", system="L")
    #: OBX-3 of the disclaimer when it is an OBX.
    disclaimer_code: Code = Code(code="DISCLAIMER", text="AI draft disclaimer", system="L")
    #: The disclaimer as the first OBX, or as an NTE after the OBR (before every OBX).
    disclaimer_segment: Literal["OBX", "NTE"] = "OBX"
    #: PV1-2 (table 0004); None leaves PV1 out. U (unknown): the CT header does not say.
    patient_class: str | None = "U"
    #: OBR-24 diagnostic service section (table 0074).
    diagnostic_section: str = "CT"
    #: When set (e.g. ``110180^Study Instance UID^DCM``), a last OBX (ST) carries StudyInstanceUID.
    study_uid_code: Code | None = None
    #: Charset the MLLP client encodes with; sets MSH-18 (``UNICODE UTF-8`` for utf-8).
    charset: Literal["utf-8", "iso-8859-1", "ascii"] = "utf-8"

    @field_validator("patient_class")
    @classmethod
    def _patient_class(cls, value: str | None) -> str | None:
        if value is not None and value not in PATIENT_CLASSES:
            raise ValueError(f"must be one of {''.join(sorted(PATIENT_CLASSES))} (HL7 table 0004) or None")
        return value

    @field_validator("accession_fields")
    @classmethod
    def _unique(cls, value: tuple[AccessionField, ...]) -> tuple[AccessionField, ...]:
        if len(set(value)) != len(value):
            raise ValueError("lists a field twice")
        return value


# --- building -----------------------------------------------------------------------------------


def _ts(moment: datetime) -> str:
    """HL7 DTM with seconds, and the UTC offset when the datetime is aware."""
    return moment.strftime("%Y%m%d%H%M%S%z")


def _study_ts(source: Dataset) -> str:
    """StudyDate/StudyTime (and TimezoneOffsetFromUTC) as HL7 DTM; empty if there is no valid date."""
    date = str(source.get("StudyDate", "") or "").strip()
    if not _DA.match(date):
        return ""
    match = _TM.match(str(source.get("StudyTime", "") or "").strip())
    if match is None:
        return date
    hours, minutes, seconds, fraction = match.groups()
    value = date + hours + (minutes or "") + (seconds or "")
    if seconds and fraction:
        value += "." + fraction[:4]  # DTM allows four fractional digits
    offset = str(source.get("TimezoneOffsetFromUTC", "") or "").strip()
    return value + offset if _TZ.match(offset) else value


def _text(source: Dataset, keyword: str) -> str:
    value = source.get(keyword)
    return "" if value is None else str(value).strip()


def _xpn(source: Dataset) -> str:
    """DICOM PN (Family^Given^Middle^Prefix^Suffix) as XPN (Family^Given^Middle^Suffix^Prefix).

    The first non-empty component group (alphabetic, then ideographic, phonetic) is used. With no
    name PID-5 (required) is ``^^^^^^U``: name type "unspecified", no invented name.
    """
    value = source.get("PatientName")
    groups = PersonName(value).components if value is not None else ()
    group = next((g for g in groups if g.strip("^ ")), "")
    if not group:
        return "^^^^^^U"
    family, given, middle, prefix, suffix = ([p.strip() for p in group.split("^")] + [""] * 5)[:5]
    return _join(family, given, middle, suffix, prefix)


def _procedure(source: Dataset, options: OruOptions) -> str:
    if options.procedure_source is ProcedureSource.PROCEDURE_CODE:
        for item in source.get("ProcedureCodeSequence", None) or ():
            code = str(item.get("CodeValue", "") or "").strip()
            if code:
                return _join(code, str(item.get("CodeMeaning", "") or "").strip(),
                             str(item.get("CodingSchemeDesignator", "") or "").strip())
    if options.procedure_source is not ProcedureSource.DEFAULT:
        description = _text(source, "StudyDescription")
        if description:
            return _join("", description)
    return options.default_procedure.to_er7()


def _lines(text: str) -> list[str]:
    """Non-blank lines, right-stripped: one OBX each (hl7apy cannot write FT line breaks)."""
    return [line.rstrip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class _Obx:
    code: str  # OBX-3, escaped ER7
    value: str  # OBX-5, plain text
    value_type: str = "TX"


def build_oru(
    report: DraftReport,
    source: Dataset,
    control_id: str,
    options: OruOptions | None = None,
    now: datetime | None = None,
) -> str:
    """The ORU^R01 (ER7, segments separated by CR) carrying a draft report as a preliminary result.

    Parameters
    ----------
    report
        The draft; one OBX per non-blank line of findings, then of impression.
    source
        A CT instance header of the study: PatientID, IssuerOfPatientID, PatientName,
        PatientBirthDate, PatientSex, AccessionNumber, StudyDescription (or ProcedureCodeSequence),
        StudyDate/StudyTime, StudyInstanceUID. Values are text already decoded by pydicom.
    control_id
        MSH-10, 1 to 20 printable ASCII characters; the caller keeps it for retries of this message.
    options
        Site mapping; defaults to :class:`OruOptions` ().
    now
        MSH-7, timezone-aware; report and study times are written in its zone. Defaults to local now.

    Raises
    ------
    ValueError
        ``control_id`` or ``now`` is invalid.
    Hl7BuildError
        PatientID or AccessionNumber is missing, the text cannot be encoded in ``options.charset``,
        or the message fails structural validation.
    """
    options = options or OruOptions()
    if not is_control_id(control_id):
        raise ValueError("control_id must be 1 to 20 printable ASCII characters without HL7 delimiters")
    now = now if now is not None else datetime.now(UTC).astimezone()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")

    patient_id = _text(source, "PatientID")
    if not patient_id:
        raise Hl7BuildError("source has no PatientID: PID-3 is required")
    accession = _text(source, "AccessionNumber")
    if not accession:
        raise Hl7BuildError("source has no AccessionNumber: the RIS matches the report to its order by it")
    issuer = _text(source, "IssuerOfPatientID") or options.patient_id_issuer

    study_time = _study_ts(source)
    report_time = _ts(report.created.astimezone(now.tzinfo))
    model = report.model
    method = _join(model.name, f"{model.name} {model.version}", "L")
    equipment = _join(f"{model.name} {model.version}", model.manufacturer, model.uid, "ISO")

    results: list[_Obx] = []
    if options.disclaimer_segment == "OBX":
        results.append(_Obx(options.disclaimer_code.to_er7(), DISCLAIMER))
    results += [_Obx(options.findings_code.to_er7(), line) for line in _lines(report.findings)]
    results += [_Obx(options.impression_code.to_er7(), line) for line in _lines(report.impression)]
    study_uid = _text(source, "StudyInstanceUID")
    if options.study_uid_code is not None and study_uid:
        results.append(_Obx(options.study_uid_code.to_er7(), study_uid, "ST"))

    accession_er7 = escape(accession)
    order = {f: accession_er7 if f in options.accession_fields else "" for f in AccessionField}
    fields: dict[str, str] = {
        "msh_3": _join(options.sending_application),
        "msh_4": _join(options.sending_facility),
        "msh_5": _join(options.receiving_application),
        "msh_6": _join(options.receiving_facility),
        "msh_7": _ts(now),
        "msh_9": ORU_MESSAGE_TYPE,
        "msh_10": control_id,
        "msh_11": options.processing_id,
        "msh_18": CHARSET_MSH18[options.charset],
        "pid_3": _join(patient_id, "", "", issuer, options.patient_id_type),
        "pid_5": _xpn(source),
        "pid_7": b if _DA.match(b := _text(source, "PatientBirthDate")) else "",
        "pid_8": s if (s := _text(source, "PatientSex").upper()) in {"M", "F", "O"} else "",
        "orc_1": "RE",
        "orc_2": order[AccessionField.OBR_2],
        "orc_3": order[AccessionField.OBR_3],
        "obr_1": "1",
        "obr_2": order[AccessionField.OBR_2],
        "obr_3": order[AccessionField.OBR_3],
        "obr_4": _procedure(source, options),
        "obr_7": study_time,
        "obr_18": order[AccessionField.OBR_18],
        "obr_19": order[AccessionField.OBR_19],
        "obr_22": report_time,
        "obr_24": escape(options.diagnostic_section),
        "obr_25": "P",
    }
    er7 = _assemble(fields, results, options, method, equipment, study_time, report_time)
    _check(er7, results)
    try:
        er7.encode(options.charset)
    except UnicodeEncodeError:
        raise Hl7BuildError(f"the message has characters that {options.charset} cannot encode "
                            "(set OruOptions.charset to utf-8)") from None
    return er7


def _assemble(fields: dict[str, str], results: list[_Obx], options: OruOptions, method: str,
              equipment: str, study_time: str, report_time: str) -> str:
    """Build with hl7apy (values already escaped), validate the structure and return the ER7."""

    def put(segment: object, values: dict[str, str]) -> None:
        for name, value in values.items():
            if value:
                setattr(segment, name, value)

    def pick(prefix: str) -> dict[str, str]:
        return {k: v for k, v in fields.items() if k.startswith(prefix)}

    try:
        message = Message("ORU_R01", version=HL7_VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
        put(message.msh, pick("msh_"))
        result = message.add_group("ORU_R01_PATIENT_RESULT")
        patient = result.add_group("ORU_R01_PATIENT")
        put(patient.pid, pick("pid_"))
        if options.patient_class is not None:
            put(patient.add_group("ORU_R01_VISIT").pv1, {"pv1_1": "1", "pv1_2": options.patient_class})
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        put(order.orc, pick("orc_"))
        put(order.obr, pick("obr_"))
        if options.disclaimer_segment == "NTE":
            put(order.add_segment("NTE"), {"nte_1": "1", "nte_2": "L", "nte_3": escape(DISCLAIMER)})
        for set_id, obx in enumerate(results, start=1):
            put(order.add_group("ORU_R01_OBSERVATION").obx, {
                "obx_1": str(set_id), "obx_2": obx.value_type, "obx_3": obx.code,
                "obx_5": escape(obx.value), "obx_11": "P", "obx_14": study_time,
                "obx_17": method, "obx_18": equipment, "obx_19": report_time,
            })
        Validator.validate(message, reference=message.reference)
        return str(message.to_er7())
    except (HL7apyException, ValueError) as exc:  # their text can quote values: keep only the type
        raise Hl7BuildError(f"hl7apy refused the ORU ({type(exc).__name__})") from None


def _check(er7: str, results: list[_Obx]) -> None:
    """Read the ER7 back with a plain split: every OBX-5 must unescape to the intended text."""
    segments = er7.split("\r")
    values = [unescape(_field(s.split("|"), 5)) for s in segments if s.startswith("OBX|")]
    if values != [r.value for r in results] or any(not s[:3].isalnum() for s in segments):
        raise Hl7BuildError("the ER7 written by hl7apy does not read back as built (escaping)")


# --- reading ------------------------------------------------------------------------------------


def _field(parts: list[str], index: int) -> str:
    return parts[index] if index < len(parts) else ""


def split_segments(er7: str) -> tuple[Delimiters, tuple[tuple[str, ...], ...]]:
    """The message's delimiters and its segments as raw fields; ``fields[n]`` is SEG-n (MSH too).

    Takes CR, LF or CRLF segment ends and strips MLLP framing. Raises :class:`Hl7ParseError`.
    """
    lines = [line for line in re.split(r"\r\n|\r|\n", er7.strip("\x0b\x1c\r\n ")) if line]
    if not lines:
        raise Hl7ParseError("empty message")
    d = Delimiters.from_msh(lines[0])
    segments = []
    for line in lines:
        parts = line.split(d.field)
        if parts[0] == "MSH":
            parts = ["MSH", d.field, *parts[1:]]
        segments.append(tuple(parts))
    return d, tuple(segments)


@dataclass(frozen=True)
class _Er7:
    """A message split into segments of fields; ``fields[n]`` is SEG-n for every segment, MSH too."""

    delimiters: Delimiters
    segments: tuple[tuple[str, ...], ...]

    @classmethod
    def read(cls, er7: str) -> _Er7:
        return cls(*split_segments(er7))

    def all(self, name: str) -> list[tuple[str, ...]]:
        return [s for s in self.segments if s[0] == name]

    def first(self, name: str) -> tuple[str, ...] | None:
        found = self.all(name)
        return found[0] if found else None

    def get(self, segment: tuple[str, ...] | None, index: int, component: int = 0, sub: int = 0) -> str:
        """Field ``index`` (first repetition), optionally one component/subcomponent; unescaped."""
        if segment is None:
            return ""
        d = self.delimiters
        value = _field(list(segment), index)
        if segment[0] != "MSH" or index > 2:
            value = value.split(d.repetition)[0]
        if component:
            value = _field(value.split(d.component), component - 1)
            if sub:
                value = _field(value.split(d.subcomponent), sub - 1)
        return unescape(value, d)


def control_id_of(er7: str) -> str:
    """MSH-10 of a message; raises :class:`Hl7ParseError` if it does not start with an MSH."""
    message = _Er7.read(er7)
    return message.get(message.segments[0], 10)


def is_control_id(value: str) -> bool:
    """Whether ``value`` can be an MSH-10 we write (1-20 printable ASCII, no spaces or delimiters)."""
    return bool(_CONTROL_ID.match(value)) and not any(c in value for c in "|^~\\&")


class AckCode(StrEnum):
    """MSA-1 acknowledgment code (HL7 table 0008); commit codes CA/CE/CR map to these."""

    AA = "AA"
    """Application accept: the RIS has the report."""
    AE = "AE"
    """Application error: the message is wrong; sending it unchanged would fail again."""
    AR = "AR"
    """Application reject: the RIS cannot take it now (or cannot process the type); retry later."""


_ACK_CODES = {"AA": AckCode.AA, "AE": AckCode.AE, "AR": AckCode.AR,
              "CA": AckCode.AA, "CE": AckCode.AE, "CR": AckCode.AR}


class Outcome(Enum):
    """What becomes of an outbound message after one delivery attempt."""

    DELIVERED = "delivered"
    """Accepted (AA/CA): done."""
    DEAD = "dead"
    """Refused for good (AE/CE): dead-letter it and alert; no blind retry."""
    RETRY = "retry"
    """Not delivered for now (AR/CR, timeout, network, bad or mismatched ACK): resend unchanged later."""


@dataclass(frozen=True)
class Ack:
    """A parsed acknowledgment."""

    code: AckCode
    #: MSA-2: the MSH-10 it acknowledges.
    control_id: str
    #: Enhanced-mode commit acknowledgment (CA/CE/CR) rather than an application one.
    commit: bool = False
    #: ERR-3.1 (HL7 table 0357 or the RIS's own), kept only when it looks like a code.
    error_code: str = ""
    #: ERR-2 as ``SEG-n``, kept only when it looks like a location.
    error_location: str = ""
    #: MSA-3, else ERR-8, else ERR-3.2: free text from the RIS that may echo patient data; never log it.
    text: str = field(default="", repr=False)


def parse_ack(er7: str) -> Ack:
    """The :class:`Ack` in an ACK message; raises :class:`Hl7ParseError` without MSH and MSA."""
    message = _Er7.read(er7)
    msa = message.first("MSA")
    if msa is None:
        raise Hl7ParseError("the answer has no MSA segment")
    raw = message.get(msa, 1).strip().upper()
    if raw not in _ACK_CODES:
        raise Hl7ParseError("MSA-1 is not an acknowledgment code")
    err = message.first("ERR")
    code = message.get(err, 3, 1).strip()
    segment, position = message.get(err, 2, 1).strip(), message.get(err, 2, 3).strip()
    location = f"{segment}-{position}" if _SEGMENT_ID.match(segment) and position.isdigit() else ""
    text = message.get(msa, 3) or message.get(err, 8) or message.get(err, 3, 2)
    return Ack(code=_ACK_CODES[raw], control_id=message.get(msa, 2).strip(), commit=raw.startswith("C"),
               error_code=code if _CODE_TOKEN.match(code) else "", error_location=location,
               text=text.strip())


def classify_ack(ack: Ack, control_id: str) -> tuple[Outcome, str]:
    """The outcome of an ACK for the message sent as ``control_id``, and a reason free of patient data."""
    raw = ("C" if ack.commit else "A") + ack.code.value[1]
    if ack.control_id != control_id:
        return Outcome.RETRY, f"{raw} acknowledges another message (MSA-2 does not match MSH-10); retry later"
    if ack.code is AckCode.AA:
        return Outcome.DELIVERED, f"accepted ({raw})"
    details = "".join([f"; error code {ack.error_code}" if ack.error_code else "",
                       f" at {ack.error_location}" if ack.error_location else ""])
    if ack.code is AckCode.AE:
        return Outcome.DEAD, f"application error ({raw}){details}; resending unchanged would fail again"
    return Outcome.RETRY, f"application reject ({raw}){details}; retry later"


@dataclass(frozen=True)
class InboundReport:
    """An inbound ORU^R01 (e.g. the radiologist's final report), reduced to what matching needs."""

    #: MSH-10 of the inbound message (to acknowledge it).
    control_id: str
    #: OBR-25 (table 0123): F final, C corrected, P preliminary, ...
    result_status: str
    accession: str = field(repr=False)
    patient_id: str = field(repr=False)
    #: OBX-5 of every text observation (TX, FT, ST) of the first OBR, one line each.
    text: str = field(repr=False)


_TEXT_TYPES = frozenset({"TX", "FT", "ST"})


def parse_oru(er7: str, options: OruOptions | None = None) -> InboundReport:
    """Read an ORU^R01: accession from ``options.accession_fields`` (first non-empty), the first OBR only.

    Raises :class:`Hl7ParseError` if it is not an ORU^R01 or has no OBR.
    """
    fields = (options or OruOptions()).accession_fields
    message = _Er7.read(er7)
    msh = message.segments[0]
    if (message.get(msh, 9, 1), message.get(msh, 9, 2)) != ("ORU", "R01"):
        raise Hl7ParseError("not an ORU^R01 message")
    obr = message.first("OBR")
    if obr is None:
        raise Hl7ParseError("the ORU has no OBR segment")
    after_obr = message.segments[message.segments.index(obr) + 1:]
    lines: list[str] = []
    for segment in after_obr:
        if segment[0] == "OBR":
            break
        if segment[0] == "OBX" and message.get(segment, 2) in _TEXT_TYPES:
            d = message.delimiters
            raw = _field(list(segment), 5).split(d.repetition)
            lines.extend(unescape(value, d) for value in raw)
    accession = next((v for f in fields if (v := message.get(obr, int(f.value[4:]), 1))), "")
    return InboundReport(
        control_id=message.get(msh, 10),
        result_status=message.get(obr, 25).strip(),
        accession=accession.strip(),
        patient_id=message.get(message.first("PID"), 3, 1).strip(),
        text="\n".join(lines),
    )
