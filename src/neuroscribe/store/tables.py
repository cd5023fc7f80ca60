"""Table definitions for queries; the DDL that creates them lives in :mod:`.migrations`.

``tests/test_store.py`` checks that a migrated database has exactly these columns.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, Table, Text

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
