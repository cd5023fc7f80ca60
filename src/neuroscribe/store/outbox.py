"""What the outbox asks of the state database: made reports and one delivery item per destination.

A report row names the SR and ORU files as they were made (paths relative to the reports folder, with
their SHA-256), so every retry resends the same objects. An outbox row is one (report, destination)
delivery and its state (:class:`~neuroscribe.store.tables.OutboxState`). Every method is one
transaction; times are POSIX seconds from the caller's (injectable) clock. State changes are guarded
in SQL (``WHERE state = ...``), so an operator's ``drop`` and a delivery attempt never overwrite each
other, and :meth:`OutboxStore.claim_due` leases an item before it is sent, so two threads or nodes
never send the same item at once.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select, text, update

from neuroscribe.store.database import Database
from neuroscribe.store.tables import DestinationKind, OutboxState, outbox, reports

__all__ = ["Destination", "OutboxItem", "OutboxStore", "ReportRecord", "sortable_id"]

#: States an operator may send again (``neuroscribe outbox retry``).
RETRYABLE_STATES = (OutboxState.PENDING, OutboxState.DEAD, OutboxState.DROPPED)
#: States an operator may give up (``neuroscribe outbox drop``).
DROPPABLE_STATES = (OutboxState.PENDING, OutboxState.DEAD)
#: Items one :meth:`OutboxStore.claim_due` call takes at most.
DEFAULT_CLAIM_LIMIT = 100


def sortable_id(prefix: str) -> str:
    """``prefix`` + 16 base32 characters: 48 bits of milliseconds then 32 random bits (time-ordered)."""
    millis = int(time.time() * 1000) & (2**48 - 1)
    raw = millis.to_bytes(6, "big") + os.urandom(4)
    return prefix + base64.b32encode(raw).decode("ascii")


@dataclass(frozen=True)
class Destination:
    """A configured destination: its kind and its name (unique within the kind)."""

    kind: DestinationKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.name}"


@dataclass(frozen=True)
class ReportRecord:
    """A made report: its identifiers and its durable files (no patient data)."""

    report_id: str
    study_instance_uid: str
    #: The source CT series the report is about.
    series_instance_uid: str
    sr_sop_instance_uid: str
    sr_series_instance_uid: str
    #: MSH-10 of the ORU; None when no ORU was made.
    control_id: str | None
    model_name: str
    model_version: str
    created_at: float
    #: The SR file, relative to the reports folder, and its SHA-256 (hex).
    sr_file: str
    sr_sha256: str
    #: The ORU's ER7 (UTF-8 bytes), relative to the reports folder, and its SHA-256; None without ORU.
    er7_file: str | None
    er7_sha256: str | None


@dataclass(frozen=True)
class OutboxItem:
    """One delivery of one report to one destination."""

    item_id: str
    report_id: str
    destination: Destination
    state: OutboxState
    #: Attempts in the current delivery window (a manual retry starts a new window at 0).
    attempts: int
    created_at: float
    #: When the dead-letter age started counting: ``created_at``, or the last manual retry.
    window_started_at: float
    next_attempt_at: float | None
    last_attempt_at: float | None
    #: ``delivered``, ``retry`` or ``dead`` (the outcome of the last attempt).
    last_outcome: str | None
    #: Why, free of patient data.
    last_reason: str | None
    delivered_at: float | None
    dead_at: float | None
    dropped_at: float | None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``destination`` as ``kind:name``)."""
        return {
            "item_id": self.item_id, "report_id": self.report_id, "destination": str(self.destination),
            "state": self.state.value, "attempts": self.attempts, "created_at": self.created_at,
            "window_started_at": self.window_started_at, "next_attempt_at": self.next_attempt_at,
            "last_attempt_at": self.last_attempt_at, "last_outcome": self.last_outcome,
            "last_reason": self.last_reason, "delivered_at": self.delivered_at, "dead_at": self.dead_at,
            "dropped_at": self.dropped_at,
        }


# Portable on SQLite (3.24+) and PostgreSQL: enqueueing the same report for a destination twice
# leaves the first row as it is.
_INSERT_ITEM = text("""
    INSERT INTO outbox (item_id, report_id, destination_kind, destination_name, state, attempts,
                        created_at, window_started_at, next_attempt_at)
    VALUES (:item_id, :report_id, :kind, :name, 'pending', 0, :now, :now, :now)
    ON CONFLICT (report_id, destination_kind, destination_name) DO NOTHING
""")


