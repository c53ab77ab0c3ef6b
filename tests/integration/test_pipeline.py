"""The whole delivery path: publish -> real broker -> real worker processes -> real HTTP receiver,
with PostgreSQL as the store and Redis for queues and slots."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
from kombu import Connection
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, make_url, select
from standardwebhooks.webhooks import Webhook as StandardWebhook

from notifier import pipeline, publish, publish_many, store, webhooks
from notifier.client import DELIVER_QUEUE, DELIVER_TASK, INGEST_TASK, QUEUE, SLOW_QUEUE, lease_args, producer
from notifier.db import Database
from notifier.models import Attempt, Delivery, DeliveryStatus, Event, EventStatus, Webhook
from notifier.pipeline import build_services
from notifier.queues import Lease, Queues
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import PATIENT, Receiver, Reply, Stack, create_webhook, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 51186


def customer(n: int = 1) -> dict[str, Any]:
    return {"customerIdentifiers": {"customerId": n}, "totalPointsIssued": 10}


@pytest.fixture
def database(stack: Stack) -> Iterator[Database]:
    """The stack's database, with the test org in it."""
    opened = Database(stack.settings.database_url)
    store.create_org(opened, ORG, "test org", now_ms=0)
    yield opened
    opened.dispose()


def hook(
    stack: Stack,
    database: Database,
    receiver: Receiver,
    path: str,
    *,
    events: tuple[str, ...] = ("pointsIssued",),
    **options: Any,
) -> tuple[str, str]:
    return create_webhook(
        database,
        load_catalog(),
        vault_for(stack.settings.secret_keys, stack.settings.data_dir),
        org_id=ORG,
        name=path.strip("/"),
        url=receiver.url(path),
        event_names=list(events),
        now_ms=0,
        **options,
    )


def send(
    stack: Stack,
    event_name: str = "pointsIssued",
    data: dict[str, Any] | None = None,
    **fields: Any,
) -> str:
    return publish(
        event_name,
        customer() if data is None else data,
        org_id=ORG,
        broker_url=stack.settings.broker_url,
        **fields,
    )


def deliveries(database: Database, **where: Any) -> list[Delivery]:
    with database.session() as session:
        query = select(Delivery)
        for name, value in where.items():
            query = query.where(getattr(Delivery, name) == value)
        return list(session.scalars(query))


def attempts_of(database: Database, delivery_id: str) -> list[Attempt]:
    with database.session() as session:
        return list(
            session.scalars(
                select(Attempt).where(Attempt.delivery_id == delivery_id).order_by(Attempt.number)
            )
        )


def count_events(database: Database) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).select_from(Event)) or 0)


def settled(database: Database, status: DeliveryStatus, count: int = 1) -> Any:
    return lambda: len(deliveries(database, status=status)) >= count


def test_fan_out_delivers_every_event_once_to_each_subscriber_signed(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    secrets = {}
    for name in ("a", "b", "c"):
        _, secrets[f"/{name}"] = hook(
            stack,
            database,
            receiver,
            f"/{name}",
            headers={"X-Hook": name, "Authorization": f"Basic {name}"},
        )
    hook(stack, database, receiver, "/other", events=("tierUpgraded",))
    # Once: each delivery's one request and one attempt are counted exactly.
    stack.env.update(PATIENT)
    stack.worker("w1")
    stack.worker("w2")
    stack.beat()

    sent = {send(stack, data=customer(n)) for n in range(200)}

    got = receiver.wait_for(600, timeout=120)
    assert len({r.headers["webhook-id"] for r in got}) == 600
    for path, secret in secrets.items():
        at_path = receiver.at(path)
        assert len(at_path) == 200
        assert {json.loads(r.body)["eventId"] for r in at_path} == sent
        verifier = StandardWebhook(secret)
        for request in at_path:
            verifier.verify(request.body, request.headers)  # raises on a bad signature
            assert request.headers["x-hook"] == path.strip("/")
            assert request.headers["authorization"] == f"Basic {path.strip('/')}"
            assert request.headers["content-type"] == "application/json"
    assert receiver.at("/other") == []
    wait_until(settled(database, DeliveryStatus.DELIVERED, 600), 30, "600 delivered rows")
    assert len(deliveries(database)) == 600
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Attempt)) == 600


