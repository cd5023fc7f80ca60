"""Learning from the site: the RIS's final reports in, paired with their series, kept as training data.

::

    listener = FinalReportListener(settings, db)     # settings.learning: bind, port, tls, ...
    host, port = listener.start()                    # MLLP; one ACK per message
    listener.pair_pending(time.time())               # the scheduler, every learning.pair_retry_seconds
    listener.stop()

Flow (docs/learning.md): an ORU^R01 arrives over MLLP -> :class:`FinalReportIntake` reads it; a
final report (OBR-25 in ``learning.accepted_statuses``) with an accession number is stripped of
names (:func:`strip_names`), written to the store's inbox and recorded ``unpaired``, and only then
acknowledged AA. After the ACK, the listener's pairing thread pairs it: the newest reported job
with the same accession (``JobStore.jobs(accession_hash=...)``) names the series; its spool files
are de-identified into a pair folder with ``report.txt`` and the manifest is rewritten. A report
whose series is not there yet stays ``unpaired`` and :meth:`FinalReportIntake.pair_pending` tries
again until ``learning.pair_timeout_hours``.

Acknowledgments (MSA-2 echoes MSH-10; docs/hl7-interface.md):

* ``AA``: kept (also kept-as-unpaired, and a duplicate of a message already kept), or understood
  and deliberately ignored (a result status we do not keep, e.g. P preliminary);
* ``AE``: understood but refused, resending it unchanged would fail again: not an ORU^R01, no
  MSH-10, no OBR, no accession number, a final report without text;
* ``AR``: not an HL7 message (no MSH, undecodable), or we could not keep it now (database or
  disk): send it again later.

Nothing here logs or audits patient data: logs carry the final report's id, its control ID, hashed
UIDs and reasons; the report text lives only in the store's files.
"""

from __future__ import annotations

import contextlib
import ipaddress
import queue
import re
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import pydicom
import pydicom.errors
from prometheus_client import Counter, Gauge

from neuroscribe import audit
from neuroscribe.config import Settings
from neuroscribe.dicom_io.deidentify import (
    PROFILE_OPTIONS,
    DeidentificationRefused,
    Deidentifier,
    load_secret,
    patient_pseudonym,
)
from neuroscribe.errors import DicomInputError, NeuroScribeError, StoreError
from neuroscribe.log import exception_fields, get_logger, hash_uid
from neuroscribe.reporting.hl7 import (
    HL7_VERSION,
    AckCode,
    Delimiters,
    Hl7ParseError,
    OruOptions,
    escape,
    is_control_id,
    parse_oru,
    split_segments,
    unescape,
)
from neuroscribe.reporting.mllp import END_BLOCK, START_BLOCK
from neuroscribe.reporting.site_data import SITE_LOCK, SiteData, secret_path, site_data_dir
from neuroscribe.store import (
    Database,
    FinalReportRow,
    FinalReportState,
    FinalReportStore,
    JobRow,
    JobState,
    JobStore,
    StateStore,
    accession_key,
)
from neuroscribe.store.outbox import sortable_id
from neuroscribe.store.site import SpoolRetentionStore
from neuroscribe.tls import server_context

__all__ = [
    "Answer",
    "DiscardReason",
    "FinalReportIntake",
    "FinalReportListener",
    "PairOutcome",
    "build_ack",
    "message_names",
    "strip_names",
]

LOG = get_logger(__name__)

FINAL_REPORTS = Counter("neuroscribe_final_reports", "Inbound ORU^R01 messages by outcome", ["outcome"])
TRAINING_PAIRS = Counter("neuroscribe_training_pairs", "Training pairs made (final report + series)")
DISCARDED = Counter("neuroscribe_final_reports_discarded", "Final reports given up, by reason", ["reason"])
UNPAIRED = Gauge("neuroscribe_final_reports_unpaired", "Final reports waiting for their series")
CONNECTIONS_REFUSED = Counter("neuroscribe_final_report_connections_refused",
                              "MLLP connections closed before reading, by reason", ["reason"])

#: Seconds a TLS handshake may take.
TLS_HANDSHAKE_SECONDS = 15.0
#: Seconds ``stop()`` waits for the export in progress (an interrupted one is redone after a restart).
STOP_GRACE_SECONDS = 30.0

# --- names out of the report text ----------------------------------------------------------------

