"""The smaller leaks of issue 12, each through the path that had it: a child org's points
balance behind its own operator gate (real workers, PostgreSQL, a receiver), a rejected event's
log line without its values (a real worker's log), and an SLA of 40 days on PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update

from notifier import publish, reference, store
from notifier.db import Database
from notifier.enrich import set_points_balance_allowed
from notifier.models import Delivery, Event, EventStatus, Webhook
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Receiver, Stack, create_webhook, wait_until
from tests.integration.test_enrichment import CUSTOMER, points_issued_data

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

PARENT, CHILD = 610, 611
DAY = 24 * 3600


@pytest.fixture
def database(stack: Stack) -> Iterator[Database]:
    opened = Database(stack.settings.database_url)
    yield opened
    opened.dispose()


def test_a_childs_balance_is_sent_to_its_parents_webhook_only_if_the_childs_gate_allows(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    store.create_org(database, PARENT, "parent", now_ms=0)
    store.create_org(database, CHILD, "child", now_ms=0, parent_id=PARENT)
    set_points_balance_allowed(database, PARENT, True)  # the parent may; the child may not
    reference.load(database, CHILD, reference.parse_jsonl([json.dumps(
        {"kind": "pointsBalances", "customerId": CUSTOMER,
         "programs": [{"programId": 1, "availablePoints": 150}]})]))
    webhook_id, _ = create_webhook(
        database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
        org_id=PARENT, name="parent", url=receiver.url("/parent"), event_names=["pointsIssued"],
        now_ms=0)
    with database.session() as session:
        session.execute(update(Webhook).where(Webhook.id == webhook_id).values(
            listen_to_child_events=True, available_points_balance_enrichment=True))
    stack.worker()

    publish("pointsIssued", points_issued_data(), org_id=CHILD,
            broker_url=stack.settings.broker_url)
    (first,) = receiver.wait_for(1, "/parent", timeout=60)
    assert "AvailablePointsBalance" not in json.loads(first.body)["data"]

    # The child's own gate opened, the same webhook gets the balance: the test can see it.
    # Workers remember reference answers for 2 s (reference.Lookups), so events go until one
    # arrives with it; each waits for its own arrival.
    set_points_balance_allowed(database, CHILD, True)

    def next_has_balance() -> bool:
        sent = len(receiver.at("/parent")) + 1
        publish("pointsIssued", points_issued_data(), org_id=CHILD,
                broker_url=stack.settings.broker_url)
        latest = receiver.wait_for(sent, "/parent", timeout=60)[-1]
        return json.loads(latest.body)["data"].get("AvailablePointsBalance") == 150

    wait_until(next_has_balance, 30, "the balance sent once the child's gate is open")


def test_a_rejected_events_log_line_names_the_path_and_rule_never_the_value(
        stack: Stack, database: Database) -> None:
    store.create_org(database, PARENT, "org", now_ms=0)
    stack.worker()
    secret = "jane.doe+private@example.com"
    event_id = publish("pointsIssued", {"customerIdentifiers": {"customerId": secret}},
                       org_id=PARENT, broker_url=stack.settings.broker_url)

    def rejected() -> bool:
        with database.session() as session:
            status = session.scalar(select(Event.status).where(Event.event_id == event_id))
        return status == EventStatus.REJECTED and f"event {event_id} rejected" in stack.log("w1")

    wait_until(rejected, 60, "the event stored as rejected and its log line")
    line = next(line for line in stack.log("w1").splitlines() if f"event {event_id}" in line)
    assert "$.data.customerIdentifiers.customerId" in line and "type" in line, line
    assert secret not in stack.log("w1")


def test_an_sla_of_40_days_is_checked_on_postgresql(stack: Stack, database: Database) -> None:
    store.create_org(database, PARENT, "org", now_ms=0)
    create_webhook(database, load_catalog(),
                         vault_for(stack.settings.secret_keys, stack.settings.data_dir),
                         org_id=PARENT, name="slow", url="https://example.com/hook",
                         event_names=["pointsIssued"], now_ms=0, sla_in_seconds=40 * DAY)
    event = {"eventName": "pointsIssued", "orgId": PARENT, "createdAt": 1,
             "data": {"customerIdentifiers": {"customerId": 1}}}
    store.ingest_many(database, load_catalog(), [{**event, "eventId": "old"}], now_ms=1000)
    store.ingest_many(database, load_catalog(), [{**event, "eventId": "new"}],
                      now_ms=10 * DAY * 1000)

    assert store.flag_sla_breaches(database, now_ms=1000 + 40 * DAY * 1000, batch=10) == []
    assert len(store.flag_sla_breaches(database, now_ms=41 * DAY * 1000, batch=10)) == 1
    with database.session() as session:
        flagged = session.scalars(select(Delivery.sla_breach_at_ms)
                                  .order_by(Delivery.ingested_at_ms)).all()
    assert flagged == [1000 + 40 * DAY * 1000, None]
