"""A poison event's log lines say which event, why in kind (the error's class, its SQLSTATE)
and where (a JSON path), never the event's values: the whole reason is kept on its row or its
dead letter, where its org's data already is. Through a real worker, and the ingest task's
batch path on the real database."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from notifier.db import Database
from notifier.models import EventStatus
from notifier.pipeline import Services, build_services
from tasks import delivery
from tasks.gathering import SimpleRequest
from tests.conftest import Stack, wait_until
from tests.reliability.conftest import ORG, customer, event_row, send

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

PRIVATE = "jane.doe+private@example.com"


@pytest.fixture
def refuse_by_check(stack: Stack) -> Iterator[None]:
    """A CHECK constraint refusing ``poison`` events as dispatched: PostgreSQL's refusal then
    quotes the whole failing row, payload included (DETAIL: Failing row contains ...)."""
    engine = sa.create_engine(stack.settings.database_url)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "ALTER TABLE events ADD CONSTRAINT notifier_test_no_poison CHECK "
            "(NOT (payload -> 'data' ? 'poison') OR status <> 'dispatched')")
    yield
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "ALTER TABLE events DROP CONSTRAINT IF EXISTS notifier_test_no_poison")
    engine.dispose()


def test_an_event_the_database_refuses_is_logged_without_its_values(
        stack: Stack, database: Database, refuse_by_check: None) -> None:
    stack.worker()

    event_id = send(stack, customer(1, poison=True, email=PRIVATE))

    row = wait_until(lambda: event_row(database, event_id), 60, "the refused event's row")
    assert row.status == EventStatus.REJECTED and "23514" in (row.error_message or "")
    assert row.payload["data"]["email"] == PRIVATE  # kept whole on its row
    wait_until(lambda: f"event {event_id}" in stack.log("w1"), 30, "its log line")
    log = stack.log("w1")
    assert "23514" in log, log
    assert PRIVATE not in log, log


@pytest.fixture
def real_services(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Services]:
    """The ingest task run in this process on the stack's database and Redis."""
    services = build_services(stack.settings)
    monkeypatch.setattr(delivery, "services", lambda: services)
    yield services
    services.db.dispose()


def _request(envelope: dict[str, object]) -> SimpleRequest:
    return SimpleRequest(id=f"task-{envelope['eventId']}", name=delivery.INGEST_TASK,
                         args=(envelope,), kwargs={}, delivery_info={}, hostname="test",
                         ignore_result=True, reply_to=None, correlation_id=None,
                         request_dict={"retries": 0})


def test_a_batch_ingested_event_by_event_logs_no_values(
        database: Database, real_services: Services, refuse_by_check: None,
        caplog: pytest.LogCaptureFixture) -> None:
    # The poison makes the batch fail for good, so each event is ingested on its own; the
    # other one is invalid, its validator message quoting its value.
    poisoned = {"eventName": "pointsIssued", "eventId": "poisoned", "orgId": ORG, "createdAt": 1,
                "data": customer(1, poison=True, email=PRIVATE)}
    invalid = {"eventName": "pointsIssued", "eventId": "invalid", "orgId": ORG, "createdAt": 1,
               "data": {"customerIdentifiers": {"customerId": PRIVATE}}}

    with caplog.at_level(logging.INFO):
        assert delivery.ingest.run([_request(poisoned), _request(invalid)]) == 2

    for event_id in ("poisoned", "invalid"):
        row = event_row(database, event_id)
        assert row is not None and row.status == EventStatus.REJECTED
    assert PRIVATE in (event_row(database, "invalid").error_message or "")  # type: ignore[union-attr]
    assert "event invalid rejected at $.data.customerIdentifiers.customerId" in caplog.text
    assert PRIVATE not in caplog.text, caplog.text
