"""Engines made per process, short sessions, and migrations (alembic) for the database.

``Database(url)`` is cheap to build; its engine is created on first use in each process, so a
Celery prefork child never shares a parent's sockets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from notifier.errors import NotifierError, StoreRefused, StoreUnavailable
from notifier.faults import is_transient_database_error, is_transient_driver_error

__all__ = ["Database", "store_error", "upgrade"]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API, beat and every worker read while one writes; the busy timeout makes a
    # writer wait for the lock instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """One database URL; hands out sessions from an engine owned by the current process."""

    def __init__(self, url: str, *, timeout: int | None = None) -> None:
        """``timeout``: seconds to wait for a new PostgreSQL connection or a free pooled one
        (``NOTIFIER_DATABASE_TIMEOUT``); None waits as long as the driver and pool do."""
        self.url = url
        self.timeout = timeout
        self._pid = -1
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @property
    def is_postgresql(self) -> bool:
        return self.url.startswith("postgresql")

    @property
    def engine(self) -> Engine:
        if self._engine is None or self._pid != os.getpid():
            self._engine = self._create_engine()
            self._sessions = sessionmaker(self._engine, expire_on_commit=False)
            self._pid = os.getpid()
        return self._engine

    def _create_engine(self) -> Engine:
        # hide_parameters: an error's text leaves out the statement's values (an event's whole
        # payload, a sealed secret), since errors end up in logs and tracebacks.
        if self.is_sqlite:
            _private_sqlite_file(self.url)
            engine = create_engine(self.url, connect_args={"timeout": 30}, hide_parameters=True)
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        # No pre-ping: it was 6% of a worker's time. A connection that died anyway fails as
        # StoreUnavailable (transient: the task retries) and the pool replaces it.
        if self.timeout is None:
            return create_engine(self.url, pool_size=5, max_overflow=5, pool_recycle=1800,
                                 hide_parameters=True)
        # Without both bounds a database lost behind the network (silent, not refusing) holds
        # every caller: libpq waits for its answer without end, and the pool's waiters 30 s.
        return create_engine(self.url, pool_size=5, max_overflow=5, pool_recycle=1800,
                             pool_timeout=self.timeout, hide_parameters=True,
                             connect_args={"connect_timeout": self.timeout})

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success, rolls back on error, and always closes.

        Database errors come out as ``StoreUnavailable`` (transient: a lost connection, a
        deadlock...) or ``StoreRefused`` (permanent), as ``notifier.faults`` decides.
        """
        self.engine  # noqa: B018 - makes the per-process engine and session factory
        assert self._sessions is not None
        session = self._sessions()
        try:
            with _classified():
                yield session
                session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in one transaction: ``session()`` without the ORM's cost, for the
        statements every delivery runs."""
        with _classified(), self.engine.begin() as connection:
            yield connection

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A Core connection where each statement commits on its own: for a write that is one
        statement, which then costs one round trip instead of three (BEGIN, it, COMMIT)."""
        with _classified(), self.engine.connect() as connection:
            yield connection.execution_options(isolation_level="AUTOCOMMIT")

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _private_sqlite_file(url: str) -> None:
    """Create the SQLite file of ``url`` readable by its owner only (0600, in a folder of 0700
    if it has to make one); SQLite gives its -wal and -shm files the same mode."""
    path = url.split("///", 1)[-1]
    if not path or path == ":memory:":
        return
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


@contextmanager
def _classified() -> Iterator[None]:
    """Wrap the driver's errors as transient (``StoreUnavailable``) or permanent
    (``StoreRefused``), once, for every caller."""
    try:
        yield
    except PoolTimeout as exc:  # every pooled connection busy for NOTIFIER_DATABASE_TIMEOUT
        raise StoreUnavailable(f"no free database connection: {exc}") from exc
    except DBAPIError as exc:
        raise store_error(exc.orig or exc, transient=is_transient_database_error(exc)) from exc


def store_error(driver: BaseException, *, transient: bool | None = None) -> NotifierError:
    """The driver's error as notifier's: ``StoreUnavailable`` when ``notifier.faults`` finds it
    transient, else ``StoreRefused``; both name the SQLSTATE when there is one."""
    if transient is None:
        transient = is_transient_driver_error(driver)
    sqlstate = getattr(driver, "sqlstate", None)
    code = f" (SQLSTATE {sqlstate})" if sqlstate else ""
    if transient:
        return StoreUnavailable(f"database error{code}: {driver}")
    return StoreRefused(f"database refused{code}: {driver}")


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` with the alembic migrations."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if url.startswith("sqlite"):
        _private_sqlite_file(url)
    command.upgrade(config, revision)
