"""What the stages ask of the state database: instances received, series and their decisions.

Every method is one transaction. Times are POSIX seconds passed in by the caller (an injected
clock), so completion rules can be tested without sleeping.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update

from neuroscribe.store.database import Database
from neuroscribe.store.tables import SeriesState, ingest_failures, instances, series


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance as the receiver records it (``header`` holds no patient data)."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    size_bytes: int
    received_at: float
    calling_ae: str
    header: dict[str, Any]


@dataclass(frozen=True)
class SeriesRow:
    """A series as the state database holds it."""

    series_instance_uid: str
    study_instance_uid: str
    state: SeriesState
    revision: int
    first_received_at: float
    last_received_at: float
    completed_at: float | None
    completion: str | None
    reason: str | None
    reason_detail: str | None
    instance_count: int


# A new instance reopens a decided series (the late-instance rule; see docs/series.md): it goes
# back to RECEIVING with revision + 1, so a decision made on the old revision can never be applied.
_UPSERT_SERIES = """
    INSERT INTO series (series_instance_uid, study_instance_uid, state, revision,
                        first_received_at, last_received_at)
    VALUES (:series, :study, 'RECEIVING', 1, :now, :now)
    ON CONFLICT (series_instance_uid) DO UPDATE SET
        last_received_at = CASE WHEN excluded.last_received_at > series.last_received_at
                                THEN excluded.last_received_at ELSE series.last_received_at END,
        revision = CASE WHEN series.state = 'RECEIVING' THEN series.revision
                        ELSE series.revision + 1 END,
        first_received_at = CASE WHEN series.state = 'RECEIVING' THEN series.first_received_at
                                 ELSE excluded.first_received_at END,
        state = 'RECEIVING',
        completed_at = NULL,
        completion = NULL,
        decided_at = NULL,
        reason = NULL,
        reason_detail = NULL
"""

_UPSERT_INSTANCE = """
    INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid, sop_class_uid,
                           transfer_syntax_uid, path, size_bytes, received_at, calling_ae, header)
    VALUES (:sop, :series, :study, :sop_class, :ts, :path, :size, :now, :ae, :header)
    ON CONFLICT (sop_instance_uid) DO UPDATE SET
        series_instance_uid = excluded.series_instance_uid,
        study_instance_uid = excluded.study_instance_uid,
        sop_class_uid = excluded.sop_class_uid,
        transfer_syntax_uid = excluded.transfer_syntax_uid,
        path = excluded.path,
        size_bytes = excluded.size_bytes,
        received_at = excluded.received_at,
        calling_ae = excluded.calling_ae,
        header = excluded.header
"""

# A re-sent instance only moves the quiet-period clock of a series that is still receiving.
_TOUCH_SERIES = """
    UPDATE series SET last_received_at = :now
    WHERE series_instance_uid = :series AND state = 'RECEIVING' AND last_received_at < :now
