"""A delivery task's leases through ``pipeline.deliver`` in-process, on both databases and a real
Redis, posting to a real HTTP receiver: what the task pays once for all its leases, and what a
task stopped midway carries on with."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, update

from config import load_settings
from notifier import pipeline, store
from notifier.errors import StoreUnavailable
from notifier.models import Attempt, Delivery, DeliveryStatus, Event, Webhook
from notifier.pipeline import DeliveryInterrupted, Services, build_services
from notifier.queues import Lease, Report
from tests.conftest import Receiver, create_webhook, refusing_delivered, slots_held, wait_until

pytestmark = pytest.mark.integration


def built(database_url: str, redis_url: str, tmp_path: Path, **settings: str) -> Services:
    """The services of a worker on these stores, sending to loopback, with ``settings``."""
    return build_services(load_settings({
        "NOTIFIER_DATA_DIR": str(tmp_path), "NOTIFIER_DATABASE_URL": database_url,
        "NOTIFIER_REDIS_URL": redis_url, "NOTIFIER_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8",
        **settings}))


@pytest.fixture
def services(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[Services]:
    # A task hands on the leases it has not started by NOTIFIER_SLOW_WEBHOOK_MS from its start
    # (never past the 5 s NOTIFIER_BATCH_TIME_BUDGET). These tests hand on nothing (no_hand_on),
    # and on a loaded machine a lease waiting for one of its task's threads (five leases, four
    # threads) could wait past the default 1 s: handed on to no one, it was never sent.
    made = built(database_url, redis_url, tmp_path, NOTIFIER_SLOW_WEBHOOK_MS="10000")
    yield made
    made.db.dispose()


def leases_of(services: Services, receiver: Receiver, org_id: int, webhooks: int,
              events: int = 1) -> list[Lease]:
    """A new org with ``webhooks`` webhooks, ``events`` events published to it: the leases
    ingest dispatched (one a webhook; what queues after the first rides in it when it is
    taken)."""
    store.create_org(services.db, org_id, f"org {org_id}", now_ms=0)
    for n in range(webhooks):
        create_webhook(services.db, services.catalog, services.vault, org_id=org_id,
                             name=f"h{n}", url=receiver.url(f"/{org_id}/{n}"),
                             event_names=["pointsIssued"], now_ms=0)
    leases: list[Lease] = []
    for n in range(events):
        pipeline.accept(services, {"eventName": "pointsIssued", "orgId": org_id,
                                   "data": {"customerIdentifiers": {"customerId": n}}},
                        leases.append)
    assert len(leases) == webhooks
    return leases


def no_send(lease: Lease) -> None:
    pytest.fail(f"nothing should be sent here: {lease}")


def no_hand_on(leases: Sequence[Lease], claimed_until: int | None) -> None:
    pytest.fail(f"nothing should be handed on here: {leases}")


@dataclass
class Cost:
    statements: int = 0
    scripts: int = 0


@contextlib.contextmanager
def counted(services: Services, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cost]:
    """Statements sent to the database and Redis calls of queue scripts while the block runs."""
    cost = Cost()

    def record(*_: Any) -> None:
        cost.statements += 1

    def script(*args: Any) -> Any:
        cost.scripts += 1
        return run_script(*args)

    run_script = services.queues._script
    event.listen(services.db.engine, "before_cursor_execute", record)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(services.queues, "_script", script)
            yield cost
    finally:
        event.remove(services.db.engine, "before_cursor_execute", record)


def statuses(services: Services) -> list[str]:
    with services.db.session() as session:
        return sorted(session.scalars(select(Delivery.status)))


def test_a_task_claims_reads_and_gives_back_once_for_all_its_leases(
    services: Services, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = leases_of(services, receiver, 1, webhooks=1)
    two_deliveries = leases_of(services, receiver, 2, webhooks=1, events=2)
    five_webhooks = leases_of(services, receiver, 3, webhooks=5)
    costs = []
    for leases in (one, two_deliveries, five_webhooks):
        with counted(services, monkeypatch) as cost:
            pipeline.deliver(services, leases, lambda lease: None, hand_on=no_hand_on)
        costs.append(cost)

    receiver.wait_for(1 + 2 + 5)
    assert statuses(services) == [DeliveryStatus.DELIVERED] * 8
    single, double, spread = costs
    # Five leases, or two deliveries, cost what one does: the claim, the webhooks' read, the
    # record of the attempts and the slots' take and give-back are the task's, once, not each
    # lease's nor each delivery's.
    assert spread.statements == double.statements == single.statements
    # take, check the slots still held once claimed (see _give_back_lost), give back, count
    assert spread.scripts == single.scripts == double.scripts == 4


def test_a_task_records_the_attempts_of_its_20_deliveries_in_one_transaction(
    services: Services, receiver: Receiver
) -> None:
    (lease,) = leases_of(services, receiver, 1, webhooks=1, events=20)
    records: list[tuple[int, int]] = []  # (attempts, statements) of each record
    statements = Cost()
    finish = store.finish

    def measured(db: Any, done: Sequence[store.Finished], *within: Any) -> list[store.Breach]:
        before = statements.statements
        breaches = finish(db, done, *within)
        records.append((len(done), statements.statements - before))
        return breaches

    def record(*_: Any) -> None:
        statements.statements += 1

    event.listen(services.db.engine, "before_cursor_execute", record)
    try:
        with pytest.MonkeyPatch.context() as patched:
            patched.setattr(store, "finish", measured)
            pipeline.deliver(services, [lease], lambda lease: None, hand_on=no_hand_on)
    finally:
        event.remove(services.db.engine, "before_cursor_execute", record)

    assert statuses(services) == [DeliveryStatus.DELIVERED] * 20
    assert len(receiver.wait_for(20)) == 20
    # One record for the task's 20 attempts, of a few statements (the attempts' insert and the
    # deliveries' update, each for all rows at once), not one or two per attempt.
    ((attempts, spent),) = records
    assert attempts == 20 and spent <= 2, records


def test_an_attempt_the_database_refuses_to_record_costs_the_others_of_its_task_nothing(
    services: Services, receiver: Receiver
) -> None:
    (lease,) = leases_of(services, receiver, 1, webhooks=1, events=3)
    with services.db.session() as session:
        first, refused, third = session.scalars(
            select(Delivery.id).order_by(Delivery.ingested_at_ms, Delivery.id))
    with refusing_delivered(services.db, refused):
        pipeline.deliver(services, [lease], lambda lease: None, hand_on=no_hand_on)

    assert len(receiver.wait_for(3)) == 3
    with services.db.session() as session:
        status = dict(session.execute(select(Delivery.id, Delivery.status)).all())
        attempts = {a.delivery_id: a for a in session.scalars(select(Attempt))}
    assert status == {first: DeliveryStatus.DELIVERED, refused: DeliveryStatus.FAILED,
                      third: DeliveryStatus.DELIVERED}
    assert len(attempts) == 3
    assert attempts[first].status_code == attempts[third].status_code == 200
    # Recorded failed, saying why (replayable once the cause is fixed).
    assert attempts[refused].error_class == "StoreRefused"
    assert "outcome refused by the test trigger" in (attempts[refused].error_message or "")
    assert slots_held(services.queues, lease.webhook_id, now_ms=pipeline.now_ms()) == 0


def test_a_task_stopped_midway_records_what_it_sent_and_carries_on_with_the_claims_it_held(
    services: Services, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    leases = leases_of(services, receiver, 1, webhooks=3)
    enriched: list[Any] = []
    enrich = pipeline.enrich

    def database_lost_at_the_second_enrichment(*args: Any, **kwargs: Any) -> Any:
        enriched.append(args)
        if len(enriched) == 2:
            raise StoreUnavailable("database: the connection was lost")
        return enrich(*args, **kwargs)

    monkeypatch.setattr(pipeline, "enrich", database_lost_at_the_second_enrichment)
    with pytest.raises(DeliveryInterrupted) as stopped:
        pipeline.deliver(services, leases, lambda lease: None, hand_on=no_hand_on)
    monkeypatch.undo()

    # What was sent before the task stopped is recorded: the first, and the third if its
    # thread (side by side with the second's) had begun it before the second failed. No slot
    # was given back, and the other claims are still held: their deliveries were never sent.
    assert sorted(lease.webhook_id for lease in stopped.value.leases) == sorted(
        lease.webhook_id for lease in leases)
    sent = len(receiver.requests)
    assert sent in (1, 2)
    assert sorted(statuses(services)) == sorted(
        [DeliveryStatus.DELIVERED] * sent + [DeliveryStatus.IN_FLIGHT] * (3 - sent))
    # The retry, with the claims' mark, takes them again at once rather than parking them until
    # they run out (NOTIFIER_SLOT_LEASE_SECONDS).
    pipeline.deliver(services, stopped.value.leases, lambda lease: None, hand_on=no_hand_on,
                     claimed_until=stopped.value.claimed_until)

    assert statuses(services) == [DeliveryStatus.DELIVERED] * 3
    ids = [request.headers["webhook-id"] for request in receiver.wait_for(3)]
    assert len(ids) == len(set(ids)) == 3
    assert [slots_held(services.queues, lease.webhook_id, now_ms=0) for lease in leases] == [0] * 3


class TimeLimit(Exception):  # as Celery's SoftTimeLimitExceeded: an Exception
    """The task's runner stopping it from outside."""


