"""``neuroscribe doctor``: print each check, exit 1 if a required one failed."""

from __future__ import annotations

import argparse
from pathlib import Path

from neuroscribe.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """It checks the settings in force; ``--model`` also loads a bundle."""
    parser.add_argument("--model", type=Path, metavar="BUNDLE",
                        help="also load this model bundle (checksums, ONNX Runtime sessions, GPU fallback)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run every check and print one line each."""
    from neuroscribe.daemon.doctor import run_checks

    checks = run_checks(settings, model=getattr(args, "model", None))
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.required else "warn")
        print(f"[{mark}] {check.name:<22} {check.detail}")
    failed = [c for c in checks if c.required and not c.ok]
    print(f"{len(failed)} required check(s) failed" if failed else "all required checks passed")
    return 1 if failed else 0
