"""Fixtures of the reliability tests: the stack's database with an org, webhooks on the test
receiver, and a PostgreSQL trigger that makes the database refuse chosen events."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from notifier import store
from notifier.client import publish
from notifier.db import Database
from notifier.models import FINAL_STATUSES, Delivery, Event, EventStatus
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Receiver, Stack, create_webhook

ORG = 71013


def customer(n: int = 1, **more: Any) -> dict[str, Any]:
    return {"customerIdentifiers": {"customerId": n}, "totalPointsIssued": 10, **more}


@pytest.fixture
def database(stack: Stack) -> Iterator[Database]:
    """The stack's database, with the test org in it."""
    opened = Database(stack.settings.database_url)
    store.create_org(opened, ORG, "reliability org", now_ms=0)
    yield opened
    opened.dispose()


@pytest.fixture
def hook(stack: Stack, database: Database, receiver: Receiver) -> Callable[..., str]:
    """Make a webhook of the test org on the receiver's ``path``; returns its id."""
    def make(path: str, **options: Any) -> str:
        webhook_id, _ = create_webhook(
            database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
            org_id=ORG, name=path.strip("/"), url=receiver.url(path),
            event_names=["pointsIssued"], now_ms=0, **options)
        return webhook_id
    return make


def send(stack: Stack, data: dict[str, Any], **fields: Any) -> str:
    """Publish a pointsIssued event through the broker; returns its eventId."""
    return publish("pointsIssued", data, org_id=ORG, broker_url=stack.settings.broker_url,
                   **fields)


def event_row(database: Database, event_id: str) -> Event | None:
    with database.session() as session:
        return session.scalar(select(Event).where(Event.event_id == event_id))


def deliveries(database: Database) -> list[Delivery]:
    with database.session() as session:
        return list(session.scalars(select(Delivery)))


def assert_nothing_open(database: Database) -> None:
    """Every event settled (dispatched or rejected) and every delivery in a final state."""
    with database.session() as session:
        events = session.scalars(select(Event.status)).all()
        open_ = session.scalars(select(Delivery.id).where(
            Delivery.status.not_in(FINAL_STATUSES))).all()
    assert set(events) <= {EventStatus.DISPATCHED, EventStatus.REJECTED}, events
    assert open_ == [], f"deliveries left open: {open_}"


_POISON = """
CREATE OR REPLACE FUNCTION notifier_test_poison() RETURNS trigger AS $$
BEGIN
    -- TG_ARGV: the SQLSTATE to raise, and 'all' or 'dispatched' (which rows to refuse).
    IF NEW.payload -> 'data' ? 'poison' AND (TG_ARGV[1] = 'all' OR NEW.status = 'dispatched')
    THEN
        RAISE EXCEPTION USING ERRCODE = TG_ARGV[0],
            MESSAGE = 'refused by the test trigger (' || TG_ARGV[0] || ')';
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql
"""


@pytest.fixture
def refuse_poison(stack: Stack) -> Iterator[Callable[[str, str], None]]:
    """``refuse_poison(sqlstate, rows)`` makes PostgreSQL refuse to store any event whose data
    has a ``poison`` key, raising ``sqlstate``: only as dispatched (``rows="dispatched"``) or
    also as rejected (``"all"``). Removed again after the test (and by ``lift()``)."""
    engine = sa.create_engine(stack.settings.database_url)

    def lift() -> None:
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TRIGGER IF EXISTS notifier_test_poison ON events")

    def install(sqlstate: str, rows: str) -> None:
        lift()
        with engine.begin() as connection:
            connection.exec_driver_sql(_POISON)
            connection.exec_driver_sql(
                "CREATE TRIGGER notifier_test_poison BEFORE INSERT ON events FOR EACH ROW "
                f"EXECUTE FUNCTION notifier_test_poison('{sqlstate}', '{rows}')")

    install.lift = lift  # type: ignore[attr-defined]
    yield install
    lift()
    engine.dispose()
