"""Retention (``NOTIFIER_RETENTION_DAYS``) on both databases: what a purge empties, what it keeps,
the bound of one run, the index it walks, and the beat task through a real worker."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import func, insert, inspect, select, text, tuple_, update

from notifier import store
from notifier.db import Database
from notifier.models import (
    FINAL_STATUSES,
    Attempt,
    Delivery,
    DeliveryStatus,
    Event,
    RetentionCursor,
)
from notifier.pipeline import now_ms
from notifier.replays import Selection
from notifier.schemas import load_catalog
from tests.conftest import Cli, Stack, wait_until
from tests.integration.test_store import ORG, event, webhook

pytestmark = pytest.mark.integration

DAY = 24 * 3600 * 1000
NOW = 100 * DAY
CUTOFF = NOW - 30 * DAY
OLD, RECENT = CUTOFF - DAY, CUTOFF + DAY


@pytest.fixture
def org(db: Database) -> Database:
    store.create_org(db, ORG, "org", now_ms=0)
    webhook(db, "a")
    webhook(db, "b")
    return db


def ingest(db: Database, event_id: str, at_ms: int, *statuses: str, **data: Any) -> None:
    """An event received at ``at_ms`` whose deliveries (by webhook id) are in ``statuses`` (the
    last repeated for the rest), each with an attempt that left its answer, and what enrichment added."""
    store.ingest_many(db, load_catalog(), [event(event_id, **data)], now_ms=at_ms)
    with db.session() as session:
        deliveries = session.scalars(
            select(Delivery).join(Event, Event.pk == Delivery.event_pk)
            .where(Event.event_id == event_id).order_by(Delivery.webhook_id)).all()
        for number, delivery in enumerate(deliveries):
            status = statuses[min(number, len(statuses) - 1)]
            delivery.status, delivery.ended_at_ms = status, at_ms + 5
            delivery.last_status_code, delivery.last_error = 500, "HTTP 500"
            delivery.enrichment = {"data": {"store": {"name": "Main St"}}}
            delivery.enrichment_notes = "till 3 unknown"
            session.execute(insert(Attempt).values(
                delivery_id=delivery.id, number=1, started_at_ms=at_ms + 1, latency_ms=4,
                status_code=500, outcome=status, error_class="HTTPError",
                error_message="HTTP 500", response_excerpt="customer 42 is a member"))


def emptied(db: Database) -> dict[str, bool]:
    """eventId -> whether its payload was emptied."""
    with db.session() as session:
        return {row.event_id: row.purged_at_ms is not None
                for row in session.execute(select(Event.event_id, Event.purged_at_ms))}


def purge(db: Database, batch: int = 100) -> store.Purged:
    return store.purge(db, older_than_ms=CUTOFF, batch=batch, now_ms=NOW)


def test_old_finished_events_are_emptied_keeping_their_rows(org: Database) -> None:
    ingest(org, "old", OLD, DeliveryStatus.DELIVERED, DeliveryStatus.DEAD)
    ingest(org, "recent", RECENT, DeliveryStatus.DELIVERED, DeliveryStatus.FAILED)
    store.ingest_many(org, load_catalog(), [event("old-rejected", customerIdentifiers="x")],
                 now_ms=OLD)

    purged = purge(org)

    assert purged == store.Purged(events=2, deliveries=2, attempts=2, more=False)
    with org.session() as session:
        events = {e.event_id: e for e in session.scalars(select(Event))}
        deliveries = session.scalars(select(Delivery).order_by(Delivery.webhook_id)).all()
        attempts = session.scalars(select(Attempt).order_by(Attempt.id)).all()
    old, recent, rejected = events["old"], events["recent"], events["old-rejected"]
    assert (old.payload, old.purged_at_ms) == (store.PURGED_PAYLOAD, NOW)
    assert (old.status, old.event_name, old.org_id, old.received_at_ms) == \
        ("dispatched", "pointsIssued", ORG, OLD)
    assert (rejected.payload, rejected.status) == (store.PURGED_PAYLOAD, "rejected")
    assert rejected.error_path == "$.data.customerIdentifiers"  # why it was refused: kept
    assert recent.payload == event("recent") and recent.purged_at_ms is None
    by_event = {d.event_pk: [] for d in deliveries}
    for delivery in deliveries:
        by_event[delivery.event_pk].append(delivery)
    for delivery in by_event[old.pk]:
        assert (delivery.enrichment, delivery.enrichment_notes, delivery.last_error) == \
            (None, None, None)
        assert (delivery.ingested_at_ms, delivery.ended_at_ms, delivery.last_status_code) == \
            (OLD, OLD + 5, 500)
    assert [d.status for d in by_event[old.pk]] == ["delivered", "dead"]
    for delivery in by_event[recent.pk]:
        assert delivery.enrichment is not None and delivery.last_error == "HTTP 500"
    old_ids = {d.id for d in by_event[old.pk]}
    for attempt in attempts:
        kept = attempt.delivery_id not in old_ids
        assert (attempt.response_excerpt is not None, attempt.error_message is not None) == \
            (kept, kept)
        assert (attempt.status_code, attempt.latency_ms) == (500, 4)
        assert attempt.started_at_ms in (OLD + 1, RECENT + 1)


@pytest.mark.parametrize("unfinished", [DeliveryStatus.PENDING, DeliveryStatus.RETRYING,
                                        DeliveryStatus.IN_FLIGHT])
def test_an_event_with_an_unfinished_delivery_is_kept_whole(org: Database,
                                                             unfinished: str) -> None:
    ingest(org, "open", OLD - DAY, DeliveryStatus.DELIVERED, unfinished)
    ingest(org, "done", OLD, DeliveryStatus.DELIVERED, DeliveryStatus.FAILED)

    # The open event is the oldest: the walk passes it, keeping it aside, and goes on.
    assert purge(org, batch=1) == store.Purged(events=0, deliveries=0, attempts=0, more=True)
    assert purge(org, batch=1) == store.Purged(events=1, deliveries=2, attempts=2, more=True)
    assert purge(org, batch=1) == store.Purged(0, 0, 0, more=False)

    assert emptied(org) == {"open": False, "done": True}
    with org.session() as session:
        (kept,) = session.scalars(select(Event).where(Event.event_id == "open"))
        assert kept.payload == event("open")
        assert session.scalar(select(func.count()).select_from(Attempt).where(
            Attempt.response_excerpt.is_not(None))) == 2
    # Finished at last: the next run empties it (from where it was kept aside: the walk has
    # passed it), once.
    with org.session() as session:
        session.execute(update(Delivery).where(Delivery.status == unfinished)
                        .values(status=DeliveryStatus.DELIVERED))
    assert purge(org) == store.Purged(events=1, deliveries=2, attempts=2, more=False)
    assert emptied(org) == {"open": True, "done": True}
    assert purge(org) == store.Purged(0, 0, 0, more=False)


def test_an_event_kept_aside_is_emptied_only_past_the_retention_of_the_run(
        org: Database) -> None:
    ingest(org, "open", OLD, DeliveryStatus.DELIVERED, DeliveryStatus.RETRYING)
    assert purge(org) == store.Purged(0, 0, 0, more=False)  # passed, kept aside
    with org.session() as session:
        session.execute(update(Delivery).where(Delivery.status == DeliveryStatus.RETRYING)
                        .values(status=DeliveryStatus.DELIVERED))

    # NOTIFIER_RETENTION_DAYS raised meanwhile: the event is within the retention again, and
    # stays whole as one the walk has not reached yet would.
    raised = store.purge(org, older_than_ms=OLD - DAY, batch=100, now_ms=NOW)

    assert raised == store.Purged(0, 0, 0, more=False)
    assert emptied(org) == {"open": False}
    # Past it again: emptied, once.
    assert purge(org) == store.Purged(events=1, deliveries=2, attempts=2, more=False)
    assert purge(org) == store.Purged(0, 0, 0, more=False)


def test_a_run_that_finds_another_under_way_says_more_may_be_due(org: Database) -> None:
    if not org.is_postgresql:
        pytest.skip("SQLite has one writer: a second run waits for the first, then goes on")
    ingest(org, "old", OLD, DeliveryStatus.DELIVERED)
    assert store.purge(org, older_than_ms=OLD, batch=1, now_ms=NOW).events == 0  # a first run

    with org.transaction() as other:  # a run under way (beat's) holds the cursor
        other.execute(select(RetentionCursor).with_for_update())
        skipped = purge(org, batch=1)

    # It emptied nothing, and does not say that nothing is due: `notifier retention run`
    # would print so, and a caller looping while `more` would stop with events left.
    assert (skipped.events, skipped.more) == (0, True)


def test_a_run_beside_one_that_moved_the_cursor_leaves_at_once(org: Database) -> None:
    """A run under way that has moved the cursor past its walk and not committed: a second run
    (beat's next tick, ``notifier retention run``) leaves the events to it at once. It must
    not wait for it: beat's runs go by the ingest queue, and one waiting holds a prefork
    process that live events need, for as long as the other run's batch lasts."""
    if not org.is_postgresql:
        pytest.skip("SQLite has one writer: a second run waits for the first, then goes on")
    for day in range(3):
        ingest(org, f"e{day}", OLD - day * DAY, DeliveryStatus.DELIVERED)
    assert store.purge(org, older_than_ms=0, batch=1, now_ms=NOW).events == 0  # a first run
    moved, go = threading.Event(), threading.Event()

    def hold(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("UPDATE retention_cursor") and not moved.is_set():
            moved.set()
            _held(go, "the test to let the first run commit")

    sa_event.listen(org.engine, "after_cursor_execute", hold)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(purge, org, 1)
            _held(moved, "the first run to move the cursor")
            second = pool.submit(purge, org, 1)
            _done_or_waiting_for_a_lock(org, second, "the second run to end or wait")
            left_at_once = second.done()
            go.set()
            assert left_at_once, "the second run waited for the first"
            assert (second.result(timeout=30).events, second.result().more) == (0, True)
            assert first.result(timeout=30).events == 1
    finally:
        go.set()
        sa_event.remove(org.engine, "after_cursor_execute", hold)


def test_a_delivery_held_past_the_retention_ends_failed_and_its_event_is_emptied(
        org: Database) -> None:
    ingest(org, "old", OLD, DeliveryStatus.DELIVERED, DeliveryStatus.HELD)
    ingest(org, "recent", RECENT, DeliveryStatus.HELD)

    assert purge(org) == store.Purged(events=1, deliveries=2, attempts=2, more=False,
                                      held_ended=1)

    assert emptied(org) == {"old": True, "recent": False}
    with org.session() as session:
        rows = session.execute(select(Event.event_id, Delivery.status, Delivery.last_error,
                                      Delivery.ended_at_ms)
                               .join(Delivery, Delivery.event_pk == Event.pk)).all()
    ended = [(status, error) for event_id, status, error, at in rows
             if event_id == "old" and status != DeliveryStatus.DELIVERED and at]
    assert ended == [(DeliveryStatus.FAILED, store.HELD_TOO_LONG)]  # the reason outlives the purge
    # A recent one stays held (for each webhook), for its webhook's activation.
    assert [status for event_id, status, *_ in rows if event_id == "recent"] == [
        DeliveryStatus.HELD] * 2


def test_a_held_delivery_sent_while_a_run_ends_it_keeps_what_its_attempt_made_of_it(
        org: Database) -> None:
    """Its webhook activated (deliverHeld) and the delivery sent after the run read it held:
    the run does not write over the delivery, delivered, as failed for being held too long."""
    if not org.is_postgresql:
        pytest.skip("SQLite has one writer: the run and the attempt never overlap")
    ingest(org, "old", OLD, DeliveryStatus.DELIVERED, DeliveryStatus.HELD)
    with org.session() as session:
        held = session.scalar(select(Delivery.id).where(Delivery.status == DeliveryStatus.HELD))

    with org.engine.connect() as attempt, ThreadPoolExecutor(1) as pool:
        # The attempt's finish, under way: the run reads the delivery held, then waits for it.
        attempt.execute(update(Delivery).where(Delivery.id == held)
                        .values(status=DeliveryStatus.DELIVERED))
        run = pool.submit(purge, org)
        with org.autocommit() as connection:
            wait_until(lambda: connection.scalar(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'UPDATE deliveries SET status%'")), 30,
                "the run to wait for the delivery's row")
        attempt.commit()
        purged = run.result(timeout=30)

    assert purged.held_ended == 0
    with org.session() as session:
        delivery = session.get(Delivery, held)
        assert delivery is not None
        assert (delivery.status, delivery.last_error) == (DeliveryStatus.DELIVERED, None)


def test_a_run_empties_at_most_its_batch_oldest_first_and_the_next_goes_on(
        org: Database) -> None:
    for day in range(5):
        ingest(org, f"e{day}", OLD - day * DAY, DeliveryStatus.DELIVERED)

    first = purge(org, batch=2)
    assert (first.events, first.more) == (2, True)
    assert emptied(org) == {"e0": False, "e1": False, "e2": False, "e3": True, "e4": True}
    assert (purge(org, batch=2).events, purge(org, batch=2)) == \
        (2, store.Purged(events=1, deliveries=2, attempts=2, more=False))
    assert all(emptied(org).values())
    assert purge(org, batch=2) == store.Purged(0, 0, 0, more=False)


def test_a_replay_leaves_an_emptied_delivery_alone(org: Database) -> None:
    ingest(org, "old", OLD, DeliveryStatus.FAILED)
    ingest(org, "recent", RECENT, DeliveryStatus.FAILED)
    purge(org)
    with org.session() as session:
        ids = dict(session.execute(select(Event.event_id, Delivery.id)
                                   .join(Delivery, Delivery.event_pk == Event.pk)
                                   .where(Delivery.status == DeliveryStatus.FAILED)).all())

    selection = Selection(delivery_ids=(ids["old"], ids["recent"]))
    counted = store.count_selection(org, selection)  # told before the replay is made
    replay_id = store.start_replay(org, selection, requested_by="test", org_id=None, now_ms=1)
    queued = store.replay_batch(org, replay_id, most=10, now_ms=1,
                                queue=lambda items: None).queued

    assert (counted.matched, counted.skipped, counted.replayable) == (2, 1, 1)
    assert [q.delivery_id for q in queued] == [ids["recent"]]  # nothing left to send of old


def _a_replay_of(db: Database, event_id: str) -> tuple[str, int]:
    """The first delivery of an event (by id) and a replay of it, made but not run yet."""
    with db.session() as session:
        delivery_id = session.scalars(
            select(Delivery.id).join(Event, Event.pk == Delivery.event_pk)
            .where(Event.event_id == event_id).order_by(Delivery.id)).first()
    assert delivery_id is not None
    replay_id = store.start_replay(db, Selection(delivery_ids=(delivery_id,)),
                                   requested_by="test", org_id=None, now_ms=NOW)
    return delivery_id, replay_id


def _held(gate: threading.Event, what: str) -> None:
    assert gate.wait(30), f"timed out waiting for {what}"


def _done_or_waiting_for_a_lock(db: Database, run: Future[Any], what: str) -> None:
    """Wait until ``run`` ends or a statement of this database waits for a row's lock (the
    other transaction's): then it has gone as far as it can while that one is open."""
    with db.autocommit() as connection:
        wait_until(lambda: run.done() or connection.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()")), 30, what)


def _emptied_with_a_delivery_to_send(db: Database) -> list[tuple[str, str]]:
    """(eventId, delivery status) of each emptied event's delivery that is not finished: a
    worker would send it (the whole payload, if it claimed it before) or end it EventEmptied."""
    with db.session() as session:
        return [tuple(row) for row in session.execute(
            select(Event.event_id, Delivery.status).join(Delivery, Delivery.event_pk == Event.pk)
            .where(Event.purged_at_ms.is_not(None),
                   Delivery.status.not_in(FINAL_STATUSES)))]


def test_a_run_beside_a_replay_reopening_a_delivery_keeps_its_event_whole(
        org: Database) -> None:
    """The replay has made a delivered delivery of an old event pending again, and not
    committed yet (it queues it in Redis first): a run must not empty the event, whose
    delivery a worker will send once the replay commits (its attempt's response and
    enrichment would then outlive the retention, the walk being past the event)."""
    if not org.is_postgresql:
        pytest.skip("SQLite has one writer: the run waits for the replay's commit, then reads")
    ingest(org, "old", OLD, DeliveryStatus.DELIVERED)
    delivery_id, replay_id = _a_replay_of(org, "old")
    reopened, go = threading.Event(), threading.Event()

    def queue(_items: list[store.Queued]) -> None:  # before the replay commits
        reopened.set()
        _held(go, "the test to let the replay commit")

    with ThreadPoolExecutor(2) as pool:
        replay = pool.submit(store.replay_batch, org, replay_id, most=10, now_ms=NOW,
                             queue=queue)
        _held(reopened, "the replay to re-open the delivery")
        run = pool.submit(purge, org)
        _done_or_waiting_for_a_lock(org, run, "the run to end or wait for the replay")
        go.set()
        queued, purged = replay.result(timeout=30).queued, run.result(timeout=30)

    assert _emptied_with_a_delivery_to_send(org) == []
    assert [q.delivery_id for q in queued] == [delivery_id]
    assert purged == store.Purged(0, 0, 0, more=False)
    assert emptied(org) == {"old": False}
    # Kept aside, not passed for good: emptied once its deliveries have ended again.
    assert purge(org) == store.Purged(0, 0, 0, more=False)
    with org.session() as session:
        session.execute(update(Delivery).where(Delivery.id == delivery_id)
                        .values(status=DeliveryStatus.DELIVERED))
    assert purge(org) == store.Purged(events=1, deliveries=2, attempts=2, more=False)


def test_a_replay_beside_a_run_emptying_the_event_leaves_its_delivery_alone(
        org: Database) -> None:
    """The run has emptied the event and not committed yet: a replay of its delivery must not
    make it pending (it would end failed, EventEmptied, though the replay queued it)."""
    if not org.is_postgresql:
        pytest.skip("SQLite has one writer: the replay waits for the run's commit, then reads")
    ingest(org, "old", OLD, DeliveryStatus.DELIVERED)
    delivery_id, replay_id = _a_replay_of(org, "old")
    emptying, go = threading.Event(), threading.Event()

    def hold(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("UPDATE events SET payload"):
            emptying.set()
            _held(go, "the test to let the run commit")

    sa_event.listen(org.engine, "after_cursor_execute", hold)
    try:
        with ThreadPoolExecutor(2) as pool:
            run = pool.submit(purge, org)
            _held(emptying, "the run to empty the event")
            replay = pool.submit(store.replay_batch, org, replay_id, most=10, now_ms=NOW,
                                 queue=lambda items: None)
            _done_or_waiting_for_a_lock(org, replay, "the replay to end or wait for the run")
            go.set()
            purged, queued = run.result(timeout=30), replay.result(timeout=30).queued
    finally:
        sa_event.remove(org.engine, "after_cursor_execute", hold)

    assert _emptied_with_a_delivery_to_send(org) == []
    assert (purged.events, queued) == (1, [])
    with org.session() as session:
        assert session.scalar(select(Delivery.status).where(Delivery.id == delivery_id)) == \
            DeliveryStatus.DELIVERED


def test_emptying_an_event_changes_no_column_an_index_of_events_holds(org: Database) -> None:
    # So that PostgreSQL can rewrite an emptied row in its own page (a HOT update), without an
    # entry in each of the events' indexes: see the next test.
    emptying = {"payload", "purged_at_ms"}
    with org.transaction() as connection:
        indexes = inspect(connection).get_indexes("events")
        unique = inspect(connection).get_unique_constraints("events")
    held = {name for index in [*indexes, *unique] for name in index["column_names"]}
    assert held and not emptying & held, held
    predicates = [str(index.get("dialect_options", {})) for index in indexes]
    assert not any(column in p for column in emptying for p in predicates), predicates
    assert "ix_events_received" in {index["name"] for index in indexes}


def test_emptied_events_are_rewritten_in_their_pages(org: Database) -> None:
    if not org.is_postgresql:
        pytest.skip("HOT updates are PostgreSQL's")
    # Events of a usual size (pointsIssued with a bill's line items: 1 KB): the emptied version
    # of a page's rows fits in the room its fillfactor left. (Of events of 200 bytes, about 60%
    # are rewritten in place, the rest anew as before.)
    for n in range(200):
        ingest(org, f"e{n}", OLD - n, DeliveryStatus.DELIVERED,
               lineItems=[{"sku": f"sku-{i}", "qty": 1, "amount": 9.5} for i in range(20)])

    def updates() -> tuple[int, int]:
        org.dispose()  # a backend that ends reports its statistics
        with org.transaction() as connection:
            connection.execute(text("SELECT pg_stat_clear_snapshot()"))
            row = connection.execute(text(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                "WHERE relname = 'events'")).one()
        return row.n_tup_upd, row.n_tup_hot_upd

    before = updates()
    assert purge(org, batch=1000).events == 200
    after = wait_until(lambda: (now := updates()) != before and now, 10, "the statistics")

    emptied_rows, in_place = after[0] - before[0], after[1] - before[1]
    assert emptied_rows == 200
    assert in_place >= 0.9 * emptied_rows, (emptied_rows, in_place)


def test_a_run_reads_the_deliveries_of_the_events_it_walks_not_the_whole_table(
        org: Database) -> None:
    """Whether a walked event has a delivery not finished is asked of that event's deliveries
    (their event_pk index), not of the whole table: written as a subquery per walked row,
    PostgreSQL hashed every unfinished delivery instead, a sequential scan of deliveries in
    each run (30 ms at 300 000 rows, on two parallel workers, growing with the table; beside
    live traffic it moved p99 by 21% at beat's pace)."""
    if not org.is_postgresql:
        pytest.skip("the plans are PostgreSQL's")
    with org.transaction() as connection:
        hook = connection.scalar(select(Delivery.webhook_id).limit(1)) or connection.scalar(
            text("SELECT id FROM webhooks ORDER BY id LIMIT 1"))
        connection.execute(text(
            "INSERT INTO events (event_id, event_name, org_id, created_at_ms, received_at_ms, "
            "payload, status) SELECT 'old-' || g, 'pointsIssued', :org, :old, :old + g, "
            "'{}'::jsonb, 'dispatched' FROM generate_series(1, 50000) AS g"),
            {"org": ORG, "old": OLD - DAY})
        connection.execute(text(
            "INSERT INTO deliveries (id, event_pk, webhook_id, status, attempt_count, "
            "ingested_at_ms, ended_at_ms) SELECT 'msg_old_' || pk, pk, :hook, 'delivered', 1, "
            "received_at_ms, received_at_ms + 5 FROM events"), {"hook": hook})
    with org.autocommit() as connection:
        connection.execute(text("ANALYZE events, deliveries"))

    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    sa_event.listen(org.engine, "before_cursor_execute", seen)
    try:
        assert purge(org, batch=100).events == 100
    finally:
        sa_event.remove(org.engine, "before_cursor_execute", seen)
    with org.transaction() as connection:
        plans = {statement: "\n".join(connection.exec_driver_sql(
            f"EXPLAIN {statement}", parameters).scalars())
            for statement, parameters in statements
            if statement.lstrip().startswith(("SELECT", "UPDATE", "DELETE"))}
    assert plans
    for statement, plan in plans.items():
        assert "Seq Scan on deliveries" not in plan, (statement, plan)


def _deliveries_read(org: Database, statements: list[tuple[str, Any]]) -> dict[str, int]:
    """Each statement of a run, run again under EXPLAIN ANALYZE (and undone): how many rows of
    deliveries its plan read, by any way in (a sequential scan, or an index scan that reads rows
    only to drop them)."""
    def read(node: dict[str, Any]) -> int:
        own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * \
            node.get("Actual Loops", 1) if node.get("Relation Name") == "deliveries" else 0
        return own + sum(read(child) for child in node.get("Plans", ()))

    found = {}
    for statement, parameters in statements:
        if not statement.lstrip().startswith(("SELECT", "UPDATE", "DELETE")):
            continue
        with org.engine.connect() as connection:  # rolled back on leaving: nothing changes
            plan = connection.exec_driver_sql(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters).scalar()
            connection.rollback()
        found[statement] = read(plan[0]["Plan"])
    return found


def test_a_run_reads_the_held_deliveries_past_the_retention_not_every_held_one(
        org: Database) -> None:
    """A webhook inactive for a while holds everything its events bring (its deliveries stay
    held until it is activated): a run reads only those held past the retention, which it ends,
    not every held delivery to find them (at 20 000 held a sequential scan of deliveries, 60 ms
    every 2 s; at fewer, the status index read them all all the same)."""
    if not org.is_postgresql:
        pytest.skip("the plans are PostgreSQL's")
    ingest(org, "old", OLD, DeliveryStatus.DELIVERED, DeliveryStatus.HELD)
    with org.transaction() as connection:
        hook = connection.scalar(text("SELECT id FROM webhooks ORDER BY id LIMIT 1"))
        connection.execute(text(
            "INSERT INTO events (event_id, event_name, org_id, created_at_ms, received_at_ms, "
            "payload, status) SELECT 'held-' || g, 'pointsIssued', :org, :at, :at + g, "
            "'{}'::jsonb, 'dispatched' FROM generate_series(1, 20000) AS g"),
            {"org": ORG, "at": RECENT})
        connection.execute(text(
            "INSERT INTO deliveries (id, event_pk, webhook_id, status, attempt_count, "
            "ingested_at_ms) SELECT 'msg_held_' || pk, pk, :hook, 'held', 0, received_at_ms "
            "FROM events WHERE event_id LIKE 'held-%'"), {"hook": hook})
    with org.autocommit() as connection:
        connection.execute(text("ANALYZE events, deliveries"))

    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    sa_event.listen(org.engine, "before_cursor_execute", seen)
    try:
        assert purge(org, batch=100).held_ended == 1
    finally:
        sa_event.remove(org.engine, "before_cursor_execute", seen)
    with org.transaction() as connection:  # the run's statements again, as they found it
        connection.execute(update(Delivery).where(Delivery.last_error == store.HELD_TOO_LONG)
                           .values(status=DeliveryStatus.HELD, last_error=None))
        connection.execute(text("DELETE FROM retention_cursor"))
    read = _deliveries_read(org, statements)
    assert read
    assert all(rows <= 100 for rows in read.values()), "\n".join(
        f"{rows} rows: {statement[:100]}" for statement, rows in read.items())


def test_the_walk_goes_by_age_through_its_index(org: Database) -> None:
    statement = (select(Event.pk).where(tuple_(Event.received_at_ms, Event.pk) > tuple_(5, 0),
                                        Event.received_at_ms < CUTOFF)
                 .order_by(Event.received_at_ms, Event.pk).limit(1000))
    compiled = statement.compile(org.engine, compile_kwargs={"literal_binds": True})
    with org.transaction() as connection:
        if org.is_postgresql:
            # On a table this small a sequential scan, or any index and a sort, is cheaper;
            # forbid them to see whether the index can serve the walk, its range and its order.
            connection.execute(text("SET LOCAL enable_seqscan = off"))
            connection.execute(text("SET LOCAL enable_sort = off"))
            plan = connection.execute(text(f"EXPLAIN {compiled}")).scalars().all()
        else:
            plan = [row[-1] for row in connection.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))]
    assert "ix_events_received" in "\n".join(plan), plan
    assert "Sort" not in "\n".join(plan) and "TEMP B-TREE" not in "\n".join(plan), plan


def migrated_again(database_url: str) -> Database:
    """The database brought back before migration 0018 and through it again (its data as the
    retention of before left it), opened."""
    from alembic import command
    from alembic.config import Config

    from notifier.db import MIGRATIONS, upgrade

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.downgrade(config, "0015")
    upgrade(database_url)
    return Database(database_url)


def emptied_before(db: Database, *event_ids: str) -> None:
    with db.session() as session:  # by the purge of before
        session.execute(update(Event).where(Event.event_id.in_(event_ids))
                        .values(payload=store.PURGED_PAYLOAD, purged_at_ms=1))
    db.dispose()


def test_migration_0018_starts_the_walk_at_the_oldest_event_not_emptied(
        database_url: str) -> None:
    db = Database(database_url)
    store.create_org(db, ORG, "org", now_ms=0)
    webhook(db, "a")
    for n, at in enumerate((OLD - 3 * DAY, OLD - 2 * DAY, OLD - DAY, OLD)):
        ingest(db, f"e{n}", at, DeliveryStatus.DELIVERED)
    emptied_before(db, "e0", "e1")

    db = migrated_again(database_url)
    try:
        with db.transaction() as connection:
            cursor = connection.execute(select(RetentionCursor.received_at_ms,
                                               RetentionCursor.event_pk)).one()
        assert tuple(cursor) == (OLD - DAY, 2)  # just before e2 (pk 3)
        # The first run walks the two not emptied, and none of those emptied before.
        assert purge(db, batch=2) == store.Purged(events=2, deliveries=2, attempts=2, more=True)
        assert all(emptied(db).values())
        assert purge(db, batch=2) == store.Purged(0, 0, 0, more=False)
    finally:
        db.dispose()


def test_migration_0018_keeps_aside_the_events_left_whole_for_an_unfinished_delivery(
        database_url: str) -> None:
    db = Database(database_url)
    store.create_org(db, ORG, "org", now_ms=0)
    webhook(db, "a")
    ingest(db, "open", OLD - 3 * DAY, DeliveryStatus.RETRYING)
    for n, at in enumerate((OLD - 2 * DAY, OLD - DAY)):
        ingest(db, f"gone{n}", at, DeliveryStatus.DELIVERED)
    ingest(db, "due", OLD, DeliveryStatus.DELIVERED)
    emptied_before(db, "gone0", "gone1")

    db = migrated_again(database_url)
    try:
        # The first run empties the event due, without walking again every event emptied since
        # the one left whole (in production: a day or more of history, at a batch a run).
        assert purge(db, batch=1) == store.Purged(events=1, deliveries=1, attempts=1, more=True)
        assert emptied(db) == {"open": False, "gone0": True, "gone1": True, "due": True}
        with db.session() as session:
            session.execute(update(Delivery).where(Delivery.status == DeliveryStatus.RETRYING)
                            .values(status=DeliveryStatus.FAILED))
        assert purge(db, batch=1) == store.Purged(events=1, deliveries=1, attempts=1, more=True)
        assert all(emptied(db).values())
        assert purge(db, batch=1) == store.Purged(0, 0, 0, more=False)
    finally:
        db.dispose()


def test_migration_0018_with_every_event_emptied_or_unfinished(database_url: str) -> None:
    db = Database(database_url)
    store.create_org(db, ORG, "org", now_ms=0)
    webhook(db, "a")
    ingest(db, "gone", OLD, DeliveryStatus.DELIVERED)
    ingest(db, "open", OLD, DeliveryStatus.PENDING)  # the newest, received in the same ms
    emptied_before(db, "gone")

    db = migrated_again(database_url)
    try:
        assert purge(db) == store.Purged(0, 0, 0, more=False)  # passed nor taken twice
        with db.session() as session:
            session.execute(update(Delivery).values(status=DeliveryStatus.DELIVERED))
        assert purge(db) == store.Purged(events=1, deliveries=1, attempts=1, more=False)
        assert purge(db) == store.Purged(0, 0, 0, more=False)
        ingest(db, "next", OLD + 1, DeliveryStatus.DELIVERED)  # the walk goes on past them
        assert purge(db) == store.Purged(events=1, deliveries=1, attempts=1, more=False)
        assert all(emptied(db).values())
    finally:
        db.dispose()


def test_an_event_kept_aside_and_emptied_by_the_retention_of_before_is_not_emptied_again(
        database_url: str) -> None:
    db = Database(database_url)
    store.create_org(db, ORG, "org", now_ms=0)
    webhook(db, "a")
    ingest(db, "open", OLD, DeliveryStatus.PENDING)
    db.dispose()
    db = migrated_again(database_url)
    try:
        # While it is deployed, the retention of before (a beat not restarted yet) empties the
        # event, its delivery ended.
        with db.session() as session:
            session.execute(update(Delivery).values(status=DeliveryStatus.DELIVERED))
        emptied_before(db, "open")

        assert purge(db) == store.Purged(0, 0, 0, more=False)
        with db.session() as session:
            assert session.scalar(select(Event.purged_at_ms)) == 1
    finally:
        db.dispose()


def test_the_beat_task_is_scheduled() -> None:
    import tasks

    entry = tasks.app.conf.beat_schedule["purge"]
    assert entry["task"] == "notifier.purge" and "notifier.purge" in tasks.app.tasks


@pytest.mark.postgres
def test_retention_run_prints_what_it_emptied(stack: Stack, stack_env: dict[str, str],
                                              cli: Cli) -> None:
    database = Database(stack.settings.database_url)
    try:
        store.create_org(database, ORG, "org", now_ms=0)
        webhook(database, "a")
        ingest(database, "old", now_ms() - 31 * DAY, DeliveryStatus.DELIVERED)

        stack_env["NOTIFIER_RETENTION_DAYS"] = "0"
        assert "retention is off" in cli("retention", "run").stdout
        assert emptied(database) == {"old": False}
        stack_env["NOTIFIER_RETENTION_DAYS"] = "30"
        ran = cli("retention", "run", "--json")
    finally:
        database.dispose()
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.stdout) == {"events": 1, "deliveries": 1, "attempts": 1,
                                      "more": False, "held_ended": 0, "dead_letters": 0}
    assert cli("retention", "run").stdout == \
        "emptied 0 events older than 30 days, 0 deliveries and 0 attempts\n"


@pytest.mark.postgres
def test_beat_empties_old_events_through_a_real_worker(stack: Stack,
                                                       stack_env: dict[str, str]) -> None:
    stack_env.update(NOTIFIER_RETENTION_DAYS="1", NOTIFIER_RETENTION_INTERVAL="0.5",
                     NOTIFIER_RETENTION_BATCH_SIZE="2")
    database = Database(stack.settings.database_url)
    try:
        store.create_org(database, ORG, "org", now_ms=0)
        webhook(database, "a")
        for number in range(5):
            ingest(database, f"old{number}", now_ms() - 2 * DAY, DeliveryStatus.DELIVERED)
        ingest(database, "new", now_ms(), DeliveryStatus.DELIVERED)
        stack.worker(queues="notifier")
        stack.beat()

        wait_until(lambda: sum(emptied(database).values()) == 5, 60,
                   "beat to empty the five old events, two a run")
        assert emptied(database)["new"] is False
    finally:
        database.dispose()
