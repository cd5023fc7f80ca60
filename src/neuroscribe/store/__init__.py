"""The state database: schema, migrations, transactions; the one place that knows tables.

Stands below every stage (dicom_io, reporting, daemon) and imports none of them.
"""

from neuroscribe.store.database import Database
from neuroscribe.store.jobs import JobRow, JobStore, accession_key
from neuroscribe.store.migrations import LATEST_VERSION
from neuroscribe.store.outbox import Destination, OutboxItem, OutboxStore, ReportRecord
from neuroscribe.store.site import FinalReportRow, FinalReportStore, SpoolRetentionStore, count_pairs
from neuroscribe.store.state import InstanceRecord, SeriesRow, StateStore
from neuroscribe.store.tables import (
    DestinationKind,
    FinalReportState,
    JobState,
    OutboxState,
    SeriesState,
)

__all__ = [
    "LATEST_VERSION",
    "Database",
    "Destination",
    "DestinationKind",
    "FinalReportRow",
    "FinalReportState",
    "FinalReportStore",
    "InstanceRecord",
    "JobRow",
    "JobState",
    "JobStore",
    "OutboxItem",
    "OutboxState",
    "OutboxStore",
    "ReportRecord",
    "SeriesRow",
    "SeriesState",
    "SpoolRetentionStore",
    "StateStore",
    "accession_key",
    "count_pairs",
]
