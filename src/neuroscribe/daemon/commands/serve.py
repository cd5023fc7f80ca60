"""``neuroscribe serve``: run the service until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse

from neuroscribe.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: everything comes from the settings."""


def run(settings: Settings, _args: argparse.Namespace) -> int:
    """Start the service and block until a signal stops it."""
    from neuroscribe.daemon.service import Service

    return Service(settings).run_until_signal()
