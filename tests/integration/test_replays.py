"""Replay by selection on both databases: each criterion, combined, in bounded batches, recorded."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update

from notifier import pipeline, store
from notifier.db import Database
from notifier.errors import QueueUnavailable
from notifier.models import Delivery, DeliveryStatus, Webhook
from notifier.pipeline import Services
from notifier.replays import Selection, selection
from notifier.schemas import load_catalog
from tests.conftest import create_webhook, waiting
from tests.integration import test_deliver
from tests.integration.test_store import ORG, VAULT, event, webhook

pytestmark = pytest.mark.integration

services = test_deliver.services  # the fixture: Services on both databases and a real Redis
OTHER_ORG = 8
HOUR = 3_600_000
NOW = 100 * HOUR


@pytest.fixture
def deliveries(db: Database) -> dict[str, Any]:
    """Two webhooks of ORG and one of OTHER_ORG, with deliveries of known times, statuses and
    last answers; named ``<webhook>-<n>``."""
    store.create_org(db, ORG, "org", now_ms=0)
    store.create_org(db, OTHER_ORG, "other", now_ms=0)
    a = webhook(db, "a", events=("pointsIssued", "tierUpgraded"))
    b = webhook(db, "b")
    other, _ = create_webhook(db, load_catalog(), VAULT, org_id=OTHER_ORG, name="x",
                                    url="https://example.com/x", event_names=["pointsIssued"],
                                    now_ms=0)
    rows = [  # (event id, name, org, hours ago, status per webhook, last status code)
        ("e1", "pointsIssued", ORG, 5, DeliveryStatus.DEAD, 500),
        ("e2", "pointsIssued", ORG, 3, DeliveryStatus.FAILED, 404),
        ("e3", "tierUpgraded", ORG, 2, DeliveryStatus.DEAD, 503),
        ("e4", "pointsIssued", ORG, 1, DeliveryStatus.DELIVERED, 200),
        ("e5", "pointsIssued", ORG, 0, DeliveryStatus.PENDING, None),
        ("e6", "pointsIssued", OTHER_ORG, 2, DeliveryStatus.DEAD, 500),
    ]
    ids: dict[str, str] = {}
    for event_id, name, org_id, ago, status, code in rows:
        (outcome,) = store.ingest_many(db, load_catalog(),
                                       [{**event(event_id, name), "orgId": org_id}],
                                       now_ms=NOW - ago * HOUR)
        for queued in outcome.queued:
            label = {a: "a", b: "b", other: "x"}[queued.webhook_id] + "-" + event_id
            ids[label] = queued.delivery_id
            with db.session() as session:
                session.execute(update(Delivery).where(Delivery.id == queued.delivery_id)
                                .values(status=status, last_status_code=code))
    with db.session() as session:
        group_a = session.scalar(select(Webhook.consumer_group_id).where(Webhook.id == a))
    return {"ids": ids, "a": a, "b": b, "x": other, "group_a": group_a}


def chosen(db: Database, made: dict[str, Any], **criteria: Any) -> set[str]:
    """The labels of the deliveries a selection holds."""
    by_id = {v: k for k, v in made["ids"].items()}
    return {by_id[row.id] for row in store.sample_selection(
        db, selection(now_ms=NOW, **criteria), most=100)}


def test_each_criterion_narrows_the_selection(db: Database, deliveries: dict[str, Any]) -> None:
    made, ids = deliveries, deliveries["ids"]

    assert chosen(db, made, delivery_ids=[ids["a-e1"], ids["b-e2"]]) == {"a-e1", "b-e2"}
    assert chosen(db, made, event_id="e2") == {"a-e2", "b-e2"}
    assert chosen(db, made, webhook=made["b"]) == {"b-e1", "b-e2", "b-e4", "b-e5"}
    assert chosen(db, made, webhook=made["group_a"]) == chosen(db, made, webhook=made["a"])
    assert chosen(db, made, org=OTHER_ORG) == {"x-e6"}
    assert chosen(db, made, statuses=["dead"]) == {"a-e1", "b-e1", "a-e3", "x-e6"}
    assert chosen(db, made, event_names=["tierUpgraded"]) == {"a-e3"}
    assert chosen(db, made, since="2h") == {"a-e3", "x-e6", "a-e4", "b-e4", "a-e5", "b-e5"}
    assert chosen(db, made, until="3h") == {"a-e1", "b-e1"}
    assert chosen(db, made, response_status="5xx") == {"a-e1", "b-e1", "a-e3", "x-e6"}
    assert chosen(db, made, response_status="404") == {"a-e2", "b-e2"}


def test_criteria_combine(db: Database, deliveries: dict[str, Any]) -> None:
    made = deliveries

    assert chosen(db, made, webhook=made["a"], statuses=["dead", "failed"], since="4h",
                  until="1h") == {"a-e2", "a-e3"}
    assert chosen(db, made, org=ORG, response_status="5xx", event_names=["pointsIssued"]) == {
        "a-e1", "b-e1"}
    assert chosen(db, made, webhook=made["x"], org=ORG) == set()


def test_a_count_skips_what_is_queued_already_and_names_ids_not_found(
        db: Database, deliveries: dict[str, Any]) -> None:
    ids = deliveries["ids"]
    counted = store.count_selection(db, Selection(webhook=deliveries["b"]))
    assert (counted.matched, counted.skipped, counted.replayable) == (4, 1, 3)

    # Of another org, as good as missing to this one.
    counted = store.count_selection(db, Selection(
        delivery_ids=(ids["a-e1"], ids["x-e6"], "msg_nope"), org_id=ORG))
    assert counted.not_found == (ids["x-e6"], "msg_nope") and counted.matched == 1


def _batches(db: Database, replay_id: int, most: int,
             queue: Any = lambda _: None) -> tuple[list[store.Queued], int]:
    """Run a replay's batches to the end: what they queued, and how many batches ran."""
    queued: list[store.Queued] = []
    batches = 0
    while True:
        done = store.replay_batch(db, replay_id, most=most, now_ms=NOW, queue=queue)
        assert done.looked_at <= most
        queued += done.queued
        batches += 1
        if done.finished:
            return queued, batches


