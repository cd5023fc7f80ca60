"""The Storage SCU: C-ECHO and C-STORE of our reports (DICOM SR) to a PACS, one association per call.

Each instance sent gets a typed :class:`Outcome`, so the caller knows whether to mark it done, try
again later, or move it to ``error/``:

* DELIVERED: Success ``0x0000``; any Warning (``0xBxxx``, ``0x0001``, ``0x0107``, ``0x0116``);
  ``0x0111`` Duplicate SOP Instance (the peer already has it: resends are idempotent, because a
  report's SOP Instance UID never changes its content).
* RETRY: no connection, TLS failure, ACSE/DIMSE timeout, abort, no response; association rejected
  (permanent or transient, any reason: a PACS not yet configured for us is fixed on its side,
  without changing the report); ``0xA7xx`` Out of Resources, ``0x0213`` Resource Limitation,
  ``0x0110`` Processing Failure, ``0x0124`` Not Authorised, ``0x0210`` Duplicate Invocation,
  ``0xFE00`` Cancel.
* DEAD: ``0xA9xx`` Data Set Does Not Match SOP Class, ``0xCxxx`` Cannot Understand, ``0x0122``
  SOP Class Not Supported, any other Failure or unrecognised status; the SOP class (or the
  compressed transfer syntax) not accepted on the association; an input that cannot be read or has
  no SOP Class/Instance UID. Resending the same object would fail the same way.

Orthanc 1.10 answers ``0xA700`` for failed stores, a malformed instance included (no StudyInstanceUID), so
against Orthanc such an object is RETRY until the caller gives up: how long RETRY goes on is the caller's
policy (attempts, age). Reasons name statuses, SOP classes and AE titles only; they never hold
patient data, file paths or exception text from pydicom (which can quote element values).
UIDs are logged only through :func:`~neuroscribe.log.hash_uid`.

pynetdicom logs no names or IDs for C-ECHO/C-STORE even at DEBUG, but at DEBUG it does print raw SOP
Instance UIDs; :func:`neuroscribe.log.configure_logging` (the service's set-up) holds it at WARNING
and switches its identifier logging off.
"""

from __future__ import annotations

