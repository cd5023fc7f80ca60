"""The state database: one engine, migrations at open, and read/write transactions.

SQLite (the default) runs in WAL mode with a busy timeout, and write transactions start with
``BEGIN IMMEDIATE`` so concurrent association threads queue for the write lock instead of failing
on a lock upgrade. Any other SQLAlchemy URL (PostgreSQL) uses its ordinary transactions.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, TextClause, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError

from neuroscribe.errors import StoreError
from neuroscribe.log import get_logger
from neuroscribe.store.migrations import migrate

LOG = get_logger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: ``synchronous=FULL`` fsyncs the WAL at every commit: a committed row survives power loss,
#: which is what a C-STORE success promises.
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
    "PRAGMA foreign_keys=ON",
)
_BEGIN_KEY = "neuroscribe_begin"
POOL_SIZE = 8
POOL_OVERFLOW = 64

#: Runs one SQL statement with ``:name`` parameters; returns its rows (none for plain DML).
SqlRunner = Callable[[str, Mapping[str, Any]], Sequence[Sequence[Any]]]


class Database:
    """The state database at ``url``, migrated to the latest schema on open."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        try:
            self.engine = self._create_engine(url)
        except SQLAlchemyError as exc:
            raise StoreError(f"state database URL not usable: {type(exc).__name__}") from exc
        with self.write() as conn:
            self.schema_version = migrate(
                conn,
                on_applied=lambda m: LOG.info(
                    "schema migrated", version=m.version, description=m.description
                ),
            )

    def _create_engine(self, url: str) -> Engine:
        if not self.is_sqlite:
            return create_engine(url, pool_pre_ping=True)
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # A pool of connections, each set up once (pragmas); a connection serves one thread at a time.
        engine = create_engine(
            url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW,
            connect_args={"check_same_thread": False},
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
            cursor = dbapi_connection.cursor()
            for pragma in SQLITE_PRAGMAS:
                cursor.execute(pragma)
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql(f"BEGIN {conn.info.pop(_BEGIN_KEY, 'DEFERRED')}")

        return engine

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that will write: committed on success, rolled back on any exception.

        Database errors surface as :class:`StoreError`.
        """
        try:
            with self.engine.connect() as conn:
                if self.is_sqlite:
                    conn.info[_BEGIN_KEY] = "IMMEDIATE"
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"state database write failed: {type(exc).__name__}") from exc

    @contextmanager
    def write_sql(self) -> Iterator[SqlRunner]:
        """Like :meth:`write`, for a few plain SQL statements on the hot path (one per C-STORE).

        On SQLite the statements go straight to the pooled driver connection inside
        ``BEGIN IMMEDIATE`` ... ``COMMIT``: the same transaction, pragmas (``synchronous=FULL``)
        and locking as :meth:`write`, without SQLAlchemy's per-statement machinery (about 1 ms of
        the 1.5 ms a C-STORE spent recording itself). Other databases go through :meth:`write`.
        Database errors surface as :class:`StoreError`; any exception rolls back.
        """
        if not self.is_sqlite:
            with self.write() as conn:
                yield functools.partial(_run_sqlalchemy, conn)
            return
        try:
            pooled = self.engine.raw_connection()
        except SQLAlchemyError as exc:
            raise StoreError(f"state database write failed: {type(exc).__name__}") from exc
        try:
            driver: sqlite3.Connection = pooled.driver_connection  # type: ignore[assignment]
            driver.execute("BEGIN IMMEDIATE")
            try:
                yield functools.partial(_run_sqlite, driver)
                driver.execute("COMMIT")
            except BaseException:
                if driver.in_transaction:
                    driver.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"state database write failed: {type(exc).__name__}") from exc
        finally:
            pooled.close()  # back to the pool

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only snapshot; database errors surface as :class:`StoreError`."""
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"state database read failed: {type(exc).__name__}") from exc

    def close(self) -> None:
        """Release every connection."""
        self.engine.dispose()


def _run_sqlite(driver: sqlite3.Connection, sql: str, params: Mapping[str, Any]) -> list[Any]:
    return driver.execute(sql, params).fetchall()


@functools.lru_cache(maxsize=64)
def _text(sql: str) -> TextClause:
    return text(sql)


def _run_sqlalchemy(conn: Connection, sql: str, params: Mapping[str, Any]) -> list[Any]:
    result = conn.execute(_text(sql), dict(params))
    return list(result.all()) if result.returns_rows else []