class OutboxStore:
    """The reports and outbox tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reports -----------------------------------------------------------------------------

    def add_report(
        self, record: ReportRecord, destinations: Iterable[Destination], now: float
    ) -> tuple[ReportRecord, bool]:
        """Store a report and a pending item (due ``now``) per destination, in one transaction.

        A report whose SR SOP Instance UID is known is not stored again: its existing record is used,
        and only destinations it lacks get an item. Returns the stored record and whether it is new.
        """
        with self.db.write() as conn:
            known = _report_where(conn, reports.c.sr_sop_instance_uid == record.sr_sop_instance_uid)
            if known is None:
                conn.execute(reports.insert().values(**_report_values(record)))
            stored = known or record
            for destination in dict.fromkeys(destinations):
                conn.execute(_INSERT_ITEM, {
                    "item_id": sortable_id("O"), "report_id": stored.report_id,
                    "kind": destination.kind.value, "name": destination.name, "now": now,
                })
        return stored, known is None

    def report(self, report_id: str) -> ReportRecord | None:
        """One report, or None."""
        with self.db.read() as conn:
            return _report_where(conn, reports.c.report_id == report_id)

    def report_by_sr_uid(self, sr_sop_instance_uid: str) -> ReportRecord | None:
        """The report whose SR has this SOP Instance UID, or None."""
        with self.db.read() as conn:
            return _report_where(conn, reports.c.sr_sop_instance_uid == sr_sop_instance_uid)

    def reports_for_series(self, series_instance_uid: str) -> list[ReportRecord]:
        """Every report on this source CT series, oldest first (empty if none)."""
        query = (select(reports).where(reports.c.series_instance_uid == series_instance_uid)
                 .order_by(reports.c.created_at, reports.c.report_id))
        with self.db.read() as conn:
            return [ReportRecord(**row._mapping) for row in conn.execute(query)]

    def report_ids(self) -> set[str]:
        """Every report ID (for start-up reconciliation of the reports folder)."""
        with self.db.read() as conn:
            return {row.report_id for row in conn.execute(select(reports.c.report_id))}

    # -- items -------------------------------------------------------------------------------

    def items(
        self, state: OutboxState | None = None, report_id: str | None = None
    ) -> list[OutboxItem]:
        """Items, optionally of one state and/or report, oldest first."""
        query = select(outbox)
        if state is not None:
            query = query.where(outbox.c.state == state.value)
        if report_id is not None:
            query = query.where(outbox.c.report_id == report_id)
        with self.db.read() as conn:
            rows = conn.execute(query.order_by(outbox.c.created_at, outbox.c.item_id))
            return [_item(row._mapping) for row in rows]

    def item(self, item_id: str) -> OutboxItem | None:
        """One item, or None."""
        with self.db.read() as conn:
            row = conn.execute(select(outbox).where(outbox.c.item_id == item_id)).first()
        return None if row is None else _item(row._mapping)

    def counts(self) -> dict[OutboxState, int]:
        """How many items are in each state (every state listed)."""
        with self.db.read() as conn:
            rows = conn.execute(select(outbox.c.state, func.count()).group_by(outbox.c.state))
            found = {OutboxState(state): int(n) for state, n in rows}
        return {state: found.get(state, 0) for state in OutboxState}

    def claim_due(
        self, now: float, lease_seconds: float, limit: int = DEFAULT_CLAIM_LIMIT, holder: str | None = None
    ) -> list[OutboxItem]:
        """Pending items due by ``now``, earliest first, each leased until ``now + lease_seconds``.

        The lease moves ``next_attempt_at`` forward, so no other caller claims the item while it is
        being sent, and an attempt cut short by a crash is tried again when the lease runs out, or
        at once when its ``holder`` restarts (:meth:`release_leases`).
        """
        with self.db.write() as conn:
            due = conn.execute(
                select(outbox.c.item_id)
                .where(outbox.c.state == OutboxState.PENDING.value)
                .where(outbox.c.next_attempt_at <= now)
                .order_by(outbox.c.next_attempt_at, outbox.c.item_id)
                .limit(limit)
            ).scalars().all()
            claimed = []
            for item_id in due:
                result = conn.execute(
                    update(outbox)
                    .where(outbox.c.item_id == item_id)
                    .where(outbox.c.state == OutboxState.PENDING.value)
                    .where(outbox.c.next_attempt_at <= now)
                    .values(next_attempt_at=now + lease_seconds, leased_by=holder)
                )
                if result.rowcount == 1:
                    claimed.append(item_id)
            if not claimed:
                return []
            rows = conn.execute(select(outbox).where(outbox.c.item_id.in_(claimed)))
            found = {row.item_id: _item(row._mapping) for row in rows}
        return [found[item_id] for item_id in claimed]

    def record_attempt(
        self,
        item_id: str,
        *,
        now: float,
        outcome: str,
        reason: str,
        state: OutboxState,
        next_attempt_at: float | None = None,
    ) -> bool:
        """Record one attempt on a pending item and move it to ``state``.

        ``next_attempt_at`` is required for PENDING and ignored otherwise. Returns False (and changes
        nothing) if the item is no longer pending, e.g. an operator dropped it meanwhile.
        """
        if state is OutboxState.PENDING and next_attempt_at is None:
            raise ValueError("next_attempt_at is required when the item stays pending")
        if state is OutboxState.DROPPED:
            raise ValueError("an attempt does not drop an item; OutboxStore.drop does")
        values: dict[str, Any] = {
            "state": state.value, "attempts": outbox.c.attempts + 1, "last_attempt_at": now,
            "last_outcome": outcome, "last_reason": reason,
            "next_attempt_at": next_attempt_at if state is OutboxState.PENDING else None,
            "leased_by": None,
        }
        if state is OutboxState.DELIVERED:
            values["delivered_at"] = now
        elif state is OutboxState.DEAD:
            values["dead_at"] = now
        with self.db.write() as conn:
            result = conn.execute(
                update(outbox)
                .where(outbox.c.item_id == item_id)
                .where(outbox.c.state == OutboxState.PENDING.value)
                .values(**values)
            )
            return result.rowcount == 1

    def release_leases(self, holder: str, now: float) -> int:
        """Make ``holder``'s leased items due now (it restarted, so its attempts ended); returns how many."""
        with self.db.write() as conn:
            return conn.execute(
                update(outbox).where(outbox.c.state == OutboxState.PENDING.value)
                .where(outbox.c.leased_by == holder).where(outbox.c.next_attempt_at > now)
                .values(next_attempt_at=now, leased_by=None)
            ).rowcount

    def retry(self, item_ids: Sequence[str], now: float) -> list[str]:
        """Make pending, dead or dropped items due ``now`` in a new delivery window (attempts 0).

        Returns the IDs that changed; delivered and unknown IDs are left out.
        """
        return self._move(item_ids, RETRYABLE_STATES, {
            "state": OutboxState.PENDING.value, "attempts": 0, "window_started_at": now,
            "next_attempt_at": now, "dead_at": None, "dropped_at": None,
        })

    def retry_dead(self, now: float) -> list[str]:
        """:meth:`retry` every dead item; returns their IDs."""
        return self.retry([item.item_id for item in self.items(OutboxState.DEAD)], now)

    def drop(self, item_ids: Sequence[str], now: float) -> list[str]:
        """Give up pending or dead items (kept, state DROPPED); returns the IDs that changed."""
        return self._move(item_ids, DROPPABLE_STATES, {
            "state": OutboxState.DROPPED.value, "dropped_at": now, "next_attempt_at": None,
        })

    def _move(self, item_ids: Sequence[str], from_states: Sequence[OutboxState],
              values: dict[str, Any]) -> list[str]:
        changed = []
        with self.db.write() as conn:
            for item_id in dict.fromkeys(item_ids):
                result = conn.execute(
                    update(outbox)
                    .where(outbox.c.item_id == item_id)
                    .where(outbox.c.state.in_([s.value for s in from_states]))
                    .values(**values)
                )
                if result.rowcount == 1:
                    changed.append(item_id)
        return changed


def _report_where(conn: Connection, condition: Any) -> ReportRecord | None:
    row = conn.execute(select(reports).where(condition)).first()
    return None if row is None else ReportRecord(**row._mapping)


def _report_values(record: ReportRecord) -> dict[str, Any]:
    return {column.name: getattr(record, column.name) for column in reports.columns}


def _item(row: Any) -> OutboxItem:
    return OutboxItem(
        item_id=row["item_id"],
        report_id=row["report_id"],
        destination=Destination(DestinationKind(row["destination_kind"]), row["destination_name"]),
        state=OutboxState(row["state"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
        window_started_at=row["window_started_at"],
        next_attempt_at=row["next_attempt_at"],
        last_attempt_at=row["last_attempt_at"],
        last_outcome=row["last_outcome"],
        last_reason=row["last_reason"],
        delivered_at=row["delivered_at"],
        dead_at=row["dead_at"],
        dropped_at=row["dropped_at"],
    )