#: Fields that hold person names: (segment, field, HL7 data type). Every repetition is read.
#: XPN is Family^Given^Middle..., XCN is ID^Family^Given^Middle..., NDL's first component is a CNN
#: whose subcomponents are ID&Family&Given&Middle.
NAME_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("PID", 5, "XPN"), ("PID", 6, "XPN"), ("PID", 9, "XPN"), ("NK1", 2, "XPN"),
    ("PD1", 4, "XCN"), ("PV1", 7, "XCN"), ("PV1", 8, "XCN"), ("PV1", 9, "XCN"), ("PV1", 17, "XCN"),
    ("PV1", 52, "XCN"), ("ORC", 10, "XCN"), ("ORC", 11, "XCN"), ("ORC", 12, "XCN"),
    ("ORC", 19, "XCN"), ("OBR", 10, "XCN"), ("OBR", 16, "XCN"), ("OBR", 28, "XCN"),
    ("OBR", 32, "NDL"), ("OBR", 33, "NDL"), ("OBR", 34, "NDL"), ("OBR", 35, "NDL"),
    ("OBX", 16, "XCN"),
)
#: Fields that hold identifiers that could be quoted in the text (patient IDs, order numbers).
ID_FIELDS: tuple[tuple[str, int], ...] = (
    ("PID", 2), ("PID", 3), ("PID", 4), ("PID", 18), ("PV1", 19),
    ("ORC", 2), ("ORC", 3), ("OBR", 2), ("OBR", 3), ("OBR", 18), ("OBR", 19), ("OBR", 20),
)
#: Which components (and subcomponents of the first) of each type are name parts (1-based).
_NAME_PARTS = {"XPN": ((1, 1), (2, 0), (3, 0)), "XCN": ((2, 1), (3, 0), (4, 0)),
               "NDL": ((1, 2), (1, 3), (1, 4))}
#: Whole lines that sign or attribute the report ("Dictated by", "Electronically signed", ...).
SIGNATURE_LINES: tuple[re.Pattern[str], ...] = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"^\W*(?:report\s+)?(?:electronically\s+|digitally\s+)?(?:e-?signed|signed|dictated|transcribed"
    r"|verified|approved|finali[sz]ed|authenticated)\b",
    r"^\W*(?:reported|read|reviewed|interpreted|dictated|signed|typed)\s+by\b",
    r"^\W*(?:attending|resident|reading|reporting|interpreting|consultant)?\s*"
    r"(?:radiologist|physician|doctor)s?\s*:",
))
#: A title and the capitalised words after it: "Dr. J. Smith" -> "Dr. [name]".
_TITLED = re.compile(r"\b(Dr|Doctor|Prof|Professor|Mr|Mrs|Ms)(\.?)[ \t]+(?:[A-Z][\w'\u2019-]*\.?[ \t]+){0,2}"
                     r"[A-Z][\w'\u2019-]*")
NAME_MARK = "[name]"
ID_MARK = "[id]"
_MIN_NAME = 2
_MIN_ID = 3


def _field(parts: Sequence[str], index: int) -> str:
    return parts[index] if index < len(parts) else ""


def message_names(er7: str) -> tuple[list[str], list[str]]:
    """The person-name parts and the identifiers of a message (:data:`NAME_FIELDS`, :data:`ID_FIELDS`).

    Raises :class:`Hl7ParseError` if it has no MSH.
    """
    d, segments = split_segments(er7)
    names: set[str] = set()
    identifiers: set[str] = set()
    for segment in segments:
        for name, index, kind in NAME_FIELDS:
            if segment[0] != name:
                continue
            for repetition in _field(segment, index).split(d.repetition):
                components = repetition.split(d.component)
                for component, sub in _NAME_PARTS[kind]:
                    value = _field(components, component - 1)
                    if sub:
                        value = _field(value.split(d.subcomponent), sub - 1)
                    names.add(unescape(value, d).strip())
        for name, index in ID_FIELDS:
            if segment[0] == name:
                for repetition in _field(segment, index).split(d.repetition):
                    value = unescape(_field(repetition.split(d.component), 0), d).strip()
                    identifiers.add(value)
    parts = {p for n in names for p in [n, *re.split(r"[\s\-]+", n)] if _is_name_part(p)}
    return sorted(parts), sorted(i for i in identifiers if len(i) >= _MIN_ID)


def _is_name_part(value: str) -> bool:
    return len(value) >= _MIN_NAME and any(c.isalpha() for c in value)


