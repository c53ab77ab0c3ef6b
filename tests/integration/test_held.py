"""Held deliveries, on both databases: what an inactive webhook's events wait as, what an
automatic disable or a deactivation cuts short, and what activation with deliverHeld sends."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, update

from config import load_settings
from notifier import pipeline, store, webhooks
from notifier.db import Database
from notifier.errors import InvalidInput, QueueUnavailable
from notifier.models import Attempt, Delivery, DeliveryStatus
from notifier.pipeline import Services, build_services
from notifier.queues import Lease
from notifier.schemas import load_catalog
from notifier.vault import Vault
from tests.conftest import Receiver, create_webhook, waiting

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
    webhook_id, _ = create_webhook(db, load_catalog(), VAULT, org_id=ORG, name=name,
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
    ids = [outcome.queued[0].delivery_id for n in range(5)
           for outcome in store.ingest_many(org, load_catalog(), [event(f"e-{n}")],
                                            now_ms=1000 + n)]
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


@pytest.fixture
def services(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[Services]:
    made = build_services(load_settings({
        "NOTIFIER_DATA_DIR": str(tmp_path), "NOTIFIER_DATABASE_URL": database_url,
        "NOTIFIER_REDIS_URL": redis_url, "NOTIFIER_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8"}))
    store.create_org(made.db, ORG, "org", now_ms=0)
    yield made
    made.db.dispose()


def receiving(services: Services, receiver: Receiver, name: str, **options: Any) -> str:
    """A webhook posting to ``receiver`` at ``/name``, its secret sealed by the services' vault."""
    webhook_id, _ = create_webhook(
        services.db, services.catalog, services.vault, org_id=ORG, name=name,
        url=receiver.url(f"/{name}"), event_names=["pointsIssued"], now_ms=0, **options)
    return webhook_id


def deliver_all(services: Services, leases: list[Lease]) -> None:
    """Run delivery tasks, in-process, for ``leases`` and every lease they lead to."""
    while leases:
        pipeline.deliver(services, [leases.pop(0)], leases.append,
                         hand_on=lambda rest, _: leases.extend(rest))


def test_held_deliveries_stay_out_of_redis_and_a_rebuild_queues_none(
        services: Services, receiver: Receiver) -> None:
    inactive = receiving(services, receiver, "inactive", active=False)
    active = receiving(services, receiver, "active")
    leases: list[Lease] = []

    outcomes = [pipeline.accept(services, event(f"e-{n}"), leases.append) for n in range(3)]

    assert {q.webhook_id for o in outcomes for q in o.queued} == {active}
    assert set(statuses(services.db, inactive).values()) == {DeliveryStatus.HELD}
    assert waiting(services.queues, inactive) == 0 and {lease.webhook_id for lease in leases} == {
        active}
    # Redis lost: the rebuild reads what is open in the database; what is held is not.
    services.queues.client.flushdb()
    assert pipeline.rebuild(services) == 3
    assert waiting(services.queues, inactive) == 0 and waiting(services.queues, active) == 3
    # A duplicate ingest hands back what it may have left out of Redis: nothing held.
    again = pipeline.accept(services, event("e-0"), leases.append)
    assert not again.created and {q.webhook_id for q in again.queued} == {active}
    assert waiting(services.queues, inactive) == 0


