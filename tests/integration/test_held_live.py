"""Held deliveries through the whole path: the API deactivates a webhook, events published to it
are held (nothing sent), and activating it with ``deliverHeld`` sends them all through a real
worker to a real receiver, in the order they were ingested."""

from __future__ import annotations

import pytest
import requests
from sqlalchemy import select

from notifier.db import Database
from notifier.models import Delivery, DeliveryStatus
from tests.conftest import PATIENT, Receiver, Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 14
EVENTS = 50


def test_events_held_while_inactive_are_sent_in_ingestion_order_on_activation(
        stack: Stack, receiver: Receiver) -> None:
    auth = {"Authorization": f"Bearer {stack.org(ORG, 'held')}"}
    stack.env.update(PATIENT)  # each once, in order: none cut and sent again
    base = stack.web()
    stack.worker()
    # One connection: one request at a time, so the receiver sees the queue's order.
    created = requests.post(f"{base}/v3/webHooks", headers=auth, timeout=10, json={
        "name": "held", "webHookUrl": receiver.url("/held"), "eventNames": ["pointsIssued"],
        "maxAllowedConnections": 1})
    assert created.status_code == 201, created.text
    hook = created.json()["data"]
    off = requests.put(f"{base}/v3/webHooks/{hook['webHookId']}", headers=auth, timeout=10,
                       json={"active": False})
    assert off.status_code == 200 and off.json()["data"]["active"] is False, off.text

    for n in range(EVENTS):
        posted = requests.post(f"{base}/v3/events", headers=auth, timeout=10, json={
            "eventName": "pointsIssued", "eventId": f"held-{n}",
            "data": {"customerIdentifiers": {"customerId": n}, "totalPointsIssued": n}})
        assert posted.status_code == 202, posted.text

    metrics = requests.get(f"{base}/v3/events/consumer-groups/{hook['consumerGroupId']}/metrics",
                           headers=auth, timeout=10).json()["data"]
    assert (metrics["heldEvents"], metrics["failedEvents"], metrics["pendingEvents"]) == (
        EVENTS, 0, 0)
    logged = requests.get(f"{base}/v3/events/consumer-groups/{hook['consumerGroupId']}/logs",
                          params={"status": "held", "size": 100}, headers=auth,
                          timeout=10).json()["data"]
    assert logged["totalElements"] == EVENTS
    assert {record["status"] for record in logged["content"]} == {"held"}
    database = Database(stack.settings.database_url)
    with database.session() as session:
        held = session.execute(select(Delivery.id, Delivery.ingested_at_ms, Delivery.status)
                               .where(Delivery.webhook_id == hook["webHookId"])).all()
    assert {row.status for row in held} == {DeliveryStatus.HELD} and len(held) == EVENTS
    assert receiver.at("/held") == []

    on = requests.put(f"{base}/v3/webHooks/{hook['webHookId']}", headers=auth, timeout=10,
                      json={"active": True, "deliverHeld": True})
    assert on.status_code == 200 and on.json()["data"]["active"] is True, on.text

    received = receiver.wait_for(EVENTS, "/held", timeout=120)
    # The webhook's queue is ordered by ingestion time (ties, ingested in one millisecond, by
    # delivery id): what the receiver saw, one request at a time, is that order, each once.
    ingested = [row.id for row in sorted(held, key=lambda row: (row.ingested_at_ms, row.id))]
    assert [r.headers["webhook-id"] for r in received] == ingested

    def delivered() -> bool:
        with database.session() as session:
            return set(session.scalars(select(Delivery.status).where(
                Delivery.webhook_id == hook["webHookId"]))) == {DeliveryStatus.DELIVERED}

    wait_until(delivered, 30, "all delivered")
    database.dispose()
