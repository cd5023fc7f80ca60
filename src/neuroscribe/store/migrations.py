"""Versioned schema migrations, applied in order at start-up and recorded in ``schema_version``.

Each migration is frozen once released: change the schema by appending a new one. The DDL is plain
SQL that SQLite and PostgreSQL both accept (TEXT, INTEGER, BIGINT, DOUBLE PRECISION), so the same
list serves a single node today and a PostgreSQL URL later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, text

from neuroscribe.errors import StoreError


@dataclass(frozen=True)
class Migration:
    """One step of the schema: ``version`` n takes the database from n-1 to n."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "instances, series and ingest failures",
        (
            """
            CREATE TABLE series (
                series_instance_uid TEXT PRIMARY KEY,
                study_instance_uid TEXT NOT NULL,
                state TEXT NOT NULL,
                revision INTEGER NOT NULL DEFAULT 1,
                first_received_at DOUBLE PRECISION NOT NULL,
                last_received_at DOUBLE PRECISION NOT NULL,
                completed_at DOUBLE PRECISION,
                completion TEXT,
                decided_at DOUBLE PRECISION,
                reason TEXT,
                reason_detail TEXT
            )
            """,
            "CREATE INDEX ix_series_state ON series (state, last_received_at)",
            "CREATE INDEX ix_series_study ON series (study_instance_uid)",
            """
            CREATE TABLE instances (
                sop_instance_uid TEXT PRIMARY KEY,
                series_instance_uid TEXT NOT NULL,
                study_instance_uid TEXT NOT NULL,
                sop_class_uid TEXT NOT NULL,
                transfer_syntax_uid TEXT NOT NULL,
                path TEXT NOT NULL,
                size_bytes BIGINT NOT NULL,
                received_at DOUBLE PRECISION NOT NULL,
                calling_ae TEXT NOT NULL,
                header TEXT NOT NULL
            )
            """,
            "CREATE INDEX ix_instances_series ON instances (series_instance_uid)",
            """
            CREATE TABLE ingest_failures (
                id INTEGER PRIMARY KEY,
                at DOUBLE PRECISION NOT NULL,
                calling_ae TEXT NOT NULL,
                peer_address TEXT NOT NULL,
                status INTEGER NOT NULL,
                reason TEXT NOT NULL,
                detail TEXT NOT NULL,
                sop_instance_uid_hash TEXT
            )
            """,
        ),
    ),
    Migration(
        2,
        "reports and the durable outbox",
        (
            """
            CREATE TABLE reports (
                report_id TEXT PRIMARY KEY,
                study_instance_uid TEXT NOT NULL,
                series_instance_uid TEXT NOT NULL,
                sr_sop_instance_uid TEXT NOT NULL UNIQUE,
                sr_series_instance_uid TEXT NOT NULL,
                control_id TEXT UNIQUE,
                model_name TEXT NOT NULL,
                model_version TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                sr_file TEXT NOT NULL,
                sr_sha256 TEXT NOT NULL,
                er7_file TEXT,
                er7_sha256 TEXT
            )
            """,
            "CREATE INDEX ix_reports_series ON reports (series_instance_uid)",
            """
            CREATE TABLE outbox (
                item_id TEXT PRIMARY KEY,
                report_id TEXT NOT NULL REFERENCES reports (report_id),
                destination_kind TEXT NOT NULL,
                destination_name TEXT NOT NULL,
                state TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                created_at DOUBLE PRECISION NOT NULL,
                window_started_at DOUBLE PRECISION NOT NULL,
                next_attempt_at DOUBLE PRECISION,
                last_attempt_at DOUBLE PRECISION,
                last_outcome TEXT,
                last_reason TEXT,
                delivered_at DOUBLE PRECISION,
                dead_at DOUBLE PRECISION,
                dropped_at DOUBLE PRECISION,
                UNIQUE (report_id, destination_kind, destination_name)
            )
            """,
            "CREATE INDEX ix_outbox_due ON outbox (state, next_attempt_at)",
        ),
    ),
    Migration(
        3,
        "report jobs: a selected series on its way to a delivered report",
        (
            """
            CREATE TABLE jobs (
                job_id TEXT PRIMARY KEY,
                series_instance_uid TEXT NOT NULL,
                study_instance_uid TEXT NOT NULL,
                revision INTEGER NOT NULL,
                state TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                last_instance_at DOUBLE PRECISION NOT NULL,
                lease_until DOUBLE PRECISION,
                worker TEXT,
                report_id TEXT,
                accession_hash TEXT,
                model_id TEXT,
                inference_seconds DOUBLE PRECISION,
                reported_at DOUBLE PRECISION,
                finished_at DOUBLE PRECISION,
                reason TEXT,
                UNIQUE (series_instance_uid, revision)
            )
            """,
            "CREATE INDEX ix_jobs_state ON jobs (state, created_at)",
            "CREATE INDEX ix_jobs_accession ON jobs (accession_hash)",
            # Who holds an outbox item's lease, so a restarted node frees its own at once.
            "ALTER TABLE outbox ADD COLUMN leased_by TEXT",
        ),
    ),
    Migration(
        4,
        "learning from the site: final reports from the RIS, training pairs, spool purges",
        (
            """
            CREATE TABLE final_reports (
                final_report_id TEXT PRIMARY KEY,
                received_at DOUBLE PRECISION NOT NULL,
                sender TEXT NOT NULL,
                control_id TEXT NOT NULL,
                accession_hash TEXT NOT NULL,
                patient_hash TEXT,
                result_status TEXT NOT NULL,
                state TEXT NOT NULL,
                report_file TEXT,
                series_instance_uid TEXT,
                job_id TEXT,
                pair_dir TEXT,
                patient_pseudonym TEXT,
                instances INTEGER NOT NULL DEFAULT 0,
                bytes BIGINT NOT NULL DEFAULT 0,
                paired_at DOUBLE PRECISION,
                discarded_at DOUBLE PRECISION,
                reason TEXT,
                UNIQUE (sender, control_id)
            )
            """,
            "CREATE INDEX ix_final_reports_state ON final_reports (state, received_at)",
            "CREATE INDEX ix_final_reports_accession ON final_reports (accession_hash)",
            """
            CREATE TABLE spool_purges (
                purge_id TEXT PRIMARY KEY,
                series_instance_uid TEXT NOT NULL,
                revision INTEGER NOT NULL,
                purged_at DOUBLE PRECISION NOT NULL,
                reason TEXT NOT NULL,
                files INTEGER NOT NULL,
                bytes BIGINT NOT NULL
            )
            """,
            "CREATE INDEX ix_spool_purges_series ON spool_purges (series_instance_uid)",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version


def current_version(conn: Connection) -> int:
    """The schema version of the database (0 for an empty one)."""
    conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
        )
    )
    found = conn.execute(text("SELECT MAX(version) FROM schema_version")).scalar()
    return int(found or 0)


def migrate(conn: Connection, on_applied: Callable[[Migration], None] | None = None) -> int:
    """Apply every migration above the current version, inside the caller's transaction.

    Returns the version reached. A database newer than this code is refused, not downgraded.
    """
    version = current_version(conn)
    if version > LATEST_VERSION:
        raise StoreError(
            f"state database has schema version {version}, newer than this NeuroScribe "
            f"({LATEST_VERSION}); upgrade NeuroScribe or restore a backup"
        )
    for migration in MIGRATIONS:
        if migration.version <= version:
            continue
        for statement in migration.statements:
            conn.execute(text(statement))
        conn.execute(
            text("INSERT INTO schema_version (version, description, applied_at) VALUES (:v, :d, :t)"),
            {"v": migration.version, "d": migration.description, "t": time.time()},
        )
        if on_applied is not None:
            on_applied(migration)
        version = migration.version
    return version
