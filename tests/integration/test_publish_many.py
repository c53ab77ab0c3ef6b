"""Several events per broker message, through the whole path: ``notifier.publish_many`` (or a
list given to ``celery -A tasks call notifier.ingest``) -> real broker -> real worker -> real
HTTP receiver, each event stored, validated and delivered as if it had come alone."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text

import notifier
from notifier import store
from notifier.db import Database
from notifier.models import Delivery, DeliveryStatus, Event, EventStatus
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Receiver, Stack, create_webhook, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 1717


@pytest.fixture
def database(database: Database) -> Database:
    """The stack's database (tests/conftest.py), with the test org in it."""
    store.create_org(database, ORG, "test org", now_ms=0)
    return database


def hook(stack: Stack, database: Database, receiver: Receiver, path: str) -> None:
    create_webhook(database, load_catalog(),
                   vault_for(stack.settings.secret_keys, stack.settings.data_dir),
                   org_id=ORG, name=path.strip("/"), url=receiver.url(path),
                   event_names=["pointsIssued"], now_ms=0)


def event(n: int, **fields: Any) -> dict[str, Any]:
    return {"eventName": "pointsIssued", "orgId": ORG,
            "data": {"customerIdentifiers": {"customerId": n}, "totalPointsIssued": n}, **fields}


def events(database: Database) -> list[Event]:
    with database.session() as session:
        return list(session.scalars(select(Event).order_by(Event.pk)))


def delivered(database: Database) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).select_from(Delivery)
                                  .where(Delivery.status == DeliveryStatus.DELIVERED)) or 0)


def waiting_on_a_lock(database: Database) -> int:
    # A connection of its own: a transaction sees pg_stat_activity as it was at its first look.
    with database.engine.connect() as connection:
        return int(connection.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")).scalar() or 0)


def celery_call(stack: Stack, *args: Any) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "call", "notifier.ingest",
         "--args", json.dumps(list(args))],
        env=stack.env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_list_of_50_with_one_invalid_delivers_49_and_keeps_the_invalid_one_rejected(
        stack: Stack, receiver: Receiver, database: Database, broker: str,
        request: pytest.FixtureRequest) -> None:
    if broker == "rabbitmq":
        stack.env["NOTIFIER_BROKER_URL"] = request.getfixturevalue("rabbitmq_url")
    hook(stack, database, receiver, "/many")
    stack.worker()
    listed = [event(n) for n in range(50)]
    listed[17]["data"]["totalPointsIssued"] = "ten"

    ids = notifier.publish_many(listed, broker_url=stack.env["NOTIFIER_BROKER_URL"])

    got = receiver.wait_for(49, "/many", timeout=60, unique=True)
    assert {json.loads(r.body)["eventId"] for r in got} == set(ids) - {ids[17]}
    wait_until(lambda: delivered(database) == 49, 30, "49 delivered rows")
    stored = {e.event_id: e for e in events(database)}
    assert set(stored) == set(ids)
    rejected = stored[ids[17]]
    assert rejected.status == EventStatus.REJECTED
    assert rejected.error_path == "$.data.totalPointsIssued", rejected.error_path
    assert "'ten'" in (rejected.error_message or "")
    assert all(stored[i].status == EventStatus.DISPATCHED for i in ids if i != ids[17])
    assert len(receiver.at("/many")) == 49  # the rejected one was never sent


