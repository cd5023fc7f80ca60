"""The Storage SCP: C-ECHO and C-STORE over pynetdicom, durable before it says success.

Handlers are thin (STYLE.md habit 7): stream to ``incoming/`` (pynetdicom's chunked receive),
check the header, fsync and rename into the spool, commit the state row, answer a named status.
They never raise and never decode pixel data; everything heavier happens in other processes.

With ``[dicom.tls]`` the port speaks TLS only (:func:`neuroscribe.tls.server_context`); each
connection shakes hands on its own thread, after the address allow-list. Accepted and refused
associations and each association's receptions are audit events (:mod:`neuroscribe.audit`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import queue
import re
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.filewriter import write_file_meta_info as pydicom_write_file_meta_info
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    evt,
)
from pynetdicom import _config as pynetdicom_config
from pynetdicom import dimse_messages as pynetdicom_dimse_messages
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta as pynetdicom_create_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from neuroscribe import audit
from neuroscribe.config import DicomSettings
from neuroscribe.dicom_io.constants import (
    ACCEPTED_TRANSFER_SYNTAXES,
    CT_SOP_CLASSES,
    VERIFICATION_SOP_CLASS,
    StoreStatus,
)
from neuroscribe.dicom_io.inspect import ReceivedHeader, Refusal, inspect_received
from neuroscribe.dicom_io.spool import Spool
from neuroscribe.errors import StoreError
from neuroscribe.log import get_logger, hash_uid
from neuroscribe.store import InstanceRecord, StateStore
from neuroscribe.tls import server_context

LOG = get_logger(__name__)

Clock = Callable[[], float]

_RECV_CHUNK = 1024 * 1024
#: pynetdicom's DUL and association threads poll every 1 ms, so each C-STORE waited ~0.5 ms on
#: average three times (request decoded -> handler, response queued -> sent, response sent -> next
#: request read), and an idle association cost ~8% of a core. Here both threads block until there
#: is work, but still wake this often to check their timers and flags as pynetdicom's loops do.
_DUL_WAIT_SECONDS = 0.1
_REACTOR_WAIT_SECONDS = 0.1
#: The DUL's sleep between loops once its socket is closed (pynetdicom's own delay).
_DUL_IDLE_SECONDS = 0.001

#: ``reason`` of a refused ``association`` audit event, for refusals before any DICOM is read.
REFUSED_ADDRESS = "address not allowed"
REFUSED_TLS = "TLS handshake failed"
#: ``reason`` by A-ASSOCIATE-RJ (source, diagnostic) (PS3.8 9.3.4); others read "rejected".
REJECT_REASONS: dict[tuple[int, int], str] = {
    (0x01, 0x03): "calling AE not allowed",
    (0x01, 0x07): "called AE title not ours",
    (0x02, 0x01): "user identity not accepted",
    (0x03, 0x02): "too many associations",
}


@dataclass
class ReceiveCounters:
    """Running totals of this SCP (thread-safe increments), kept for the service's metrics endpoint."""

    associations: int = 0
    instances: int = 0
    duplicates: int = 0
    bytes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        """Add to the named totals."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def fail(self, reason: str) -> None:
        """Count a refused C-STORE by reason."""
        with self._lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1


class _BulkReadSocket(AssociationSocket):
    """pynetdicom's socket, reading a PDU with few large ``recv_into`` calls and waiting in ``ready``.

    * ``recv``: pynetdicom loops over 4 KiB reads; a 512 KiB CT slice cost ~130 Python-level
      calls. Behaviour is unchanged.
    * ``ready``: pynetdicom's DUL loop asks ``ready`` (a zero-timeout ``select``) and sleeps 1 ms
      when idle. Here ``ready`` blocks in ``select`` until the peer sends, :meth:`wake` is called
      (a primitive was queued for sending, see :class:`_WakingDUL`), or ``_DUL_WAIT_SECONDS``
      pass. The answer is the same as pynetdicom's, only sooner.
    """

    def setup_wakeup(self) -> None:
        """Create the wake-up pair; called once, before the association's threads start."""
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)

    @property
    def can_wait(self) -> bool:
        """True while ``ready`` blocks (an open connection), so the DUL need not sleep."""
        return self.socket is not None and self._is_connected is not False

    def wake(self) -> None:
        """Make a waiting ``ready`` return now (thread-safe; a closed pair is ignored)."""
        with contextlib.suppress(OSError):  # full (already woken) or closed (association over)
            self._wake_writer.send(b"\0")

    @property
    def ready(self) -> bool:
        """True when data can be read; waits up to ``_DUL_WAIT_SECONDS`` for data or a wake-up."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # TLS-buffered bytes (pynetdicom #528)
            return True
        # Never wait while the DUL has events of its own queued (Evt5 at start, ARTIM expiry):
        # its loop asks ready() before it handles them.
        wait = 0.0 if self.event_queue.qsize() else _DUL_WAIT_SECONDS
        try:
            readable, _, _ = select.select([sock, self._wake_reader], [], [], wait)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport closed, as in pynetdicom's ready
            return False
        if self._wake_reader in readable:
            with contextlib.suppress(OSError):
                self._wake_reader.recv(4096)
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        while nr_read < nr_bytes:
            got = self.socket.recv_into(view[nr_read:], min(nr_bytes - nr_read, _RECV_CHUNK))
            if not got:  # connection closed: return what arrived, as pynetdicom does
                return buffer[:nr_read]
            nr_read += got
        return buffer

    def close(self) -> None:
        super().close()
        self.close_wakeup()

    def close_wakeup(self) -> None:
        """Close the wake-up pair (idempotent); the DUL thread does it when it ends."""
        for end in (self._wake_reader, self._wake_writer):
            end.close()


class _WakingDUL(DULServiceProvider):
    """pynetdicom's DUL, woken when a primitive is queued instead of polling for it."""

    @property  # type: ignore[override]
    def _run_loop_delay(self) -> float:
        """No sleep between loops while ``ready`` waits; pynetdicom's 1 ms once the socket closed."""
        sock = self.socket
        return 0.0 if isinstance(sock, _BulkReadSocket) and sock.can_wait else _DUL_IDLE_SECONDS

    @_run_loop_delay.setter
    def _run_loop_delay(self, _value: float) -> None:
        pass  # pynetdicom sets its 1 ms default in __init__ (before the class swap)

    def run_reactor(self) -> None:
        """pynetdicom's loop; on the way out (release, abort, timeout) free the wake-up pair."""
        try:
            super().run_reactor()
        finally:
            if isinstance(self.socket, _BulkReadSocket):
                self.socket.close_wakeup()

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wake(self) -> None:
        if isinstance(self.socket, _BulkReadSocket):
            self.socket.wake()


