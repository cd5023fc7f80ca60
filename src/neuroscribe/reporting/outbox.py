"""The durable outbox: every made report reaches every PACS and RIS, exactly as it was made.

:meth:`Outbox.enqueue_report` writes the SR (PS3.10 file) and the ORU (ER7 as UTF-8 bytes) under
``<storage.root>/reports/<report id>/`` through :func:`~neuroscribe.durable.atomic_file`, fsyncs the
folder, and only then commits the report row and one pending outbox row per destination, in one
transaction. A crash before the commit leaves at most an unreferenced folder, which
:meth:`Outbox.recover` removes at start-up; a crash after it leaves a report that the next
:meth:`Outbox.deliver_due` sends. The SR SOP Instance UID and the HL7 control ID (MSH-10) are fixed
in those files, so every retry resends byte-identical objects and the PACS and RIS can de-duplicate.

One delivery pass (:meth:`Outbox.deliver_due`) claims the due items and tries each once:

* PACS: C-STORE of the SR (:func:`neuroscribe.dicom_io.scu.store`);
* RIS: the ORU over MLLP (:func:`neuroscribe.reporting.mllp.deliver`).

DELIVERED ends the item; DEAD (a refusal that resending cannot fix, e.g. HL7 AE) makes it a dead
letter with the reason; RETRY schedules the next attempt after :func:`backoff_delay`, unless the item
has been failing for ``outbox.dead_letter_after_seconds`` (or ``outbox.max_attempts`` attempts), when
it becomes a dead letter too. Dead letters wait for an operator: ``neuroscribe outbox retry|drop``.

A destination with ``tls.enabled`` is reached over DICOM TLS or MLLP over TLS with the client
context of :func:`neuroscribe.tls.client_context`, built on first use (:meth:`Outbox.check_tls` builds
them all at once, for start-up). Every delivered item is an audit event ``report_sent``, every dead
letter ``report_dead`` (:mod:`neuroscribe.audit`).

Logs carry item and report IDs, destinations, outcomes and reasons (which the SCU and MLLP client keep
free of patient data), and UIDs only as :func:`~neuroscribe.log.hash_uid`; never report text.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from neuroscribe import audit, failpoints
from neuroscribe.config import OutboxSettings, PacsDestination, RisDestination, Settings
from neuroscribe.dicom_io import scu
from neuroscribe.dicom_io.scu import Outcome, PacsPeer, Timeouts
from neuroscribe.durable import atomic_file, fsync_dir
from neuroscribe.errors import ConfigError, NeuroScribeError
from neuroscribe.log import get_logger, hash_uid
from neuroscribe.reporting import mllp
from neuroscribe.reporting.draft import DraftReport
from neuroscribe.reporting.hl7 import Hl7ParseError, control_id_of, is_control_id
from neuroscribe.reporting.sr import write_sr
from neuroscribe.store import (
    Database,
    Destination,
    DestinationKind,
    OutboxItem,
    OutboxState,
    OutboxStore,
    ReportRecord,
)
from neuroscribe.store.outbox import DEFAULT_CLAIM_LIMIT, sortable_id
from neuroscribe.tls import client_context

__all__ = [
    "AttemptResult",
    "HealthResult",
    "Outbox",
    "SrUids",
    "backoff_delay",
    "new_control_id",
    "new_sr_uids",
    "reports_dir",
]

LOG = get_logger(__name__)

#: Folder under ``storage.root`` that holds one folder per report.
REPORTS_DIR_NAME = "reports"
SR_FILE_NAME = "sr.dcm"
ER7_FILE_NAME = "oru.hl7"
#: The ER7 is stored as these bytes whatever the wire charset; it is re-encoded on sending.
ER7_FILE_ENCODING = "utf-8"
#: Prefixes of generated IDs; each is followed by 16 base32 characters (time-ordered).
CONTROL_ID_PREFIX = "NS"
REPORT_ID_PREFIX = "R"
_REPORT_ID = re.compile(rf"^{REPORT_ID_PREFIX}[A-Z2-7]{{16}}$")
#: A claimed item is offered again after this many destination timeouts plus the margin, should
#: the attempt never be recorded (a crash mid-send). C-STORE waits for connect, association and
#: the response in turn, hence several timeouts.
LEASE_TIMEOUTS = 4
LEASE_MARGIN_SECONDS = 60.0


def new_control_id() -> str:
    """A fresh MSH-10: ``NS`` + 16 base32 characters (18 in all), unique and time-ordered."""
    return sortable_id(CONTROL_ID_PREFIX)


@dataclass(frozen=True)
class SrUids:
    """The UIDs an SR is built with (:func:`neuroscribe.reporting.sr.build_sr`)."""

    sop_instance_uid: str
    series_instance_uid: str


def new_sr_uids() -> SrUids:
    """Fresh SOP Instance and Series Instance UIDs for a new SR (pydicom's ``generate_uid``)."""
    return SrUids(str(generate_uid()), str(generate_uid()))


def reports_dir(settings: Settings) -> Path:
    """Where made reports are kept: ``<storage.root>/reports``."""
    return settings.storage.root / REPORTS_DIR_NAME


def backoff_delay(attempts: int, settings: OutboxSettings, rng: random.Random) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 for the first).

    ``min(ceiling, base * factor ** (attempts - 1))``, times a uniform factor in
    ``[1 - jitter, 1 + jitter]``, and never above the ceiling.
    """
    if attempts < 1:
        raise ValueError(f"attempts = {attempts!r}: the delay follows a failed attempt (>= 1)")
    ceiling = settings.backoff_ceiling_seconds
    try:
        delay = min(ceiling, settings.backoff_base_seconds * settings.backoff_factor ** (attempts - 1))
    except OverflowError:
        delay = ceiling
    return min(ceiling, delay * (1.0 + rng.uniform(-settings.jitter, settings.jitter)))


@dataclass(frozen=True)
class AttemptResult:
    """One delivery attempt of one outbox item, and where it left the item."""

    item_id: str
    report_id: str
    destination: Destination
    #: What the destination made of it.
    outcome: Outcome
    #: Why, free of patient data.
    reason: str
    #: The item's state after the attempt.
    state: OutboxState
    #: Attempts in the current delivery window, this one included.
    attempts: int
    #: When the item is due again (PENDING only).
    next_attempt_at: float | None
    #: False when the item changed meanwhile (dropped by an operator) and the attempt was not recorded.
    recorded: bool = True


@dataclass(frozen=True)
class HealthResult:
    """Whether a destination answers now: C-ECHO for a PACS, a TCP connection for a RIS."""

    destination: Destination
    ok: bool
    reason: str


class Outbox:
    """The durable outbox of one node, over the state database.

    Parameters
    ----------
    settings
        ``pacs``, ``ris``, ``hl7``, ``outbox``, ``dicom.ae_title`` and ``storage.root`` are used.
    db
        The state database (migrated).
    clock
        POSIX seconds now; tests inject one.
    rng
        Source of backoff jitter; tests pass a seeded one.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = OutboxStore(db)
        self.clock = clock
        self.rng = rng or random.Random()
        self.root = reports_dir(settings)
        #: This node's name on the leases it takes (one service per host and database).
        self.node = socket.gethostname()
        self._pacs = {d.name: d for d in settings.pacs}
        self._ris = {d.name: d for d in settings.ris}
        self._tls_contexts: dict[Destination, ssl.SSLContext] = {}

    # -- destinations --------------------------------------------------------------------------

    def destinations(self) -> list[Destination]:
        """Every configured destination: the ``[[pacs]]`` tables, then the ``[[ris]]`` tables."""
        return ([Destination(DestinationKind.PACS, name) for name in self._pacs]
                + [Destination(DestinationKind.RIS, name) for name in self._ris])

    def pacs_peer(self, destination: PacsDestination) -> PacsPeer:
        """The SCU's peer for a ``[[pacs]]`` table (calling AE title defaults to ``dicom.ae_title``).

        Raises ConfigError when its ``tls`` files cannot be used (see :meth:`tls_context`).
        """
        return PacsPeer(
            ae_title=destination.ae_title, host=destination.host, port=destination.port,
            calling_ae_title=destination.calling_ae_title or self.settings.dicom.ae_title,
            ssl_context=self.tls_context(destination),
        )

    def tls_context(self, destination: PacsDestination | RisDestination) -> ssl.SSLContext | None:
        """The destination's client TLS context (built once, then reused); None when TLS is off.

        Raises
        ------
        ConfigError
            A ``tls`` file is missing or unusable; the message names the key (``pacs[0].tls.ca_file``).
        """
        if not destination.tls.enabled:
            return None
        is_pacs = isinstance(destination, PacsDestination)
        key = Destination(DestinationKind.PACS if is_pacs else DestinationKind.RIS, destination.name)
        context = self._tls_contexts.get(key)
        if context is None:
            tables: tuple[PacsDestination | RisDestination, ...] = (
                self.settings.pacs if is_pacs else self.settings.ris)
            index = next(i for i, d in enumerate(tables) if d.name == destination.name)
            context = client_context(destination.tls, key=f"{key.kind.value}[{index}].tls")
            self._tls_contexts[key] = context
        return context

    def check_tls(self) -> None:
        """Build every destination's TLS context now, so that a bad file stops the start (ConfigError)."""
        for destination in (*self.settings.pacs, *self.settings.ris):
            self.tls_context(destination)

    def _ris_encoding(self, destination: RisDestination) -> str:
        return destination.encoding or self.settings.hl7.charset

    # -- enqueue -------------------------------------------------------------------------------

    def enqueue_report(
        self,
        report: DraftReport,
        sr_dataset: Dataset,
        er7: str | None,
        control_id: str | None,
        destinations: Iterable[Destination] | None = None,
        *,
        series_instance_uid: str | None = None,
    ) -> ReportRecord:
        """Keep a made report durably and queue it for each destination; returns its record.

        Parameters
        ----------
        report
            The draft the SR and ORU were built from (model and creation time are recorded).
        sr_dataset
            The SR (:func:`~neuroscribe.reporting.sr.build_sr`); its SOP Instance UID identifies the
            report: enqueueing the same SR again stores nothing new and adds only missing items.
        er7, control_id
            The ORU (:func:`~neuroscribe.reporting.hl7.build_oru`) and its MSH-10; both None when no
            ORU could be made (then no RIS destination is allowed).
        destinations
            Where to send it; None means every configured PACS, and every RIS when there is an ORU.
        series_instance_uid
            The source CT series; None takes the first series of the SR's evidence.

        Raises
        ------
        ValueError
            Missing SR UIDs, an ORU whose MSH-10 is not ``control_id``, or an unknown destination.
        StoreError
            The rows could not be committed; the files written for them are removed again.
        """
        sr_uid, sr_series_uid, study_uid = (
            str(sr_dataset.get(keyword, "") or "")
            for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
        )
        if not (sr_uid and sr_series_uid and study_uid):
            raise ValueError("sr_dataset needs SOPInstanceUID, SeriesInstanceUID and StudyInstanceUID")
        source_series = series_instance_uid or _evidence_series(sr_dataset)
        if (er7 is None) != (control_id is None):
            raise ValueError("er7 and control_id go together: give both or neither")
        if er7 is not None and control_id is not None:
            if not is_control_id(control_id):
                raise ValueError("control_id must be 1 to 20 printable ASCII characters without delimiters")
            try:
                if control_id_of(er7) != control_id:
                    raise ValueError("control_id is not the MSH-10 of er7")
            except Hl7ParseError:
                raise ValueError("er7 is not an HL7 message (no MSH)") from None
        chosen = self._choose(destinations, has_oru=er7 is not None)
        now = self.clock()

        known = self.store.report_by_sr_uid(sr_uid)
        if known is not None:
            self.store.add_report(known, chosen, now)
            LOG.info("report already queued", report_id=known.report_id, sr_uid_hash=hash_uid(sr_uid),
                     destinations=[str(d) for d in chosen])
            return known

        report_id = sortable_id(REPORT_ID_PREFIX)
        folder = self.root / report_id
        try:
            sr_sha256 = _sha256(write_sr(sr_dataset, folder / SR_FILE_NAME).read_bytes())
            er7_sha256 = None
            if er7 is not None:
                data = er7.encode(ER7_FILE_ENCODING)
                with atomic_file(folder / ER7_FILE_NAME, "wb") as handle:
                    handle.write(data)
                er7_sha256 = _sha256(data)
            fsync_dir(self.root)  # the report's folder entry itself
            record = ReportRecord(
                report_id=report_id, study_instance_uid=study_uid, series_instance_uid=source_series,
                sr_sop_instance_uid=sr_uid, sr_series_instance_uid=sr_series_uid, control_id=control_id,
                model_name=report.model.name, model_version=report.model.version,
                created_at=report.created.timestamp(), sr_file=f"{report_id}/{SR_FILE_NAME}",
                sr_sha256=sr_sha256, er7_file=None if er7 is None else f"{report_id}/{ER7_FILE_NAME}",
                er7_sha256=er7_sha256,
            )
            stored, new = self.store.add_report(record, chosen, now)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # no row refers to it
            raise
        if not new:  # queued meanwhile by another caller: its files are the report's
            shutil.rmtree(folder, ignore_errors=True)
        LOG.info("report queued", report_id=stored.report_id, sr_uid_hash=hash_uid(sr_uid),
                 study_uid_hash=hash_uid(study_uid), control_id=control_id,
                 destinations=[str(d) for d in chosen])
        return stored

    def _choose(self, destinations: Iterable[Destination] | None, *, has_oru: bool) -> list[Destination]:
        if destinations is None:
            return [d for d in self.destinations() if has_oru or d.kind is DestinationKind.PACS]
        chosen = list(dict.fromkeys(destinations))
        configured = set(self.destinations())
        for destination in chosen:
            if destination not in configured:
                raise ValueError(f"destination {destination} is not configured ([[pacs]] / [[ris]] name)")
            if destination.kind is DestinationKind.RIS and not has_oru:
                raise ValueError(f"destination {destination} needs an ORU, and er7 is None")
        return chosen

    # -- delivery ------------------------------------------------------------------------------

    def deliver_due(self, now: float | None = None) -> list[AttemptResult]:
        """One pass: try every item due by ``now`` (default: the clock) once; returns the attempts."""
        now = self.clock() if now is None else now
        results = []
        for item in self.store.claim_due(now, self._lease_seconds(), holder=self.node):
            outcome, reason = self._attempt(item)
            failpoints.hit(f"outbox.after_send.{item.destination.kind.value}")
            results.append(self._record(item, outcome, reason, now))
        return results

    def _lease_seconds(self) -> float:
        timeouts = [d.timeout_seconds for d in (*self.settings.pacs, *self.settings.ris)] or [0.0]
        return LEASE_TIMEOUTS * max(timeouts) + LEASE_MARGIN_SECONDS

    def _attempt(self, item: OutboxItem) -> tuple[Outcome, str]:
        """Send the item once; never raises (an unexpected error is a RETRY naming its type)."""
        try:
            report = self.store.report(item.report_id)
            if report is None:  # the foreign key makes this impossible; say so if it happens
                return Outcome.DEAD, f"report {item.report_id} is not in the database"
            name = item.destination.name
            if item.destination.kind is DestinationKind.PACS:
                pacs = self._pacs.get(name)
                if pacs is None:
                    return Outcome.DEAD, f"destination {item.destination} is no longer configured"
                return self._send_sr(report, pacs)
            ris = self._ris.get(name)
            if ris is None:
                return Outcome.DEAD, f"destination {item.destination} is no longer configured"
            return self._send_oru(report, ris)
        except ConfigError as exc:  # TLS files: the message names key and path, no patient data
            LOG.error("outbox attempt failed: configuration", item_id=item.item_id, error=str(exc))
            return Outcome.RETRY, f"configuration: {exc}"
        except NeuroScribeError as exc:
            LOG.warning("outbox attempt failed", item_id=item.item_id, error_type=type(exc).__name__)
            return Outcome.RETRY, f"{type(exc).__name__} before the attempt finished"
        except Exception as exc:  # a bug in one item must not stop the others; no text (may hold PHI)
            LOG.error("outbox attempt failed unexpectedly", item_id=item.item_id,
                      error_type=type(exc).__name__)
            return Outcome.RETRY, f"unexpected {type(exc).__name__}"

    def _read(self, relative: str, sha256: str) -> bytes | str:
        """The stored file's bytes, or why they cannot be sent (missing, or not as made)."""
        try:
            data = (self.root / relative).read_bytes()
        except OSError as exc:
            return f"stored file {relative} cannot be read ({type(exc).__name__})"
        if _sha256(data) != sha256:
            return f"stored file {relative} changed since the report was made (SHA-256 differs)"
        return data

    def _send_sr(self, report: ReportRecord, destination: PacsDestination) -> tuple[Outcome, str]:
        data = self._read(report.sr_file, report.sr_sha256)
        if isinstance(data, str):
            return Outcome.DEAD, data
        try:
            dataset = dcmread(io.BytesIO(data))
        except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
            return Outcome.DEAD, f"stored SR cannot be read ({type(exc).__name__})"
        result = scu.store(self.pacs_peer(destination), [dataset],
                           timeout=Timeouts.of(destination.timeout_seconds))
        return result.outcome, result.reason

    def _send_oru(self, report: ReportRecord, destination: RisDestination) -> tuple[Outcome, str]:
        if report.er7_file is None or report.er7_sha256 is None or report.control_id is None:
            return Outcome.DEAD, "the report has no ORU"
        data = self._read(report.er7_file, report.er7_sha256)
        if isinstance(data, str):
            return Outcome.DEAD, data
        result = mllp.deliver(destination.host, destination.port, data.decode(ER7_FILE_ENCODING),
                              report.control_id, timeout=destination.timeout_seconds,
                              encoding=self._ris_encoding(destination),
                              ssl_context=self.tls_context(destination))
        return Outcome(result.outcome.value), result.reason

    def _record(self, item: OutboxItem, outcome: Outcome, reason: str, now: float) -> AttemptResult:
        """Apply the outcome to the item: delivered, dead letter, or pending with the next time."""
        policy = self.settings.outbox
        attempts = item.attempts + 1
        next_at: float | None = None
        if outcome is Outcome.DELIVERED:
            state = OutboxState.DELIVERED
        elif outcome is Outcome.DEAD:
            state = OutboxState.DEAD
        elif policy.max_attempts and attempts >= policy.max_attempts:
            state, reason = OutboxState.DEAD, f"{reason}; gave up after {attempts} attempts"
        elif now - item.window_started_at >= policy.dead_letter_after_seconds:
            state = OutboxState.DEAD
            reason = (f"{reason}; undelivered {now - item.window_started_at:.0f} s after queueing "
                      f"(dead-letter age {policy.dead_letter_after_seconds:.0f} s)")
        else:
            state = OutboxState.PENDING
            # The last try falls on the dead-letter deadline rather than after it.
            deadline = item.window_started_at + policy.dead_letter_after_seconds
            next_at = min(now + backoff_delay(attempts, policy, self.rng), deadline)
        recorded = self.store.record_attempt(item.item_id, now=now, outcome=outcome.value, reason=reason,
                                             state=state, next_attempt_at=next_at)
        result = AttemptResult(item.item_id, item.report_id, item.destination, outcome, reason, state,
                               attempts, next_at, recorded)
        fields = {"item_id": item.item_id, "report_id": item.report_id, "destination": str(item.destination),
                  "outcome": outcome.value, "state": state.value, "attempts": attempts, "reason": reason,
                  "recorded": recorded}
        if next_at is not None:
            fields["retry_in_seconds"] = round(next_at - now, 1)
        if state is OutboxState.DEAD:
            LOG.error("outbox dead letter", **fields)
        elif state is OutboxState.PENDING:
            LOG.warning("outbox attempt", **fields)
        else:
            LOG.info("outbox attempt", **fields)
        if state is not OutboxState.PENDING:
            self._audit(item, state, attempts, reason)
        return result

    def _audit(self, item: OutboxItem, state: OutboxState, attempts: int, reason: str) -> None:
        """``report_sent`` for a delivered item, ``report_dead`` for a dead letter."""
        try:
            report = self.store.report(item.report_id)
        except NeuroScribeError:
            report = None
        fields = {"destination_kind": item.destination.kind.value, "destination": item.destination.name,
                  "report_id": item.report_id, "item_id": item.item_id, "attempts": attempts,
                  "sr_uid_hash": hash_uid(report.sr_sop_instance_uid) if report is not None else None}
        if state is OutboxState.DELIVERED:
            audit.record("report_sent", "success", **fields)
        else:
            audit.record("report_dead", "failure", reason=reason, **fields)

    # -- service -------------------------------------------------------------------------------

    def recover(self) -> int:
        """At start-up: remove report folders no row refers to (a crash before the commit), and free
        this node's leases (attempts a crash cut short are due again at once).

        Call before delivery starts. Returns how many folders were removed.
        """
        released = self.store.release_leases(self.node, self.clock())
        if released:
            LOG.info("outbox leases released", items=released)
        if not self.root.is_dir():
            return 0
        known = self.store.report_ids()
        removed = 0
        for folder in self.root.iterdir():
            if folder.is_dir() and _REPORT_ID.match(folder.name) and folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        if removed:
            fsync_dir(self.root)
        LOG.info("outbox recovered", orphan_report_folders_removed=removed,
                 **{state.value: n for state, n in self.store.counts().items()})
        return removed

    def run_forever(self, stop_event: threading.Event, wake: threading.Event | None = None) -> None:
        """Deliver due items every ``outbox.poll_seconds`` until ``stop_event`` is set (a thread's body).

        ``wake``, when given and set (a report was just queued), starts the next pass at once.
        Never run it on an association thread: an attempt waits for network timeouts.
        """
        poll = self.settings.outbox.poll_seconds
        while not stop_event.is_set():
            claimed = 0
            try:
                claimed = len(self.deliver_due())
            except NeuroScribeError:
                LOG.exception("outbox pass failed; retrying next poll")
            except Exception:  # keep delivering: one bad pass must not stop the service
                LOG.exception("outbox pass failed unexpectedly; retrying next poll")
            if claimed < DEFAULT_CLAIM_LIMIT:  # a full batch means more may be due now
                if wake is None:
                    stop_event.wait(poll)
                elif wake.wait(poll):
                    wake.clear()

    def start(self, stop_event: threading.Event, wake: threading.Event | None = None) -> threading.Thread:
        """:meth:`run_forever` on a new daemon thread named ``outbox``; returns the started thread."""
        thread = threading.Thread(target=self.run_forever, args=(stop_event, wake), name="outbox",
                                  daemon=True)
        thread.start()
        return thread

    def check_health(self, timeout: float | None = None) -> list[HealthResult]:
        """Each destination now: C-ECHO for a PACS, a TCP connection for a RIS (for ``/readyz``).

        ``timeout`` caps each destination's own ``timeout_seconds``.
        """
        results = []
        for pacs in self.settings.pacs:
            seconds = min(pacs.timeout_seconds, timeout or pacs.timeout_seconds)
            destination = Destination(DestinationKind.PACS, pacs.name)
            try:
                peer = self.pacs_peer(pacs)
            except ConfigError as exc:
                results.append(HealthResult(destination, False, f"configuration: {exc}"))
                continue
            echo = scu.echo(peer, timeout=Timeouts.of(seconds))
            results.append(HealthResult(destination, echo.ok, echo.reason))
        for ris in self.settings.ris:
            seconds = min(ris.timeout_seconds, timeout or ris.timeout_seconds)
            destination = Destination(DestinationKind.RIS, ris.name)
            try:
                context = self.tls_context(ris)
                with socket.create_connection((ris.host, ris.port), timeout=seconds) as sock:
                    if context is not None:  # the handshake proves certificates and host name
                        context.wrap_socket(sock, server_hostname=ris.host).close()
                    results.append(HealthResult(destination, True, "connected"))
            except ConfigError as exc:
                results.append(HealthResult(destination, False, f"configuration: {exc}"))
            except OSError as exc:  # ssl.SSLError included
                why = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
                reason = f"cannot connect to {ris.host}:{ris.port}: {why}"
                results.append(HealthResult(destination, False, reason))
        return results


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _evidence_series(sr: Dataset) -> str:
    """The first referenced series of the SR's evidence (current requested procedure, else other)."""
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(keyword, None) or ():
            for series in study.get("ReferencedSeriesSequence", None) or ():
                uid = str(series.get("SeriesInstanceUID", "") or "")
                if uid:
                    return uid
    raise ValueError("sr_dataset references no evidence series; pass series_instance_uid")