def test_a_replay_goes_in_batches_marks_its_deliveries_and_queues_nothing_twice(
        db: Database, deliveries: dict[str, Any]) -> None:
    made = Selection(org_id=ORG)  # 9 deliveries, of which 2 pending already
    replay_id = store.start_replay(db, made, requested_by="tester", org_id=None, now_ms=NOW)
    queued_in_redis: list[list[store.Queued]] = []
    (view,) = store.replays(db)
    assert view.as_json()["queuing"] is True

    queued, batches = _batches(db, replay_id, 2, queued_in_redis.append)

    assert len(queued) == 7 and batches == 4
    assert queued_in_redis == [queued[:2], queued[2:4], queued[4:6], queued[6:]]
    assert {q.delivery_id for q in queued} == {
        v for k, v in deliveries["ids"].items() if not k.endswith("e5") and k != "x-e6"}
    with db.session() as session:
        replayed = session.execute(select(Delivery.status, Delivery.replay_id)
                                   .where(Delivery.id.in_([q.delivery_id for q in queued]))).all()
    assert set(replayed) == {(DeliveryStatus.PENDING, replay_id)}
    (view,) = store.replays(db)
    assert (view.id, view.queued, view.to_go, view.requested_by) == (replay_id, 7, 7, "tester")
    assert view.selection == {"org": ORG} and view.as_json()["queuing"] is False
    # Finished, it is finished: carried on again (a task redelivered), it queues nothing.
    assert store.replay_batch(db, replay_id, most=2, now_ms=NOW, queue=queued_in_redis.append
                              ) == store.ReplayBatch([], 0, finished=True)

    # Run again while they wait: every one is pending, so nothing is queued twice.
    again = store.start_replay(db, made, requested_by="tester", org_id=None, now_ms=NOW)
    assert _batches(db, again, 100, queued_in_redis.append) == ([], 1)


def test_a_replay_carried_on_takes_up_where_its_last_batch_committed(
        db: Database, deliveries: dict[str, Any]) -> None:
    made = Selection(org_id=ORG)
    replay_id = store.start_replay(db, made, requested_by="t", org_id=None, now_ms=NOW)
    first = store.replay_batch(db, replay_id, most=3, now_ms=NOW, queue=lambda _: None)

    def refused(_: list[store.Queued]) -> None:
        raise QueueUnavailable("redis: connection refused")

    # A batch that fails (a worker killed, Redis away) leaves the cursor where it was.
    with pytest.raises(QueueUnavailable):
        store.replay_batch(db, replay_id, most=3, now_ms=NOW, queue=refused)
    rest, _ = _batches(db, replay_id, 3)

    taken = [q.delivery_id for q in first.queued + rest]
    assert len(taken) == len(set(taken)) == 7
    # Past the last batch committed, in id order.
    assert max(q.delivery_id for q in first.queued) < min(q.delivery_id for q in rest)
    (view,) = store.replays(db, replay_id=replay_id)
    assert (view.queued, view.finished_at_ms) == (7, NOW)


