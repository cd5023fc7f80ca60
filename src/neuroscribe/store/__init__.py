"""The state database: schema, migrations, transactions; the one place that knows tables.

Stands below every stage (dicom_io, reporting, daemon) and imports none of them.
"""

from neuroscribe.store.database import Database
from neuroscribe.store.migrations import LATEST_VERSION
from neuroscribe.store.outbox import Destination, OutboxItem, OutboxStore, ReportRecord
from neuroscribe.store.state import InstanceRecord, SeriesRow, StateStore
from neuroscribe.store.tables import DestinationKind, OutboxState, SeriesState

__all__ = [
    "LATEST_VERSION",
    "Database",
    "Destination",
    "DestinationKind",
    "InstanceRecord",
    "OutboxItem",
    "OutboxState",
    "OutboxStore",
    "ReportRecord",
    "SeriesRow",
    "SeriesState",
    "StateStore",
]