def test_server_errors_are_retried_until_delivered(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/flaky")
    receiver.script("/flaky", 500, 500, 200)
    stack.env.update(PATIENT)  # its three attempts, and no other
    stack.worker()
    stack.beat()

    send(stack)

    got = receiver.wait_for(3, "/flaky")
    assert len({r.headers["webhook-id"] for r in got}) == 1
    wait_until(settled(database, DeliveryStatus.DELIVERED), 30, "delivered")
    (delivery,) = deliveries(database)
    assert [a.status_code for a in attempts_of(database, delivery.id)] == [500, 500, 200]
    assert delivery.attempt_count == 3


def test_client_error_fails_after_one_attempt(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/bad")
    receiver.script("/bad", Reply(400))
    stack.env.update(PATIENT)  # one attempt (sent again, it would be answered 200)
    stack.worker()
    stack.beat()

    send(stack)

    wait_until(settled(database, DeliveryStatus.FAILED), 30, "failed")
    (delivery,) = deliveries(database)
    assert [a.status_code for a in attempts_of(database, delivery.id)] == [400]
    assert delivery.next_attempt_at_ms is None
    assert len(receiver.at("/bad")) == 1


def test_retry_after_is_honoured(stack: Stack, receiver: Receiver, database: Database) -> None:
    hook(stack, database, receiver, "/busy")
    receiver.script("/busy", Reply(429, {"Retry-After": "2"}), Reply(200))
    stack.env.update(PATIENT)  # the 429 read (cut, it would be sent again after 0.3 s)
    stack.worker()
    stack.beat()

    send(stack)

    first, second = receiver.wait_for(2, "/busy", timeout=30)
    # The schedule says 0.3 s; only the receiver's Retry-After can explain a wait of 2 s.
    assert second.at - first.at >= 1.9
    wait_until(settled(database, DeliveryStatus.DELIVERED), 30, "delivered")


def test_timeout_is_retried(stack: Stack, receiver: Receiver, database: Database) -> None:
    hook(stack, database, receiver, "/slow")
    receiver.script("/slow", Reply(200, delay=2.5), Reply(200))  # read timeout is 1 s
    stack.worker()
    stack.beat()

    send(stack)

    wait_until(settled(database, DeliveryStatus.DELIVERED), 30, "delivered")
    (delivery,) = deliveries(database)
    first, second = attempts_of(database, delivery.id)
    assert first.status_code is None and "timed out" in (first.error_message or "").lower()
    assert second.status_code == 200


def test_schema_violation_is_rejected_with_the_field_and_never_delivered(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/h")
    stack.worker()

    event_id = send(stack, data={"totalPointsIssued": "ten"})

    def stored() -> Event | None:
        with database.session() as session:
            return session.scalar(select(Event).where(Event.event_id == event_id))

    event = wait_until(stored, 30, "the event row")
    assert event.status == EventStatus.REJECTED
    assert "customerIdentifiers" in (event.error_message or "")
    assert deliveries(database) == []


def test_max_allowed_connections_holds_across_worker_processes(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/capped", max_allowed_connections=3)
    receiver.hold("/capped", 0.3)
    # Batches of 5: the 30 deliveries make more leases than there are slots.
    stack.env["NOTIFIER_BATCH_SIZE"] = "5"
    stack.worker("w1", concurrency=2)
    stack.worker("w2", concurrency=2)
    stack.beat()

    for n in range(30):
        send(stack, data=customer(n))

    receiver.wait_for(30, "/capped", timeout=60)
    # Four pool processes could send four at once; the slots allow three, and three are used.
    assert receiver.peak["/capped"] == 3


def test_a_killed_worker_loses_nothing(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/k", max_allowed_connections=4)
    receiver.hold("/k", 0.1)
    stack.worker("w1", concurrency=2)
    stack.beat()
    sent = {send(stack, data=customer(n)) for n in range(80)}

    receiver.wait_for(10, "/k", timeout=60)
    slots = redis.Redis.from_url(stack.settings.redis_url)
    held = f"{stack.settings.redis_prefix}:leases"
    before = set(slots.zrangebyscore(held, pipeline.now_ms(), "+inf"))
    stack.kill("w1")
    # The only worker died holding leases, and nobody gave them back: their deliveries come
    # back only by the leases' expiry.
    assert before & set(slots.zrange(held, 0, -1)), "the killed worker held no lease"
    stack.worker("w2", concurrency=2)

    got = receiver.wait_for(80, "/k", timeout=120, unique=True)
    assert {json.loads(r.body)["eventId"] for r in got} == sent
    wait_until(settled(database, DeliveryStatus.DELIVERED, 80), 60, "80 delivered rows")


def test_a_worker_stopped_while_it_gathers_events_loses_none_of_them(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/stop", max_allowed_connections=4)
    receiver.hold("/stop", 0.05)
    # Batches larger than the burst: what arrives while the first batch runs gathers for the
    # next, all of it, and nothing flushes it before that batch is done.
    stack.env["NOTIFIER_INGEST_BATCH_SIZE"] = "1000"
    stack.worker("w1", concurrency=2)
    sent = {send(stack, data=customer(0))}
    wait_until(lambda: count_events(database) == 1, 60, "the first event stored")
    broker = redis.Redis.from_url(stack.settings.broker_url)
    # The events table locked, as a database slow to write would hold it: the burst's first
    # event goes alone, its batch waits for the lock, and what the worker takes meanwhile
    # gathers. Unlocked, the worker could store the whole burst before this process, held up,
    # stopped it (it takes under a second), and nothing was gathered at the stop.
    with database.engine.connect() as connection, connection.begin():
        connection.exec_driver_sql("LOCK TABLE events IN SHARE MODE")
        sent |= {send(stack, data=customer(n)) for n in range(1, 300)}
        wait_until(lambda: broker.llen(QUEUE) == 0, 60,
                   "the worker to take the burst (its first event's batch held, the rest gathered)")
        # A warm shutdown mid-burst: the events the worker had gathered but not stored go back
        # to the broker (they were never acknowledged), marked as delivered before.
        os.killpg(stack.processes["w1"].pid, signal.SIGTERM)
    stack.processes["w1"].wait(timeout=30)  # (the lock let go: nothing it runs waits for it)
    gathered = restored_ingests(stack)
    assert gathered, "the worker held no gathered event when it stopped: nothing was tested"
    assert count_events(database) < 300
    stack.worker("w2", concurrency=2)
    stack.beat()

    got = receiver.wait_for(300, "/stop", timeout=150, unique=True)
    assert {json.loads(r.body)["eventId"] for r in got} == sent
    wait_until(lambda: count_events(database) == 300, 30, "300 events stored once")


def restored_ingests(stack: Stack) -> list[str]:
    """The ingest messages waiting in the broker that a stopped worker had taken and given back
    unacknowledged (kombu marks them redelivered): their task ids."""
    broker = redis.Redis.from_url(stack.settings.broker_url)
    waiting = (json.loads(raw) for raw in broker.lrange(QUEUE, 0, -1))
    return [message["headers"]["id"] for message in waiting
            if message["headers"].get("redelivered") and message["headers"]["task"] == INGEST_TASK]


def test_a_flushed_redis_loses_nothing(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/f", max_allowed_connections=2)
    receiver.hold("/f", 0.1)
    stack.worker("w1")
    stack.beat()
    sent = {send(stack, data=customer(n)) for n in range(60)}
    # Until ingested, an event lives only in the broker, which this flush wipes too (the
    # README's production notes: a durable broker). Flush once all are stored, mid-delivery.
    wait_until(lambda: count_events(database) == 60, 60, "60 events stored")
    assert len(receiver.at("/f")) < 60
    redis.Redis.from_url(stack.settings.redis_url).flushall()

    got = receiver.wait_for(60, "/f", timeout=120, unique=True)
    assert {json.loads(r.body)["eventId"] for r in got} == sent
    wait_until(settled(database, DeliveryStatus.DELIVERED, 60), 60, "60 delivered rows")


def test_the_same_event_id_is_delivered_once_per_webhook(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/once")
    stack.env.update(PATIENT)  # once: the first delivery is not sent again
    # One solo worker takes tasks in order, so once the marker arrives, the duplicate's ingest
    # (sent before it) has run, and any delivery it made would have arrived first.
    stack.worker("solo", concurrency=1, pool="solo")
    event_id = str(uuid.uuid4())

    send(stack, event_id=event_id)
    receiver.wait_for(1, "/once")
    send(stack, event_id=event_id)
    marker = send(stack)
    receiver.wait_for(2, "/once")

    ids = [json.loads(r.body)["eventId"] for r in receiver.at("/once")]
    assert sorted(ids) == sorted([event_id, marker])
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Event)) == 2


def test_replay_from_the_celery_command_keeps_the_webhook_id(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/replay")
    stack.env.update(PATIENT)  # the second request is the replay's, not a retry of the first
    stack.worker()
    send(stack)
    (first,) = receiver.wait_for(1, "/replay")
    wait_until(settled(database, DeliveryStatus.DELIVERED), 30, "delivered")

    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "replay", first.headers["webhook-id"],
         "--yes"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "queued 1" in done.stdout
    _, again = receiver.wait_for(2, "/replay")
    assert again.headers["webhook-id"] == first.headers["webhook-id"]
    assert again.body == first.body


def test_sla_breach_is_flagged_by_beat(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/late", sla_in_seconds=1)
    receiver.script("/late", *[500] * 50)
    stack.worker()
    stack.beat()
    started = time.time_ns() // 1_000_000

    send(stack)

    (flagged,) = wait_until(
        lambda: [d for d in deliveries(database) if d.sla_breach_at_ms is not None],
        30,
        "the SLA breach flag",
    )
    assert flagged.status != DeliveryStatus.DELIVERED
    assert flagged.sla_breach_at_ms == flagged.ingested_at_ms + 1000
    assert flagged.ingested_at_ms >= started


def test_metrics_show_what_the_workers_did(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    ok, _ = hook(stack, database, receiver, "/ok")
    bad, _ = hook(stack, database, receiver, "/bad", sla_in_seconds=1)
    flaky, _ = hook(stack, database, receiver, "/flaky")
    receiver.script("/bad", 400, 400)
    receiver.script("/flaky", 503, 503)
    stack.env.update(PATIENT)  # the eight attempts, and no other
    stack.worker()
    stack.beat()
    base = stack.web()

    first = send(stack, data=customer(1))
    send(stack, data=customer(2))
    send(stack, data=customer(1), event_id=first)  # the same event again
    send(stack, data={"totalPointsIssued": 1})  # no customerIdentifiers: rejected

    def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = requests.get(f"{base}/metrics", timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(response.text)
                for sample in family.samples}

    def attempts(webhook: str, outcome: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return ("notifier_delivery_attempts_total", (("outcome", outcome), ("webhook", webhook)))

    # Counted by the workers at the end of each task, after the attempts are recorded: wait for
    # all eight (two a webhook, and two 503s retried) and for beat's SLA check of /bad.
    samples = wait_until(
        lambda: (got := scraped()).get(("notifier_sla_breaches_total", ())) == 2 and sum(
            value for (name, _), value in got.items()
            if name == "notifier_delivery_attempts_total") == 8 and got, 60, "8 attempts counted")
    assert samples[attempts(ok, "delivered")] == 2
    assert samples[attempts(bad, "failed")] == 2
    assert samples[attempts(flaky, "retrying")] == 2 and samples[attempts(flaky, "delivered")] == 2
    assert [samples[("notifier_events_total", (("outcome", outcome),))]
            for outcome in ("accepted", "duplicate", "rejected")] == [2, 1, 1]
    assert samples[("notifier_deliveries_created_total", ())] == 6
    assert samples[("notifier_webhook_response_seconds_count", ())] == 8
    assert samples[("notifier_webhook_response_seconds_bucket", (("le", "+Inf"),))] == 8
    assert samples[("notifier_delivered_seconds_count", ())] == 4
    assert 0 < samples[("notifier_delivered_seconds_sum", ())] < 60
    assert samples[("notifier_delivery_task_leases_total", ())] >= samples[
        ("notifier_delivery_tasks_total", ())] > 0
    # Nothing is left to do: the gauges read from the database and Redis say so.
    assert [samples[("notifier_deliveries_open", (("status", status),))]
            for status in ("pending", "in_flight", "retrying")] == [0, 0, 0]
    assert samples[("notifier_retries_parked", ())] == 0
    assert not [key for key in samples if key[0] == "notifier_deliveries_waiting"]


def test_a_delivery_task_with_an_option_from_a_newer_version_still_delivers(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/upgrade")
    services = build_services(stack.settings)
    leases: list[Lease] = []
    # Ingested and dispatched here; the task is sent as a newer worker would send it.
    try:
        pipeline.accept(services, {"eventName": "pointsIssued", "orgId": ORG,
                                   "data": customer()}, leases.append)
    finally:
        services.db.dispose()
        services.queues.client.close()
    (lease,) = leases
    producer(stack.settings.broker_url).send_task(
        DELIVER_TASK, args=lease_args(lease), kwargs={"optionFromANewerVersion": True},
        queue=SLOW_QUEUE if lease.slow else DELIVER_QUEUE)
    stack.worker()

    receiver.wait_for(1, "/upgrade")
    wait_until(settled(database, DeliveryStatus.DELIVERED), 30, "delivered")
    assert "left out by this version: ['optionFromANewerVersion']" in stack.log("w1")


def test_a_webhook_that_fails_every_attempt_for_too_long_is_deactivated(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    broken, _ = hook(stack, database, receiver, "/broken")
    mended, _ = hook(stack, database, receiver, "/mended")
    receiver.script("/broken", *[503] * 100)
    receiver.script("/mended", 503)  # fails once, then answers
    stack.env["NOTIFIER_DISABLE_FAILING_AFTER"] = "3"
    # Every retry tried (the circuit breaker would make them probes: tests/integration/
    # test_failing_endpoints.py); and this test saves the webhook without the pipeline's context,
    # which closes the breaker on activation.
    stack.env["NOTIFIER_BREAKER_FAILURES"] = "0"
    stack.env.update(PATIENT)  # every attempt answered (503), none cut by a timeout
    stack.worker()
    stack.beat()
    vault = vault_for(stack.settings.secret_keys, stack.settings.data_dir)
    context = webhooks.Context(database, load_catalog(), vault)

    send(stack, data=customer(1))

    # Retried every 0.3 s or so; the first failure 3 s after the first one deactivates it.
    wait_until(lambda: not webhooks.get(context, ORG, broken)["active"], 30, "/broken inactive")
    requests_made = len(receiver.at("/broken"))
    reason = webhooks.get(context, ORG, broken)["disabledReason"]
    assert reason.startswith("deactivated by notifier: every attempt has failed since")
    # Nothing is lost: its delivery, cut short in retry, is held (replayable, or sent when the
    # webhook is activated with deliverHeld), not failed, without another request; the
    # webhook that answered after one failure stays active.
    (delivery,) = wait_until(lambda: deliveries(database, webhook_id=broken,
                                                 status=DeliveryStatus.HELD), 30, "held")
    attempts = attempts_of(database, delivery.id)
    answered = [a for a in attempts if a.status_code is not None]
    # A retry claimed before the disable committed finds its webhook inactive: held, unsent.
    assert {(a.outcome, a.error_class) for a in attempts if a.status_code is None} <= {
        (DeliveryStatus.HELD, "WebhookInactive")}
    assert {a.status_code for a in answered} == {503} and len(answered) == requests_made
    # Deactivated once every attempt had failed for 3 s, as recorded when it was (its last
    # attempt may have begun a moment before the 3 s were up: the check follows its answer).
    with database.session() as session:
        disabled_at = session.scalar(select(Webhook.updated_at_ms).where(Webhook.id == broken))
    assert disabled_at is not None and disabled_at - answered[0].started_at_ms >= 3000
    assert all(a.started_at_ms < disabled_at for a in answered)
    assert len(receiver.at("/broken")) == requests_made
    assert webhooks.get(context, ORG, mended)["active"]
    assert deliveries(database, webhook_id=mended)[0].status == DeliveryStatus.DELIVERED
    assert f"webhook {broken} deactivated by notifier" in stack.log("w1")

    # Mended and activated again: a fresh period, and the reason is gone.
    receiver.scripts["/broken"].clear()
    receiver.script("/broken", 503)
    webhooks.update_webhook(context, ORG, broken, {"active": True}, now_ms=int(time.time() * 1000))
    assert webhooks.get(context, ORG, broken)["disabledReason"] is None
    send(stack, data=customer(2))
    wait_until(lambda: len(deliveries(database, webhook_id=broken,
                                      status=DeliveryStatus.DELIVERED)) == 1, 30, "delivered")
    assert webhooks.get(context, ORG, broken)["active"]
    # Activated without deliverHeld: what it held stays held, for a replay.
    assert deliveries(database, id=delivery.id)[0].status == DeliveryStatus.HELD


def test_an_event_sent_with_celery_call_is_delivered(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/called")
    stack.worker()
    envelope = {"eventName": "pointsIssued", "orgId": ORG, "data": customer(7)}

    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "call", "notifier.ingest",
         "--args", json.dumps([envelope])],
        env=stack.env, capture_output=True, text=True, timeout=60, check=False,
    )

    assert done.returncode == 0, done.stderr
    (request,) = receiver.wait_for(1, "/called")
    body = json.loads(request.body)
    # eventId and createdAt were missing: notifier filled them in.
    assert body["data"] == customer(7) and body["eventId"] and body["createdAt"] > 0


def test_a_burst_of_events_waiting_to_be_ingested_does_not_hold_back_deliveries(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/burst", max_allowed_connections=4)
    for n in range(1000):
        send(stack, data=customer(n))
    stack.worker("w1", concurrency=2)
    stack.beat()

    receiver.wait_for(1, "/burst", timeout=60)
    # Deliveries have a queue of their own, which the worker takes turns with: the first one
    # went out long before the last event was ingested (one FIFO would put it behind all 1000).
    assert count_events(database) < 1000
    receiver.wait_for(1000, "/burst", timeout=120, unique=True)
    # The worker ingested the waiting events in batches (one transaction each, counted by the
    # workers as notifier_ingest_batches_total), not one task per event.
    counts = Queues(stack.settings.redis_url, stack.settings.redis_prefix).counts()
    assert counts["events|accepted"] == 1000
    assert 0 < counts["ingest_batches"] <= 1000 / 4, counts["ingest_batches"]


class Gate:
    """A TCP gate on 127.0.0.1 in front of a server: while shut, it cuts every connection
    through it and refuses new ones (they are accepted and closed at once), as a database that
    is down or being restarted would; open, it passes bytes both ways. Stalled, it cuts what
    is live and holds new connections open in silence, as a server lost behind a network
    partition would (nothing refuses, nothing answers)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.is_open = False
        self.is_stalled = False
        self.lock = threading.Lock()
        self.live: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.is_stalled:
                    self.live.append(client)
                    continue
                if not self.is_open:
                    client.close()
                    continue
                upstream = socket.create_connection(self.target)
                self.live += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def open(self) -> None:
        if self.is_stalled:
            self.shut()  # what the stall held is cut, as the partition's end would reset it
        with self.lock:
            self.is_open = True

    def stall(self) -> None:
        self.shut()
        with self.lock:
            self.is_stalled = True

    def shut(self) -> None:
        with self.lock:
            self.is_open = self.is_stalled = False
            for end in self.live:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
            self.live.clear()

    def close(self) -> None:
        self.shut()
        self.listener.close()


def test_events_that_arrive_while_the_database_is_down_are_ingested_once_it_is_back(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/db-down")
    url = make_url(stack.settings.database_url)
    gate = Gate(url.host or "127.0.0.1", url.port or 5432)
    try:
        stack.env["NOTIFIER_DATABASE_URL"] = url.set(
            host="127.0.0.1", port=gate.port).render_as_string(hide_password=False)
        stack.worker("w1")
        sent = {send(stack, data=customer(n)) for n in range(40)}
        # A batch that meets the shut gate is sent again with a countdown, not dropped.
        wait_until(lambda: "retried (attempt 2)" in stack.log("w1"), 60, "a second retry")
        assert count_events(database) == 0 and receiver.at("/db-down") == []

        gate.open()
        got = receiver.wait_for(40, "/db-down", timeout=90, unique=True)
        assert {json.loads(r.body)["eventId"] for r in got} == sent
        wait_until(settled(database, DeliveryStatus.DELIVERED, 40), 60, "40 delivered rows")
        assert count_events(database) == 40
    finally:
        gate.close()


def test_a_webhook_that_turns_slow_moves_to_the_slow_lane_and_stops_holding_up_the_others(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/turns", max_allowed_connections=2)
    hook(stack, database, receiver, "/quick", max_allowed_connections=2)
    stack.env["NOTIFIER_SLOW_WEBHOOK_MS"] = "300"
    stack.worker("fast", concurrency=1, queues="notifier,notifier.deliver")
    stack.worker("slow", pool="threads", concurrency=4, queues="notifier.slow")
    stack.beat()
    for n in range(3):  # both answer fast at first, and are measured fast
        send(stack, data=customer(n))
    receiver.wait_for(3, "/turns", timeout=60)
    receiver.wait_for(3, "/quick", timeout=60)

    receiver.script("/turns", *[Reply(200, delay=0.6)] * 20)
    for n in range(20):
        send(stack, data=customer(n))

    receiver.wait_for(23, "/quick", timeout=60)
    # /turns takes 0.6 s an answer, two at a time: 6 s for its 20. Its first slow answer ended
    # its batch in the fast lane; the rest went by the slow lane, so /quick, sharing the one
    # prefork process with it, got all of its 20 while /turns had answered fewer than 12.
    assert len(receiver.at("/turns")) < 3 + 12  # 7 seen here; 22 without the slow lane
    receiver.wait_for(23, "/turns", timeout=60)
    assert "notifier.deliver" in stack.log("slow") and "succeeded" in stack.log("slow")


def test_a_fast_webhooks_burst_goes_side_by_side_in_one_prefork_task_within_its_cap(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/burst", max_allowed_connections=4)
    stack.env.update(PATIENT)  # the nine requests, and no other
    # Batches of 2: the burst's 8 deliveries fill the 4 slots, which the task sends side by
    # side (NOTIFIER_SEND_CONCURRENCY, 4).
    stack.env["NOTIFIER_BATCH_SIZE"] = "2"
    stack.worker("fast", concurrency=2, queues="notifier,notifier.deliver")
    stack.worker("slow", pool="threads", concurrency=4, queues="notifier.slow")
    send(stack, data=customer(0))  # never measured: by the slow lane, and measured fast
    wait_until(settled(database, DeliveryStatus.DELIVERED, 1), 30, "the first delivered")

    receiver.hold("/burst", 0.3)
    # One message: one ingest, whose one Redis call takes the webhook's 4 slots.
    publish_many([{"eventName": "pointsIssued", "data": customer(n)} for n in range(1, 9)],
                 org_id=ORG, broker_url=stack.settings.broker_url)

    receiver.wait_for(9, "/burst", timeout=60)
    wait_until(settled(database, DeliveryStatus.DELIVERED, 9), 30, "9 delivered rows")
    # The 4 slots were used at once, and never more; by one task of the prefork worker (its
    # first lease in the fast lane, the 3 others riding with it), not one task each by the
    # slow lane's one process, which sent the first delivery only.
    assert receiver.peak["/burst"] == 4

    def delivery_tasks() -> tuple[int, int]:
        return tuple(sum(1 for line in stack.log(worker).splitlines()
                         if "notifier.deliver[" in line and "succeeded" in line)
                     for worker in ("fast", "slow"))  # type: ignore[return-value]

    wait_until(lambda: min(delivery_tasks()) >= 1, 30, "the delivery tasks logged")
    assert delivery_tasks() == (1, 1)


def test_a_burst_that_begins_with_a_lone_event_boards_its_fast_lane_task(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    hook(stack, database, receiver, "/burst", max_allowed_connections=4)
    hook(stack, database, receiver, "/busy", events=("tierUpgraded",))
    stack.env.update(PATIENT)  # the requests, and no other
    stack.env["NOTIFIER_BATCH_SIZE"] = "2"  # the burst's 7 fill the lone event's 4 slots
    stack.worker("ingest", concurrency=1, queues="notifier")
    # One prefork process, so that the lone event's task waits to start behind another.
    stack.worker("fast", concurrency=1, queues="notifier.deliver")
    stack.worker("slow", pool="threads", concurrency=4, queues="notifier.slow")

    def ingested(count: int) -> bool:
        """``count`` deliveries stored, and every ingest task that stored them done (their
        leases dispatched after the commit)."""
        lines = [line for line in stack.log("ingest").splitlines() if "notifier.ingest[" in line]
        return (len(deliveries(database)) == count
                and sum("Received" in line for line in lines)
                == sum("succeeded" in line for line in lines))

    def delivery_tasks() -> tuple[int, int]:
        return tuple(sum(1 for line in stack.log(worker).splitlines()
                         if "notifier.deliver[" in line and "succeeded" in line)
                     for worker in ("fast", "slow"))  # type: ignore[return-value]

    # Never measured: each webhook's first delivery goes by the slow lane, and is measured fast.
    send(stack, data=customer(0))
    send(stack, "tierUpgraded", data=customer(0))
    wait_until(settled(database, DeliveryStatus.DELIVERED, 2), 30, "the first two delivered")
    # The prefork process is held by a request to the other webhook...
    held = receiver.gate("/busy")
    send(stack, "tierUpgraded", data=customer(1))
    wait_until(lambda: receiver.in_flight["/busy"] == 1, 30, "the held request open")
    # ... while a lone event, then a burst, come for this one.
    receiver.hold("/burst", 0.3)
    send(stack, data=customer(1))
    wait_until(lambda: ingested(4), 30, "the lone event ingested")
    publish_many([{"eventName": "pointsIssued", "data": customer(n)} for n in range(2, 9)],
                 org_id=ORG, broker_url=stack.settings.broker_url)
    wait_until(lambda: ingested(11), 30, "the burst ingested")
    held.set()

    receiver.wait_for(9, "/burst", timeout=60)
    wait_until(settled(database, DeliveryStatus.DELIVERED, 11), 30, "11 delivered rows")
    # The burst waited for the lone event's task, and boarded it as it started: the 4 slots
    # used at once, never more, by one task of the prefork process; not one slow-lane task per
    # lease while the lone event's task waited to start.
    assert receiver.peak["/burst"] == 4
    wait_until(lambda: sum(delivery_tasks()) >= 4, 30, "the delivery tasks logged")
    assert delivery_tasks() == (2, 2)  # the held request's and the burst's; the two first
    # Its three boarders counted (notifier_delivery_task_boarders_total), as its task ended.
    queues = Queues(stack.settings.redis_url, stack.settings.redis_prefix)
    wait_until(lambda: queues.counts().get("delivery_task_boarders") == 3, 30,
               "the three boarders counted")


def test_traffic_spread_over_webhooks_shares_delivery_tasks(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    orgs = [ORG + 1 + n for n in range(10)]
    vault = vault_for(stack.settings.secret_keys, stack.settings.data_dir)
    for n, org in enumerate(orgs):
        store.create_org(database, org, f"org {n}", now_ms=0)
        create_webhook(database, load_catalog(), vault, org_id=org, name=f"s{n}",
                             url=receiver.url(f"/s{n}"), event_names=["pointsIssued"], now_ms=0)
    # Warm up: each webhook measured fast, so that what follows rides the fast lane.
    stack.worker("w1", concurrency=2)
    for org in orgs:
        publish("pointsIssued", customer(), org_id=org, broker_url=stack.settings.broker_url)
    for n in range(10):
        receiver.wait_for(1, f"/s{n}", timeout=60)
    wait_until(settled(database, DeliveryStatus.DELIVERED, 10), 30, "10 delivered rows")
    stack.kill("w1", signal.SIGTERM)
    queues = Queues(stack.settings.redis_url, stack.settings.redis_prefix)
    before = queues.counts()

    for round_ in range(20):  # round-robin over the ten orgs
        for org in orgs:
            publish("pointsIssued", customer(round_), org_id=org,
                    broker_url=stack.settings.broker_url)
    stack.worker("w2", concurrency=2)
    for n in range(10):
        receiver.wait_for(21, f"/s{n}", timeout=90)
    wait_until(settled(database, DeliveryStatus.DELIVERED, 210), 30, "210 delivered rows")

    # Counted by the workers (notifier_delivery_tasks_total, ..._task_leases_total) at the end
    # of each task, after its attempts are recorded. Without sharing every task carries one
    # lease; with it, leases of different webhooks ride together. The number of tasks is no
    # measure of sharing: it follows the machine's speed (a slow one batches more of a queue in
    # a lease, and hands leases on at NOTIFIER_SLOW_WEBHOOK_MS, one a task). Seen here: 75 to
    # 102 tasks with sharing (101 to 112 leases), 23 to 100 with none (as many leases).
    def counted(prefix: str, suffix: str = "") -> int:
        after = queues.counts()
        return sum(after[name] - before.get(name, 0) for name in after
                   if name.startswith(prefix) and name.endswith(suffix))

    # Each delivery's one delivered attempt: a request cut by the stack's 1 s read timeout on a
    # loaded machine, and sent again, adds an attempt (retrying), never a second delivered one.
    wait_until(lambda: counted("attempts|", "|delivered") == 200, 30,
               "the 200 delivered attempts counted")
    tasks, leases = counted("delivery_tasks"), counted("delivery_task_leases")
    assert 0 < tasks < leases, f"{tasks} delivery tasks carried {leases} leases"


def test_a_webhook_that_turns_slow_in_a_shared_task_hands_the_others_on(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    first, _ = hook(stack, database, receiver, "/one")
    second, _ = hook(stack, database, receiver, "/two")
    # The task's own lease is the lower webhook id's (store.ingest_many orders the fan-out by id).
    lagging, other = ("/one", "/two") if first < second else ("/two", "/one")
    stack.env["NOTIFIER_SLOW_WEBHOOK_MS"] = "300"
    # One lease after another: side by side (the default), the second would not wait.
    stack.env["NOTIFIER_SEND_CONCURRENCY"] = "1"
    # The lagging request stays open until the test ends it (the stack's 1 s read timeout and
    # 2 s deadline would end it, and free the task to send the other lease itself).
    stack.env.update({"NOTIFIER_HTTP_READ_TIMEOUT": "40", "NOTIFIER_HTTP_DEADLINE": "40",
                      "NOTIFIER_SLOT_LEASE_SECONDS": "90", "NOTIFIER_VISIBILITY_TIMEOUT": "120"})
    stack.worker("w1", concurrency=2, queues="notifier,notifier.deliver")
    stack.worker("slow", pool="threads", concurrency=4, queues="notifier.slow")
    for n in range(3):  # both measured fast
        send(stack, data=customer(n))
    receiver.wait_for(3, "/one", timeout=60)
    receiver.wait_for(3, "/two", timeout=60)
    wait_until(settled(database, DeliveryStatus.DELIVERED, 6), 30, "6 delivered rows")

    answer = receiver.gate(lagging)
    try:
        send(stack, data=customer(9))
        wait_until(lambda: receiver.in_flight[lagging] == 1, 30, "the lagging request open")
        # Both leases rode one task, and the lagging request is held open: the other is
        # answered only if, 0.3 s into the task, it was handed on to a task of its own (kept
        # waiting behind the lagging one, it would go after the 40 s deadline, past this wait).
        receiver.wait_for(4, other, timeout=30)
        assert receiver.in_flight[lagging] == 1  # still open when the other was answered
    finally:
        answer.set()
    receiver.wait_for(4, lagging, timeout=60)
    assert "1 lease(s) handed on" in stack.log("w1")


def test_a_tasks_leases_are_sent_side_by_side_each_within_its_webhooks_cap(
    stack: Stack, receiver: Receiver, database: Database
) -> None:
    paths = ("/p1", "/p2", "/p3")
    for path in paths:
        hook(stack, database, receiver, path, max_allowed_connections=1)
    # A held request stays open (the stack's 1 s read timeout and 2 s deadline would end it,
    # and the receiver would still count it open): only a task sending side by side has
    # requests open to the three webhooks at once.
    stack.env.update({"NOTIFIER_HTTP_READ_TIMEOUT": "40", "NOTIFIER_HTTP_DEADLINE": "40",
                      "NOTIFIER_SLOT_LEASE_SECONDS": "90", "NOTIFIER_VISIBILITY_TIMEOUT": "120"})
    stack.worker("w1", concurrency=1, queues="notifier,notifier.deliver")
    stack.worker("slow", pool="threads", concurrency=4, queues="notifier.slow")
    for n in range(3):  # each measured fast
        send(stack, data=customer(n))
    wait_until(settled(database, DeliveryStatus.DELIVERED, 9), 60, "9 delivered rows")
    # From here one prefork process does all (it takes the slow lane too once no other worker
    # does).
    stack.kill("slow", signal.SIGTERM)

    opened = [receiver.gate(path) for path in paths]
    for n in range(2):  # two deliveries a webhook, over one slot each
        send(stack, data=customer(10 + n))
    wait_until(lambda: all(receiver.in_flight[path] == 1 for path in paths), 30,
               "a request open to each of the three webhooks at once")
    for gate in opened:
        gate.set()

    wait_until(settled(database, DeliveryStatus.DELIVERED, 15), 60, "15 delivered rows")
    # Never two requests at once to one webhook: each lease's deliveries go one after another.
    assert [receiver.peak[path] for path in paths] == [1, 1, 1]
    assert all(len(receiver.at(path)) == 5 for path in paths)


def test_rabbitmq_as_the_broker_carries_all_three_queues(
    stack: Stack, receiver: Receiver, database: Database, rabbitmq_url: str
) -> None:
    hook(stack, database, receiver, "/amqp", max_allowed_connections=2)
    stack.env["NOTIFIER_BROKER_URL"] = rabbitmq_url
    stack.worker("w1")
    stack.beat()

    # The first delivery goes by the slow lane (the webhook was never measured), the rest by
    # notifier.deliver; every event comes in by notifier.
    sent = {publish("pointsIssued", customer(n), org_id=ORG, broker_url=rabbitmq_url)
            for n in range(20)}

    got = receiver.wait_for(20, "/amqp", timeout=60, unique=True)
    assert {json.loads(r.body)["eventId"] for r in got} == sent
    wait_until(settled(database, DeliveryStatus.DELIVERED, 20), 60, "20 delivered rows")
    # The worker names its broker, the password masked (as kombu masks it).
    assert Connection(rabbitmq_url).as_uri() in stack.log("w1")
    assert "guest:**@" in Connection(rabbitmq_url).as_uri()
