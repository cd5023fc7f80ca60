"""The service process: state database, spool, Storage SCP and series assembly, with shutdown.

Start-up order matters for "nothing lost": the database is migrated, partial files from a crash
are removed (never acknowledged), spool files without a state row are recorded, and only then
does the SCP accept associations. Open series resume from their recorded times.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from neuroscribe.config import Settings
from neuroscribe.daemon import systemd
from neuroscribe.dicom_io.scp import StorageSCP, recover_unrecorded
from neuroscribe.dicom_io.series import SeriesAssembler
from neuroscribe.dicom_io.spool import Spool
from neuroscribe.errors import NeuroScribeError
from neuroscribe.log import get_logger
from neuroscribe.store import Database, SeriesState, StateStore

LOG = get_logger(__name__)

#: How long SIGTERM waits for open associations before the process exits anyway.
SHUTDOWN_GRACE_SECONDS = 20.0


class Service:
    """One NeuroScribe node. ``start()`` returns once the SCP listens; ``stop()`` is idempotent."""

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.db = Database(settings.storage.resolved_database_url)
        self.store = StateStore(self.db)
        self.spool = Spool(settings.storage.spool_dir, settings.storage.incoming_dir)
        self.scp = StorageSCP(
            settings.dicom, self.store, self.spool, settings.storage.min_free_bytes, clock=clock
        )
        self.assembler = SeriesAssembler(self.store, settings.series, settings.selection, clock=clock)
        self._stop = threading.Event()
        self._assembler_thread: threading.Thread | None = None
        # systemd (daemon/systemd.py): READY/STOPPING/STATUS, and watchdog pings while loops beat.
        self.systemd = systemd.ServiceNotifier()
        self.heartbeats = {"series assembler": systemd.Heartbeat.for_loop(settings.series.poll_seconds)}

    def start(self) -> tuple[str, int]:
        """Recover, then listen. Returns the SCP's bound (address, port)."""
        removed = self.spool.prepare()
        recovered = recover_unrecorded(self.spool, self.store)
        open_series = len(self.store.series_rows(state=SeriesState.RECEIVING))
        LOG.info("service starting", schema_version=self.db.schema_version,
                 partial_files_removed=removed, spool_files_recovered=recovered,
                 open_series=open_series)
        address = self.scp.start()
        self._assembler_thread = threading.Thread(
            target=self._assemble_forever, name="series-assembler", daemon=True
        )
        self._assembler_thread.start()
        self.systemd.ready(f"Receiving as {self.settings.dicom.ae_title} on {address[0]}:{address[1]}; "
                           f"{open_series} open series at start", self.heartbeats)
        return address

    def _assemble_forever(self) -> None:
        poll = self.settings.series.poll_seconds
        while not self._stop.wait(poll):
            self.heartbeats["series assembler"].beat()
            try:
                self.assembler.tick()
            except NeuroScribeError:
                LOG.exception("series assembly pass failed; retrying next poll")
            except Exception:  # keep assembling: one bad series must not stop the service
                LOG.exception("series assembly pass failed unexpectedly; retrying next poll")

    def stop(self) -> None:
        """Stop accepting, let open associations finish (bounded), stop assembling, close."""
        if self._stop.is_set():
            return
        self._stop.set()
        LOG.info("service stopping", active_associations=self.scp.active_associations)
        self.systemd.stopping(f"Stopping: {self.scp.active_associations} open associations")
        self.scp.stop()
        if self._assembler_thread is not None:
            self._assembler_thread.join(timeout=SHUTDOWN_GRACE_SECONDS)
        self.db.close()
        self.systemd.close()
        LOG.info("service stopped")

    def run_until_signal(self) -> int:
        """Serve until SIGTERM or SIGINT; return the process exit code."""
        stop_requested = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            LOG.info("signal received", signal=signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        while not stop_requested.wait(1.0):
            pass
        self.stop()
        return 0
