"""The ``neuroscribe`` command: one sub-command per task an operator or engineer has."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neuroscribe import __version__
from neuroscribe.config import Settings, load_settings
from neuroscribe.errors import ConfigError, NeuroScribeError
from neuroscribe.log import configure_logging, get_logger

LOG = get_logger(__name__)


def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    from neuroscribe.daemon.service import Service

    return Service(settings).run_until_signal()


def _doctor(settings: Settings, _args: argparse.Namespace) -> int:
    from neuroscribe.daemon.doctor import run_checks

    checks = run_checks(settings)
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.required else "warn")
        print(f"[{mark}] {check.name:<22} {check.detail}")
    failed = [c for c in checks if c.required and not c.ok]
    print(f"{len(failed)} required check(s) failed" if failed else "all required checks passed")
    return 1 if failed else 0


COMMANDS = {
    "serve": (_serve, "run the service: Storage SCP and series assembly, until SIGTERM"),
    "doctor": (_doctor, "check configuration, storage, database, port and tools"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``neuroscribe --help``)."""
    parser = argparse.ArgumentParser(
        prog="neuroscribe",
        description="NeuroScribe drafts head-CT reports from DICOM (AI drafts, never a diagnosis).",
    )
    parser.add_argument("--version", action="version", version=f"neuroscribe {__version__}")
    parser.add_argument("--config", type=Path, help="TOML settings file (NEUROSCRIBE_* env wins)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_func, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"neuroscribe: {exc}", file=sys.stderr)
        return 2
    log = settings.logging
    configure_logging(
        level=log.level,
        fmt=log.format,
        log_dir=settings.storage.log_dir if (log.to_file and args.command == "serve") else None,
    )
    func, _help = COMMANDS[args.command]
    try:
        return func(settings, args)
    except NeuroScribeError as exc:
        LOG.error("command failed", command=args.command, error=str(exc))
        print(f"neuroscribe {args.command}: {exc}", file=sys.stderr)
        return 1
