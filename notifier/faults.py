"""Transient or permanent, decided once: is a failure worth trying again?

Ingest and delivery ask the same question here. Transient: the connection was refused or lost,
a serialization failure, a deadlock, a lock or statement timeout, a database shutting down or
out of connections, SQLite's "database is locked", Redis unreachable. Everything else is
permanent (data and integrity errors, bad input, bugs): retrying it would loop for ever, so
its work ends with a recorded reason instead (a rejected event, a failed attempt, a dead letter).
"""

from __future__ import annotations

import sqlite3
import traceback
from pathlib import Path

import redis
from sqlalchemy.exc import DBAPIError

from notifier.errors import TransientError

__all__ = ["TRANSIENT_SQLSTATES", "is_transient", "is_transient_database_error",
           "is_transient_driver_error", "reason", "summary"]

# PostgreSQL SQLSTATEs (or their two-character classes) worth retrying: connection exceptions
# (08), insufficient resources such as too many connections (53), operator intervention such
# as a shutdown or a cancelled statement (57), system I/O errors (58), serialization failure
# (40001), deadlock (40P01), lock not available (55P03), idle-in-transaction timeout (25P03).
# Everything else (22 data exception, 23 integrity violation, 42 a bad statement...) is not.
TRANSIENT_SQLSTATES = ("08", "53", "57", "58", "40001", "40P01", "55P03", "25P03")

# SQLite says so in words only: another connection holds the lock past the busy timeout.
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy")

_TRANSIENT_TYPES = (TransientError, redis.exceptions.ConnectionError,
                    redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)


def is_transient_database_error(exc: DBAPIError) -> bool:
    """Whether a database error may pass if the same statement runs again later."""
    return exc.connection_invalidated or is_transient_driver_error(exc.orig or exc)


def is_transient_driver_error(driver: BaseException) -> bool:
    """``is_transient_database_error`` for the driver's own exception (psycopg, sqlite3)."""
    sqlstate = getattr(driver, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate.startswith(TRANSIENT_SQLSTATES)
    if isinstance(driver, sqlite3.OperationalError):
        return any(words in str(driver).lower() for words in _SQLITE_TRANSIENT)
    # A driver error with no SQLSTATE is the client's own: no connection could be made, or the
    # one in use broke. Only those of its operational kinds (PEP 249's names) are about that.
    return any(kind.__name__ in ("OperationalError", "InterfaceError")
               for kind in type(driver).__mro__)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: notifier's ``TransientError`` and the outside errors
    it wraps as such (should one reach a caller unwrapped)."""
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    if isinstance(exc, DBAPIError):
        return is_transient_database_error(exc)
    return False


def reason(exc: BaseException) -> str:
    """What to record about a failure: its kind and message, bounded."""
    return f"{type(exc).__name__}: {exc}"[:2000]


def summary(exc: BaseException) -> str:
    """What a log line may say about a failure: its kind, the database's SQLSTATE and where it
    was raised, never its message. A database's message quotes the values it refused (``DETAIL:
    Failing row contains (...)``, the whole event) and a bug's may quote what it failed on;
    the whole ``reason`` is kept where the event's data already is (its row, its dead letter)."""
    sqlstate, seen = None, set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen and sqlstate is None:
        seen.add(id(cause))
        sqlstate = getattr(cause, "sqlstate", None) or getattr(
            getattr(cause, "orig", None), "sqlstate", None)
        cause = cause.__cause__
    if sqlstate:
        return f"{type(exc).__name__} (SQLSTATE {sqlstate})"
    frames = traceback.extract_tb(exc.__traceback__)  # a bug: where to look for it
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{where}"
