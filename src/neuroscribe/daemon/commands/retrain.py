"""``neuroscribe retrain [--force]``: one retraining check by hand, as the service's scheduler runs it.

Trains a candidate when enough new paired studies arrived (``--force``: whenever there is any),
in a subprocess under the ``[retraining]`` limits, and offers it to the registry's gate. A running
service picks up a promoted model before its next drafting job. Exit status: 0 skipped or promoted,
1 refused (both figures printed) or failed (the reason and the log printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json

from neuroscribe.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--force`` and ``--json``."""
    parser.add_argument("--force", action="store_true",
                        help="train even with fewer new paired studies than [retraining] min_new_pairs")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one check; print what happened."""
    from neuroscribe import audit
    from neuroscribe.daemon.retraining import RetrainStatus, maybe_retrain

    if audit.path() is None:  # a promotion by hand belongs in the same trail as the service's
        with contextlib.suppress(OSError):
            audit.configure(settings.storage.log_dir / audit.AUDIT_FILE_NAME)
    outcome = maybe_retrain(settings, force=args.force)
    if args.json:
        print(json.dumps(outcome.to_dict(), indent=2))
    else:
        print(f"{outcome.status.value}: {outcome.reason}")
        if outcome.log is not None and outcome.status is RetrainStatus.FAILED:
            print(f"log: {outcome.log}")
    return 0 if outcome.status in (RetrainStatus.SKIPPED, RetrainStatus.PROMOTED) else 1
