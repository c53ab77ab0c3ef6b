"""Operational alert events (notifier.alerts) through a real worker, beat and receiver: each sent,
signed, to the operations webhooks that hear it, once; never an alert about an alert."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook as StandardWebhook

from config import load_settings
from notifier import alerts, pipeline, publish, store
from notifier.client import lease_sender
from notifier.db import Database
from notifier.errors import StoreRefused, StoreUnavailable
from notifier.models import Alert, Delivery, DeliveryStatus, Event, Webhook
from notifier.pipeline import Services, build_services
from notifier.queues import Lease, Queues
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Receiver, Stack, create_webhook, refusing_delivered, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 51186
OPERATOR_ORG = 1
ALERT_NAMES = tuple(sorted(alerts.KINDS))


@pytest.fixture
def database(database: Database) -> Database:
    """The stack's database (tests/conftest.py), with the test org and the operator's."""
    store.create_org(database, ORG, "test org", now_ms=0)
    store.create_org(database, OPERATOR_ORG, "the operator", now_ms=0)
    return database


@pytest.fixture
def services(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[Services]:
    """notifier's services in this process, on either database and a Redis of its own."""
    made = build_services(load_settings({
        "NOTIFIER_DATA_DIR": str(tmp_path), "NOTIFIER_DATABASE_URL": database_url,
        "NOTIFIER_REDIS_URL": redis_url}))
    yield made
    made.db.dispose()
    made.queues.client.close()


def no_send(lease: Lease) -> None:
    pytest.fail(f"nothing should be sent here: {lease}")


def hook(stack: Stack, database: Database, receiver: Receiver, path: str, *,
         org: int = ORG, events: tuple[str, ...] = ("pointsIssued",),
         **options: Any) -> tuple[str, str]:
    return create_webhook(
        database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
        org_id=org, name=path.strip("/"), url=receiver.url(path), event_names=list(events),
        now_ms=0, **options)


def send(stack: Stack, n: int = 1, event_name: str = "pointsIssued") -> str:
    return publish(event_name, {"customerIdentifiers": {"customerId": n}},
                   org_id=ORG, broker_url=stack.settings.broker_url)


def rows(database: Database, model: Any, **where: Any) -> list[Any]:
    with database.session() as session:
        query = select(model)
        for name, value in where.items():
            query = query.where(getattr(model, name) == value)
        return list(session.scalars(query))


def verified(request: Any, secret: str) -> dict[str, Any]:
    StandardWebhook(secret).verify(request.body, request.headers)  # raises on a bad signature
    body: dict[str, Any] = json.loads(request.body)
    return body