def test_a_time_limit_landing_while_reference_data_is_read_ahead_stops_the_task(
    services: Services, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading ahead is only a head start, so its failures are logged and the task goes on;
    but a time limit that lands there stops the task like one landing anywhere else: taken as
    a failed read-ahead, the task sent on until the hard limit killed it mid-request, and
    nothing it sent was recorded."""
    leases = leases_of(services, receiver, 1, webhooks=3)

    def limit_reached(*_: Any) -> None:
        raise TimeLimit("soft time limit exceeded")

    monkeypatch.setattr(pipeline, "prefetch", limit_reached)
    with pytest.raises(DeliveryInterrupted) as stopped:
        pipeline.deliver(services, leases, lambda lease: None, hand_on=no_hand_on,
                         interruptions=(TimeLimit,))
    monkeypatch.undo()

    assert isinstance(stopped.value.__cause__, TimeLimit)
    assert statuses(services) == [DeliveryStatus.IN_FLIGHT] * 3  # claimed, nothing sent
    assert len(stopped.value.leases) == 3
    pipeline.deliver(services, stopped.value.leases, lambda lease: None, hand_on=no_hand_on,
                     claimed_until=stopped.value.claimed_until)
    assert statuses(services) == [DeliveryStatus.DELIVERED] * 3
    ids = [request.headers["webhook-id"] for request in receiver.wait_for(3)]
    assert len(ids) == len(set(ids)) == 3  # each sent once: none before the stop


def test_a_time_limit_landing_right_after_the_record_commits_records_each_attempt_once(
    services: Services, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is one transaction; a time limit can land after its commit and before the
    task has marked its attempts recorded. The task then records them again on its way out:
    the attempt log held every attempt of the batch twice."""
    leases = leases_of(services, receiver, 1, webhooks=3)
    finish = store.finish
    calls: list[int] = []

    def limit_reached_once_committed(db: Any, done: Any, *within: Any) -> list[store.Breach]:
        breaches = finish(db, done, *within)
        calls.append(len(done))
        if len(calls) == 1:
            raise TimeLimit("soft time limit exceeded")
        return breaches

    monkeypatch.setattr(store, "finish", limit_reached_once_committed)
    with pytest.raises(DeliveryInterrupted) as stopped:
        pipeline.deliver(services, leases, lambda lease: None, hand_on=no_hand_on,
                         interruptions=(TimeLimit,))
    monkeypatch.undo()

    assert calls == [3, 3]  # recorded, then recorded again on the way out
    assert statuses(services) == [DeliveryStatus.DELIVERED] * 3
    # The retry finds them delivered: nothing goes again.
    pipeline.deliver(services, stopped.value.leases, lambda lease: None, hand_on=no_hand_on,
                     claimed_until=stopped.value.claimed_until)
    ids = [request.headers["webhook-id"] for request in receiver.wait_for(3)]
    with services.db.session() as session:
        recorded = sorted((a.delivery_id, a.number, a.status_code)
                          for a in session.scalars(select(Attempt)))
    assert recorded == sorted((delivery_id, 1, 200) for delivery_id in ids)
    assert [slots_held(services.queues, lease.webhook_id, now_ms=0) for lease in leases] == [0] * 3


def test_a_task_whose_record_finds_the_database_away_sends_again_and_loses_no_delivery(
    services: Services, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    leases = leases_of(services, receiver, 1, webhooks=3)

    def database_away(*_: Any, **__: Any) -> list[store.Breach]:
        raise StoreUnavailable("database: the connection was lost")

    monkeypatch.setattr(store, "finish", database_away)
    with pytest.raises(DeliveryInterrupted) as stopped:
        pipeline.deliver(services, leases, lambda lease: None, hand_on=no_hand_on)
    monkeypatch.undo()

    # All three sent, none recorded: the task keeps its slots and claims for its retry.
    assert len(receiver.wait_for(3)) == 3
    assert statuses(services) == [DeliveryStatus.IN_FLIGHT] * 3
    assert len(stopped.value.leases) == 3
    pipeline.deliver(services, stopped.value.leases, lambda lease: None, hand_on=no_hand_on,
                     claimed_until=stopped.value.claimed_until)

    # Sent again with the same webhook-ids (at-least-once) and recorded: what the fault cost is
    # the records of the first sends, never a delivery.
    assert statuses(services) == [DeliveryStatus.DELIVERED] * 3
    ids = [request.headers["webhook-id"] for request in receiver.wait_for(6)]
    assert len(ids) == 6 and len(set(ids)) == 3
    with services.db.session() as session:
        recorded = sorted((a.delivery_id, a.number, a.status_code)
                          for a in session.scalars(select(Attempt)))
    assert recorded == sorted((delivery_id, 1, 200) for delivery_id in set(ids))
    assert [slots_held(services.queues, lease.webhook_id, now_ms=0) for lease in leases] == [0] * 3


def test_a_burst_boards_its_fast_lane_lease_and_a_retry_carries_the_boarders_on(
    services: Services, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create_org(services.db, 1, "org 1", now_ms=0)
    webhook_id, _ = create_webhook(services.db, services.catalog, services.vault, org_id=1,
                                   name="h", url=receiver.url("/h"),
                                   event_names=["pointsIssued"], max_allowed_connections=4,
                                   now_ms=0)
    services.queues.client.hset(f"{services.settings.redis_prefix}:latency", webhook_id, 5)
    events = [{"eventName": "pointsIssued", "orgId": 1,
               "data": {"customerIdentifiers": {"customerId": n}}} for n in range(61)]
    leases: list[Lease] = []
    pipeline.accept(services, events[0], leases.append)  # a lone event: a fast-lane lease
    pipeline.accept_many(services, events[1:], leases.append)  # a burst: it waits for it
    (leader,) = leases
    assert not leader.slow and len(leader.delivery_ids) == 1

    def database_away(*_: Any, **__: Any) -> Any:
        raise StoreUnavailable("database: the connection was lost")

    # The task stops after it took its lease and the burst boarded it: its retry carries them
    # all on, and nothing is handed on or left in a slot.
    monkeypatch.setattr(store, "claim", database_away)
    with pytest.raises(DeliveryInterrupted) as stopped:
        pipeline.deliver(services, [leader], no_send, hand_on=no_hand_on)
    monkeypatch.undo()
    carried = stopped.value.leases
    assert [len(lease.delivery_ids) for lease in carried] == [20, 20, 20, 1]
    assert slots_held(services.queues, webhook_id, now_ms=0) == 4

    pipeline.deliver(services, carried, no_send, hand_on=no_hand_on)

    assert statuses(services) == [DeliveryStatus.DELIVERED] * 61
    assert len(receiver.wait_for(61, "/h", unique=True)) == 61
    assert receiver.peak["/h"] <= 4
    assert slots_held(services.queues, webhook_id, now_ms=0) == 0


def test_a_lease_sharing_its_task_moves_out_with_its_burst_even_with_the_broker_away(
    services: Services, receiver: Receiver
) -> None:
    store.create_org(services.db, 1, "org 1", now_ms=0)
    hooks = {}
    for name, event_name in (("w", "pointsIssued"), ("x", "tierUpgraded")):
        hooks[name], _ = create_webhook(services.db, services.catalog, services.vault, org_id=1,
                                        name=name, url=receiver.url(f"/{name}"),
                                        event_names=[event_name], max_allowed_connections=4,
                                        now_ms=0)
        services.queues.client.hset(f"{services.settings.redis_prefix}:latency", hooks[name], 5)

    def event(name: str, n: int) -> dict[str, Any]:
        return {"eventName": name, "orgId": 1, "data": {"customerIdentifiers": {"customerId": n}}}

    leases: list[Lease] = []
    # Two lone events: two webhooks' fast-lane leases, which share a task; then a burst for w.
    pipeline.accept_many(services, [event("pointsIssued", 0), event("tierUpgraded", 0)],
                         leases.append)
    pipeline.accept_many(services, [event("pointsIssued", n) for n in range(1, 31)],
                         leases.append)
    assert sorted(lease.webhook_id for lease in leases) == sorted(hooks.values())

    def broker_away(handed: Sequence[Lease], claimed_until: int | None) -> None:
        raise OSError("broker: connection refused")

    sent: list[Lease] = []
    pipeline.deliver(services, leases, sent.append, hand_on=broker_away)

    # x's lease was sent; w's moved out: its burst (and the lone event it carried) dispatched as
    # a fast-lane lease and those riding with it, sent as the task ended since the broker was
    # away at its start.
    assert len(receiver.wait_for(1, "/x")) == 1 and receiver.at("/w") == []
    assert [(lease.webhook_id, lease.slow, lease.rides, len(lease.delivery_ids))
            for lease in sent] == [(hooks["w"], False, False, 20), (hooks["w"], False, True, 11)]
    pipeline.deliver(services, sent, no_send, hand_on=no_hand_on)
    assert len(receiver.wait_for(31, "/w", unique=True)) == 31
    assert statuses(services) == [DeliveryStatus.DELIVERED] * 32
    assert [slots_held(services.queues, hook, now_ms=0) for hook in hooks.values()] == [0, 0]


def test_a_delivery_sent_twice_by_a_duplicate_event_leaves_no_retry_parked(
    services: Services, receiver: Receiver
) -> None:
    store.create_org(services.db, 1, "org 1", now_ms=0)
    create_webhook(services.db, services.catalog, services.vault, org_id=1, name="h",
                         url=receiver.url("/h"), event_names=["pointsIssued"], now_ms=0)
    envelope = {"eventName": "pointsIssued", "orgId": 1, "eventId": "e-1",
                "data": {"customerIdentifiers": {"customerId": 1}}}
    first: list[Lease] = []
    pipeline.accept(services, envelope, first.append)
    # The receiver answers the first task's request only once the second task is done.
    answer = receiver.gate("/h")
    sending = threading.Thread(target=pipeline.deliver, args=(services, first, no_send),
                               kwargs={"hand_on": no_hand_on})
    sending.start()
    try:
        # While the first task holds its claim, the event comes again (a producer's retry): its
        # unfinished delivery is queued again, and a second task finds it under that claim.
        wait_until(lambda: statuses(services) == [DeliveryStatus.IN_FLIGHT], 30, "the claim")
        second: list[Lease] = []
        pipeline.accept(services, envelope, second.append)
        assert len(second) == 1
        pipeline.deliver(services, second, no_send, hand_on=no_hand_on)
    finally:
        answer.set()
        sending.join(30)

    assert statuses(services) == [DeliveryStatus.DELIVERED]
    assert len(receiver.wait_for(1)) == 1
    state = services.queues.state(now_ms=pipeline.now_ms())
    # Every delivery has ended: no retry is parked. The second task's look again when the
    # first claim would run out (were its holder to die) is kept, as a re-check.
    assert (state.parked, state.rechecks) == (0, 1)
def test_a_task_whose_lease_redis_lost_before_its_claim_sends_nothing_and_requeues(
    services: Services, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    (lease,) = leases_of(services, receiver, 1, webhooks=1, events=2)
    rebuilt: list[Lease] = []
    claim = store.claim

    def lost_and_rebuilt_before_the_claim(*args: Any, **kwargs: Any) -> Any:
        # Redis loses its state after the task took its lease, and another process rebuilds it
        # before the claim: the deliveries read as pending, and get a slot of their own.
        services.queues.client.flushdb()
        pipeline.recover(services, rebuilt.append)
        return claim(*args, **kwargs)

    monkeypatch.setattr(store, "claim", lost_and_rebuilt_before_the_claim)
    pipeline.deliver(services, [lease], lambda lease: None, hand_on=no_hand_on)
    monkeypatch.undo()

    # Sending them now would open requests the rebuilt slots do not count (over the cap).
    assert statuses(services) == [DeliveryStatus.PENDING] * 2
    (again,) = rebuilt  # both, the one dispatched and the one the take topped the lease up with
    assert len(again.delivery_ids) == 2 and lease.delivery_ids[0] in again.delivery_ids
    pipeline.deliver(services, [again], lambda lease: None, hand_on=no_hand_on)
    assert statuses(services) == [DeliveryStatus.DELIVERED] * 2
    assert len(receiver.wait_for(2)) == 2


def test_two_tasks_claiming_in_one_millisecond_keep_a_slot_each_through_a_flush(
    services: Services, receiver: Receiver
) -> None:
    store.create_org(services.db, 1, "org 1", now_ms=0)
    webhook_id, _ = create_webhook(
        services.db, services.catalog, services.vault, org_id=1, name="capped",
        url=receiver.url("/capped"), event_names=["pointsIssued"], now_ms=0,
        max_allowed_connections=2)
    for n in range(3):
        pipeline.accept(services, {"eventName": "pointsIssued", "orgId": 1,
                                   "data": {"customerIdentifiers": {"customerId": n}}},
                        lambda lease: None)
    with services.db.session() as session:
        first, second, third = session.scalars(
            select(Delivery.id).order_by(Delivery.ingested_at_ms, Delivery.id))
    # Two tasks of the webhook claim in the same millisecond (threads of the slow lane, started
    # together, do): their claims carry the same expiry. Both requests are open when Redis
    # loses its state, and another process rebuilds it.
    now = pipeline.now_ms()
    claims = [store.claim(services.db, [delivery_id], now_ms=now, lease_ms=60_000)
              for delivery_id in (first, second)]
    assert [len(claim.claimed) for claim in claims] == [1, 1]
    services.queues.client.flushdb()
    sent: list[Lease] = []
    pipeline.recover(services, sent.append)

    # Two requests open on a cap of 2: the third delivery waits.
    assert slots_held(services.queues, webhook_id, now_ms=pipeline.now_ms()) == 2
    assert sent == []

    # The first task ends: its claim's slot (and none other) frees for the third delivery.
    (released,) = services.queues.release_many(
        [(Lease(webhook_id, "1-1", (first,)), Report())], batch=1, lease_ms=60_000,
        now_ms=pipeline.now_ms(), claim=claims[0].token)
    assert [lease.delivery_ids for lease in released.leases] == [(third,)]
    assert slots_held(services.queues, webhook_id, now_ms=pipeline.now_ms()) == 2


def test_a_delivery_whose_event_retention_emptied_is_not_sent(
    services: Services, receiver: Receiver
) -> None:
    # The race a replay can run with retention: the replay found the event whole and queued
    # its delivery again; retention, which had seen every delivery of it finished, emptied it
    # meanwhile. What is left of the event ({"purged": true}) must not reach the receiver.
    leases = leases_of(services, receiver, 9, webhooks=1)
    with services.db.transaction() as connection:
        connection.execute(update(Event).values(payload=store.PURGED_PAYLOAD, purged_at_ms=1))

    pipeline.deliver(services, leases, no_send, hand_on=no_hand_on)

    with services.db.session() as session:
        delivery = session.scalars(select(Delivery)).one()
        attempt = session.scalars(select(Attempt)).one()
    assert delivery.status == DeliveryStatus.FAILED
    assert attempt.error_class == "EventEmptied" and "retention" in (attempt.error_message or "")
    assert attempt.status_code is None
    assert receiver.requests == [] and sum(receiver.in_flight.values()) == 0


def test_a_delivery_met_in_time_is_recorded_before_its_sla_falls_due_while_its_task_goes_on(
    services: Services, receiver: Receiver
) -> None:
    store.create_org(services.db, 1, "org 1", now_ms=0)
    # An SLA of 3 s: the first answer and its record come well within it on a loaded machine
    # (checked below), and the second request is still held open past it.
    create_webhook(services.db, services.catalog, services.vault, org_id=1, name="h",
                   url=receiver.url("/h"), event_names=["pointsIssued"], now_ms=0,
                   sla_in_seconds=3)
    leases: list[Lease] = []
    for n in range(2):
        pipeline.accept(services, {"eventName": "pointsIssued", "orgId": 1,
                                   "data": {"customerIdentifiers": {"customerId": n}}},
                        leases.append)
    with services.db.session() as session:
        in_time, held = session.scalars(select(Delivery).order_by(Delivery.ingested_at_ms,
                                                                  Delivery.id))
    # The first is answered at once; the second is held open past the first's SLA, while
    # beat's check runs.
    answer = receiver.gate("/h", after=1)
    sending = threading.Thread(target=pipeline.deliver, args=(services, leases, no_send),
                               kwargs={"hand_on": no_hand_on})
    sending.start()
    try:
        # The task has the first answer and has gone on to the second delivery: its request is
        # open (held by the gate), before either SLA is due.
        wait_until(lambda: len(receiver.requests) == 1 and receiver.in_flight["/h"] == 1, 30,
                   "the first answer, and the second request open")
        assert pipeline.now_ms() < min(in_time.sla_due_at_ms or 0, held.sla_due_at_ms or 0), (
            "the first answer came after its SLA was due: nothing was tested")
        due = max(in_time.sla_due_at_ms or 0, held.sla_due_at_ms or 0)
        wait_until(lambda: pipeline.now_ms() > due, 5, "both SLAs due")
        breaches = store.flag_sla_breaches(services.db, now_ms=pipeline.now_ms(), batch=10)
    finally:
        answer.set()
        sending.join(30)

    # Beat stamps the one still open past its SLA, not the one delivered in time whose task was
    # still sending: its record was written before its due time came.
    assert [breach.delivery_id for breach in breaches] == [held.id]
    with services.db.session() as session:
        first = session.get(Delivery, in_time.id)
        assert first is not None
        assert (first.status, first.sla_breach_at_ms, first.sla_due_at_ms) == (
            DeliveryStatus.DELIVERED, None, None)


def test_a_delivery_met_in_time_is_recorded_in_time_while_another_lease_of_its_task_is_open(
    services: Services, receiver: Receiver
) -> None:
    # Review of c54432c (leases sent side by side): failed before its fix.
    store.create_org(services.db, 1, "org 1", now_ms=0)
    # An SLA of 3 s: both requests open, and the fast one answered and recorded, well within it
    # on a loaded machine (checked below: nothing is tested if it was not).
    for path, sla in (("/fast", 3), ("/held", 3600)):
        create_webhook(services.db, services.catalog, services.vault, org_id=1, name=path[1:],
                       url=receiver.url(path), event_names=["pointsIssued"], now_ms=0,
                       sla_in_seconds=sla)
    leases: list[Lease] = []
    pipeline.accept(services, {"eventName": "pointsIssued", "orgId": 1,
                               "data": {"customerIdentifiers": {"customerId": 1}}},
                    leases.append)
    assert len(leases) == 2
    with services.db.session() as session:
        in_time = session.scalars(select(Delivery).where(Delivery.sla_due_at_ms.is_not(None))
                                  .order_by(Delivery.sla_due_at_ms)).first()
    assert in_time is not None and in_time.sla_due_at_ms is not None
    # Both requests open at once, each past its own SLA check; then the one to the webhook
    # with the short SLA is answered, while the other is held open past that SLA's due time.
    answer_fast, answer_held = receiver.gate("/fast"), receiver.gate("/held")
    sending = threading.Thread(target=pipeline.deliver, args=(services, leases, no_send),
                               kwargs={"hand_on": no_hand_on})
    sending.start()
    try:
        wait_until(lambda: receiver.in_flight["/fast"] == receiver.in_flight["/held"] == 1, 30,
                   "a request open to each webhook")
        answer_fast.set()

        def recorded() -> bool:
            with services.db.session() as session:
                found = session.get(Delivery, in_time.id)
                return found is not None and found.status == DeliveryStatus.DELIVERED

        # Recorded while the other request is still held open (recorded only at the task's
        # end, it would not be before this wait ends).
        wait_until(recorded, 30, "the fast one recorded delivered")
        due = in_time.sla_due_at_ms
        assert pipeline.now_ms() < due, (
            "the fast one was recorded after its SLA was due: nothing was tested")
        wait_until(lambda: pipeline.now_ms() > due, 5, "its SLA due")
        breaches = store.flag_sla_breaches(services.db, now_ms=pipeline.now_ms(), batch=10)
    finally:
        answer_fast.set()
        answer_held.set()
        sending.join(30)

    # Delivered in time: its record was written before its due time came, though its task
    # still had a request open to the other webhook.
    assert breaches == []
    with services.db.session() as session:
        first = session.get(Delivery, in_time.id)
        assert first is not None
        assert (first.status, first.sla_breach_at_ms) == (DeliveryStatus.DELIVERED, None)


def test_a_time_limit_landing_as_the_helper_threads_start_stops_those_started(
    services: Services, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review of c54432c (leases sent side by side): failed before its fix. The limit lands
    # after the first helper thread started, before the task's threads were under the watch
    # that stops and cuts them: the started helper sent on after its task had stopped, and
    # what it sent rode the leases the task carried on to its retry.
    leases = leases_of(services, receiver, 1, webhooks=3)
    gates = [receiver.gate(f"/1/{n}") for n in range(3)]
    started: list[threading.Thread] = []
    handed: list[Lease] = []
    class LimitAtTheSecondHelper(threading.Thread):
        def start(self) -> None:
            if self.name == "notifier-send-1":
                raise TimeLimit("soft time limit exceeded")
            if self.name.startswith("notifier-send-"):
                started.append(self)
            super().start()

    monkeypatch.setattr(threading, "Thread", LimitAtTheSecondHelper)
    try:
        with pytest.raises(DeliveryInterrupted) as stopped:
            pipeline.deliver(services, leases, lambda lease: None,
                             hand_on=lambda leases, _: handed.extend(leases),
                             interruptions=(TimeLimit,))
    finally:
        monkeypatch.undo()
        for gate in gates:
            gate.set()
        for helper in started:
            helper.join(60)

    assert isinstance(stopped.value.__cause__, TimeLimit)
    assert len(started) == 1 and len(stopped.value.leases) == 3
    # After its task stopped, the helper took no other lease, nor handed one on: at most the
    # request it had open when the limit landed reached the receiver (cut).
    assert handed == []
    assert len(receiver.requests) <= 1


def test_leases_past_the_concurrency_not_started_by_the_deadline_are_handed_on(
    database_url: str, redis_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    # The deadline runs from the task's start, before its take, claim and reads: 2 s leaves a
    # loaded machine the time to start the second lease before it (at 0.3 s, a slow start had
    # all three waiting handed on), and the two not started are handed on all the same.
    services = built(database_url, redis_url, tmp_path, NOTIFIER_SEND_CONCURRENCY="2",
                     NOTIFIER_SLOW_WEBHOOK_MS="2000")
    try:
        leases = leases_of(services, receiver, 1, webhooks=4)
        paths = [f"/1/{n}" for n in range(4)]
        gates = [receiver.gate(path) for path in paths]  # every request held open
        handed: list[Lease] = []
        sending = threading.Thread(target=pipeline.deliver, args=(services, leases, no_send),
                                   kwargs={"hand_on": lambda held, _: handed.extend(held)})
        sending.start()
        try:
            # Two leases side by side, their requests held; the two waiting for a thread are
            # handed on at the deadline, to tasks of their own. (The hand-on can come before
            # the second request reaches the receiver: both are waited for.)
            def handed_and_open() -> list[str]:
                open_now = [path for path in paths if receiver.in_flight[path]]
                return open_now if len(handed) >= 2 and len(open_now) >= 2 else []

            open_paths = wait_until(handed_and_open, 30, "two leases handed on, two requests open")
            assert len(handed) == 2 and len(open_paths) == 2
        finally:
            for gate in gates:
                gate.set()
            sending.join(30)

        with services.db.session() as session:
            path_of = {hook.id: "/" + hook.url.split("/", 3)[3]
                       for hook in session.scalars(select(Webhook))}
        handed_on = {lease.webhook_id for lease in handed}
        sent = {path_of[lease.webhook_id] for lease in leases} - {path_of[h] for h in handed_on}
        assert set(open_paths) == sent
        assert {r.path for r in receiver.requests} == sent
        assert statuses(services) == sorted([DeliveryStatus.DELIVERED] * 2
                                            + [DeliveryStatus.IN_FLIGHT] * 2)
    finally:
        services.db.dispose()


@pytest.mark.parametrize(("order", "handed_on"), [
    # w's riding lease waits while its fast-lane lease is sent: the rider goes by the slow lane.
    (("x", "w", "w+", "y"), [("w", True), ("y", False)]),
    # w's lease and its rider both wait: one goes on by its lane, the other by the slow lane.
    (("x", "y", "w", "w+"), [("w", False), ("w", True)]),
])
def test_leases_handed_on_keep_a_webhook_to_one_prefork_process(
    database_url: str, redis_url: str, tmp_path: Path, receiver: Receiver,
    order: tuple[str, ...], handed_on: list[tuple[str, bool]]
) -> None:
    # Two at once (one lease may ride with a fast-lane one), batches of one.
    services = built(database_url, redis_url, tmp_path, NOTIFIER_SEND_CONCURRENCY="2",
                     NOTIFIER_SLOW_WEBHOOK_MS="2000", NOTIFIER_BATCH_SIZE="1")
    try:
        store.create_org(services.db, 3, "org 3", now_ms=0)
        name_of = {}
        for name, slots in (("x", 1), ("w", 2), ("y", 1)):
            webhook_id, _ = create_webhook(
                services.db, services.catalog, services.vault, org_id=3, name=name,
                url=receiver.url(f"/3/{name}"), event_names=["pointsIssued"],
                max_allowed_connections=slots, now_ms=0)
            name_of[webhook_id] = name
            # Measured fast: its leases go by the fast lane.
            services.queues.client.hset(f"{services.settings.redis_prefix}:latency", webhook_id, 5)
        leases: list[Lease] = []
        pipeline.accept_many(services, [
            {"eventName": "pointsIssued", "orgId": 3,
             "data": {"customerIdentifiers": {"customerId": n}}} for n in range(2)], leases.append)
        named = {name_of[lease.webhook_id] + ("+" if lease.rides else ""): lease
                 for lease in leases}
        assert sorted(named) == ["w", "w+", "x", "y"] and not any(lease.slow for lease in leases)
        # The two sent first have their requests held open; the others wait for a thread.
        gates = [receiver.gate(f"/3/{name.rstrip('+')}") for name in order[:2]]
        handed: list[Lease] = []
        # As the task has them from its message: which lease rides is not told.
        task = [replace(named[name], rides=False) for name in order]
        sending = threading.Thread(target=pipeline.deliver, args=(services, task, lambda _: None),
                                   kwargs={"hand_on": lambda held, _: handed.extend(held)})
        sending.start()
        try:
            wait_until(lambda: len(handed) == 2 and all(
                receiver.in_flight[f"/3/{name.rstrip('+')}"] for name in order[:2]), 30,
                "two leases handed on, two requests open")
            assert [(name_of[lease.webhook_id], lease.slow) for lease in handed] == handed_on
        finally:
            for gate in gates:
                gate.set()
            sending.join(30)
    finally:
        services.db.dispose()