class _SignallingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that sets ``event`` on every put, so one thread can wait for several queues."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self._event = event

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._event.set()


class _StoreDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider: waits for the next message, encodes C-STORE-RSP directly."""

    def setup_activity(self) -> None:
        """Signal one event for decoded messages and for A-RELEASE/A-ABORT from the peer."""
        self._activity = threading.Event()
        self.msg_queue = _SignallingQueue(self._activity)
        self.dul.to_user_queue = _SignallingQueue(self._activity)

    def get_msg(self, block: bool = False) -> Any:
        """The association reactor polls this (non-blocking) every 1 ms; wait for activity instead.

        Returns a message as soon as one is decoded, or ``(None, None)`` (nothing) as soon as
        the peer asks to release or abort, so the reactor answers that at once too.
        """
        if block:
            return super().get_msg(block=True)
        self._activity.clear()  # then look at both queues, so no put between is missed
        if self.msg_queue.empty() and self.dul.to_user_queue.empty():
            self._activity.wait(_REACTOR_WAIT_SECONDS)
        with contextlib.suppress(queue.Empty):
            return self.msg_queue.get_nowait()
        return None, None

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a plain C-STORE-RSP without pydicom (~1 ms a response); anything else as before."""
        encoded = None
        if isinstance(primitive, C_STORE) and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            encoded = _encode_store_response(primitive)
        max_pdu = self.maximum_pdu_size
        if encoded is None or (max_pdu and len(encoded) > max_pdu - 6):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
        self.dul.send_pdu(pdata)


def _implicit_element(element: int, value: bytes) -> bytes:
    """One command-group (0000) element, implicit VR little endian (PS3.7 6.3.1)."""
    return struct.pack("<HHL", 0, element, len(value)) + value


