"""Transient or permanent, decided once (notifier.faults): the driver's SQLSTATE for
PostgreSQL, SQLite's words, Redis's connection errors; everything else is permanent."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
import redis
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from notifier.errors import InvalidEvent, StoreRefused, StoreUnavailable
from notifier.faults import is_transient, is_transient_driver_error


class _Driver(Exception):
    """A driver's error as psycopg raises it: its SQLSTATE, or None for the client's own."""

    def __init__(self, sqlstate: str | None) -> None:
        super().__init__("driver says no")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(("sqlstate", "transient"), [
    ("08006", True),   # connection failure
    ("40001", True),   # serialization failure
    ("40P01", True),   # deadlock
    ("55P03", True),   # lock not available
    ("57P01", True),   # admin shutdown
    ("53300", True),   # too many connections
    ("22023", False),  # invalid parameter value (a DataError)
    ("22P02", False),  # invalid text representation (NaN in JSON)
    ("23505", False),  # unique violation
    ("42P01", False),  # undefined table: a bug
])
def test_postgresql_errors_are_classified_by_their_sqlstate(sqlstate: str, transient: bool) -> None:
    wrapped = OperationalError("INSERT ...", {}, _Driver(sqlstate))
    assert is_transient(wrapped) is transient
    assert is_transient(DataError("INSERT ...", {}, _Driver(sqlstate))) is transient


def test_a_driver_error_without_sqlstate_is_transient_only_when_operational() -> None:
    # psycopg's own errors (no server answer): connection refused or lost, or a client bug.
    assert is_transient(OperationalError("connect", {}, psycopg.OperationalError("refused")))
    assert is_transient_driver_error(psycopg.OperationalError("connection lost"))
    assert not is_transient(IntegrityError("INSERT ...", {}, psycopg.IntegrityError("bad")))
    assert not is_transient_driver_error(psycopg.ProgrammingError("only '%s' placeholders"))


def test_sqlite_is_transient_only_when_locked() -> None:
    locked = OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
    missing = OperationalError("INSERT ...", {}, sqlite3.OperationalError("no such table: x"))
    assert is_transient(locked) and not is_transient(missing)


def test_notifier_and_redis_errors() -> None:
    assert is_transient(StoreUnavailable("away"))
    assert is_transient(redis.exceptions.ConnectionError("refused"))
    assert not is_transient(redis.exceptions.ResponseError("a bad script"))
    assert not is_transient(StoreRefused("database refused"))
    assert not is_transient(InvalidEvent("$.data", "bad"))
    assert not is_transient(KeyError("a bug"))