"""

_INSTANCE_SERIES = "SELECT series_instance_uid FROM instances WHERE sop_instance_uid = :sop"


class StateStore:
    """The receiving half's view of the state database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- instances ---------------------------------------------------------------------------

    def record_instance(self, rec: InstanceRecord) -> bool:
        """Record a stored instance; True if new, False if this SOP Instance UID was known.

        A re-sent instance replaces the row (and its file was replaced atomically) but does not
        reopen a series that was already completed: sending the same object twice changes nothing.
        """
        params = {
            "sop": rec.sop_instance_uid,
            "series": rec.series_instance_uid,
            "study": rec.study_instance_uid,
            "sop_class": rec.sop_class_uid,
            "ts": rec.transfer_syntax_uid,
            "path": str(rec.path),
            "size": rec.size_bytes,
            "now": rec.received_at,
            "ae": rec.calling_ae,
            "header": json.dumps(rec.header, separators=(",", ":")),
        }
        # Plain SQL through write_sql: this runs once per C-STORE, on the association thread.
        with self.db.write_sql() as run:
            known = run(_INSTANCE_SERIES, params)
            run(_UPSERT_INSTANCE, params)
            moved = bool(known) and known[0][0] != rec.series_instance_uid
            run(_UPSERT_SERIES if not known or moved else _TOUCH_SERIES, params)
            return not known

    def record_failure(
        self,
        *,
        at: float,
        calling_ae: str,
        peer_address: str,
        status: int,
        reason: str,
        detail: str,
        sop_instance_uid_hash: str | None,
    ) -> None:
        """Keep a refused C-STORE (status, reason) where an operator can see it."""
        with self.db.write() as conn:
            conn.execute(
                insert(ingest_failures).values(
                    at=at, calling_ae=calling_ae, peer_address=peer_address, status=status,
                    reason=reason, detail=detail, sop_instance_uid_hash=sop_instance_uid_hash,
                )
            )

    def failures(self) -> list[dict[str, Any]]:
        """Every recorded ingest failure, oldest first."""
        with self.db.read() as conn:
            rows = conn.execute(select(ingest_failures).order_by(ingest_failures.c.id))
            return [dict(row._mapping) for row in rows]

    def instance_headers(self, series_instance_uid: str) -> list[dict[str, Any]]:
        """The recorded header of each instance of a series (plus its ``path`` and SOP UIDs)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(instances.c.sop_instance_uid, instances.c.sop_class_uid,
                       instances.c.path, instances.c.header)
                .where(instances.c.series_instance_uid == series_instance_uid)
                .order_by(instances.c.sop_instance_uid)
            )
            return [
                {**json.loads(row.header), "sop_instance_uid": row.sop_instance_uid,
                 "sop_class_uid": row.sop_class_uid, "path": row.path}
                for row in rows
            ]

    def instance_paths(self, series_instance_uid: str) -> list[Path]:
        """Spool paths of a series' instances."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(instances.c.path).where(
                    instances.c.series_instance_uid == series_instance_uid
                )
            )
            return [Path(row.path) for row in rows]

    def known_paths(self) -> set[str]:
        """Every spool path the database knows (for start-up reconciliation)."""
        with self.db.read() as conn:
            return {row.path for row in conn.execute(select(instances.c.path))}

    def instance_count(self) -> int:
        """How many instances are recorded."""
        with self.db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(instances)).scalar_one())

    def spool_bytes(self) -> int:
        """The bytes of every recorded instance (the spool's size as the database knows it)."""
        with self.db.read() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(instances.c.size_bytes), 0))).scalar_one())

    # -- series ------------------------------------------------------------------------------

    def series_counts(self) -> dict[tuple[SeriesState, str | None], int]:
        """How many series are in each (state, reason); the reason is set for REJECTED only."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(series.c.state, series.c.reason, func.count())
                .group_by(series.c.state, series.c.reason)
            )
            return {(SeriesState(state), reason): int(n) for state, reason, n in rows}

    def complete_quiet_series(
        self, now: float, quiet_seconds: float, force_complete_seconds: float
    ) -> list[SeriesRow]:
        """Mark RECEIVING series COMPLETE: quiet long enough, or past the force-complete ceiling."""
        with self.db.write() as conn:
            done: list[str] = []
            for completion, condition in (
                ("quiet", series.c.last_received_at <= now - quiet_seconds),
                ("forced", series.c.first_received_at <= now - force_complete_seconds),
            ):
                result = conn.execute(
                    update(series)
                    .where(series.c.state == SeriesState.RECEIVING)
                    .where(condition)
                    .values(state=SeriesState.COMPLETE, completed_at=now, completion=completion)
                    .returning(series.c.series_instance_uid)
                )
                done.extend(row.series_instance_uid for row in result)
        return self.series_rows(done)

    def series_rows(
        self, uids: Iterable[str] | None = None, state: SeriesState | None = None
    ) -> list[SeriesRow]:
        """Series by UID and/or state, with their instance counts, oldest first."""
        counts = (
            select(instances.c.series_instance_uid, func.count().label("n"))
            .group_by(instances.c.series_instance_uid)
            .subquery()
        )
        query = select(series, func.coalesce(counts.c.n, 0).label("instance_count")).outerjoin(
            counts, counts.c.series_instance_uid == series.c.series_instance_uid
        )
        if uids is not None:
            uid_list = list(uids)
            if not uid_list:
                return []
            query = query.where(series.c.series_instance_uid.in_(uid_list))
        if state is not None:
            query = query.where(series.c.state == state)
        with self.db.read() as conn:
            rows = conn.execute(query.order_by(series.c.first_received_at))
            return [_series_row(row._mapping) for row in rows]

    def series_row(self, series_instance_uid: str) -> SeriesRow | None:
        """One series, or None."""
        rows = self.series_rows([series_instance_uid])
        return rows[0] if rows else None

    def decide_series(
        self,
        series_instance_uid: str,
        revision: int,
        state: SeriesState,
        now: float,
        reason: str | None = None,
        detail: str | None = None,
    ) -> bool:
        """Record SELECTED or REJECTED for a COMPLETE series at ``revision``.

        Returns False (and changes nothing) if the series moved on meanwhile, e.g. a late instance
        reopened it: decisions are only ever applied to the revision they were made on.
        """
        if state not in (SeriesState.SELECTED, SeriesState.REJECTED):
            raise ValueError(f"state {state!r}: a decision is SELECTED or REJECTED")
        with self.db.write() as conn:
            result = conn.execute(
                update(series)
                .where(series.c.series_instance_uid == series_instance_uid)
                .where(series.c.revision == revision)
                .where(series.c.state == SeriesState.COMPLETE)
                .values(state=state, decided_at=now, reason=reason, reason_detail=detail)
            )
            return result.rowcount == 1

    def study_series(self, study_instance_uid: str) -> list[SeriesRow]:
        """Every series of a study."""
        with self.db.read() as conn:
            uids = [
                row.series_instance_uid
                for row in conn.execute(
                    select(series.c.series_instance_uid).where(
                        series.c.study_instance_uid == study_instance_uid
                    )
                )
            ]
        return self.series_rows(uids)


def _series_row(row: Any) -> SeriesRow:
    return SeriesRow(
        series_instance_uid=row["series_instance_uid"],
        study_instance_uid=row["study_instance_uid"],
        state=SeriesState(row["state"]),
        revision=row["revision"],
        first_received_at=row["first_received_at"],
        last_received_at=row["last_received_at"],
        completed_at=row["completed_at"],
        completion=row["completion"],
        reason=row["reason"],
        reason_detail=row["reason_detail"],
        instance_count=row["instance_count"],
    )
