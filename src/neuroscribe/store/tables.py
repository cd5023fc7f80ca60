"""Table definitions for queries; the DDL that creates them lives in :mod:`.migrations`.

``tests/test_store.py`` checks that a migrated database has exactly these columns.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import BigInteger, Column, Float, ForeignKey, Integer, MetaData, Table, Text, UniqueConstraint

metadata = MetaData()


class SeriesState(StrEnum):
    """Where a series stands between its first instance and its selection."""

    #: Instances are still arriving (or may be); the quiet period has not passed.
    RECEIVING = "RECEIVING"
    #: Quiet for the configured period (or forced by the ceiling); waiting for selection.
    COMPLETE = "COMPLETE"
    #: Chosen as the study's head CT; a report job can be made from it.
    SELECTED = "SELECTED"
    #: Kept on disk but not reported on; ``reason`` says why.
    REJECTED = "REJECTED"


class JobState(StrEnum):
    """Where a report job stands, from a SELECTED series to its delivered report.

    Together with :class:`SeriesState` this is the pipeline's state machine::

        RECEIVING -> COMPLETE -> SELECTED | REJECTED        (series table)
        SELECTED -> queued -> inferring -> reported -> delivering -> delivered | dead   (jobs table)

    Side exits: ``failed`` (the model could not report on it, ``reason`` says why, after
    ``inference.max_attempts``) and ``superseded`` (a late instance reopened the series; the new
    revision gets its own job).
    """

    QUEUED = "queued"
    INFERRING = "inferring"
    REPORTED = "reported"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    DEAD = "dead"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class FinalReportState(StrEnum):
    """Where a final report from the RIS stands (docs/learning.md)::

        unpaired -> paired -> discarded (superseded, or deleted for the quota)
        unpaired -> discarded (no series within learning.pair_timeout_hours, or it cannot be paired)
    """

    #: Kept (the stripped text in the inbox); no reported series has its accession yet.
    UNPAIRED = "unpaired"
    #: Kept with its de-identified series as a training pair (``pair_dir``).
    PAIRED = "paired"
    #: Given up or removed; ``reason`` says why. Its files are gone.
    DISCARDED = "discarded"


class OutboxState(StrEnum):
    """Where one (report, destination) delivery stands."""

    #: Waiting for its next attempt (``next_attempt_at``).
    PENDING = "pending"
    #: The destination has it (C-STORE success/warning/duplicate, or HL7 AA).
    DELIVERED = "delivered"
    #: Refused for good, or still failing after the dead-letter age: an operator must look.
    DEAD = "dead"
    #: Given up by an operator (``neuroscribe outbox drop``); kept for audit.
    DROPPED = "dropped"


class DestinationKind(StrEnum):
    """What a destination receives."""

    #: The SR, by C-STORE.
    PACS = "pacs"
    #: The ORU^R01, over MLLP.
    RIS = "ris"


series = Table(
    "series",
    metadata,
    Column("series_instance_uid", Text, primary_key=True),
    Column("study_instance_uid", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("first_received_at", Float, nullable=False),
    Column("last_received_at", Float, nullable=False),
    Column("completed_at", Float),
    Column("completion", Text),
    Column("decided_at", Float),
    Column("reason", Text),
    Column("reason_detail", Text),
)

instances = Table(
    "instances",
    metadata,
    Column("sop_instance_uid", Text, primary_key=True),
    Column("series_instance_uid", Text, nullable=False),
    Column("study_instance_uid", Text, nullable=False),
    Column("sop_class_uid", Text, nullable=False),
    Column("transfer_syntax_uid", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("calling_ae", Text, nullable=False),
    Column("header", Text, nullable=False),
)

ingest_failures = Table(
    "ingest_failures",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", Float, nullable=False),
    Column("calling_ae", Text, nullable=False),
    Column("peer_address", Text, nullable=False),
    Column("status", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("sop_instance_uid_hash", Text),
)

reports = Table(
    "reports",
    metadata,
    Column("report_id", Text, primary_key=True),
    Column("study_instance_uid", Text, nullable=False),
    Column("series_instance_uid", Text, nullable=False),
    Column("sr_sop_instance_uid", Text, nullable=False, unique=True),
    Column("sr_series_instance_uid", Text, nullable=False),
    Column("control_id", Text, unique=True),
    Column("model_name", Text, nullable=False),
    Column("model_version", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("sr_file", Text, nullable=False),
    Column("sr_sha256", Text, nullable=False),
    Column("er7_file", Text),
    Column("er7_sha256", Text),
)

outbox = Table(
    "outbox",
    metadata,
    Column("item_id", Text, primary_key=True),
    Column("report_id", Text, ForeignKey("reports.report_id"), nullable=False),
    Column("destination_kind", Text, nullable=False),
    Column("destination_name", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("window_started_at", Float, nullable=False),
    Column("next_attempt_at", Float),
    Column("last_attempt_at", Float),
    Column("last_outcome", Text),
    Column("last_reason", Text),
    Column("delivered_at", Float),
    Column("dead_at", Float),
    Column("dropped_at", Float),
    Column("leased_by", Text),
    UniqueConstraint("report_id", "destination_kind", "destination_name"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", Text, primary_key=True),
    Column("series_instance_uid", Text, nullable=False),
    Column("study_instance_uid", Text, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("last_instance_at", Float, nullable=False),
    Column("lease_until", Float),
    Column("worker", Text),
    Column("report_id", Text),
    Column("accession_hash", Text),
    Column("model_id", Text),
    Column("inference_seconds", Float),
    Column("reported_at", Float),
    Column("finished_at", Float),
    Column("reason", Text),
    UniqueConstraint("series_instance_uid", "revision"),
)

final_reports = Table(
    "final_reports",
    metadata,
    Column("final_report_id", Text, primary_key=True),
    Column("received_at", Float, nullable=False),
    Column("sender", Text, nullable=False),
    Column("control_id", Text, nullable=False),
    Column("accession_hash", Text, nullable=False),
    Column("patient_hash", Text),
    Column("result_status", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("report_file", Text),
    Column("series_instance_uid", Text),
    Column("job_id", Text),
    Column("pair_dir", Text),
    Column("patient_pseudonym", Text),
    Column("instances", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("paired_at", Float),
    Column("discarded_at", Float),
    Column("reason", Text),
    UniqueConstraint("sender", "control_id"),
)

spool_purges = Table(
    "spool_purges",
    metadata,
    Column("purge_id", Text, primary_key=True),
    Column("series_instance_uid", Text, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("purged_at", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("files", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
)