def test_a_webhook_disabled_for_failing_too_long_sends_one_webhook_disabled_with_the_reason(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    broken, _ = hook(stack, database, receiver, "/broken")
    ops, ops_secret = hook(stack, database, receiver, "/ops", events=ALERT_NAMES)
    operator, operator_secret = hook(stack, database, receiver, "/operator", org=OPERATOR_ORG,
                                     events=ALERT_NAMES)
    alerts.set_operations_webhook(database, ORG, ops)
    receiver.script("/broken", *[503] * 200)
    stack.env["NOTIFIER_DISABLE_FAILING_AFTER"] = "2"
    stack.env["NOTIFIER_OPERATOR_ALERTS_WEBHOOK"] = operator
    stack.worker()
    stack.beat()
    base = stack.web()

    send(stack)

    (got,) = receiver.wait_for(1, "/ops", timeout=60)
    (to_operator,) = receiver.wait_for(1, "/operator", timeout=30)
    body = verified(got, ops_secret)
    assert body["eventName"] == "webhookDisabled" and body["orgId"] == ORG
    assert body["data"]["webHookId"] == broken and body["data"]["orgId"] == ORG
    assert body["data"]["reason"].startswith("deactivated by notifier: every attempt has failed")
    # The operator's copy: an event of the operator's org, the same alert.
    operator_body = verified(to_operator, operator_secret)
    assert operator_body["orgId"] == OPERATOR_ORG and operator_body["data"] == body["data"]
    # Delivered and recorded like any event; raised once.
    wait_until(lambda: [d for d in rows(database, Delivery, webhook_id=ops)
                        if d.status == DeliveryStatus.DELIVERED], 30, "the alert delivered")
    (kept,) = rows(database, Alert)
    assert (kept.kind, kept.webhook_id, kept.data["reason"]) == (
        "webhookDisabled", broken, body["data"]["reason"])
    # Counted once, as it was raised: the count reaches Redis as the task that raised it ends,
    # which may be after its alert was delivered by another worker process.
    queues = Queues(stack.settings.redis_url, stack.settings.redis_prefix)
    wait_until(lambda: queues.counts().get("alerts|webhookDisabled"), 30, "the alert counted")
    samples = requests.get(f"{base}/metrics", timeout=10).text
    counted = {sample.labels.get("kind"): sample.value
               for family in text_string_to_metric_families(samples)
               if family.name == "notifier_alerts" for sample in family.samples}
    assert counted == {"webhookDisabled": 1}
    assert len(receiver.at("/ops")) == 1 and len(receiver.at("/operator")) == 1


def test_a_dead_delivery_sends_delivery_exhausted(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    dying, _ = hook(stack, database, receiver, "/dying")
    ops, ops_secret = hook(stack, database, receiver, "/ops", events=ALERT_NAMES)
    alerts.set_operations_webhook(database, ORG, ops)
    receiver.script("/dying", *[500] * 200)
    stack.env["NOTIFIER_RETRY_HORIZON"] = "1"
    stack.worker()
    stack.beat()

    event_id = send(stack)

    (got,) = receiver.wait_for(1, "/ops", timeout=60)
    (dead,) = rows(database, Delivery, webhook_id=dying)
    assert dead.status == DeliveryStatus.DEAD
    body = verified(got, ops_secret)
    assert body["eventName"] == "deliveryExhausted"
    assert body["data"] == {"webHookId": dying, "orgId": ORG, "deliveryId": dead.id,
                            "eventId": event_id, "eventName": "pointsIssued",
                            "attempts": dead.attempt_count, "lastStatusCode": 500}
    # Counted once, as it was raised (notifier_alerts): not again as it was sent.
    queues = Queues(stack.settings.redis_url, stack.settings.redis_prefix)
    wait_until(lambda: queues.counts().get("alerts|deliveryExhausted"), 30, "the alert counted")
    wait_until(lambda: [d for d in rows(database, Delivery, webhook_id=ops)
                        if d.status == DeliveryStatus.DELIVERED], 30, "the alert delivered")
    assert queues.counts().get("alerts|deliveryExhausted") == 1


def test_a_flood_of_late_deliveries_sends_one_sla_breached_per_webhook_per_minute(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    late, _ = hook(stack, database, receiver, "/late", sla_in_seconds=1,
                   max_allowed_connections=1)
    ops, ops_secret = hook(stack, database, receiver, "/ops", events=ALERT_NAMES)
    alerts.set_operations_webhook(database, ORG, ops)
    receiver.script("/late", *[500] * 5000)  # never delivered: every one stays late
    stack.worker()
    stack.beat()
    # A second beat: two SLA checks race for the same minutes.
    stack.beat("beat2")

    for n in range(200):
        send(stack, n)

    wait_until(lambda: len([d for d in rows(database, Delivery, webhook_id=late)
                            if d.sla_breach_at_ms is not None]) == 200, 60, "200 breaches stamped")
    # Every breach is counted in its minute's alert (a kept count grows with later finds).
    wait_until(lambda: sum(a.count for a in rows(database, Alert)) == 200, 30, "200 counted")
    kept = rows(database, Alert)
    assert {a.kind for a in kept} == {"slaBreached"} and {a.webhook_id for a in kept} == {late}
    minutes = sorted(a.data["minuteStart"] for a in kept)
    assert len(minutes) == len(set(minutes)) <= 2  # one a minute; 200 events fit in two
    got = receiver.wait_for(len(kept), "/ops", timeout=30)
    wait_until(lambda: len([d for d in rows(database, Delivery, webhook_id=ops)
                            if d.status == DeliveryStatus.DELIVERED]) == len(kept), 30,
               "the alerts delivered")
    late_ids = {d.id for d in rows(database, Delivery, webhook_id=late)}
    sent = sorted((verified(request, ops_secret) for request in receiver.at("/ops")),
                  key=lambda body: body["data"]["minuteStart"])
    assert len(got) == len(sent) == len(kept)
    for body, row in zip(sent, sorted(kept, key=lambda a: a.data["minuteStart"]), strict=True):
        data = body["data"]
        assert body["eventName"] == "slaBreached" and data["webHookId"] == late
        assert data["minuteStart"] == row.data["minuteStart"] and data["slaInSeconds"] == 1
        # At least this many: what the minute found when it was raised.
        assert 1 <= data["count"] <= row.count
        assert len(data["firstDeliveryIds"]) == min(10, data["count"])
        assert set(data["firstDeliveryIds"]) <= late_ids


def breaches_counted(base: str) -> float:
    samples = requests.get(f"{base}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(samples)
               if family.name == "notifier_sla_breaches" for sample in family.samples
               if sample.name == "notifier_sla_breaches_total")


def test_the_operations_webhook_failing_raises_no_alert_about_itself(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    dying, _ = hook(stack, database, receiver, "/dying")
    # It fails every alert sent to it, past its SLA: neither its dead deliveries nor its
    # breaches raise an alert, which it would be sent, and fail, and so on.
    ops, _ = hook(stack, database, receiver, "/ops", events=ALERT_NAMES, sla_in_seconds=1)
    alerts.set_operations_webhook(database, ORG, ops)
    receiver.script("/dying", *[500] * 200)
    receiver.script("/ops", *[500] * 200)
    stack.env["NOTIFIER_RETRY_HORIZON"] = "2"
    stack.worker()
    stack.beat()
    base = stack.web()

    send(stack)

    (to_ops,) = wait_until(lambda: [d for d in rows(database, Delivery, webhook_id=ops)
                                    if d.status == DeliveryStatus.DEAD
                                    and d.sla_breach_at_ms is not None], 60,
                           "the alert's delivery dead, past its SLA")
    # Whichever stamped the breach (beat's check, or the attempt that ended late) has decided
    # its alerts: both count a breach once its alerts are raised.
    wait_until(lambda: breaches_counted(base) == 1, 30, "the breach counted")
    (kept,) = rows(database, Alert)
    assert (kept.kind, kept.webhook_id) == ("deliveryExhausted", dying)
    assert {r.headers["webhook-id"] for r in receiver.at("/ops")} == {to_ops.id}
    assert len(rows(database, Delivery, webhook_id=ops)) == 1


def test_no_operations_webhook_named_or_subscribed_sends_nothing_and_loses_nothing(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    first, _ = hook(stack, database, receiver, "/first")
    hook(stack, database, receiver, "/watcher", events=ALERT_NAMES)  # subscribed, not named
    receiver.script("/first", *[500] * 200)
    stack.env["NOTIFIER_RETRY_HORIZON"] = "1"
    stack.worker()
    stack.beat()

    send(stack, 1)

    (kept,) = wait_until(lambda: rows(database, Alert), 60, "the alert kept")
    assert (kept.kind, kept.webhook_id) == ("deliveryExhausted", first)
    assert alerts.recent(database, ORG)[0]["kind"] == "deliveryExhausted"

    # Named, but not subscribed to the kind: the alert's event is stored, and goes nowhere.
    second, _ = hook(stack, database, receiver, "/second", events=("tierUpgraded",))
    named, _ = hook(stack, database, receiver, "/named", events=("slaBreached",))
    alerts.set_operations_webhook(database, ORG, named)
    receiver.script("/second", *[500] * 200)
    send(stack, 2, "tierUpgraded")
    wait_until(lambda: len(rows(database, Alert)) == 2, 60, "the second alert kept")
    wait_until(lambda: rows(database, Event, event_name="deliveryExhausted"), 30,
               "the alert's event stored")
    assert [d for d in rows(database, Delivery)
            if d.webhook_id not in (first, second)] == []
    assert receiver.at("/watcher") == [] and receiver.at("/named") == []
    assert [a["webHookId"] for a in alerts.recent(database, ORG)] == [second, first]


def test_webhook_recovered_through_the_pipeline(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    mended, _ = hook(stack, database, receiver, "/mended")
    ops, ops_secret = hook(stack, database, receiver, "/ops", events=ALERT_NAMES)
    alerts.set_operations_webhook(database, ORG, ops)
    stack.worker()
    services = build_services(stack.settings)
    try:
        pipeline.alert_webhook_recovered(services, ORG, mended,
                                         lease_sender(stack.settings.broker_url),
                                         reason="its circuit closed")
    finally:
        services.db.dispose()
        services.queues.client.close()

    (got,) = receiver.wait_for(1, "/ops", timeout=30)
    body = verified(got, ops_secret)
    assert body["eventName"] == "webhookRecovered"
    assert body["data"] == {"webHookId": mended, "orgId": ORG, "reason": "its circuit closed"}


def test_one_alert_per_key_however_many_race_for_it(database_url: str) -> None:
    """Several processes raising the same minute's slaBreached at once: one sends it, and the
    kept count is every breach they found."""
    db = Database(database_url)
    store.create_org(db, ORG, "test org", now_ms=0)
    raised = alerts.Alert("slaBreached", ORG, "wh_1", "slaBreached:wh_1:60000",
                          {"count": 3}, count=3)
    won: list[bool] = []
    start = threading.Barrier(8)

    def race() -> None:
        start.wait()
        won.append(alerts.record(db, raised, now_ms=int(time.time() * 1000)))

    try:
        threads = [threading.Thread(target=race) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(won) == [False] * 7 + [True]
        (kept,) = rows(db, Alert)
        assert kept.count == 24
    finally:
        db.dispose()


def test_a_producer_cannot_publish_an_alert(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    """The alert kinds are notifier's own: one published by a producer (a forged
    webhookDisabled, say) is stored rejected, naming eventName, and reaches no webhook."""
    hook(stack, database, receiver, "/watcher", events=ALERT_NAMES)
    stack.worker()

    forged = publish("webhookDisabled", {"webHookId": "x" * 24, "orgId": ORG, "reason": "forged"},
                     org_id=ORG, broker_url=stack.settings.broker_url)

    (event,) = wait_until(lambda: rows(database, Event, event_id=forged), 30, "the event row")
    assert (event.status, event.error_path) == ("rejected", "$.eventName")
    assert "notifier's own" in (event.error_message or "")
    assert rows(database, Delivery) == [] and receiver.at("/watcher") == []


def test_a_breach_stamped_by_a_late_answer_raises_its_alert_once(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    """No beat runs: the breach is stamped by the attempt that ends past the SLA, and that
    stamp alone raises slaBreached (a late finish is a breach as beat's is)."""
    late, _ = hook(stack, database, receiver, "/late", sla_in_seconds=1)
    ops, ops_secret = hook(stack, database, receiver, "/ops", events=ALERT_NAMES)
    alerts.set_operations_webhook(database, ORG, ops)
    receiver.hold("/late", 1.5)
    # A request may stay open past the SLA (and a slot's lease above the task's limit).
    stack.env.update({"NOTIFIER_HTTP_READ_TIMEOUT": "5", "NOTIFIER_HTTP_DEADLINE": "5",
                      "NOTIFIER_SLOT_LEASE_SECONDS": "10"})
    stack.worker()

    send(stack, 1)

    (got,) = receiver.wait_for(1, "/ops", timeout=30)
    (delivery,) = rows(database, Delivery, webhook_id=late)
    assert delivery.status == DeliveryStatus.DELIVERED
    assert delivery.sla_breach_at_ms == delivery.ingested_at_ms + 1000
    body = verified(got, ops_secret)
    assert body["eventName"] == "slaBreached"
    assert (body["data"]["webHookId"], body["data"]["count"],
            body["data"]["firstDeliveryIds"]) == (late, 1, [delivery.id])
    (kept,) = rows(database, Alert)
    assert (kept.kind, kept.count) == ("slaBreached", 1)


def test_an_alert_kept_whose_event_could_not_be_stored_is_sent_by_beat(
        stack: Stack, receiver: Receiver, database: Database,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The database away between keeping the alert and storing its event: the alert is kept, so
    no later raise sends it; beat's sweep does, once."""
    mended, _ = hook(stack, database, receiver, "/mended")
    ops, ops_secret = hook(stack, database, receiver, "/ops", events=ALERT_NAMES)
    alerts.set_operations_webhook(database, ORG, ops)
    stack.worker()
    stack.beat()
    ingest_many = store.ingest_many
    failures: list[int] = []

    def unavailable_once(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(1)
            raise StoreUnavailable("the database did not answer")
        return ingest_many(*args, **kwargs)

    monkeypatch.setattr(store, "ingest_many", unavailable_once)
    services = build_services(stack.settings)
    try:
        pipeline.alert_webhook_recovered(services, ORG, mended,
                                         lease_sender(stack.settings.broker_url),
                                         reason="its circuit closed")
    finally:
        services.db.dispose()
        services.queues.client.close()
    assert failures and rows(database, Event, event_name="webhookRecovered") == []

    (got,) = receiver.wait_for(1, "/ops", timeout=30)
    body = verified(got, ops_secret)
    assert body["eventName"] == "webhookRecovered"
    assert body["data"] == {"webHookId": mended, "orgId": ORG, "reason": "its circuit closed"}
    wait_until(lambda: rows(database, Alert)[0].sent_at_ms is not None, 30, "the alert sent")
    (event,) = rows(database, Event, event_name="webhookRecovered")
    assert (event.event_id, body["eventId"]) == (f"{rows(database, Alert)[0].key}>{ops}",) * 2
    assert len(rows(database, Delivery, webhook_id=ops)) == 1


def test_an_alert_half_sent_is_sent_again_and_stored_once(services: Services) -> None:
    """Killed once the alert's first event was stored, before the second and before the alert was
    marked sent: the sweep sends it again, which stores nothing twice, queues the first event's
    delivery (lost from Redis with the process) and stores the second."""
    db = services.db
    pipeline.sweep(services, no_send)  # Redis whole: nothing to rebuild
    store.create_org(db, ORG, "test org", now_ms=0)
    store.create_org(db, OPERATOR_ORG, "the operator", now_ms=0)
    ops, operator = (create_webhook(db, services.catalog, services.vault, org_id=org, name=name,
                                    url=f"https://{name}.example.com/",
                                    event_names=list(ALERT_NAMES), now_ms=0)[0]
                     for org, name in ((ORG, "ops"), (OPERATOR_ORG, "operator")))
    alerts.set_operations_webhook(db, ORG, ops)
    services.settings = replace(services.settings, operator_alerts_webhook=operator)
    kept_at = int(time.time() * 1000) - 60_000
    raised = alerts.webhook_recovered(ORG, "wh_mended", now_ms=kept_at)
    assert alerts.record(db, raised, now_ms=kept_at)
    (first, to_ops), _ = alerts.envelopes(db, raised, operator_webhook=operator,
                                          raised_at_ms=kept_at)
    assert to_ops == ops
    (stored,) = store.ingest_many(db, services.catalog, [first], now_ms=kept_at,
                                  only_webhook=ops)
    leases: list[Lease] = []

    assert pipeline.sweep(services, leases.append).alerts_sent == 1

    assert sorted((e.org_id, e.event_id) for e in rows(db, Event)) == [
        (OPERATOR_ORG, f"{raised.key}>{operator}"), (ORG, f"{raised.key}>{ops}")]
    deliveries = {d.webhook_id: d.id for d in rows(db, Delivery)}
    assert deliveries[ops] == stored.queued[0].delivery_id and len(deliveries) == 2
    assert sorted((lease.webhook_id, lease.delivery_ids) for lease in leases) == sorted(
        (hook, (delivery_id,)) for hook, delivery_id in deliveries.items())
    (kept,) = rows(db, Alert)
    assert kept.sent_at_ms is not None
    assert pipeline.sweep(services, no_send).alerts_sent == 0


class TimeLimit(Exception):  # as Celery's SoftTimeLimitExceeded: an Exception
    """The task's runner stopping it from outside."""


class Killed(BaseException):
    """The process killed: nothing of it runs after this (a kill, not an exception it handles)."""


@contextlib.contextmanager
def local_services(database_url: str, redis_url: str, tmp_path: Path,
                   **env: str) -> Iterator[Services]:
    """notifier's services in this process, whose deliveries may go to the tests' receivers on
    127.0.0.1, with the test org."""
    made = build_services(load_settings({
        "NOTIFIER_DATA_DIR": str(tmp_path), "NOTIFIER_DATABASE_URL": database_url,
        "NOTIFIER_REDIS_URL": redis_url, "NOTIFIER_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8",
        **env}))
    try:
        store.create_org(made.db, ORG, "test org", now_ms=0)
        yield made
    finally:
        made.db.dispose()
        made.queues.client.close()


def operations_webhook(services: Services) -> str:
    """The org's operations webhook, hearing every alert (never sent to: the tests look at the
    leases its alerts' deliveries go out with)."""
    ops, _ = create_webhook(services.db, services.catalog, services.vault, org_id=ORG,
                            name="ops", url="https://ops.example.com/",
                            event_names=list(ALERT_NAMES), now_ms=0)
    alerts.set_operations_webhook(services.db, ORG, ops)
    return ops


def local_webhook(services: Services, receiver: Receiver, path: str, **options: Any) -> str:
    made, _ = create_webhook(services.db, services.catalog, services.vault, org_id=ORG,
                             name=path.strip("/"), url=receiver.url(path),
                             event_names=["pointsIssued"], now_ms=0, **options)
    return made


def accepted(services: Services) -> tuple[str, list[Lease]]:
    """An event accepted: its id, and the leases that send it."""
    leases: list[Lease] = []
    event_id = pipeline.accept(services, {"eventName": "pointsIssued", "orgId": ORG, "data": {
        "customerIdentifiers": {"customerId": 1}}}, leases.append).event_id
    return event_id, leases


def stop_once_committed(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str,
                        stop: type[BaseException] = TimeLimit) -> list[int]:
    """``owner.name`` stopped (``stop``) right after its first call returns (its transaction
    committed); returns the calls made."""
    original = getattr(owner, name)
    calls: list[int] = []

    def stopped_once_committed(*args: Any, **kwargs: Any) -> Any:
        done = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise stop(f"{name} stopped once committed")
        return done

    monkeypatch.setattr(owner, name, stopped_once_committed)
    return calls


def deliver_stopped(services: Services, leases: list[Lease], monkeypatch: pytest.MonkeyPatch,
                    stopped: str) -> None:
    """A delivery task stopped by its time limit where ``stopped`` says."""
    if stopped == "right after its record commits":
        stop_once_committed(monkeypatch, store, "finish")
    elif stopped == "in its record, once its alerts are kept":
        finish = store.finish
        calls: list[int] = []

        def stopped_before_its_commit(db: Database, done: Any,
                                      within: store.WithBreaches | None = None) -> Any:
            calls.append(1)
            if within is None or len(calls) > 1:
                return finish(db, done, within)

            def then_stopped(connection: Any, breaches: Any) -> None:
                within(connection, breaches)
                raise TimeLimit("soft time limit exceeded")  # the record rolls back

            return finish(db, done, then_stopped)

        monkeypatch.setattr(store, "finish", stopped_before_its_commit)
    elif stopped == "right after its deactivation commits":
        stop_once_committed(monkeypatch, store, "disable_failing")
    else:
        assert stopped == "as it gives its slots back"

        def limit_reached(*args: Any, **kwargs: Any) -> Any:
            raise TimeLimit("soft time limit exceeded")

        monkeypatch.setattr(services.queues, "release_many", limit_reached)
    with pytest.raises(pipeline.DeliveryInterrupted):
        pipeline.deliver(services, leases, no_send, hand_on=lambda *_: None,
                         interruptions=(TimeLimit,))
    monkeypatch.undo()


def swept(services: Services, monkeypatch: pytest.MonkeyPatch) -> list[Lease]:
    """Beat's sweep, once the alerts just kept are its to send; the leases it sent."""
    monkeypatch.setattr(pipeline, "_ALERT_SEND_GRACE_MS", 0)
    sent: list[Lease] = []
    assert pipeline.sweep(services, sent.append).alerts_sent == 1
    assert pipeline.sweep(services, no_send).alerts_sent == 0
    return sent


STOPS = ("in its record, once its alerts are kept", "right after its record commits",
         "as it gives its slots back")


@pytest.mark.parametrize("stopped", STOPS)
def test_a_delivery_dead_in_a_task_stopped_after_its_record_still_raises_its_alert(
        database_url: str, redis_url: str, tmp_path: Path, receiver: Receiver,
        monkeypatch: pytest.MonkeyPatch, stopped: str) -> None:
    """The task records the dead attempt, then its time limit lands before it could raise the
    alert (it raises them once it has given its slots back): the delivery was dead and no
    deliveryExhausted was ever raised. The alert is kept by the record's own transaction, and
    beat's sweep sends what the task could not. It is counted once (notifier_alerts), as it is
    raised: the sweep that sends it counts nothing, and a task stopped this way counted none."""
    with local_services(database_url, redis_url, tmp_path,
                        NOTIFIER_RETRY_HORIZON="1") as services:
        db = services.db
        dying = local_webhook(services, receiver, "/dying")
        ops = operations_webhook(services)
        receiver.script("/dying", 500)
        event_id, leases = accepted(services)

        deliver_stopped(services, leases, monkeypatch, stopped)

        assert services.queues.counts().get("alerts|deliveryExhausted") == 1
        (dead,) = rows(db, Delivery, webhook_id=dying)
        assert dead.status == DeliveryStatus.DEAD
        (kept,) = rows(db, Alert)
        assert (kept.kind, kept.webhook_id, kept.count, kept.sent_at_ms) == (
            "deliveryExhausted", dying, 1, None)
        assert kept.data == {"webHookId": dying, "orgId": ORG, "deliveryId": dead.id,
                             "eventId": event_id, "eventName": "pointsIssued", "attempts": 1,
                             "lastStatusCode": 500}

        assert [lease.webhook_id for lease in swept(services, monkeypatch)] == [ops]
        (event,) = rows(db, Event, event_name="deliveryExhausted")
        assert event.payload["data"] == kept.data
        assert services.queues.counts().get("alerts|deliveryExhausted") == 1


@pytest.mark.parametrize("stopped", STOPS)
def test_an_sla_breach_stamped_by_a_task_stopped_after_its_record_still_raises_its_alert(
        database_url: str, redis_url: str, tmp_path: Path, receiver: Receiver,
        monkeypatch: pytest.MonkeyPatch, stopped: str) -> None:
    """The attempt ends past its SLA: its record stamps the breach (which beat then never
    stamps again), and the task raised slaBreached only at its very end, so a task stopped
    in between left a breach that never raised its alert. The alert is kept by the record's own
    transaction, counted once (notifier_alerts, and the breach in notifier_sla_breaches), and
    sent by beat's sweep."""
    with local_services(database_url, redis_url, tmp_path) as services:
        db = services.db
        late = local_webhook(services, receiver, "/late", sla_in_seconds=1)
        ops = operations_webhook(services)
        _, leases = accepted(services)
        time.sleep(1.1)  # past its SLA before it is sent: its attempt ends late

        deliver_stopped(services, leases, monkeypatch, stopped)

        counts = services.queues.counts()
        assert (counts.get("alerts|slaBreached"), counts.get("sla_breaches")) == (1, 1)
        (delivery,) = rows(db, Delivery, webhook_id=late)
        assert delivery.status == DeliveryStatus.DELIVERED
        assert delivery.sla_breach_at_ms == delivery.ingested_at_ms + 1000
        (kept,) = rows(db, Alert)
        assert (kept.kind, kept.webhook_id, kept.count, kept.sent_at_ms) == (
            "slaBreached", late, 1, None)
        assert (kept.data["count"], kept.data["firstDeliveryIds"]) == (1, [delivery.id])

        assert [lease.webhook_id for lease in swept(services, monkeypatch)] == [ops]
        (event,) = rows(db, Event, event_name="slaBreached")
        assert event.payload["data"] == kept.data
        (kept,) = rows(db, Alert)
        assert kept.count == 1
        counts = services.queues.counts()
        assert (counts.get("alerts|slaBreached"), counts.get("sla_breaches")) == (1, 1)


@pytest.mark.parametrize("stopped", ["the database failing as it keeps the alert",
                                     "killed right after its stamps commit"])
def test_an_sla_breach_stamped_by_beat_raises_its_alert_whatever_stops_the_check(
        database_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        stopped: str) -> None:
    """Beat's check committed its stamps, then kept their slaBreached alerts in another
    transaction: the database failing, or the check's process dying, in between left breaches
    that beat never stamps again, and no alert. The alert is kept by the stamps' transaction:
    with them, or not at all (and then stamped and raised by the next check)."""
    with local_services(database_url, redis_url, tmp_path) as services:
        db = services.db
        late, _ = create_webhook(db, services.catalog, services.vault, org_id=ORG, name="late",
                                 url="https://late.example.com/", event_names=["pointsIssued"],
                                 now_ms=0, sla_in_seconds=1)
        ops = operations_webhook(services)
        accepted(services)  # never sent: its SLA runs out waiting
        time.sleep(1.1)
        sent: list[Lease] = []

        if stopped == "the database failing as it keeps the alert":
            keep = alerts.keep
            failures: list[int] = []

            def unavailable_once(*args: Any, **kwargs: Any) -> bool:
                if not failures:
                    failures.append(1)
                    raise StoreUnavailable("the database did not answer")
                return keep(*args, **kwargs)

            monkeypatch.setattr(alerts, "keep", unavailable_once)
            with contextlib.suppress(StoreUnavailable):  # the check is skipped, and logged
                pipeline.check_sla(services, sent.append)
            monkeypatch.undo()
            assert failures
            pipeline.check_sla(services, sent.append)  # beat's next check

            # Raised by the check that kept it, sent at once and counted once.
            (kept,) = rows(db, Alert)
            assert kept.sent_at_ms is not None
            assert [lease.webhook_id for lease in sent] == [ops]
            counts = services.queues.counts()
            assert (counts.get("alerts|slaBreached"), counts.get("sla_breaches")) == (1, 1)
        else:
            stop_once_committed(monkeypatch, store, "flag_sla_breaches", Killed)
            with pytest.raises(Killed):
                pipeline.check_sla(services, no_send)
            monkeypatch.undo()
            assert pipeline.check_sla(services, no_send) == 0  # stamped once, for good

            (kept,) = rows(db, Alert)
            assert kept.sent_at_ms is None
            assert [lease.webhook_id for lease in swept(services, monkeypatch)] == [ops]
            # The sweep that sends it counts nothing: an alert is counted by the process that
            # keeps it, once (this one died before it counted anything).
            assert services.queues.counts().get("alerts|slaBreached") is None

        (delivery,) = rows(db, Delivery, webhook_id=late)
        assert delivery.sla_breach_at_ms == delivery.ingested_at_ms + 1000
        (kept,) = rows(db, Alert)
        assert (kept.kind, kept.webhook_id, kept.count) == ("slaBreached", late, 1)
        assert (kept.data["count"], kept.data["firstDeliveryIds"]) == (1, [delivery.id])
        (event,) = rows(db, Event, event_name="slaBreached")
        assert event.payload["data"] == kept.data


@pytest.mark.parametrize(("failing", "stopped"), [
    ("gone", "as it gives its slots back"),
    ("gone", "right after its deactivation commits"),
    ("too long", "right after its deactivation commits")])
def test_a_webhook_deactivated_by_a_task_stopped_after_still_raises_its_alert(
        database_url: str, redis_url: str, tmp_path: Path, receiver: Receiver,
        monkeypatch: pytest.MonkeyPatch, failing: str, stopped: str) -> None:
    """notifier deactivates a webhook (it answered 410 Gone, or has failed every attempt for
    NOTIFIER_DISABLE_FAILING_AFTER), and the task raised webhookDisabled later (once it gave its
    slots back): a task stopped in between left the webhook inactive and no alert ever raised.
    The alert is kept by the deactivation's own transaction, counted once and sent by beat's
    sweep."""
    with local_services(database_url, redis_url, tmp_path,
                        NOTIFIER_DISABLE_FAILING_AFTER="0.001") as services:
        db = services.db
        broken = local_webhook(services, receiver, "/broken")
        ops = operations_webhook(services)
        receiver.script("/broken", 410 if failing == "gone" else 503)
        _, leases = accepted(services)

        deliver_stopped(services, leases, monkeypatch, stopped)

        counts = services.queues.counts()
        assert (counts.get("alerts|webhookDisabled"), counts.get("webhooks_disabled")) == (1, 1)
        (webhook,) = rows(db, Webhook, id=broken)
        assert not webhook.active
        (kept,) = rows(db, Alert)
        assert (kept.kind, kept.webhook_id, kept.count, kept.sent_at_ms) == (
            "webhookDisabled", broken, 1, None)
        assert kept.data == {"webHookId": broken, "orgId": ORG,
                             "reason": webhook.disabled_reason}

        assert [lease.webhook_id for lease in swept(services, monkeypatch)] == [ops]
        (event,) = rows(db, Event, event_name="webhookDisabled")
        assert event.payload["data"] == kept.data
        counts = services.queues.counts()
        assert (counts.get("alerts|webhookDisabled"), counts.get("webhooks_disabled")) == (1, 1)


def test_an_alert_lease_lost_after_its_event_was_stored_is_sent_by_beat(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    """The alert's event stored and its lease taken, then the broker message lost (the task that
    raised it failing to publish its leases at its end): the lease expires and beat's sweep
    sends the delivery again, as it does any lease lost."""
    mended, _ = hook(stack, database, receiver, "/mended")
    ops, _ = hook(stack, database, receiver, "/ops", events=ALERT_NAMES)
    alerts.set_operations_webhook(database, ORG, ops)
    stack.worker()
    stack.beat()
    lost: list[Lease] = []
    services = build_services(stack.settings)
    try:
        pipeline.alert_webhook_recovered(services, ORG, mended, lost.append)
    finally:
        services.db.dispose()
        services.queues.client.close()
    assert [lease.webhook_id for lease in lost] == [ops]

    (got,) = receiver.wait_for(1, "/ops", timeout=30)
    assert got.headers["webhook-id"] == lost[0].delivery_ids[0]
    # Sent, as far as the alert goes: its event was stored.
    (kept,) = rows(database, Alert)
    assert kept.sent_at_ms is not None


def test_the_sweep_sends_the_alerts_kept_but_not_sent_oldest_first_a_batch_a_run(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Those kept just now are left to the process that kept them."""
    db = services.db
    pipeline.sweep(services, no_send)
    store.create_org(db, ORG, "test org", now_ms=0)
    monkeypatch.setattr(pipeline, "ALERT_SEND_BATCH", 2)
    now = int(time.time() * 1000)
    for kept_at in (now - 30_000, now - 20_000, now - 10_000, now):
        assert alerts.record(db, alerts.webhook_recovered(ORG, "wh_mended", now_ms=kept_at),
                             now_ms=kept_at)

    def sent() -> list[bool]:
        return [a.sent_at_ms is not None for a in sorted(rows(db, Alert), key=lambda a: a.id)]

    assert pipeline.sweep(services, no_send).alerts_sent == 2
    assert sent() == [True, True, False, False]
    assert pipeline.sweep(services, no_send).alerts_sent == 1
    assert pipeline.sweep(services, no_send).alerts_sent == 0
    assert sent() == [True, True, True, False]


def test_an_alert_that_cannot_be_sent_for_good_is_given_up_with_the_reason(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure that trying again would only repeat (the database refusing the event) ends the
    alert with its reason, instead of the sweep trying it for ever."""
    db = services.db
    store.create_org(db, ORG, "test org", now_ms=0)
    ops, _ = create_webhook(db, services.catalog, services.vault, org_id=ORG, name="ops",
                            url="https://ops.example.com/", event_names=list(ALERT_NAMES),
                            now_ms=0)
    alerts.set_operations_webhook(db, ORG, ops)

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise StoreRefused("the database refused the statement")

    monkeypatch.setattr(store, "ingest_many", refused)
    kept_at = int(time.time() * 1000) - 60_000

    raised = alerts.webhook_recovered(ORG, "wh_mended", now_ms=kept_at)
    pipeline.raise_alerts(services, [raised], no_send)

    (kept,) = rows(db, Alert)
    assert (kept.sent_at_ms, kept.send_error) == (
        None, "StoreRefused: the database refused the statement")
    assert pipeline.sweep(services, no_send).alerts_sent == 0


def test_migration_0020_takes_the_alerts_kept_before_as_sent(database_url: str) -> None:
    """Sent then or lost for good, nothing says which: none is sent again, hours late."""
    from alembic import command
    from alembic.config import Config

    from notifier.db import MIGRATIONS, upgrade

    db = Database(database_url)
    store.create_org(db, ORG, "test org", now_ms=0)
    assert alerts.record(db, alerts.webhook_recovered(ORG, "wh_mended", now_ms=1000),
                         now_ms=1000)
    db.dispose()
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.downgrade(config, "0019")

    upgrade(database_url)

    db = Database(database_url)
    try:
        (kept,) = rows(db, Alert)
        assert (kept.sent_at_ms, kept.send_error) == (1000, None)
        assert alerts.unsent(db, kept_before_ms=2**62, most=10) == []
    finally:
        db.dispose()


def test_late_attempts_recorded_one_by_one_raise_one_sla_breached_that_counts_them_all(
        database_url: str, redis_url: str, tmp_path: Path, receiver: Receiver) -> None:
    """The database refuses one attempt of a task's batch: each is recorded on its own, each
    record stamping its breach and keeping its slaBreached under the webhook's minute. The one
    alert sent says the count and ids of all the breaches its key was raised for (as one
    record of the batch would), not those of the first record only."""
    with local_services(database_url, redis_url, tmp_path) as services:
        db = services.db
        late = local_webhook(services, receiver, "/late", sla_in_seconds=1)
        ops = operations_webhook(services)
        leases: list[Lease] = []
        for n in range(3):
            pipeline.accept(services, {"eventName": "pointsIssued", "orgId": ORG, "data": {
                "customerIdentifiers": {"customerId": n}}}, leases.append)
        ids = sorted(delivery.id for delivery in rows(db, Delivery, webhook_id=late))
        sent: list[Lease] = []
        with refusing_delivered(db, ids[1]):
            time.sleep(1.1)  # past their SLA before they are sent: their attempts end late
            pipeline.deliver(services, leases, sent.append, hand_on=lambda *_: None)

        assert sorted(d.sla_breach_at_ms is not None for d in rows(db, Delivery,
                                                                    webhook_id=late)) == [True] * 3
        counts = services.queues.counts()
        assert (counts.get("alerts|slaBreached"), counts.get("sla_breaches")) == (1, 3)
        (kept,) = rows(db, Alert)
        assert kept.count == 3
        assert (kept.data["count"], kept.data["firstDeliveryIds"]) == (3, ids)
        assert [lease.webhook_id for lease in sent] == [ops]
        (event,) = rows(db, Event, event_name="slaBreached")
        assert (event.payload["data"]["count"], event.payload["data"]["firstDeliveryIds"]) == (
            3, ids)
