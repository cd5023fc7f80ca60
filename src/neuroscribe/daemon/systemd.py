"""systemd integration without dependencies: ``sd_notify`` datagrams and the service watchdog.

The unit (``systemd/neuroscribe.service``) is ``Type=notify`` with ``WatchdogSec=``. The service
reports through :class:`ServiceNotifier`:

* ``READY=1`` once the database is migrated, the spool recovered and the SCP listens;
* ``WATCHDOG=1`` every half watchdog interval, but only while every registered :class:`Heartbeat`
  (the service's own loops) is fresh: a hung loop stops the pings and systemd restarts the process;
* ``STOPPING=1`` when shutdown begins (pings then continue: the stop is bounded by TimeoutStopSec);
* ``STATUS=...`` lines for ``systemctl status``: addresses, counts and loop names, never patient data.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so tests and ``./run serve`` need
nothing. Protocol: sd_notify(3), one ``AF_UNIX`` datagram of newline-separated ``KEY=VALUE``
assignments; a socket name starting with ``@`` is in the abstract namespace.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from neuroscribe.log import get_logger

__all__ = ["Heartbeat", "ServiceNotifier", "Watchdog", "notify", "watchdog_interval"]

LOG = get_logger(__name__)

Clock = Callable[[], float]
Notify = Callable[[str], bool]

#: A heartbeat older than this (seconds) counts as a hung loop, unless its owner says otherwise.
DEFAULT_STALE_AFTER_SECONDS = 30.0


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=..."``) to ``$NOTIFY_SOCKET``; True if it was sent.

    False when the variable is unset (not under systemd), names an unsupported address (only file
    system paths and ``@abstract`` names are), or sending fails; never raises.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        LOG.warning("NOTIFY_SOCKET is neither a path nor an abstract socket name; not notifying")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.send(state.encode("utf-8"))
    except OSError as exc:
        LOG.warning("systemd notification not sent", error=type(exc).__name__,
                    reason=exc.strerror or "", message=state.split("\n", 1)[0])
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog interval in seconds from ``$WATCHDOG_USEC``, or None when there is none for us.

    None also when ``$WATCHDOG_PID`` names another process (a child that inherited the variables)
    or a value is not a positive integer.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        LOG.warning("WATCHDOG_USEC or WATCHDOG_PID is not an integer; watchdog off")
        return None
    return value / 1_000_000 if value > 0 else None


class Heartbeat:
    """When a loop last made progress: the loop calls :meth:`beat`, the watchdog reads :meth:`age`.

    Parameters
    ----------
    stale_after
        Seconds without a beat after which the loop counts as hung.
    clock
        Monotonic seconds; injected for tests.
    """

    def __init__(
        self, stale_after: float = DEFAULT_STALE_AFTER_SECONDS, clock: Clock = time.monotonic
    ) -> None:
        if not stale_after > 0:
            raise ValueError(f"stale_after = {stale_after!r}: must be seconds > 0")
        self.stale_after = stale_after
        self._clock = clock
        self._last = clock()

    @classmethod
    def for_loop(cls, poll_seconds: float) -> Heartbeat:
        """The heartbeat of a loop that beats every ``poll_seconds``: stale after 10 polls, at least 30 s."""
        return cls(max(DEFAULT_STALE_AFTER_SECONDS, 10 * poll_seconds))

    def beat(self) -> None:
        """Record progress now (a float assignment: safe from any thread)."""
        self._last = self._clock()

    def age(self) -> float:
        """Seconds since the last beat (or since creation)."""
        return self._clock() - self._last

    @property
    def stale(self) -> bool:
        """True when the last beat is older than ``stale_after``."""
        return self.age() > self.stale_after


class Watchdog:
    """Sends ``WATCHDOG=1`` every ``interval / 2`` seconds while all heartbeats are fresh.

    Parameters
    ----------
    interval
        The watchdog interval (``WatchdogSec=``) in seconds.
    heartbeats
        Loop name (shown in STATUS and logs) to its heartbeat; read at every check, so the owner may
        add entries later.
    notify_fn
        Sends a notification; :func:`notify` by default.
    """

    def __init__(
        self, interval: float, heartbeats: Mapping[str, Heartbeat], notify_fn: Notify = notify
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval = {interval!r}: must be seconds > 0")
        self.interval = interval
        self.heartbeats = heartbeats
        self._notify = notify_fn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stale: tuple[str, ...] = ()
        #: Set when shutdown begins: pings no longer depend on the loops, which are ending.
        self.stopping = False

    def stale_loops(self) -> tuple[str, ...]:
        """Names of the loops whose heartbeat is stale (empty when all are healthy)."""
        return tuple(name for name, beat in dict(self.heartbeats).items() if beat.stale)

    def check(self) -> bool:
        """Ping if healthy (or stopping); returns whether a ping was sent. One step of the thread."""
        stale = () if self.stopping else self.stale_loops()
        if stale != self._stale and not self.stopping:
            if stale:
                ages = {name: round(self.heartbeats[name].age(), 1) for name in stale}
                LOG.error("watchdog pings withheld: loop made no progress", stale_loops=ages)
                self._notify(f"STATUS=Unhealthy: no progress in {', '.join(stale)}; systemd will restart")
            else:
                LOG.warning("watchdog pings resumed: loops make progress again")
        self._stale = stale
        return not stale and self._notify("WATCHDOG=1")

    def start(self) -> None:
        """Ping on a daemon thread named ``systemd-watchdog`` (first check at once)."""
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.check()
            if self._stop.wait(self.interval / 2):
                return

    def close(self) -> None:
        """Stop the thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class ServiceNotifier:
    """The service's side of ``Type=notify``: ready, status, watchdog and stopping; no-ops off systemd.

    Parameters
    ----------
    notify_fn
        Sends a notification; :func:`notify` by default.
    interval
        Watchdog interval in seconds; by default :func:`watchdog_interval` (None: no watchdog).
    """

    def __init__(self, notify_fn: Notify = notify, interval: float | None = None) -> None:
        self._notify = notify_fn
        self.interval = watchdog_interval() if interval is None else interval
        self.watchdog: Watchdog | None = None

    def status(self, text: str) -> None:
        """``STATUS=text`` (one line, no patient data)."""
        self._notify(f"STATUS={_one_line(text)}")

    def ready(self, status: str, heartbeats: Mapping[str, Heartbeat]) -> None:
        """``READY=1`` with a status line, then start the watchdog over ``heartbeats`` if systemd asked.

        Every heartbeat is beaten first: a loop's time to hang counts from ready, not from start-up.
        """
        for heartbeat in heartbeats.values():
            heartbeat.beat()
        sent = self._notify(f"READY=1\nSTATUS={_one_line(status)}")
        if self.interval:
            self.watchdog = Watchdog(self.interval, heartbeats, self._notify)
            self.watchdog.start()
        LOG.info("systemd notified ready", notified=sent, watchdog_seconds=self.interval)

    def stopping(self, status: str) -> None:
        """``STOPPING=1`` with a status line; the watchdog keeps pinging until :meth:`close`."""
        if self.watchdog is not None:
            self.watchdog.stopping = True
        self._notify(f"STOPPING=1\nSTATUS={_one_line(status)}")

    def close(self) -> None:
        """Stop the watchdog thread (at the end of shutdown)."""
        if self.watchdog is not None:
            self.watchdog.close()


def _one_line(text: str) -> str:
    return " ".join(text.split())