def _encode_store_response(rsp: C_STORE) -> bytes | None:
    """The C-STORE-RSP command set pynetdicom would encode, or None if not a plain one.

    Plain: a response (MessageIDBeingRespondedTo set) with a status, both UIDs and no
    OffendingElement or ErrorComment. The bytes must equal pynetdicom's ``encode_msg`` output
    (compare them in a test when pynetdicom is upgraded).
    """
    message_id, status = rsp.MessageIDBeingRespondedTo, rsp.Status
    sop_class, sop_instance = rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID
    if (
        not isinstance(message_id, int) or not 0 <= message_id <= 0xFFFF
        or not isinstance(status, int) or not 0 <= status <= 0xFFFF
        or rsp.OffendingElement is not None or rsp.ErrorComment is not None
        or not all(isinstance(u, str) and len(u) <= 64 and _PLAIN_UID.fullmatch(u)
                   for u in (sop_class, sop_instance))
    ):
        return None
    body = b"".join((
        _implicit_element(0x0002, sop_class.encode("ascii") + b"\x00" * (len(sop_class) % 2)),
        _implicit_element(0x0100, struct.pack("<H", 0x8001)),  # CommandField: C-STORE-RSP
        _implicit_element(0x0120, struct.pack("<H", message_id)),
        _implicit_element(0x0800, struct.pack("<H", 0x0101)),  # CommandDataSetType: no data set
        _implicit_element(0x0900, struct.pack("<H", status)),
        _implicit_element(0x1000, sop_instance.encode("ascii") + b"\x00" * (len(sop_instance) % 2)),
    ))
    return _implicit_element(0x0000, struct.pack("<L", len(body))) + body


class _EncodedFileMeta(bytes):
    """A File Meta Information group already encoded (explicit VR little endian)."""


_PLAIN_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, explicit VR little endian (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 2, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def _create_file_meta(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, **other: Any
) -> Any:
    """pynetdicom's ``create_file_meta`` for chunked C-STORE files, encoded directly.

    pynetdicom builds a pydicom ``FileMetaDataset`` and writes it with ``write_file_meta_info``
    on the DUL thread for every received instance (~0.4 ms, ~4% of a CT slice's receive time).
    The bytes must equal pydicom's (compare them in a test when pydicom or pynetdicom is
    upgraded); anything but three plain UIDs goes the original way, so pydicom still validates
    and raises as before.
    """
    uids = (sop_class_uid, sop_instance_uid, transfer_syntax)
    if other or not all(isinstance(u, str) and len(u) <= 64 and _PLAIN_UID.fullmatch(u) for u in uids):
        return pynetdicom_create_file_meta(
            sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,  # type: ignore[arg-type]
            transfer_syntax=transfer_syntax, **other,  # type: ignore[arg-type]
        )
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        *(
            _meta_element(element, b"UI", uid.encode("ascii") + b"\x00" * (len(uid) % 2))
            for element, uid in (
                (0x0002, sop_class_uid), (0x0003, sop_instance_uid), (0x0010, transfer_syntax),
                (0x0012, str(PYNETDICOM_IMPLEMENTATION_UID)),
            )
        ),
        _meta_element(0x0013, b"SH", version + b" " * (len(version) % 2)),
    ))
    return _EncodedFileMeta(_meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body)


def _write_file_meta_info(fp: BinaryIO, file_meta: Any, enforce_standard: bool = True) -> None:
    """Writes what :func:`_create_file_meta` encoded; anything else via pydicom."""
    if isinstance(file_meta, _EncodedFileMeta):
        fp.write(file_meta)
    else:
        pydicom_write_file_meta_info(fp, file_meta, enforce_standard)


class _RequestHandler(RequestHandler):
    """pynetdicom's request handler; swaps in the subclasses above before the threads start.

    Each swap keeps the object and its state and only changes the methods named in the
    subclass docstrings. Written against pynetdicom 3.0; a test should check that they still
    take effect and that released, aborted and idle-timed-out associations end promptly.
    """

    def handle(self) -> None:
        """TLS handshake first (when the server has a context), on this connection's own thread."""
        context = self.server.ssl_context
        if context is not None:
            tls_socket = _handshake(context, self.request, self.client_address[0],
                                    self.server.ae.acse_timeout)
            if tls_socket is None:
                return
            self.request = tls_socket
        super().handle()

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = _BulkReadSocket
        assoc.dul.socket.setup_wakeup()
        assoc.dul.__class__ = _WakingDUL
        # The DUL thread's target was bound to pynetdicom's run_reactor in __init__; rebind it so
        # _WakingDUL.run_reactor runs (and frees the wake-up pair when the association ends).
        assoc.dul._target = make_target(assoc.dul.run_reactor)
        assoc.dimse.__class__ = _StoreDIMSE
        assoc.dimse.setup_activity()
        return assoc


