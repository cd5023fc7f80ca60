"""``neuroscribe jobs list|retry``: report jobs as an operator sees them (docs/operations.md).

A job is one selected series on its way to a delivered report (``queued`` -> ``inferring`` ->
``reported`` -> ``delivering`` -> ``delivered``/``dead``; ``failed`` with its reason when the series
could not be reported on). ``retry`` queues failed jobs again, e.g. after a new model was promoted.
Deliveries themselves are the outbox's: ``neuroscribe outbox``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import TYPE_CHECKING

from neuroscribe.config import Settings
from neuroscribe.reporting.outbox_command import format_utc

if TYPE_CHECKING:
    from neuroscribe.store import JobStore

#: ``list`` text columns: (heading, width); the reason takes the rest of the line.
_COLUMNS = (("ID", 20), ("STATE", 10), ("SERIES", 12), ("REV", 3), ("TRIES", 5), ("UPDATED (UTC)", 19),
            ("REPORT", 17))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands list and retry."""
    from neuroscribe.store import JobState

    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="jobs: state, series (hashed), attempts, report, reason")
    listing.add_argument("--state", choices=[s.value for s in JobState], help="only jobs in this state")
    listing.add_argument("--json", action="store_true", help="machine-readable output (series UIDs hashed)")
    retry = sub.add_parser("retry", help="queue failed jobs again")
    retry.add_argument("ids", nargs="*", metavar="ID", help="job IDs (from list)")
    retry.add_argument("--all-failed", action="store_true", help="every failed job")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """List, or retry; exit 1 when an ID was unknown or not failed."""
    from neuroscribe.store import Database, JobStore

    db = Database(settings.storage.resolved_database_url)
    try:
        jobs = JobStore(db)
        return _list(jobs, args) if args.action == "list" else _retry(jobs, args)
    finally:
        db.close()


def _list(jobs: JobStore, args: argparse.Namespace) -> int:
    from neuroscribe.log import hash_uid
    from neuroscribe.store import JobState

    rows = jobs.jobs(states=(JobState(args.state),) if args.state else None)
    if args.json:
        listed = [{**dataclasses.asdict(row), "series_instance_uid": hash_uid(row.series_instance_uid),
                   "study_instance_uid": hash_uid(row.study_instance_uid)} for row in rows]
        print(json.dumps(listed, indent=2, default=str))
        return 0
    if not rows:
        print("no jobs" + (f" in state {args.state}" if args.state else ""))
        return 0
    print(" ".join(f"{name:<{width}}" for name, width in _COLUMNS) + " REASON")
    for row in rows:
        cells = (row.job_id, row.state.value, hash_uid(row.series_instance_uid), str(row.revision),
                 str(row.attempts), format_utc(row.updated_at), row.report_id or "-")
        line = " ".join(f"{cell:<{width}}" for cell, (_, width) in zip(cells, _COLUMNS, strict=True))
        print(f"{line} {row.reason or '-'}")
    return 0


def _retry(jobs: JobStore, args: argparse.Namespace) -> int:
    from neuroscribe.log import get_logger
    from neuroscribe.store import JobState

    if bool(args.ids) == args.all_failed:
        print("neuroscribe jobs retry: give job IDs or --all-failed (not both)")
        return 2
    ids = [job.job_id for job in jobs.jobs(states=(JobState.FAILED,))] if args.all_failed else args.ids
    failed = {job.job_id for job in jobs.jobs(job_ids=list(ids), states=(JobState.FAILED,))}
    jobs.requeue_failed(sorted(failed), time.time())
    get_logger(__name__).info("jobs retry", job_ids=sorted(failed))
    for job_id in ids:
        print(f"queued {job_id}" if job_id in failed else f"unchanged {job_id}: unknown or not failed")
    if args.all_failed and not ids:
        print("no failed jobs")
    return 0 if set(ids) <= failed else 1