import copy
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.status import (
    STATUS_FAILURE,
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from neuroscribe.dicom_io.constants import VERIFICATION_SOP_CLASS
from neuroscribe.log import get_logger, hash_uid

LOG = get_logger(__name__)

#: The SR storage SOP classes our reports use; always proposed, whatever is sent.
SR_STORAGE_SOP_CLASSES: tuple[UID, ...] = (EnhancedSRStorage, ComprehensiveSRStorage, BasicTextSRStorage)
#: Uncompressed transfer syntaxes proposed for every SOP class (pynetdicom converts between them).
UNCOMPRESSED_TRANSFER_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: PS3.8 9.3.2.2: at most 128 presentation contexts in one association request.
MAX_PRESENTATION_CONTEXTS = 128
#: A-ASSOCIATE-RJ results: rejected-permanent and rejected-transient (PS3.8 7.1.1.7).
REJECTED_RESULTS = frozenset({0x01, 0x02})
#: An AE title: 1 to 16 characters of the default repertoire, no backslash or control characters.
MAX_AE_TITLE_LENGTH = 16


class PeerStatus(IntEnum):
    """C-STORE/C-ECHO response statuses an SCU must tell apart (PS3.7 Annex C, PS3.4 B.2.3)."""

    #: Success.
    SUCCESS = 0x0000
    #: Failure: processing failure (generic; treated as transient).
    PROCESSING_FAILURE = 0x0110
    #: Failure: the peer already holds an instance with this SOP Instance UID.
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: Refused: SOP class not supported.
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Refused: not authorised (the peer's configuration for our AE title).
    NOT_AUTHORISED = 0x0124
    #: Failure: duplicate invocation (message ID in use).
    DUPLICATE_INVOCATION = 0x0210
    #: Failure: resource limitation.
    RESOURCE_LIMITATION = 0x0213
    #: Cancel.
    CANCEL = 0xFE00


#: Refused: out of resources (PS3.4 B.2.3), a range.
OUT_OF_RESOURCES = range(0xA700, 0xA800)
#: Error: data set does not match SOP class, a range.
DATASET_DOES_NOT_MATCH_SOP_CLASS = range(0xA900, 0xAA00)
#: Error: cannot understand, a range.
CANNOT_UNDERSTAND = range(0xC000, 0xD000)

#: Failure statuses worth sending again later unchanged.
TRANSIENT_STATUSES: frozenset[int] = frozenset(
    {*OUT_OF_RESOURCES, PeerStatus.PROCESSING_FAILURE, PeerStatus.NOT_AUTHORISED,
     PeerStatus.DUPLICATE_INVOCATION, PeerStatus.RESOURCE_LIMITATION, PeerStatus.CANCEL}
)


class Outcome(StrEnum):
    """What became of one instance (or, for :class:`StoreResult`, of the whole call)."""

    #: The peer holds the instance (success, warning, or it already had it).
    DELIVERED = "delivered"
    #: Not delivered for a reason that may pass (network, association, transient status): resend.
    RETRY = "retry"
    #: Not delivered and resending the same object will fail the same way.
    DEAD = "dead"


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for each step; pynetdicom's defaults would wait a minute or forever."""

    #: TCP connect (a host that drops SYNs would otherwise block for the OS default, minutes).
    connect: float = 10.0
    #: Association request and release answers.
    acse: float = 30.0
    #: Each DIMSE response (C-STORE-RSP, C-ECHO-RSP).
    dimse: float = 60.0
    #: Network idle time before the association is aborted.
    network: float = 60.0

    def __post_init__(self) -> None:
        for name in ("connect", "acse", "dimse", "network"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"Timeouts.{name} = {value!r}: must be a number of seconds > 0")

    @classmethod
    def of(cls, timeout: float | Timeouts) -> Timeouts:
        """``timeout`` itself, or a number of seconds used for every step."""
        return timeout if isinstance(timeout, Timeouts) else cls(timeout, timeout, timeout, timeout)


DEFAULT_TIMEOUTS = Timeouts()


@dataclass(frozen=True)
class PacsPeer:
    """A DICOM peer we send to: its AE title, address, and the AE title we call it with.

    ``ssl_context`` (a client context) switches the association to DICOM TLS; the peer's ``host``
    is the server hostname checked against its certificate when the context checks hostnames.
    """

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "NEUROSCRIBE"
    ssl_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        _check_ae_title("ae_title", self.ae_title)
        _check_ae_title("calling_ae_title", self.calling_ae_title)
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"PacsPeer.host = {self.host!r}: must be a non-empty host name or address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"PacsPeer.port = {self.port!r}: must be an integer in 1..65535")
        if self.ssl_context is not None and not isinstance(self.ssl_context, ssl.SSLContext):
            raise TypeError(f"PacsPeer.ssl_context: expected ssl.SSLContext or None, got "
                            f"{type(self.ssl_context).__name__}")

    def describe(self) -> str:
        """``AE@host:port`` for reasons and logs (no patient data)."""
        return f"{self.ae_title}@{self.host}:{self.port}"


def _check_ae_title(name: str, value: object) -> None:
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > MAX_AE_TITLE_LENGTH
        or "\\" in value
        or any(ord(ch) < 0x20 or ord(ch) > 0x7E for ch in value)
    ):
        raise ValueError(
            f"PacsPeer.{name} = {value!r}: must be 1-{MAX_AE_TITLE_LENGTH} printable ASCII characters, "
            "not all spaces, without backslash"
        )


@dataclass(frozen=True)
class InstanceResult:
    """The outcome for one input of :func:`store`."""

    #: Position in the input sequence.
    index: int
    #: None when the input could not be read.
    sop_instance_uid: str | None
    outcome: Outcome
    #: The C-STORE response status; None when no response came (or nothing was sent).
    status: int | None
    #: Why, in words free of patient data.
    reason: str


@dataclass(frozen=True)
class StoreResult:
    """The outcome of one :func:`store` call, per instance and overall.

    ``outcome`` is the worst of the instances': DEAD if any is DEAD, else RETRY if any is RETRY,
    else DELIVERED (also for an empty input).
    """

    peer: str
    instances: tuple[InstanceResult, ...]

    @property
    def outcome(self) -> Outcome:
        """Worst instance outcome: DEAD, then RETRY, then DELIVERED."""
        outcomes = {r.outcome for r in self.instances}
        for worst in (Outcome.DEAD, Outcome.RETRY):
            if worst in outcomes:
                return worst
        return Outcome.DELIVERED

    @property
    def reason(self) -> str:
        """The distinct reasons of the instances that were not delivered, or ``"delivered"``."""
        reasons = dict.fromkeys(r.reason for r in self.instances if r.outcome is not Outcome.DELIVERED)
        return "; ".join(reasons) or "delivered"

    @property
    def statuses(self) -> tuple[int | None, ...]:
        """C-STORE response statuses in input order."""
        return tuple(r.status for r in self.instances)

    def by_outcome(self, outcome: Outcome) -> tuple[InstanceResult, ...]:
        """The instance results with this outcome."""
        return tuple(r for r in self.instances if r.outcome is outcome)

    def __bool__(self) -> bool:
        return self.outcome is Outcome.DELIVERED


@dataclass(frozen=True)
class EchoResult:
    """The outcome of :func:`echo`; true when the peer answered C-ECHO with Success."""

    ok: bool
    #: The C-ECHO response status; None when there was no response.
    status: int | None
    reason: str
    #: RETRY unless ``ok`` (an echo failure never proves a store would fail permanently).
    outcome: Outcome

    def __bool__(self) -> bool:
        return self.ok


def classify_status(status: int) -> tuple[Outcome, str]:
    """The outcome of a C-STORE response status and a reason naming it (see the module table)."""
    category = code_to_category(status)
    name = _status_name(status)
    if category == STATUS_SUCCESS:
        return Outcome.DELIVERED, "success"
    if category == STATUS_WARNING:
        return Outcome.DELIVERED, f"stored with warning 0x{status:04X} ({name})"
    if status == PeerStatus.DUPLICATE_SOP_INSTANCE:
        return Outcome.DELIVERED, "peer already holds this SOP instance (0x0111)"
    if status in TRANSIENT_STATUSES:
        return Outcome.RETRY, f"transient failure 0x{status:04X} ({name})"
    kind = "failure" if category == STATUS_FAILURE else "unrecognised status"
    return Outcome.DEAD, f"permanent {kind} 0x{status:04X} ({name})"


def _status_name(status: int) -> str:
    if status in OUT_OF_RESOURCES:
        return "Refused: Out of Resources"
    if status in DATASET_DOES_NOT_MATCH_SOP_CLASS:
        return "Data Set Does Not Match SOP Class"
    if status in CANNOT_UNDERSTAND:
        return "Cannot Understand"
    return STORAGE_SERVICE_CLASS_STATUS.get(status, ("", "unknown"))[1] or code_to_category(status)


def echo(peer: PacsPeer, *, timeout: float | Timeouts = DEFAULT_TIMEOUTS) -> EchoResult:
    """C-ECHO the peer on a new association; never raises for network or peer problems."""
    timeouts = Timeouts.of(timeout)
    ae = _make_ae(peer, timeouts)
    ae.add_requested_context(VERIFICATION_SOP_CLASS, list(UNCOMPRESSED_TRANSFER_SYNTAXES))
    assoc = _associate(ae, peer)
    if isinstance(assoc, str) or not assoc.is_established:
        reason, _ = _association_failure(assoc, peer)
        result = EchoResult(ok=False, status=None, reason=reason, outcome=Outcome.RETRY)
    else:
        try:
            response = assoc.send_c_echo()
        except RuntimeError:  # the association ended between establishment and the request
            response = Dataset()
        finally:
            _end(assoc)
        status = int(response.Status) if "Status" in response else None
        if status == PeerStatus.SUCCESS:
            result = EchoResult(ok=True, status=status, reason="success", outcome=Outcome.DELIVERED)
        elif status is None:
            result = EchoResult(ok=False, status=None, outcome=Outcome.RETRY,
                                reason=f"no C-ECHO response from {peer.describe()} (timeout or abort)")
        else:
            result = EchoResult(ok=False, status=status, outcome=Outcome.RETRY,
                                reason=f"C-ECHO answered 0x{status:04X} by {peer.describe()}")
    LOG.info("pacs_echo", peer=peer.describe(), ok=result.ok, status=result.status, reason=result.reason)
    return result


@dataclass
class _Item:
    index: int
    dataset: Dataset
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax: UID


def store(
    peer: PacsPeer,
    datasets_or_paths: Iterable[Dataset | Path | str],
    *,
    timeout: float | Timeouts = DEFAULT_TIMEOUTS,
) -> StoreResult:
    """C-STORE each data set (or DICOM file) to the peer on one new association.

    Proposes the SR storage classes (:data:`SR_STORAGE_SOP_CLASSES`) plus the SOP class of each
    input, each with Explicit and Implicit VR Little Endian (and the input's own transfer syntax if
    compressed). A data set without file meta is sent as Explicit VR Little Endian; the caller's
    objects are not modified. Never raises for network, peer or input problems: see the module
    docstring for how each becomes an :class:`Outcome`.

    Raises ValueError only if the inputs need more than :data:`MAX_PRESENTATION_CONTEXTS` contexts.
    """
    timeouts = Timeouts.of(timeout)
    results: dict[int, InstanceResult] = {}
    items: list[_Item] = []
    for index, obj in enumerate(datasets_or_paths):
        prepared = _prepare(index, obj)
        if isinstance(prepared, InstanceResult):
            results[index] = prepared
        else:
            items.append(prepared)

    if items:
        ae = _make_ae(peer, timeouts)
        for sop_class_uid, transfer_syntaxes in _contexts(items):
            ae.add_requested_context(sop_class_uid, transfer_syntaxes)
        assoc = _associate(ae, peer)
        if isinstance(assoc, str) or not assoc.is_established:
            reason, outcome = _association_failure(assoc, peer)
            for item in items:
                results[item.index] = _result(item, outcome, None, reason)
        else:
            try:
                for item in items:
                    results[item.index] = _send(assoc, item, peer)
            finally:
                _end(assoc)

    result = StoreResult(peer=peer.describe(), instances=tuple(results[i] for i in sorted(results)))
    LOG.info(
        "pacs_store",
        peer=result.peer,
        outcome=str(result.outcome),
        instances=len(result.instances),
        delivered=len(result.by_outcome(Outcome.DELIVERED)),
        retry=len(result.by_outcome(Outcome.RETRY)),
        dead=len(result.by_outcome(Outcome.DEAD)),
        statuses=[None if s is None else f"0x{s:04X}" for s in result.statuses],
        uid_hashes=[hash_uid(r.sop_instance_uid) for r in result.instances if r.sop_instance_uid],
        reason=result.reason,
    )
    return result


def _prepare(index: int, obj: Dataset | Path | str) -> _Item | InstanceResult:
    """Read a path, check the UIDs and make sure there is a transfer syntax to encode with."""
    if isinstance(obj, Dataset):
        ds = obj
    else:
        try:
            ds = dcmread(Path(obj))
        except (OSError, InvalidDicomError, ValueError, TypeError, KeyError, EOFError) as exc:
            # The exception text can hold the path or element values: keep only its type.
            return InstanceResult(index, None, Outcome.DEAD, None,
                                  f"input {index}: cannot read DICOM file ({type(exc).__name__})")
    missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID") if not ds.get(kw)]
    if missing:
        return InstanceResult(index, str(ds.get("SOPInstanceUID", "")) or None, Outcome.DEAD, None,
                              f"input {index}: no {' or '.join(missing)}")
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = UID(str(file_meta.get("TransferSyntaxUID", ""))) if file_meta is not None else UID("")
    if not transfer_syntax:
        ds = copy.copy(ds)  # shares the elements; only the copy gets file meta
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = transfer_syntax = ExplicitVRLittleEndian
    return _Item(index, ds, UID(str(ds.SOPClassUID)), str(ds.SOPInstanceUID), transfer_syntax)


def _contexts(items: list[_Item]) -> list[tuple[UID, list[UID]]]:
    """One uncompressed context per SOP class, plus one per compressed transfer syntax in use."""
    sop_classes = dict.fromkeys([*SR_STORAGE_SOP_CLASSES, *(item.sop_class_uid for item in items)])
    compressed = dict.fromkeys(
        (item.sop_class_uid, item.transfer_syntax) for item in items if item.transfer_syntax.is_compressed
    )
    contexts = [(uid, list(UNCOMPRESSED_TRANSFER_SYNTAXES)) for uid in sop_classes]
    contexts += [(uid, [syntax]) for uid, syntax in compressed]
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(
            f"datasets_or_paths: {len(contexts)} presentation contexts needed, at most "
            f"{MAX_PRESENTATION_CONTEXTS} fit in one association (too many SOP classes/transfer syntaxes)"
        )
    return contexts


def _make_ae(peer: PacsPeer, timeouts: Timeouts) -> AE:
    ae = AE(ae_title=peer.calling_ae_title)
    ae.connection_timeout = timeouts.connect
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    return ae


def _associate(ae: AE, peer: PacsPeer) -> Association | str:
    """The association (maybe not established), or why none could even be tried (name lookup)."""
    tls_args = None if peer.ssl_context is None else (peer.ssl_context, peer.host)
    try:
        return ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    except OSError as exc:  # getaddrinfo runs before pynetdicom's own connection error handling
        return f"no association with {peer.describe()}: {type(exc).__name__} ({exc.strerror})"


def _association_failure(assoc: Association | str, peer: PacsPeer) -> tuple[str, Outcome]:
    """Why the association was not established, and what that means for the instances."""
    if isinstance(assoc, str):
        return assoc, Outcome.RETRY
    where = peer.describe()
    rejection = assoc.acceptor.primitive if assoc.is_rejected else _queued_rejection(assoc)
    if rejection is not None:
        detail = f"{rejection.result_str}, {rejection.source_str}: {rejection.reason_str}"
        return f"association rejected by {where} ({detail})", Outcome.RETRY
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        return f"{where} accepted none of the proposed SOP classes", Outcome.DEAD
    if assoc.acceptor.primitive is None:
        failed = "connection or TLS handshake failed" if peer.ssl_context else "connection failed"
        return f"no association with {where}: {failed} or no answer in time", Outcome.RETRY
    return f"association with {where} aborted", Outcome.RETRY


def _queued_rejection(assoc: Association) -> A_ASSOCIATE | None:
    """An A-ASSOCIATE-RJ that pynetdicom received but did not read.

    pynetdicom 3.0 race: a peer that rejects within microseconds (loopback) has its RJ queued and the
    socket closed before the requestor checks the socket, so pynetdicom reports "failed to connect"
    and aborts (about 1 in 50 on loopback against Orthanc). The RJ is queued before the socket closes.
    """
    queue = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    for primitive in list(getattr(queue, "queue", ())):
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in REJECTED_RESULTS:
            return primitive
    return None


def _send(assoc: Association, item: _Item, peer: PacsPeer) -> InstanceResult:
    if not assoc.is_established:
        return _result(item, Outcome.RETRY, None, f"association with {peer.describe()} ended before sending")
    if not any(cx.abstract_syntax == item.sop_class_uid for cx in assoc.accepted_contexts):
        return _result(item, Outcome.DEAD, None,
                       f"SOP class {item.sop_class_uid.name} not accepted by {peer.describe()}")
    try:
        response = assoc.send_c_store(item.dataset)
    except ValueError as exc:  # no context for a compressed syntax, or the data set cannot be encoded
        reason = "cannot be encoded" if "encode" in str(exc) else "transfer syntax not accepted"
        return _result(item, Outcome.DEAD, None, f"{item.sop_class_uid.name}: {reason}")
    except AttributeError:  # the data set's encoding contradicts its file meta transfer syntax
        reason = "encoding differs from the file meta transfer syntax"
        return _result(item, Outcome.DEAD, None, f"{item.sop_class_uid.name}: {reason}")
    except RuntimeError:  # the association ended under us
        return _result(item, Outcome.RETRY, None, f"association with {peer.describe()} ended while sending")
    if "Status" not in response:
        return _result(item, Outcome.RETRY, None,
                       f"no C-STORE response from {peer.describe()} (timeout or abort)")
    status = int(response.Status)
    outcome, reason = classify_status(status)
    return _result(item, outcome, status, reason)


def _result(item: _Item, outcome: Outcome, status: int | None, reason: str) -> InstanceResult:
    return InstanceResult(item.index, item.sop_instance_uid, outcome, status, reason)


def _end(assoc: Association) -> None:
    """Release politely; abort if the release itself fails."""
    if assoc.is_established:
        assoc.release()
    if assoc.is_established:
        assoc.abort()
