"""The Storage SCP: C-ECHO and C-STORE over pynetdicom, durable before it says success.

Handlers are thin (STYLE.md habit 7): stream to ``incoming/`` (pynetdicom's chunked receive),
check the header, fsync and rename into the spool, commit the state row, answer a named status.
They never raise and never decode pixel data; everything heavier happens in other processes.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom import dimse_messages as pynetdicom_dimse_messages
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

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

LOG = get_logger(__name__)

Clock = Callable[[], float]

_RECV_CHUNK = 1024 * 1024
#: pynetdicom's DUL thread sleeps this long when idle (its default is 1 ms per poll).
_DUL_POLL_SECONDS = 0.001


@dataclass
class ReceiveCounters:
    """Running totals, read by the daemon's metrics (thread-safe increments)."""

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
    """Reads a PDU with few large ``recv_into`` calls (pynetdicom loops over 4 KiB reads).

    A 512 KiB CT slice otherwise costs ~130 Python-level recv calls; behaviour is unchanged.
    """

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


class _RequestHandler(RequestHandler):
    """pynetdicom's request handler, with the bulk-reading socket and a tighter DUL poll."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = _BulkReadSocket  # same object, faster recv()
        assoc.dul._run_loop_delay = _DUL_POLL_SECONDS
        return assoc


class _AllowListServer(ThreadedAssociationServer):
    """Closes connections from addresses outside the allow-list before any DICOM is read."""

    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_networks:
            return True
        address = ipaddress.ip_address(client_address[0])
        if any(address in net for net in self.allowed_networks):
            return True
        LOG.warning("connection refused: address not in dicom.allowed_networks", peer=client_address[0])
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
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed, ["released"]),
            (evt.EVT_ABORTED, self._on_closed, ["aborted"]),
        ]
        server = self.ae.make_server(
            (s.bind, s.port), evt_handlers=handlers, server_class=_AllowListServer,
            request_handler=_RequestHandler,
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
                 max_associations=s.max_associations)
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
        LOG.info("association established", calling_ae=requestor.ae_title,
                 peer=requestor.address, assoc_id=id(event.assoc))

    def _on_closed(self, event: evt.Event, how: str) -> None:
        stats = getattr(event.assoc, "neuroscribe_stats", {})
        LOG.info(f"association {how}", calling_ae=event.assoc.requestor.ae_title,
                 peer=event.assoc.requestor.address, assoc_id=id(event.assoc), **stats)

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
