"""``neuroscribe outbox list|retry|drop``: the durable outbox as an operator sees it (docs/outbox.md)."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from neuroscribe.config import Settings

if TYPE_CHECKING:
    from neuroscribe.store import OutboxStore

#: ``list`` text columns: (heading, width); the last reason takes the rest of the line.
_COLUMNS = (("ID", 17), ("STATE", 9), ("DESTINATION", 20), ("TRIES", 5), ("NEXT ATTEMPT (UTC)", 19),
            ("REPORT", 17))
_STATES = ("pending", "delivered", "dead", "dropped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands list, retry, drop."""
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="outbox items: state, destination, attempts, next attempt, reason")
    listing.add_argument("--state", choices=_STATES, help="only items in this state (dead: dead letters)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    retry = sub.add_parser("retry", help="send items again now, in a new delivery window (dead, dropped "
                                         "or pending)")
    retry.add_argument("ids", nargs="*", metavar="ID", help="outbox item IDs (from list)")
    retry.add_argument("--all-dead", action="store_true", help="every dead letter")
    drop = sub.add_parser("drop", help="give items up (state dropped; kept for audit)")
    drop.add_argument("ids", nargs="+", metavar="ID", help="outbox item IDs (from list)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Do the action; exit 1 when an ID was unknown or in a state the action does not apply to."""
    from neuroscribe.store import Database, OutboxStore

    db = Database(settings.storage.resolved_database_url)
    try:
        store = OutboxStore(db)
        return _list(store, args) if args.action == "list" else _change(store, args)
    finally:
        db.close()


def _list(store: OutboxStore, args: argparse.Namespace) -> int:
    from neuroscribe.store import OutboxState

    items = store.items(OutboxState(args.state) if args.state else None)
    if args.json:
        print(json.dumps([item.as_dict() for item in items], indent=2))
        return 0
    if not items:
        print("no outbox items" + (f" in state {args.state}" if args.state else ""))
        return 0
    print(" ".join(f"{name:<{width}}" for name, width in _COLUMNS) + " LAST REASON")
    for item in items:
        cells = (item.item_id, item.state.value, str(item.destination), str(item.attempts),
                 format_utc(item.next_attempt_at), item.report_id)
        line = " ".join(f"{cell:<{width}}" for cell, (_, width) in zip(cells, _COLUMNS, strict=True))
        print(f"{line} {item.last_reason or '-'}")
    return 0


def _change(store: OutboxStore, args: argparse.Namespace) -> int:
    from neuroscribe.log import get_logger

    now = time.time()
    if args.action == "retry":
        if bool(args.ids) == args.all_dead:
            print("neuroscribe outbox retry: give item IDs or --all-dead (not both)")
            return 2
        changed = store.retry_dead(now) if args.all_dead else store.retry(args.ids, now)
        verb, rule = "retrying", "not pending, dead or dropped"
    else:
        changed = store.drop(args.ids, now)
        verb, rule = "dropped", "not pending or dead"
    get_logger(__name__).info(f"outbox {args.action}", item_ids=changed)
    for item_id in changed:
        print(f"{verb} {item_id}")
    unchanged = [i for i in dict.fromkeys(args.ids) if i not in changed]
    for item_id in unchanged:
        print(f"unchanged {item_id}: unknown or {rule}")
    if args.action == "retry" and args.all_dead and not changed:
        print("no dead letters")
    return 1 if unchanged else 0


def format_utc(moment: float | None) -> str:
    """A POSIX time as ``YYYY-MM-DD HH:MM:SS`` (UTC), or ``-``."""
    return "-" if moment is None else datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S")