def _handshake(
    context: ssl.SSLContext, sock: socket.socket, peer: str, timeout: float | None
) -> ssl.SSLSocket | None:
    """The server side of the TLS handshake, or None (logged, audited, socket closed) if it failed.

    pynetdicom would shake hands in ``get_request``, on the thread that accepts every connection
    and without a timeout, so one silent client would stall all others; here each connection's own
    thread does it within ``timeout``. The reason (no certificate, unknown CA, protocol) is logged;
    the audit trail names the peer address only.
    """
    try:
        sock.settimeout(timeout)
        tls_socket = context.wrap_socket(sock, server_side=True)
        tls_socket.settimeout(None)  # blocking again, as pynetdicom's plain sockets are
    except (ssl.SSLError, OSError) as exc:  # TimeoutError and resets included
        detail = getattr(exc, "reason", None) or type(exc).__name__
        LOG.warning("connection refused: TLS handshake failed", peer=peer, detail=str(detail))
        audit.record("association", "refused", reason=REFUSED_TLS, peer=peer)
        with contextlib.suppress(OSError):
            sock.close()
        return None
    return tls_socket


class _AllowListServer(ThreadedAssociationServer):
    """Closes connections from addresses outside the allow-list before any DICOM (or TLS) is read."""

    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only; the TLS handshake happens on the connection's thread (:func:`_handshake`)."""
        return self.socket.accept()  # type: ignore[union-attr]

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_networks:
            return True
        address = ipaddress.ip_address(client_address[0])
        if any(address in net for net in self.allowed_networks):
            return True
        LOG.warning("connection refused: address not in dicom.allowed_networks", peer=client_address[0])
        audit.record("association", "refused", reason=REFUSED_ADDRESS, peer=client_address[0])
        return False

    def shutdown(self) -> None:
        """Stop serving and close the socket (pynetdicom's version expects ``ae.start_server``)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class StorageSCP:
    """NeuroScribe's Storage SCP.

    Parameters
    ----------
    settings
        The ``[dicom]`` settings (AE title, address, allow-lists, limits).
    store
        Where each received instance is recorded.
    spool
        Where each received instance is kept.
    min_free_bytes
        C-STORE answers 0xA700 while free disk is below this.
    clock
        POSIX seconds; injected for tests.
    """

    def __init__(
        self,
        settings: DicomSettings,
        store: StateStore,
        spool: Spool,
        min_free_bytes: int,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        self.counters = ReceiveCounters()
        self._server: _AllowListServer | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings
        # Stream each data set to a file in incoming/ instead of holding it in memory.
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom creates that file with tempfile.NamedTemporaryFile in the system temp folder;
        # point it at incoming/ so the rename into the spool stays on one filesystem (and off a
        # systemd PrivateTmp). tests/test_scp.py checks this hook still takes effect.
        pynetdicom_dimse_messages.NamedTemporaryFile = self.spool.temp_file_factory()  # type: ignore[attr-defined]
        # ... and have it write the file meta of that file without building a pydicom data set.
        pynetdicom_dimse_messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined]
        pynetdicom_dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[attr-defined]
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.acse_timeout_seconds
        ae.dimse_timeout = s.dimse_timeout_seconds
        ae.network_timeout = s.network_timeout_seconds
        ae.maximum_pdu_size = s.max_pdu_size
        ae.require_called_aet = s.require_called_ae
        ae.require_calling_aet = list(s.allowed_calling_aes)
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for sop_class in sorted(CT_SOP_CLASSES):
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        if s.accept_other_storage:
            for context in AllStoragePresentationContexts:
                if context.abstract_syntax not in CT_SOP_CLASSES:
                    ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Listen in a background thread; return the bound (address, port)."""
        s = self.settings
        if not s.allowed_calling_aes:
            LOG.warning("dicom.allowed_calling_aes is empty: any calling AE title may store")
        if not s.allowed_networks:
            LOG.warning("dicom.allowed_networks is empty: any source address may connect")
        context = server_context(s.tls, key="dicom.tls") if s.tls.enabled else None
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed, ["released"]),
            (evt.EVT_ABORTED, self._on_closed, ["aborted"]),
        ]
        server = self.ae.make_server(
            (s.bind, s.port), evt_handlers=handlers, server_class=_AllowListServer,
            request_handler=_RequestHandler, ssl_context=context,
        )
        server.allowed_networks = tuple(
            ipaddress.ip_network(net, strict=False) for net in s.allowed_networks
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="dicom-scp", daemon=True
        )
        self._thread.start()
        address = server.server_address
        LOG.info("storage scp listening", ae_title=s.ae_title, bind=address[0], port=address[1],
                 max_associations=s.max_associations, tls=s.tls.enabled,
                 peer_cert_required=s.tls.enabled and s.tls.require_peer_cert)
        return address[0], address[1]

    def stop(self) -> None:
        """Stop accepting associations, then wait for the open ones to end."""
        if self._server is None:
            return
        self._server.shutdown()
        for assoc in list(self._server.active_associations):
            assoc.join(timeout=self.settings.dimse_timeout_seconds)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        LOG.info("storage scp stopped")

    @property
    def active_associations(self) -> int:
        """Associations open right now."""
        return len(self._server.active_associations) if self._server else 0

    # -- handlers (never raise) ------------------------------------------------------------

    def _on_established(self, event: evt.Event) -> None:
        self.counters.add(associations=1)
        requestor = event.assoc.requestor
        event.assoc.neuroscribe_stats = {"stored": 0, "failed": 0, "bytes": 0}  # type: ignore[attr-defined]
        event.assoc.neuroscribe_studies = set()  # type: ignore[attr-defined]
        LOG.info("association established", calling_ae=requestor.ae_title,
                 peer=requestor.address, assoc_id=id(event.assoc))
        audit.record("association", "success", calling_ae=requestor.ae_title,
                     called_ae=_called_ae(event.assoc), peer=requestor.address, **_tls_fields(event.assoc))

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        rejection = event.assoc.acceptor.primitive
        code = (getattr(rejection, "result_source", None), getattr(rejection, "diagnostic", None))
        reason = REJECT_REASONS.get(code, "rejected")  # type: ignore[arg-type]
        LOG.warning("association rejected", reason=reason, calling_ae=requestor.ae_title,
                    called_ae=_called_ae(event.assoc), peer=requestor.address)
        audit.record("association", "refused", reason=reason, calling_ae=requestor.ae_title,
                     called_ae=_called_ae(event.assoc), peer=requestor.address)

    def _on_closed(self, event: evt.Event, how: str) -> None:
        stats = getattr(event.assoc, "neuroscribe_stats", {})
        LOG.info(f"association {how}", calling_ae=event.assoc.requestor.ae_title,
                 peer=event.assoc.requestor.address, assoc_id=id(event.assoc), **stats)
        if stats.get("stored", 0) + stats.get("failed", 0):
            studies = getattr(event.assoc, "neuroscribe_studies", set())
            audit.record("instances_received", "success" if not stats["failed"] else "failure",
                         calling_ae=event.assoc.requestor.ae_title, peer=event.assoc.requestor.address,
                         count=stats["stored"], failed=stats["failed"], bytes=stats["bytes"],
                         study_uid_hashes=sorted(studies), ended=how)

    def _on_echo(self, event: evt.Event) -> int:
        return StoreStatus.SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        requestor = event.assoc.requestor
        stats = getattr(event.assoc, "neuroscribe_stats", {"stored": 0, "failed": 0, "bytes": 0})
        partial = None
        sop_hash = None
        try:
            partial = event.dataset_path
            affected = str(event.request.AffectedSOPInstanceUID or "")
            sop_hash = hash_uid(affected) if affected else None
            if self.spool.free_bytes() < self.min_free_bytes:
                raise Refusal(StoreStatus.OUT_OF_RESOURCES, "disk_full",
                              "free disk below storage.min_free_bytes")
            header = inspect_received(partial, affected or None)
            size = partial.stat().st_size
            final = self.spool.commit(partial, header.series_instance_uid, header.sop_instance_uid)
            is_new = self.store.record_instance(
                _record(header, final, size, self.clock(), requestor.ae_title)
            )
        except Refusal as refusal:
            self._refuse(event, refusal, sop_hash, stats)
            return refusal.status
        except (OSError, StoreError) as exc:
            LOG.exception("instance not stored", reason="store_failed", sop=sop_hash,
                          error=type(exc).__name__)
            self._refuse(event, Refusal(StoreStatus.OUT_OF_RESOURCES, "store_failed",
                                        type(exc).__name__), sop_hash, stats, log=False)
            return StoreStatus.OUT_OF_RESOURCES
        except Exception as exc:  # the handler must answer, whatever went wrong
            LOG.exception("instance not stored", reason="internal_error", sop=sop_hash)
            self._refuse(event, Refusal(StoreStatus.CANNOT_UNDERSTAND, "internal_error",
                                        type(exc).__name__), sop_hash, stats, log=False)
            return StoreStatus.CANNOT_UNDERSTAND
        finally:
            if partial is not None:
                self.spool.discard(partial)  # no-op once renamed into the spool
        stats["stored"] += 1
        stats["bytes"] += size
        getattr(event.assoc, "neuroscribe_studies", set()).add(hash_uid(header.study_instance_uid))
        self.counters.add(instances=1, bytes=size, duplicates=0 if is_new else 1)
        LOG.debug("instance stored", sop=hash_uid(header.sop_instance_uid),
                  series=hash_uid(header.series_instance_uid), bytes=size, new=is_new)
        return StoreStatus.SUCCESS

    def _refuse(
        self,
        event: evt.Event,
        refusal: Refusal,
        sop_hash: str | None,
        stats: dict[str, int],
        log: bool = True,
    ) -> None:
        stats["failed"] += 1
        self.counters.fail(refusal.reason)
        requestor = event.assoc.requestor
        if log:
            LOG.warning("instance refused", reason=refusal.reason, detail=refusal.detail,
                        status=f"0x{int(refusal.status):04X}", sop=sop_hash,
                        calling_ae=requestor.ae_title)
        try:
            self.store.record_failure(
                at=self.clock(), calling_ae=requestor.ae_title, peer_address=str(requestor.address),
                status=int(refusal.status), reason=refusal.reason, detail=refusal.detail,
                sop_instance_uid_hash=sop_hash,
            )
        except StoreError:
            LOG.exception("ingest failure not recorded", reason=refusal.reason)