def strip_names(text: str, names: Iterable[str] = (), identifiers: Iterable[str] = ()) -> str:
    """The report text without names, signatures and identifiers; the clinical text is kept.

    * lines that sign or attribute the report (:data:`SIGNATURE_LINES`) are dropped;
    * a title and the capitalised words after it become ``Dr [name]``;
    * each of ``names`` (parts of the message's person names) becomes ``[name]`` wherever it stands
      as a whole word starting with a capital letter (so "mass" stays when a patient is called Mass,
      but a capitalised "Mass" at the start of a sentence goes: privacy wins);
    * each of ``identifiers`` (patient IDs, accession and order numbers) becomes ``[id]``.

    Names of people neither in the message nor after a title are not recognised
    (docs/learning.md).
    """
    kept = [line for line in text.splitlines() if not any(p.search(line) for p in SIGNATURE_LINES)]
    result = "\n".join(kept).strip("\n")
    result = _TITLED.sub(lambda m: f"{m.group(1)}{m.group(2)} {NAME_MARK}", result)
    for name in sorted({n for n in names if _is_name_part(n)}, key=len, reverse=True):
        pattern = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])", re.IGNORECASE)
        result = pattern.sub(lambda m: NAME_MARK if m.group(0)[0].isupper() else m.group(0), result)
    for identifier in sorted({i for i in identifiers if len(i) >= _MIN_ID}, key=len, reverse=True):
        result = re.sub(rf"(?<![\w]){re.escape(identifier)}(?![\w])", ID_MARK, result, flags=re.IGNORECASE)
    mark = re.escape(NAME_MARK)
    return re.sub(rf"{mark}(?:,?\s*{mark})+", NAME_MARK, result)


# --- acknowledgments -----------------------------------------------------------------------------


class ErrorCode(StrEnum):
    """HL7 table 0357 (message error condition codes) used in our ACKs' ERR-3."""

    SEGMENT_SEQUENCE = "100"
    """Segment sequence error: not an HL7 message, or a required segment is missing."""
    REQUIRED_FIELD_MISSING = "101"
    """A required field (MSH-10, the accession number, the report text) is empty."""
    UNSUPPORTED_MESSAGE_TYPE = "200"
    """Not an ORU."""
    UNSUPPORTED_EVENT = "201"
    """An ORU, but not R01."""
    INTERNAL_ERROR = "207"
    """We could not keep the message now (database or disk); send it again later."""


_ERROR_TEXT = {
    ErrorCode.SEGMENT_SEQUENCE: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_EVENT: "Unsupported event code",
    ErrorCode.INTERNAL_ERROR: "Application internal error",
}
_TOKEN = re.compile(r"^[A-Za-z0-9_]{1,10}$")


@dataclass(frozen=True)
class _Header:
    """What the ACK and the deduplication need from MSH."""

    delimiters: Delimiters
    sender: str  # MSH-3^MSH-4 (namespace IDs): not patient data
    sending_application: str
    sending_facility: str
    message_type: str
    trigger: str
    control_id: str
    processing_id: str


def _header(er7: str) -> _Header:
    d, segments = split_segments(er7)
    msh = segments[0]

    def value(index: int, component: int = 1) -> str:
        raw = _field(msh, index).split(d.repetition)[0]
        return unescape(_field(raw.split(d.component), component - 1), d).strip()

    application, facility = value(3), value(4)
    return _Header(d, f"{application}^{facility}", application, facility, value(9, 1).upper(),
                   value(9, 2).upper(), unescape(_field(msh, 10), d).strip(), value(11))


def build_ack(code: AckCode, control_id: str, *, text: str = "", error: ErrorCode | None = None,
              location: str = "", incoming: _Header | None = None, sending_application: str = "NEUROSCRIBE",
              sending_facility: str = "", now: datetime | None = None) -> str:
    """An ACK (ER7, segments separated by CR): MSA-1 ``code``, MSA-2 ``control_id`` (the message's MSH-10).

    ``text`` (MSA-3) and ``error`` (ERR-3, with ERR-2 ``location`` like ``OBR^1^3``) must be free of
    patient data: they are ours, never quoted from the message.
    """
    now = now or datetime.now(UTC).astimezone()
    trigger = incoming.trigger if incoming is not None and _TOKEN.match(incoming.trigger) else ""
    processing = incoming.processing_id if incoming is not None and incoming.processing_id in "PTD" else "P"
    msh = "|".join([
        "MSH", "^~\\&", escape(sending_application), escape(sending_facility),
        escape(incoming.sending_application) if incoming else "",
        escape(incoming.sending_facility) if incoming else "",
        now.strftime("%Y%m%d%H%M%S%z"), "", f"ACK^{trigger}^ACK" if trigger else "ACK",
        sortable_id("A")[:20], processing or "P", HL7_VERSION,
    ])
    segments = [msh, "|".join(["MSA", code.value, escape(control_id), escape(text)]).rstrip("|")]
    if error is not None:
        segments.append("|".join(["ERR", "", location, f"{error.value}^{_ERROR_TEXT[error]}^HL70357", "E"]))
    return "\r".join(segments) + "\r"


