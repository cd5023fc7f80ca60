"""The ``neuroscribe`` command: one sub-command per task an operator or engineer has.

Each sub-command lives in a small module with ``add_arguments(parser)`` and
``run(settings, args) -> int``; heavy imports happen inside ``run``, so ``neuroscribe --help`` and
the service stay light (the service never imports the training code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from neuroscribe import __version__
from neuroscribe.config import load_settings
from neuroscribe.errors import ConfigError, NeuroScribeError
from neuroscribe.log import configure_logging, get_logger

LOG = get_logger(__name__)

#: name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("neuroscribe.daemon.commands.serve",
              "run the service: Storage SCP and series assembly, until SIGTERM"),
    "doctor": ("neuroscribe.daemon.commands.doctor",
               "check configuration, storage, database, port and tools"),
    "outbox": ("neuroscribe.reporting.outbox_command",
               "the durable outbox of reports: list deliveries, retry dead letters, drop items"),
    "jobs": ("neuroscribe.daemon.commands.jobs",
             "report jobs: list them (state, attempts, reason), queue failed ones again"),
    "evaluate": ("neuroscribe.training.metrics.command",
                 "score candidate reports against references: FORTE and captioning metrics"),
    "synth": ("neuroscribe.training.synth.command",
              "make synthetic head-CT studies with reports (phantoms, no patient data)"),
    "train": ("neuroscribe.training.commands.train",
              "train the CVIT report model on studies with reports and write a model bundle"),
    "models": ("neuroscribe.training.commands.models",
               "the model registry: list bundles, promote one through the FORTE gate, roll back"),
    "infer": ("neuroscribe.daemon.commands.infer",
              "draft the report of one CT series with a model bundle (ONNX Runtime; an AI draft)"),
    "demo": ("neuroscribe.daemon.commands.demo",
             "push a synthetic head CT to the running service and show the SR and ORU it drafted"),
    "retrain": ("neuroscribe.daemon.commands.retrain",
                "one retraining check: train on new paired studies, promote through the FORTE gate"),
}

#: Commands that write the service's log file under storage.root (others log to stdout only).
SERVICE_COMMANDS = frozenset({"serve"})


def _module(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name][0])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``neuroscribe --help``)."""
    parser = argparse.ArgumentParser(
        prog="neuroscribe",
        description="NeuroScribe drafts head-CT reports from DICOM (AI drafts, never a diagnosis).",
    )
    parser.add_argument("--version", action="version", version=f"neuroscribe {__version__}")
    parser.add_argument("--config", type=Path, help="TOML settings file (NEUROSCRIBE_* env wins)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        _module(name).add_arguments(command_parser)
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
    to_file = log.to_file and args.command in SERVICE_COMMANDS
    configure_logging(level=log.level, fmt=log.format,
                      log_dir=settings.storage.log_dir if to_file else None)
    try:
        return int(_module(args.command).run(settings, args))
    except NeuroScribeError as exc:
        LOG.error("command failed", command=args.command, error=str(exc))
        print(f"neuroscribe {args.command}: {exc}", file=sys.stderr)
        return 1