def _called_ae(assoc: Any) -> str | None:
    """The called AE title the requestor asked for (ours, unless it was refused for that)."""
    request = assoc.requestor.primitive
    return None if request is None else str(request.called_ae_title).strip()


def _tls_fields(assoc: Any) -> dict[str, Any]:
    """``tls`` (the protocol version, or None) and ``peer_cert`` (the client certificate's CN)."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return {"tls": None}
    subject = dict(item for rdn in (sock.getpeercert() or {}).get("subject", ()) for item in rdn)
    return {"tls": sock.version(), "peer_cert": subject.get("commonName")}


def port_is_free(bind: str, port: int) -> bool:
    """True if nothing listens on (bind, port) yet (for ``neuroscribe doctor``)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind, port))
        except OSError:
            return False
    return True


def recover_unrecorded(spool: Spool, store: StateStore) -> int:
    """Record spool files that have no state row (a crash between rename and commit).

    Such a file was fsync'd and checked but never acknowledged; keeping it is harmless (a re-send
    is idempotent) and its series then completes like any other. Returns how many were recorded.
    """
    known = store.known_paths()
    recovered = 0
    for path in spool.files():
        if str(path) in known:
            continue
        try:
            header = inspect_received(path)
        except Refusal as refusal:
            LOG.warning("unrecorded spool file is not valid; left in place", file=path.name,
                        reason=refusal.reason)
            continue
        stat = path.stat()
        store.record_instance(_record(header, path, stat.st_size, stat.st_mtime, "(recovered)"))
        recovered += 1
    return recovered


def _record(
    header: ReceivedHeader, path: Path, size: int, received_at: float, calling_ae: str
) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=header.sop_instance_uid,
        series_instance_uid=header.series_instance_uid,
        study_instance_uid=header.study_instance_uid,
        sop_class_uid=header.sop_class_uid,
        transfer_syntax_uid=header.transfer_syntax_uid,
        path=path,
        size_bytes=size,
        received_at=received_at,
        calling_ae=calling_ae,
        header=header.fields,
    )