def test_an_event_id_given_twice_in_a_list_and_again_later_is_one_event_delivered_once(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    hook(stack, database, receiver, "/twice")
    # One solo worker takes messages in order: once the marker arrives, the second list's
    # ingest has run, and a delivery it made would have arrived before.
    stack.worker("solo", concurrency=1, pool="solo")
    broker = stack.settings.broker_url

    first = notifier.publish_many([event(1, eventId="same"), event(2), event(3, eventId="same")],
                                  broker_url=broker)
    receiver.wait_for(2, "/twice")
    notifier.publish_many([event(4, eventId="same")], broker_url=broker)
    (marker,) = notifier.publish_many([event(5)], broker_url=broker)
    receiver.wait_for(3, "/twice")

    ids = sorted(json.loads(r.body)["eventId"] for r in receiver.at("/twice"))
    assert ids == sorted(["same", first[1], marker])
    # The first of the list is the one stored (its data), as with two messages.
    (same,) = [r for r in receiver.at("/twice") if json.loads(r.body)["eventId"] == "same"]
    assert json.loads(same.body)["data"]["customerIdentifiers"] == {"customerId": 1}
    assert len(events(database)) == 3


def test_celery_call_takes_a_list_of_envelopes_and_still_takes_one(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    hook(stack, database, receiver, "/called")
    stack.worker()

    celery_call(stack, [event(1), event(2, eventId="listed-2")])
    celery_call(stack, event(3, eventId="alone"))

    got = receiver.wait_for(3, "/called", timeout=60)
    bodies = [json.loads(r.body) for r in got]
    assert sorted(b["data"]["customerIdentifiers"]["customerId"] for b in bodies) == [1, 2, 3]
    assert {"listed-2", "alone"} <= {b["eventId"] for b in bodies}
    # eventId and createdAt were missing from the first: notifier filled them in.
    assert all(b["eventId"] and b["createdAt"] > 0 for b in bodies)


def test_a_message_over_the_bound_is_kept_rejected_event_by_event_never_delivered(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    stack.env["NOTIFIER_MAX_EVENTS_PER_MESSAGE"] = "3"
    hook(stack, database, receiver, "/bound")
    stack.worker()

    celery_call(stack, [event(n, eventId=f"over-{n}") for n in range(4)])
    celery_call(stack, [event(n, eventId=f"fine-{n}") for n in range(3)])

    receiver.wait_for(3, "/bound", timeout=60)
    stored = wait_until(lambda: (found := events(database)) and len(found) == 7 and found,
                        30, "7 events stored")
    over = [e for e in stored if e.status == EventStatus.REJECTED]
    assert sorted(e.payload["eventId"] for e in over) == [f"over-{n}" for n in range(4)]
    for refused in over:
        assert refused.error_path == "$"
        assert "4 events" in (refused.error_message or "")
        assert "NOTIFIER_MAX_EVENTS_PER_MESSAGE" in (refused.error_message or "")
        # Its names, not its data (as for an event over the size limit), under an id of its
        # own: the same events published again in shorter lists are delivered.
        assert "data" not in refused.payload and refused.event_id != refused.payload["eventId"]
    assert sorted(json.loads(r.body)["eventId"] for r in receiver.at("/bound")) == [
        f"fine-{n}" for n in range(3)]


def test_a_worker_killed_in_the_middle_of_a_list_loses_none_of_it(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    stack.env["NOTIFIER_VISIBILITY_TIMEOUT"] = "10"  # the killed worker's message comes back
    hook(stack, database, receiver, "/killed")
    listed = [event(n, eventId=f"k-{n:03}") for n in range(50)]
    # A transaction of the test's own holds k-025 (inserted, not committed): the worker's
    # transaction stores the list in eventId order and waits there, half of it written.
    holder = database.engine.connect()
    held = holder.begin()
    holder.execute(insert(Event).values(
        event_id="k-025", event_name="pointsIssued", org_id=ORG, created_at_ms=0,
        received_at_ms=0, payload={}, status=EventStatus.DISPATCHED))
    try:
        stack.worker("w1")
        notifier.publish_many(listed, broker_url=stack.settings.broker_url)
        wait_until(lambda: waiting_on_a_lock(database), 60, "the worker to wait mid-list")
        stack.kill("w1")  # SIGKILL, the pool with it: the message was never acknowledged
    finally:
        held.rollback()
        holder.close()
    assert events(database) == []  # what it wrote of the list went with its transaction
    stack.worker("w2")

    got = receiver.wait_for(50, "/killed", timeout=90, unique=True)
    assert {json.loads(r.body)["eventId"] for r in got} == {e["eventId"] for e in listed}
    wait_until(lambda: delivered(database) == 50, 30, "50 delivered rows")
    assert len(events(database)) == 50