def test_a_replay_of_delivered_ones_takes_each_once(db: Database,
                                                    deliveries: dict[str, Any]) -> None:
    made = Selection(statuses=(DeliveryStatus.DELIVERED,))
    replay_id = store.start_replay(db, made, requested_by="t", org_id=None, now_ms=NOW)
    first = store.replay_batch(db, replay_id, most=1, now_ms=NOW, queue=lambda _: None)
    # Delivered again before the next batch: it matches again, and is not taken again.
    with db.session() as session:
        session.execute(update(Delivery).where(Delivery.id == first.queued[0].delivery_id)
                        .values(status=DeliveryStatus.DELIVERED))
    assert not first.finished
    rest, _ = _batches(db, replay_id, 1)

    assert {q.delivery_id for q in first.queued + rest} == {
        deliveries["ids"]["a-e4"], deliveries["ids"]["b-e4"]}
    (view,) = store.replays(db, replay_id=replay_id)
    assert (view.queued, view.delivered, view.failed, view.to_go) == (2, 1, 0, 1)


def test_a_replay_rides_the_replay_queue_also_after_redis_is_rebuilt(
        services: Services, deliveries: dict[str, Any]) -> None:
    hook, leases = deliveries["a"], []
    services.queues.rebuilt()  # the state is whole, as the sweeper leaves it

    done = pipeline.replay_selection(services, Selection(webhook=hook), leases.append,
                                     requested_by="tester", batch=2)

    assert (done.queued, done.skipped) == (4, 1)
    sent = [i for lease in leases for i in lease.delivery_ids]
    assert len(sent) + waiting(services.queues, hook, replay=True) == 4
    assert waiting(services.queues, hook) == 0
    services.queues.client.flushall()
    pipeline.rebuild(services)
    # The replayed ones (none claimed yet) back behind live traffic; a-e5, pending from its
    # event, is live work.
    assert waiting(services.queues, hook, replay=True) == 4
    assert waiting(services.queues, hook) == 1


def test_a_batch_redis_refused_is_left_as_it_was(db: Database,
                                                deliveries: dict[str, Any]) -> None:
    made = Selection(webhook=deliveries["b"])
    replay_id = store.start_replay(db, made, requested_by="t", org_id=None, now_ms=NOW)

    def refused(_: list[store.Queued]) -> None:
        raise QueueUnavailable("redis: connection refused")

    with pytest.raises(QueueUnavailable):
        store.replay_batch(db, replay_id, most=10, now_ms=NOW, queue=refused)

    # Run again, the replay finds them all: none was left pending with nothing to send it.
    assert store.count_selection(db, made).replayable == 3
    (view,) = store.replays(db, replay_id=replay_id)
    assert (view.queued, view.to_go) == (0, 0)


def test_a_large_replay_goes_in_bounded_batches(services: Services,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store.create_org(services.db, ORG, "org", now_ms=0)
    hook = webhook(services.db, "big", max_allowed_connections=1)
    store.ingest_many(services.db, load_catalog(), [event(f"e{n}") for n in range(250)],
                      now_ms=NOW)
    with services.db.session() as session:
        session.execute(update(Delivery).values(status=DeliveryStatus.DEAD))
    services.queues.rebuilt()
    calls: list[int] = []
    enqueue = services.queues.enqueue

    def counted(webhook_id: str, limit: int, items: Any, *, replay: bool = False) -> None:
        items = list(items)
        calls.append(len(items))
        enqueue(webhook_id, limit, items, replay=replay)

    monkeypatch.setattr(services.queues, "enqueue", counted)
    looked_at: list[int] = []

    done = pipeline.replay_selection(services, Selection(webhook=hook), lambda lease: None,
                                     requested_by="t", progress=looked_at.append, batch=100)

    # One transaction and one Redis call per batch (of one webhook), never one per delivery.
    assert done.queued == 250 and calls == [100, 100, 50] and looked_at == [100, 100, 50]
    assert waiting(services.queues, hook, replay=True) == 250 - 20  # one lease took a batch