# --- the intake ----------------------------------------------------------------------------------


class DiscardReason(StrEnum):
    """Why a final report was given up (the metric label; the row's ``reason`` adds details)."""

    NO_SERIES = "no_series"
    """No reported series with its accession within ``learning.pair_timeout_hours``."""
    SERIES_PURGED = "series_purged"
    """Retention deleted the series' spool files before the final report came."""
    NO_INSTANCES = "no_instances"
    """The job's series has no stored instances."""
    TOO_LARGE = "too_large"
    """The series alone is larger than ``learning.quota_bytes``."""
    PATIENT_MISMATCH = "patient_mismatch"
    """PID-3 of the report is not the series' PatientID (``learning.check_patient_id``)."""
    DEID_REFUSED = "deid_refused"
    """The series cannot be de-identified safely (burned-in annotation, not CT)."""
    UNREADABLE = "unreadable"
    """A spool file is not readable DICOM."""
    SUPERSEDED = "superseded"
    """A later final report for the same accession replaced it (a correction)."""
    LOST = "lost"
    """Its stored text is gone."""


class PairOutcome(StrEnum):
    """What one pairing attempt did."""

    PAIRED = "paired"
    WAITING = "waiting"
    DISCARDED = "discarded"
    SKIPPED = "skipped"
    """The report was no longer unpaired."""


@dataclass(frozen=True)
class Answer:
    """The intake's verdict on one message: the ACK to send and, if kept, the report to pair."""

    code: AckCode
    ack: str
    #: ``kept``, ``duplicate``, ``ignored``, ``refused`` or ``rejected`` (the metric's outcome).
    outcome: str
    final_report_id: str | None = None


#: Jobs whose series can be paired, the preferred first (a dead job's series is still right).
_PAIRABLE = (JobState.REPORTED, JobState.DELIVERING, JobState.DELIVERED)