def test_deactivating_holds_what_waits_and_a_task_holds_what_it_finds_inactive(
        services: Services, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    services.settings = dataclasses.replace(services.settings, batch_size=1)
    hook_id = receiving(services, receiver, "off", max_allowed_connections=1)
    context = pipeline.webhook_context(services, lambda lease: None)
    leases: list[Lease] = []
    for n in range(3):
        pipeline.accept(services, event(f"e-{n}"), leases.append)
    (lease,) = leases
    claim = store.claim

    def deactivated_after_the_claim(*args: Any, **kwargs: Any) -> Any:
        taken = claim(*args, **kwargs)
        # The org deactivates it while the task holds its claim: the rest waits, held.
        webhooks.deactivate(context, ORG, hook_id, now_ms=pipeline.now_ms())
        return taken

    monkeypatch.setattr(store, "claim", deactivated_after_the_claim)
    deliver_all(services, [lease])

    assert receiver.at("/off") == []
    assert set(statuses(services.db, hook_id).values()) == {DeliveryStatus.HELD}
    with services.db.session() as session:
        recorded = session.execute(select(Attempt.delivery_id, Attempt.outcome,
                                          Attempt.error_class)).all()
    # The claimed one was not sent: held by its task, with the reason; the others by the save
    # (their Redis entries, still queued, fell away as they came up: a claim takes no held one).
    assert [(outcome, error) for _, outcome, error in recorded] == [
        (DeliveryStatus.HELD, "WebhookInactive")]
    assert [recorded[0].delivery_id] == list(lease.delivery_ids)
    assert waiting(services.queues, hook_id) == 0


def test_activation_without_deliver_held_keeps_them_held_and_with_it_sends_them_in_order(
        services: Services, receiver: Receiver) -> None:
    hook_id = receiving(services, receiver, "held", active=False, max_allowed_connections=1)
    leases: list[Lease] = []
    context = pipeline.webhook_context(services, leases.append)
    # Ingested out of the order they are stored in: ingestion time orders them.
    for name, at in (("late", 3000), ("early", 1000), ("middle", 2000)):
        store.ingest_many(services.db, services.catalog, [event(name)], now_ms=at)
    held = statuses(services.db, hook_id)

    plain = webhooks.activate(context, ORG, hook_id, now_ms=pipeline.now_ms())
    assert plain.delivered_held == 0 and leases == []
    assert statuses(services.db, hook_id) == held and waiting(services.queues, hook_id) == 0

    webhooks.deactivate(context, ORG, hook_id, now_ms=pipeline.now_ms())
    saved = webhooks.update_webhook(context, ORG, hook_id, {"active": True, "deliverHeld": True},
                                    now_ms=pipeline.now_ms())
    assert saved.delivered_held == 3 and saved.view["active"]
    deliver_all(services, leases)

    sent = receiver.wait_for(3, "/held")
    assert [json.loads(r.body)["eventId"] for r in sent] == ["early", "middle", "late"]
    assert {r.headers["webhook-id"] for r in sent} == set(held)  # the same ids, kept
    assert set(statuses(services.db, hook_id).values()) == {DeliveryStatus.DELIVERED}


def test_deliver_held_is_refused_for_a_webhook_left_inactive_naming_the_field(
        services: Services, receiver: Receiver) -> None:
    hook_id = receiving(services, receiver, "still-off", active=False)
    context = pipeline.webhook_context(services, lambda lease: None)
    store.ingest_many(services.db, services.catalog, [event("e-1")], now_ms=1000)
    for body in ({"deliverHeld": True}, {"active": False, "deliverHeld": True},
                 {"active": True, "deliverHeld": "yes"}):
        with pytest.raises(InvalidInput) as refused:
            webhooks.update_webhook(context, ORG, hook_id, body, now_ms=2000)
        assert refused.value.field == "deliverHeld"
    assert list(statuses(services.db, hook_id).values()) == [DeliveryStatus.HELD]
    assert not webhooks.get(context, ORG, hook_id)["active"]


def test_a_deleted_webhook_holds_nothing(services: Services, receiver: Receiver) -> None:
    hook_id = receiving(services, receiver, "gone")
    context = pipeline.webhook_context(services, lambda lease: None)
    leases: list[Lease] = []
    queued = pipeline.accept(services, event("before"), leases.append).queued

    webhooks.delete_webhook(context, ORG, hook_id, now_ms=pipeline.now_ms())
    after = pipeline.accept(services, event("after"), leases.append)
    deliver_all(services, leases)

    assert after.created and after.queued == ()
    # What it had waiting ends failed (replayable), saying why; the event after has no
    # delivery to it at all.
    assert statuses(services.db, hook_id) == {queued[0].delivery_id: DeliveryStatus.FAILED}
    with services.db.session() as session:
        assert session.scalar(select(Attempt.error_message)) == "the webhook was deleted"
    assert receiver.at("/gone") == []
    # Activated again, it is no longer deleted: inactive from then on, it holds.
    webhooks.activate(context, ORG, hook_id, now_ms=pipeline.now_ms())
    webhooks.deactivate(context, ORG, hook_id, now_ms=pipeline.now_ms())
    pipeline.accept(services, event("held"), leases.append)
    assert sorted(statuses(services.db, hook_id).values()) == [DeliveryStatus.FAILED,
                                                               DeliveryStatus.HELD]


def test_held_deliveries_whose_queueing_failed_are_queued_by_the_next_deliver_held(
        services: Services, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    hook_id = receiving(services, receiver, "retried", active=False)
    leases: list[Lease] = []
    # A Redis running as ever: a fresh one reads as lost, and its rebuild would queue them.
    pipeline.recover(services, leases.append)
    context = pipeline.webhook_context(services, leases.append)
    for n in range(2):
        store.ingest_many(services.db, services.catalog, [event(f"e-{n}")], now_ms=1000 + n)

    def away(*args: Any, **kwargs: Any) -> Any:
        raise QueueUnavailable("Redis did not answer")

    monkeypatch.setattr(services.queues, "offer_many", away)
    with pytest.raises(QueueUnavailable):  # the caller is told (503), and may try again
        webhooks.update_webhook(context, ORG, hook_id, {"active": True, "deliverHeld": True},
                                now_ms=pipeline.now_ms())
    monkeypatch.undo()
    # Pending, but in no queue: nothing would ever send them.
    assert set(statuses(services.db, hook_id).values()) == {DeliveryStatus.PENDING}
    assert waiting(services.queues, hook_id) == 0 and leases == []

    again = webhooks.update_webhook(context, ORG, hook_id, {"active": True, "deliverHeld": True},
                                    now_ms=pipeline.now_ms())
    deliver_all(services, leases)

    assert again.delivered_held == 0  # none was held any more: the first made them pending
    assert len(receiver.wait_for(2, "/retried")) == 2
    assert set(statuses(services.db, hook_id).values()) == {DeliveryStatus.DELIVERED}
