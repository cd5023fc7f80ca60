"""Shared fixtures: a real ``neuroscribe serve`` process on loopback and DCMTK as the scanner;
the real peers it delivers to (Orthanc as the PACS, hl7apy's MLLPServer as the RIS).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.presentation import build_context

from neuroscribe.dicom_io.constants import ACCEPTED_TRANSFER_SYNTAXES
from neuroscribe.store import Database, SeriesRow, SeriesState, StateStore
from tests.orthanc import Orthanc
from tests.peers import Ris, free_port

#: Environment for DCMTK tools: without TCP_NODELAY both ends stall ~45 ms per image on loopback.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SERVER_AE = "NEUROSCRIBE"
T = TypeVar("T")


def require_tool(name: str) -> str:
    """The tool's path; the test suite's set-up (./run test) installs the Debian packages."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not on PATH: run the suite through ./run test, which installs it")
    return path


def storescu(port: int, files: list[Path], *, calling_ae: str = "SCANNER1",
             called_ae: str = SERVER_AE, extra: tuple[str, ...] = (),
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Push files with DCMTK storescu, verbose, so each response status is in the output."""
    require_tool("storescu")
    return subprocess.run(
        ["storescu", "-v", "-aet", calling_ae, "-aec", called_ae, *extra, "127.0.0.1", str(port),
         *map(str, files)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout, check=False,
    )


def echoscu(port: int, *, calling_ae: str = "ECHOSCU", called_ae: str = SERVER_AE) -> bool:
    """True if C-ECHO succeeds."""
    require_tool("echoscu")
    result = subprocess.run(
        ["echoscu", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=30, check=False,
    )
    return result.returncode == 0


def send_files_raw(port: int, paths: list[Path], calling_ae: str = "RAWSCU") -> list[int | None]:
    """Send files as they are on disk (no re-encoding) with pynetdicom; return each status.

    Used for damaged objects that DCMTK's storescu would refuse to read. None means no response.
    """
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        import pydicom

        contexts = {}
        for path in paths:
            meta = pydicom.filereader.read_file_meta_info(path)
            contexts.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(
                str(meta.TransferSyntaxUID)
            )
        for sop_class, syntaxes in contexts.items():
            ae.requested_contexts.append(build_context(sop_class, sorted(syntaxes)))
        assoc = ae.associate("127.0.0.1", port, ae_title=SERVER_AE)
        assert assoc.is_established, "association with NeuroScribe failed"
        statuses: list[int | None] = []
        try:
            for path in paths:
                status = assoc.send_c_store(path)
                statuses.append(int(status.Status) if "Status" in status else None)
        finally:
            assoc.release()
        return statuses
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous


def send_datasets(port: int, datasets: list[Dataset], calling_ae: str = "PYSCU") -> list[int | None]:
    """Send pydicom datasets with pynetdicom (each in its own file-meta transfer syntax)."""
    ae = AE(ae_title=calling_ae)
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES[:2]))
    assoc = ae.associate("127.0.0.1", port, ae_title=SERVER_AE)
    assert assoc.is_established, "association with NeuroScribe failed"
    try:
        statuses = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else None)
        return statuses
    finally:
        assoc.release()


@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """``cli.main()`` configures the process's logging; put it back as it was afterwards."""
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    try:
        yield
    finally:
        for handler in list(root_logger.handlers):
            if handler not in handlers:
                root_logger.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root_logger.handlers:
                root_logger.addHandler(handler)
        root_logger.setLevel(level)
        logging.captureWarnings(False)
        structlog.reset_defaults()


@dataclass
class Clock:
    """An injected clock: POSIX seconds (``clock.now``) that move only when the test says."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


@dataclass
class Server:
    """A ``neuroscribe serve`` subprocess with its own storage root and port."""

    root: Path
    port: int
    env: dict[str, str]
    output: Path
    proc: subprocess.Popen[bytes] | None = None
    _outputs: list[Path] = field(default_factory=list)

    def start(self, timeout: float = 30) -> Server:
        """Start (or restart) and wait until C-ECHO answers."""
        out = self.output.with_suffix(f".{len(self._outputs)}.log")
        self._outputs.append(out)
        with out.open("wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "neuroscribe", "serve"], env=self.env,
                stdout=sink, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"neuroscribe serve exited early:\n{self.logs()}")
            if echoscu(self.port):
                return self
            time.sleep(0.1)
        raise AssertionError(f"neuroscribe serve did not answer C-ECHO:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def ensure_stopped(self) -> None:
        """Kill the process if it still runs (fixture teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs."""
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        """Everything the server printed, across restarts, plus its JSON log files."""
        texts = [p.read_text(errors="replace") for p in self._outputs if p.exists()]
        log_dir = self.root / "logs"
        if log_dir.is_dir():
            texts += [p.read_text(errors="replace") for p in sorted(log_dir.iterdir())]
        return "\n".join(texts)

    def state(self) -> StateStore:
        """The server's state database, opened read-write from the test (WAL allows it)."""
        return StateStore(Database(f"sqlite:///{self.root / 'state.sqlite3'}"))

    def wait_for(self, predicate: Callable[[StateStore], T | None], timeout: float = 30,
                 interval: float = 0.2) -> T:
        """Poll ``predicate(state)`` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        store = self.state()
        try:
            while time.monotonic() < deadline:
                value = predicate(store)
                if value:
                    return value
                time.sleep(interval)
        finally:
            store.db.close()
        raise AssertionError(f"condition not met within {timeout} s\n{self.logs()[-4000:]}")


def decided(series_instance_uid: str) -> Callable[[StateStore], SeriesRow | None]:
    """A predicate for :meth:`Server.wait_for`: the series row once SELECTED or REJECTED."""

    def predicate(store: StateStore) -> SeriesRow | None:
        row = store.series_row(series_instance_uid)
        return row if row and row.state in (SeriesState.SELECTED, SeriesState.REJECTED) else None

    return predicate


def make_server(root: Path, **env_overrides: str) -> Server:
    """A server (not yet started) with test defaults: 1.5 s quiet period, at least 4 slices."""
    port = free_port()
    env = {
        **os.environ,
        "NEUROSCRIBE_STORAGE__ROOT": str(root),
        "NEUROSCRIBE_DICOM__PORT": str(port),
        "NEUROSCRIBE_HTTP__PORT": str(free_port()),
        "NEUROSCRIBE_STORAGE__MIN_FREE_BYTES": "0",
        "NEUROSCRIBE_SERIES__QUIET_SECONDS": "1.5",
        "NEUROSCRIBE_SERIES__POLL_SECONDS": "0.2",
        "NEUROSCRIBE_SELECTION__MIN_SLICES": "4",
        "NEUROSCRIBE_LOGGING__LEVEL": "DEBUG",
        **env_overrides,
    }
    root.mkdir(parents=True, exist_ok=True)
    return Server(root=root, port=port, env=env, output=root.parent / f"{root.name}-stdout")


ServerFactory = Callable[..., Server]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Build servers with settings overrides (environment variables); all are stopped at the end."""
    servers: list[Server] = []

    def make(**env_overrides: str) -> Server:
        server = make_server(tmp_path / f"server{len(servers)}", **env_overrides)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.ensure_stopped()


@pytest.fixture
def server(server_factory: ServerFactory) -> Server:
    """A running server with test defaults (1.5 s quiet period, at least 4 slices)."""
    return server_factory().start()


@pytest.fixture
def isolated_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No NEUROSCRIBE_* variable of the shell; storage under tmp_path (the CLI finds it there).

    Yields the storage root (``NEUROSCRIBE_STORAGE__ROOT``); logging is put back as it was afterwards.
    """
    for name in list(os.environ):
        if name.startswith("NEUROSCRIBE_"):
            monkeypatch.delenv(name)
    root = tmp_path / "root"
    monkeypatch.setenv("NEUROSCRIBE_STORAGE__ROOT", str(root))
    with logging_restored():
        yield root


# -- real peers: Orthanc as the PACS, hl7apy's MLLPServer as the RIS ------------------------------

OrthancFactory = Callable[..., Orthanc]


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[OrthancFactory]:
    """Make (not start) Orthanc peers under tmp_path; all are killed at the end."""
    made: list[Orthanc] = []

    def make(**options: object) -> Orthanc:
        orthanc = Orthanc(root=tmp_path / f"orthanc{len(made)}", **options)  # type: ignore[arg-type]
        made.append(orthanc)
        return orthanc

    yield make
    for orthanc in made:
        orthanc.kill()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One running Orthanc shared by the module's tests (each test uses fresh UIDs)."""
    server = Orthanc(root=tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.kill()


@pytest.fixture
def ris() -> Iterator[Ris]:
    """A running RIS (:class:`tests.peers.Ris`) on an ephemeral loopback port; it answers AA unless
    the test sets its ``script``."""
    with Ris() as server:
        yield server


# -- in-process SCP and the audit trail ----------------------------------------------------------


@dataclass
class InProcessScp:
    """A :class:`~neuroscribe.dicom_io.scp.StorageSCP` in the test process, with its own storage root.

    Unlike :class:`Server` it needs no C-ECHO to start (a TLS-only port would refuse echoscu), and its
    audit events reach this process's trail (the ``audit_trail`` fixture).
    """

    scp: Any
    store: StateStore
    root: Path
    port: int


ScpFactory = Callable[..., InProcessScp]


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[ScpFactory]:
    """Start in-process SCPs with ``[dicom]`` overrides (``tls={...}``); all stopped at the end.

    The SCP points pynetdicom's module-level hooks at its spool; they are put back afterwards so that
    later tests in this process receive as pynetdicom does.
    """
    from pynetdicom import dimse_messages

    from neuroscribe.config import load_settings
    from neuroscribe.dicom_io.scp import StorageSCP
    from neuroscribe.dicom_io.spool import Spool

    hooks = ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info")
    saved = {name: getattr(dimse_messages, name) for name in hooks}
    chunked = pynetdicom_config.STORE_RECV_CHUNKED_DATASET
    made: list[InProcessScp] = []

    def make(**dicom: object) -> InProcessScp:
        root = tmp_path / f"scp{len(made)}"
        settings = load_settings(None, storage={"root": str(root), "min_free_bytes": 0},
                                 dicom={"port": free_port(), **dicom})
        store = StateStore(Database(settings.storage.resolved_database_url))
        spool = Spool(settings.storage.spool_dir, settings.storage.incoming_dir)
        spool.prepare()
        scp = StorageSCP(settings.dicom, store, spool, 0)
        try:
            _, port = scp.start()
        except BaseException:
            store.db.close()
            raise
        made.append(InProcessScp(scp, store, root, port))
        return made[-1]

    yield make
    for running in made:
        running.scp.stop()
        running.store.db.close()
    for name, value in saved.items():
        setattr(dimse_messages, name, value)
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = chunked


@dataclass
class AuditTrail:
    """The audit file of a test; :meth:`events` parses its lines."""

    path: Path

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """Every line as a dict, or only those of ``event``."""
        if not self.path.exists():
            return []
        lines = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines()]
        return [line for line in lines if event is None or line["event"] == event]

    def wait_for(self, event: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        """The ``event`` lines once there are ``count`` (association threads write them late)."""
        deadline = time.monotonic() + timeout
        while len(found := self.events(event)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(found) >= count, f"{count} {event!r} audit events expected: {self.events()}"
        return found


@pytest.fixture
def audit_trail(tmp_path: Path) -> Iterator[AuditTrail]:
    """Record this process's audit events to ``tmp_path/audit.jsonl`` during the test."""
    from neuroscribe import audit

    trail = AuditTrail(tmp_path / "logs" / audit.AUDIT_FILE_NAME)
    audit.configure(trail.path)
    try:
        yield trail
    finally:
        audit.configure(None)


def small_report(sr: Dataset) -> tuple[Any, str, str]:
    """A short draft and its ORU^R01 built from ``sr``'s patient and study: (report, er7, control_id).

    ``sr`` is a small SR such as ``tests.test_scu.minimal_sr()``.
    """
    from datetime import UTC, datetime

    from neuroscribe.reporting.draft import DraftReport, ModelIdentity
    from neuroscribe.reporting.hl7 import OruOptions, build_oru
    from neuroscribe.reporting.outbox import new_control_id

    model = ModelIdentity("neuroscribe-test", "1", "1.2.826.0.1.3680043.8.498.1")
    report = DraftReport("No acute intracranial abnormality.", "Normal study.", model,
                         datetime(2026, 11, 29, 10, 0, tzinfo=UTC))
    control_id = new_control_id()
    return report, build_oru(report, sr, control_id, OruOptions(), report.created), control_id


def queue_report(outbox: Any, sr: Dataset, *, with_oru: bool = True) -> str:
    """Queue :func:`small_report` of ``sr`` for every configured destination; returns its report ID.

    The SR references no evidence, so its own series stands in for the source series.
    """
    report, er7, control_id = small_report(sr)
    record = outbox.enqueue_report(report, sr, er7 if with_oru else None, control_id if with_oru else None,
                                   series_instance_uid=str(sr.SeriesInstanceUID))
    return str(record.report_id)
