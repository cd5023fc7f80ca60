"""Run a command under resource limits: ``python -m neuroscribe.daemon._limited [options] -- CMD ...``.

The service has threads, so it cannot safely set limits between fork and exec (``preexec_fn`` may
deadlock). It starts this small single-threaded program instead, which

1. sets ``RLIMIT_DATA`` (private writable memory: heap, arrays; unlike ``RLIMIT_AS`` it does not
   count the huge address-space reservations of CUDA) and ``RLIMIT_CPU`` (soft: SIGXCPU; the hard
   limit, a few seconds later: SIGKILL), and raises its niceness;
2. asks the kernel to SIGKILL it when the process that started it dies (``PR_SET_PDEATHSIG``), so
   a training run does not outlive a crashed service;
3. writes the limits in force as one JSON line to stdout (the first line of the run's log);
4. replaces itself with ``CMD`` (``os.execv``): same PID, and the limits are inherited.

Exit status 127 when ``CMD`` cannot be started.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import signal
import sys

#: Seconds between the soft CPU limit (SIGXCPU) and the hard one (SIGKILL).
CPU_HARD_GRACE_SECONDS = 5
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when ``parent`` dies (``kill -9`` included)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the service still kills the group on timeout
        return
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _limit_text(value: int) -> str | int:
    return "unlimited" if value == resource.RLIM_INFINITY else value


def main(argv: list[str] | None = None) -> int:
    """Set the limits, report them, and exec the command."""
    parser = argparse.ArgumentParser(prog="python -m neuroscribe.daemon._limited")
    parser.add_argument("--data-bytes", type=int, default=0, help="RLIMIT_DATA; 0: unchanged")
    parser.add_argument("--cpu-seconds", type=int, default=0, help="RLIMIT_CPU; 0: unchanged")
    parser.add_argument("--nice", type=int, default=0, help="niceness to add")
    parser.add_argument("--parent", type=int, default=0, help="PID whose death kills this process")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    if args.data_bytes > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (args.data_bytes, args.data_bytes))
    if args.cpu_seconds > 0:
        resource.setrlimit(resource.RLIMIT_CPU, (args.cpu_seconds, args.cpu_seconds + CPU_HARD_GRACE_SECONDS))
    if args.nice > 0:
        os.nice(args.nice)
    die_with_parent(args.parent)
    data = resource.getrlimit(resource.RLIMIT_DATA)
    cpu = resource.getrlimit(resource.RLIMIT_CPU)
    print(json.dumps({"event": "resource_limits", "pid": os.getpid(), "pgid": os.getpgrp(),
                      "rlimit_data": [_limit_text(v) for v in data],
                      "rlimit_cpu": [_limit_text(v) for v in cpu],
                      "nice": os.nice(0), "command": command}), flush=True)
    program = command[0] if os.sep in command[0] else (shutil.which(command[0]) or command[0])
    try:
        os.execv(program, command)  # noqa: S606 (an argument list we were given, no shell)
    except OSError as exc:
        print(f"cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        return 127
    return 127  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