class FinalReportIntake:
    """Reads final reports, keeps them, pairs them with their series; thread-safe.

    Raises :class:`~neuroscribe.errors.ConfigError` at construction if the de-identification
    secret cannot be read or created.
    """

    def __init__(self, settings: Settings, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.learning = settings.learning
        self.clock = clock
        self.options = OruOptions(**settings.hl7.oru_options())
        self.site = SiteData(site_data_dir(settings))
        self.secret = load_secret(secret_path(settings))
        self.deidentifier = Deidentifier(self.secret, PROFILE_OPTIONS)
        self.reports = FinalReportStore(db)
        self.jobs = JobStore(db)
        self.state = StateStore(db)
        self.retention = SpoolRetentionStore(db)

    # -- receiving ---------------------------------------------------------------------------

    def receive_bytes(self, data: bytes, peer: str = "") -> tuple[Answer, str]:
        """One MLLP frame's body in; the answer and the codec to encode its ACK with. Never raises."""
        codec = _codec(data)
        try:
            er7 = data.decode(codec)
        except (UnicodeDecodeError, LookupError):
            try:  # MSH is ASCII: read it to echo MSH-10
                header: _Header | None = _header(data.decode("latin-1"))
            except Exception:  # any failure only means no echo
                header = None
            answer = self._reject("the message cannot be decoded in its MSH-18 character set", header, peer)
            return answer, "utf-8"
        return self.receive(er7, peer), codec

    def receive(self, er7: str, peer: str = "") -> Answer:
        """Judge and keep one message; returns the ACK to send. Never raises."""
        try:
            header = _header(er7)
        except Hl7ParseError:
            return self._reject("not an HL7 message (no MSH segment with encoding characters)", None, peer)
        except Exception as exc:  # never crash on input; the message may quote it: not logged
            LOG.error("inbound HL7 header unreadable", **exception_fields(exc))
            return self._reject("not an HL7 message", None, peer)
        try:
            return self._receive(er7, header, peer)
        except (StoreError, OSError) as exc:
            LOG.error("final report not kept: storage failed", error=type(exc).__name__,
                      control_id=_safe_id(header.control_id))
            return self._answer(AckCode.AR, header, "rejected", "could not be stored now; send it again "
                                "later", peer, error=ErrorCode.INTERNAL_ERROR, audit_outcome="failure")
        except Exception as exc:  # the message may quote the input: type and place only
            LOG.error("final report not kept: unexpected error", control_id=_safe_id(header.control_id),
                      **exception_fields(exc))
            return self._answer(AckCode.AR, header, "rejected", "internal error; send it again later",
                                peer, error=ErrorCode.INTERNAL_ERROR, audit_outcome="failure")

    def _receive(self, er7: str, header: _Header, peer: str) -> Answer:
        if header.message_type != "ORU":
            return self._refuse(header, peer, "only ORU^R01 is accepted", ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
                                "MSH^1^9")
        if header.trigger != "R01":
            return self._refuse(header, peer, "only ORU^R01 is accepted", ErrorCode.UNSUPPORTED_EVENT,
                                "MSH^1^9")
        if not header.control_id or len(header.control_id) > 199:
            return self._refuse(header, peer, "MSH-10 (message control ID) is required",
                                ErrorCode.REQUIRED_FIELD_MISSING, "MSH^1^10")
        try:
            report = parse_oru(er7, self.options)
        except Hl7ParseError:
            return self._refuse(header, peer, "the ORU has no OBR segment", ErrorCode.SEGMENT_SEQUENCE, "OBR")
        status = report.result_status.upper()
        if not report.accession:
            field = self.options.accession_fields[0].value.replace("-", "^1^")
            return self._refuse(header, peer, "no accession number in "
                                + ", ".join(f.value for f in self.options.accession_fields),
                                ErrorCode.REQUIRED_FIELD_MISSING, field)
        if status not in self.learning.accepted_statuses:
            return self._answer(AckCode.AA, header, "ignored",
                                f"result status {status or '(empty)'} is not kept", peer, status=status)
        if not report.text.strip():
            return self._refuse(header, peer, "the final report has no text (OBX-5 of TX, FT or ST)",
                                ErrorCode.REQUIRED_FIELD_MISSING, "OBX^1^5")
        known = self.reports.find(header.sender, header.control_id)
        if known is not None:
            return self._answer(AckCode.AA, header, "duplicate", "already kept", peer, status=status,
                                final_report_id=known.final_report_id)
        names, identifiers = message_names(er7)
        text = strip_names(report.text, names, [*identifiers, report.accession])
        final_report_id = sortable_id("fr")
        path = self.site.write_inbox(final_report_id, text + "\n")
        row, created = self.reports.add(
            final_report_id=final_report_id, received_at=self.clock(), sender=header.sender,
            control_id=header.control_id, accession_hash=accession_key(report.accession),
            patient_hash=patient_pseudonym(self.secret, report.patient_id) if report.patient_id else None,
            result_status=status, report_file=str(path),
        )
        if not created:
            self.site.remove(path)
            return self._answer(AckCode.AA, header, "duplicate", "already kept", peer, status=status,
                                final_report_id=row.final_report_id)
        self._update_unpaired()
        return self._answer(AckCode.AA, header, "kept", "kept", peer, status=status,
                            final_report_id=row.final_report_id, pair=True)

    def _refuse(self, header: _Header, peer: str, text: str, error: ErrorCode, location: str) -> Answer:
        return self._answer(AckCode.AE, header, "refused", text, peer, error=error, location=location,
                            audit_outcome="refused")

    def _reject(self, text: str, header: _Header | None, peer: str) -> Answer:
        return self._answer(AckCode.AR, header, "rejected", text, peer, error=ErrorCode.SEGMENT_SEQUENCE,
                            audit_outcome="refused")

    def _answer(self, code: AckCode, header: _Header | None, outcome: str, text: str, peer: str, *,
                error: ErrorCode | None = None, location: str = "", status: str = "",
                final_report_id: str | None = None, pair: bool = False,
                audit_outcome: str = "success") -> Answer:
        control_id = header.control_id if header is not None else ""
        ack = build_ack(code, control_id, text=text, error=error, location=location, incoming=header,
                        sending_application=self.settings.hl7.sending_application,
                        sending_facility=self.settings.hl7.sending_facility)
        FINAL_REPORTS.labels(outcome=outcome).inc()
        fields = {"control_id": _safe_id(control_id), "ack": code.value, "result": outcome,
                  "result_status": status if _TOKEN.match(status) else "",
                  "final_report_id": final_report_id, "peer": peer}
        audit.record("final_report_received", audit_outcome, **fields)
        log = LOG.info if code is AckCode.AA else LOG.warning
        log("final report message", reason=text if code is not AckCode.AA or outcome != "kept" else None,
            **fields)
        return Answer(code, ack, outcome, final_report_id if pair else None)

    # -- pairing -----------------------------------------------------------------------------

    def pair_pending(self, now: float | None = None) -> int:
        """Try every unpaired report, oldest first; returns how many became pairs."""
        now = self.clock() if now is None else now
        made = 0
        for row in self.reports.rows(states=(FinalReportState.UNPAIRED,)):
            try:
                made += self.pair(row.final_report_id, now) is PairOutcome.PAIRED
            except NeuroScribeError:
                LOG.exception("pairing failed; retried later", final_report_id=row.final_report_id)
        self._update_unpaired()
        return made

    def pair(self, final_report_id: str, now: float | None = None) -> PairOutcome:
        """Pair one unpaired report with its series, if it is there; see the module docstring."""
        now = self.clock() if now is None else now
        with SITE_LOCK:
            row = self.reports.get(final_report_id)
            if row is None or row.state is not FinalReportState.UNPAIRED:
                return PairOutcome.SKIPPED
            newer = [r for r in self.reports.rows(states=(FinalReportState.PAIRED,),
                                                  accession_hash=row.accession_hash)
                     if r.received_at > row.received_at]
            if newer:
                return self._discard(row, DiscardReason.SUPERSEDED, "a later final report for the "
                                     "accession is already paired", now)
            job = self._job_for(row.accession_hash)
            outcome = PairOutcome.WAITING if job is None else self._pair_with(row, job, now)
            hours = self.learning.pair_timeout_hours
            if outcome is PairOutcome.WAITING and now - row.received_at >= hours * 3600:
                if job is None:
                    return self._discard(row, DiscardReason.NO_SERIES, "no reported series with its "
                                         f"accession within {hours:g} h", now)
                return self._discard(row, DiscardReason.UNREADABLE, f"its series could not be read within "
                                     f"{hours:g} h", now, job)
            return outcome

    def _pair_with(self, row: FinalReportRow, job: JobRow, now: float) -> PairOutcome:
        series_uid = job.series_instance_uid
        paths = self.state.instance_paths(series_uid)
        if not paths:
            if self.retention.was_purged(series_uid):
                return self._discard(row, DiscardReason.SERIES_PURGED, "retention deleted the series from "
                                     "the spool before its final report came", now, job)
            return self._discard(row, DiscardReason.NO_INSTANCES, "the series has no stored instances",
                                 now, job)
        try:
            size = sum(path.stat().st_size for path in paths)
            if size > self.learning.quota_bytes:
                return self._discard(row, DiscardReason.TOO_LARGE, f"the series ({size} bytes) is larger "
                                     "than learning.quota_bytes", now, job)
            if self.learning.check_patient_id and row.patient_hash is not None:
                first = pydicom.dcmread(paths[0], stop_before_pixels=True, specific_tags=["PatientID"])
                if patient_pseudonym(self.secret, str(first.get("PatientID", "") or "")) != row.patient_hash:
                    return self._discard(row, DiscardReason.PATIENT_MISMATCH, "PID-3 of the report is not "
                                         "the series' PatientID", now, job)
            report = self.site.read_report(row)
            if report is None:
                return self._discard(row, DiscardReason.LOST, "its stored text is gone", now, job)
            exported = self.site.export_pair(row.final_report_id, paths, report, self.deidentifier)
        except DeidentificationRefused as exc:
            return self._discard(row, DiscardReason.DEID_REFUSED, f"de-identification refused: {exc}",
                                 now, job)
        except (DicomInputError, pydicom.errors.InvalidDicomError):
            return self._discard(row, DiscardReason.UNREADABLE, "a spool file is not readable DICOM",
                                 now, job)
        except OSError as exc:  # files purged meanwhile, or the disk: the next retry decides
            LOG.warning("pairing postponed: reading or writing files failed",
                        final_report_id=row.final_report_id, series=hash_uid(series_uid),
                        error=exc.strerror or type(exc).__name__)
            return PairOutcome.WAITING
        if not self.reports.mark_paired(
                row.final_report_id, series_instance_uid=series_uid, job_id=job.job_id,
                pair_dir=str(exported.path), patient_pseudonym=exported.patient_pseudonym,
                instances=exported.instances, size_bytes=exported.size_bytes, now=now):
            self.site.remove(exported.path)
            return PairOutcome.SKIPPED
        self.site.remove(row.report_file)
        for older in self.reports.rows(states=(FinalReportState.PAIRED,), accession_hash=row.accession_hash):
            if older.final_report_id != row.final_report_id:
                self._discard(older, DiscardReason.SUPERSEDED, "replaced by a later final report for the "
                              "accession", now)
        TRAINING_PAIRS.inc()
        audit.record("export_for_training", "success", final_report_id=row.final_report_id,
                     job_id=job.job_id, series=hash_uid(series_uid), instances=exported.instances,
                     bytes=exported.size_bytes, profile=[option.code for option in PROFILE_OPTIONS])
        LOG.info("training pair made", final_report_id=row.final_report_id, job_id=job.job_id,
                 series=hash_uid(series_uid), instances=exported.instances, bytes=exported.size_bytes)
        self.site.write_manifest(self.reports)
        self.site.enforce_quota(self.reports, self.learning.quota_bytes, now, keep=row.final_report_id)
        return PairOutcome.PAIRED

    def _job_for(self, accession_hash: str) -> JobRow | None:
        """The newest job with a report for the accession, preferring ones not dead."""
        found = self.jobs.jobs(accession_hash=accession_hash, states=(*_PAIRABLE, JobState.DEAD))

        def newest(rows: list[JobRow]) -> JobRow | None:
            return max(rows, key=lambda j: (j.reported_at or j.created_at, j.job_id), default=None)

        return newest([j for j in found if j.state in _PAIRABLE]) or newest(found)

    def _discard(self, row: FinalReportRow, reason: DiscardReason, detail: str, now: float,
                 job: JobRow | None = None) -> PairOutcome:
        if not self.reports.mark_discarded(row.final_report_id, f"{reason.value}: {detail}", now,
                                           from_states=(row.state,)):
            return PairOutcome.SKIPPED
        self.site.remove(row.report_file)
        if row.pair_dir:
            self.site.remove(row.pair_dir)
            self.site.write_manifest(self.reports)
        DISCARDED.labels(reason=reason.value).inc()
        if reason in (DiscardReason.DEID_REFUSED, DiscardReason.UNREADABLE, DiscardReason.PATIENT_MISMATCH):
            audit.record("export_for_training", "refused", final_report_id=row.final_report_id,
                         job_id=job.job_id if job else None, reason=reason.value)
        LOG.warning("final report discarded", final_report_id=row.final_report_id, reason=reason.value,
                    detail=detail, job_id=job.job_id if job else None)
        self._update_unpaired()
        return PairOutcome.DISCARDED

    def _update_unpaired(self) -> None:
        UNPAIRED.set(self.reports.counts()[FinalReportState.UNPAIRED])

    def reconcile(self, now: float | None = None) -> dict[str, int]:
        """Repair the store after a crash (see :meth:`SiteData.reconcile`)."""
        fixed = self.site.reconcile(self.reports, self.clock() if now is None else now)
        self.site.update_gauges(self.reports, self.learning.quota_bytes)
        self._update_unpaired()
        return fixed


def _safe_id(control_id: str) -> str:
    """A control ID fit for logs, or a placeholder (a sender could put anything in MSH-10)."""
    return control_id if is_control_id(control_id) else "[not a control id]"


#: MSH-18 values (HL7 table 0211) and their Python codecs; empty or ASCII reads as UTF-8.
_CHARSETS = {"": "utf-8", "ASCII": "utf-8", "UNICODE UTF-8": "utf-8", "UNICODE": "utf-8",
             "8859/1": "latin-1", "8859/2": "iso8859-2", "8859/5": "iso8859-5", "8859/7": "iso8859-7",
             "8859/9": "iso8859-9", "8859/15": "iso8859-15"}


def _codec(data: bytes) -> str:
    """The codec MSH-18 names (read from the ASCII bytes of MSH); UTF-8 when it names none we know."""
    first = data.split(b"\r", 1)[0]
    if len(first) < 4 or not first.startswith(b"MSH"):
        return "utf-8"
    parts = first.split(first[3:4])
    raw = parts[17].split(first[4:5])[0] if len(parts) > 17 else b""
    declared = raw.decode("ascii", "replace").strip().upper()
    return _CHARSETS.get(declared, "utf-8")


# --- the listener --------------------------------------------------------------------------------


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    listener: FinalReportListener


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Connection(socketserver.BaseRequestHandler):
    """One RIS connection: frames in, one ACK per frame, until the peer closes or goes quiet."""

    server: _Server

    def handle(self) -> None:
        listener = self.server.listener
        peer = str(self.client_address[0])
        raw: socket.socket = self.request
        if not listener._admit(peer, raw):
            return
        sock = raw
        try:
            if listener.ssl_context is not None:
                sock.settimeout(TLS_HANDSHAKE_SECONDS)
                try:
                    sock = listener.ssl_context.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    CONNECTIONS_REFUSED.labels(reason="tls").inc()
                    LOG.warning("final report connection: TLS handshake failed", peer=peer,
                                error=type(exc).__name__)
                    return
            listener._serve(sock, peer)
        finally:
            listener._leave(raw)


class FinalReportListener:
    """The MLLP listener for the RIS's final reports (``[learning]``).

    Parameters
    ----------
    settings, db
        The service's settings and state database.
    clock
        POSIX seconds (injected in tests).
    ssl_context
        A server context to use instead of building one from ``learning.tls`` (tests).
    """

    def __init__(self, settings: Settings, db: Database, clock: Callable[[], float] = time.time,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.learning = settings.learning
        self.clock = clock
        self.intake = FinalReportIntake(settings, db, clock)
        if ssl_context is None and self.learning.tls.enabled:
            ssl_context = server_context(self.learning.tls, key="learning.tls")
        self.ssl_context = ssl_context
        self._networks = [ipaddress.ip_network(n, strict=False) for n in self.learning.allowed_networks]
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        # Pairing runs on its own thread, so an ACK never waits for an export.
        self._to_pair: queue.Queue[str | None] = queue.Queue()
        self._pairer: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Repair the store, then listen; returns the bound (address, port)."""
        if self._server is not None:
            raise RuntimeError("the final report listener is already running")
        fixed = self.intake.reconcile()
        self._stopping.clear()
        server_class = _Server6 if ":" in self.learning.bind else _Server
        self._server = server_class((self.learning.bind, self.learning.port), _Connection)
        self._server.listener = self
        host, port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="final-report-listener", daemon=True)
        self._thread.start()
        self._pairer = threading.Thread(target=self._pair_forever, name="final-report-pairing", daemon=True)
        self._pairer.start()
        if not self._networks:
            LOG.warning("final report listener accepts any source address (learning.allowed_networks empty)")
        LOG.info("final report listener started", bind=host, port=port, tls=self.ssl_context is not None,
                 **{k: v for k, v in fixed.items() if v})
        return str(host), int(port)

    def stop(self) -> None:
        """Stop listening and close open connections; idempotent."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for sock in list(self._connections):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)
        self._to_pair.put(None)
        if self._pairer is not None:
            self._pairer.join(STOP_GRACE_SECONDS)
        self._server = self._thread = self._pairer = None
        LOG.info("final report listener stopped")

    def pair_pending(self, now: float | None = None) -> int:
        """Try the unpaired final reports again (the scheduler calls this); returns pairs made."""
        return self.intake.pair_pending(now)

    def __enter__(self) -> FinalReportListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connections -------------------------------------------------------------------------

    def _admit(self, peer: str, sock: socket.socket) -> bool:
        """Count the connection in, or refuse it (source network, connection limit)."""
        reason = None
        if self._networks:
            try:
                address = ipaddress.ip_address(peer)
                allowed = any(address in net for net in self._networks)
            except ValueError:
                allowed = False
            if not allowed:
                reason = "network"
        with self._lock:
            if reason is None and len(self._connections) >= self.learning.max_connections:
                reason = "limit"
            if reason is None:
                self._connections.add(sock)
                return True
        CONNECTIONS_REFUSED.labels(reason=reason).inc()
        LOG.warning("final report connection refused", peer=peer, reason=reason)
        return False

    def _leave(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.discard(sock)

    def _serve(self, sock: socket.socket, peer: str) -> None:
        buffer = bytearray()
        while not self._stopping.is_set():
            body = self._read_frame(sock, buffer, peer)
            if body is None:
                return
            answer, codec = self.intake.receive_bytes(body, peer)
            try:
                sock.sendall(START_BLOCK + answer.ack.encode(codec, errors="replace") + END_BLOCK)
            except OSError:
                LOG.warning("final report ACK not sent: the connection broke", peer=peer)
                return
            if answer.final_report_id is not None:
                self._to_pair.put(answer.final_report_id)

    def _pair_forever(self) -> None:
        """Pair reports just kept, one at a time, until ``stop()``; unpaired ones stay for pair_pending."""
        while (final_report_id := self._to_pair.get()) is not None:
            try:
                self.intake.pair(final_report_id)
            except Exception:  # the report is kept; pair_pending retries
                LOG.exception("pairing failed; retried later", final_report_id=final_report_id)

    def _read_frame(self, sock: socket.socket, buffer: bytearray, peer: str) -> bytes | None:
        """The next frame's body, or None when the connection should close (EOF, idle, too big)."""
        timeout = self.learning.read_timeout_seconds
        limit = self.learning.max_message_bytes
        while True:
            start = buffer.find(START_BLOCK)
            if start < 0:
                buffer.clear()  # bytes outside a frame mean nothing in MLLP
            elif start > 0:
                del buffer[:start]
            end = buffer.find(b"\x1c") if buffer else -1
            if end >= 0:
                body = bytes(buffer[1:end])
                del buffer[:end + 1]
                if buffer[:1] == b"\r":
                    del buffer[:1]
                return body
            if len(buffer) > limit:
                LOG.warning("final report message too large; connection closed", peer=peer, limit=limit)
                return None
            sock.settimeout(timeout)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if buffer:
                    LOG.warning("final report connection idle inside a message; closed", peer=peer)
                return None
            except OSError:
                return None
            if not chunk:
                return None
            buffer += chunk

