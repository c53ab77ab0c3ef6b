"""Held deliveries, on both databases: what an inactive webhook's events wait as, what an
automatic disable or a deactivation cuts short, and what activation with deliverHeld sends."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, update

from notifier import store
from notifier.db import Database
from notifier.models import Delivery, DeliveryStatus
from notifier.schemas import load_catalog
from notifier.vault import Vault

pytestmark = pytest.mark.integration

ORG = 7
VAULT = Vault([Fernet.generate_key().decode()])


def event(event_id: str, name: str = "pointsIssued") -> dict[str, Any]:
    return {"eventName": name, "eventId": event_id, "orgId": ORG, "createdAt": 1,
            "data": {"customerIdentifiers": {"customerId": 1}}}


@pytest.fixture
def org(db: Database) -> Database:
    store.create_org(db, ORG, "org", now_ms=0)
    return db


def webhook(db: Database, name: str, **options: Any) -> str:
    webhook_id, _ = store.create_webhook(db, load_catalog(), VAULT, org_id=ORG, name=name,
                                         url=f"https://example.com/{name}",
                                         event_names=["pointsIssued"], now_ms=0, **options)
    return webhook_id


def statuses(db: Database, webhook_id: str) -> dict[str, str]:
    with db.session() as session:
        return dict(session.execute(select(Delivery.id, Delivery.status)
                                    .where(Delivery.webhook_id == webhook_id)).all())


def set_status(db: Database, delivery_id: str, status: DeliveryStatus, **values: Any) -> None:
    with db.session() as session:
        session.execute(update(Delivery).where(Delivery.id == delivery_id)
                        .values(status=status, **values))


def test_an_automatic_disable_holds_what_it_cuts_short(org: Database) -> None:
    failing = webhook(org, "failing")
    ids = [store.ingest(org, load_catalog(), event(f"e-{n}"), now_ms=1000 + n).queued[0]
           .delivery_id for n in range(5)]
    pending, retrying, in_flight, delivered, failed = ids
    set_status(org, retrying, DeliveryStatus.RETRYING, next_attempt_at_ms=9000)
    set_status(org, in_flight, DeliveryStatus.IN_FLIGHT, lease_until_ms=9000)
    set_status(org, delivered, DeliveryStatus.DELIVERED)
    set_status(org, failed, DeliveryStatus.FAILED)

    assert store.disable_failing(org, failing, reason="every attempt failed", now_ms=5000)

    # What waited, or waited to be tried again, is held: one activation brings it all back.
    # One in flight is being sent: its task records how it ends (held, if it finds the webhook
    # inactive when it goes to send). What ended stays as it ended.
    assert statuses(org, failing) == {
        pending: DeliveryStatus.HELD, retrying: DeliveryStatus.HELD,
        in_flight: DeliveryStatus.IN_FLIGHT, delivered: DeliveryStatus.DELIVERED,
        failed: DeliveryStatus.FAILED}
