"""Named crash points for the crash tests: ``kill -9`` of the whole service at an exact step.

``NEUROSCRIBE_FAILPOINTS="worker.after_report"`` (a comma-separated list; ``name:N`` fires on the
N-th pass) makes :func:`hit` SIGKILL the service's main process and then itself when execution
reaches that name. Nothing runs in between (no ``finally``, no atexit), as when the power fails.
Unset, :func:`hit` is one dictionary lookup. The points are listed in docs/operations.md.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "NEUROSCRIBE_FAILPOINTS"
#: Set by the service before it starts child processes, so a child's failpoint kills the service too.
SERVICE_PID_ENV = "NEUROSCRIBE_SERVICE_PID"

_lock = threading.Lock()
_passes: dict[str, int] = {}


def _armed() -> dict[str, int]:
    armed = {}
    for item in filter(None, (part.strip() for part in os.environ.get(ENV, "").split(","))):
        name, _, count = item.partition(":")
        armed[name] = int(count or 1)
    return armed


def hit(name: str) -> None:
    """SIGKILL the service here when ``name`` is armed (and this is its N-th pass)."""
    if ENV not in os.environ:
        return
    wanted = _armed().get(name)
    if wanted is None:
        return
    with _lock:
        _passes[name] = _passes.get(name, 0) + 1
        if _passes[name] < wanted:
            return
    service_pid = int(os.environ.get(SERVICE_PID_ENV, "0") or 0)
    if service_pid and service_pid != os.getpid():
        os.kill(service_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
