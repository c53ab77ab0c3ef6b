"""The store on both databases: SQLite (the embedded default) and PostgreSQL."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cryptography.fernet import Fernet
from sqlalchemy import func, or_, select, text, update

from config import load_settings
from notifier import store, webhooks
from notifier.db import Database, upgrade
from notifier.errors import InvalidInput
from notifier.models import Attempt, Base, Delivery, DeliveryStatus, Event, EventStatus, Webhook
from notifier.schemas import load_catalog
from notifier.vault import Vault
from tests.conftest import create_webhook, wait_until

pytestmark = pytest.mark.integration

ORG = 7
VAULT = Vault([Fernet.generate_key().decode()])


def event(event_id: str = "e-1", name: str = "pointsIssued", **data: Any) -> dict[str, Any]:
    return {"eventName": name, "eventId": event_id, "orgId": ORG, "createdAt": 1,
            "data": {"customerIdentifiers": {"customerId": 1}, **data}}


@pytest.fixture
def org(db: Database) -> Database:
    store.create_org(db, ORG, "org", now_ms=0)
    return db


def webhook(db: Database, name: str, events: tuple[str, ...] = ("pointsIssued",),
            **options: Any) -> str:
    webhook_id, _ = create_webhook(db, load_catalog(), VAULT, org_id=ORG, name=name,
                                         url=f"https://example.com/{name}",
                                         event_names=list(events), now_ms=0, **options)
    return webhook_id


def test_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_ingest_queues_for_active_subscribers_and_holds_for_inactive_ones(org: Database) -> None:
    subscribed = webhook(org, "a")
    webhook(org, "other-event", events=("tierUpgraded",))
    inactive = webhook(org, "inactive", active=False)

    (outcome,) = store.ingest_many(org, load_catalog(), [event()], now_ms=1000)

    assert outcome.created and outcome.status == EventStatus.DISPATCHED
    assert [q.webhook_id for q in outcome.queued] == [subscribed]
    with org.session() as session:
        recorded = {(d.webhook_id, d.status, d.ingested_at_ms)
                    for d in session.scalars(select(Delivery))}
    assert recorded == {(subscribed, DeliveryStatus.PENDING, 1000),
                        (inactive, DeliveryStatus.HELD, 1000)}


def test_ingest_is_idempotent_on_org_and_event_id(org: Database) -> None:
    webhook(org, "a")
    (first,) = store.ingest_many(org, load_catalog(), [event()], now_ms=1000)
    (again,) = store.ingest_many(org, load_catalog(), [event()], now_ms=2000)

    assert not again.created
    # An unfinished delivery is handed back so a crashed ingest can re-queue it.
    assert [q.delivery_id for q in again.queued] == [q.delivery_id for q in first.queued]
    with org.session() as session:
        assert len(session.scalars(select(Event)).all()) == 1
        assert len(session.scalars(select(Delivery)).all()) == 1


def test_the_same_event_id_in_another_org_is_another_event(org: Database) -> None:
    store.create_org(org, ORG + 1, "other", now_ms=0)
    store.ingest_many(org, load_catalog(), [event()], now_ms=1)
    (other,) = store.ingest_many(org, load_catalog(), [{**event(), "orgId": ORG + 1}], now_ms=1)
    assert other.created


def test_invalid_events_are_kept_as_rejected_with_the_field(org: Database) -> None:
    webhook(org, "a")
    bad = event()
    del bad["data"]["customerIdentifiers"]

    (outcome,) = store.ingest_many(org, load_catalog(), [bad], now_ms=1)
    (unknown,) = store.ingest_many(org, load_catalog(), [event("e-2", name="noSuchEvent")],
                                   now_ms=1)
    (no_org,) = store.ingest_many(org, load_catalog(), [{**event("e-3"), "orgId": "x"}],
                                  now_ms=1)

    assert outcome.status == EventStatus.REJECTED and "customerIdentifiers" in (outcome.error or "")
    assert "noSuchEvent" in (unknown.error or "")
    assert "$.orgId" in (no_org.error or "")
    with org.session() as session:
        rows = session.scalars(select(Event).order_by(Event.pk)).all()
        assert [r.status for r in rows] == [EventStatus.REJECTED] * 3
        assert rows[0].error_path == "$.data"
        assert session.scalars(select(Delivery)).all() == []


def test_an_event_over_the_size_limit_is_kept_rejected_by_its_names_without_its_data(
        org: Database) -> None:
    webhook(org, "a")
    small, big = event("e-1"), event("e-2", note="x" * 5000)

    outcomes = store.ingest_many(org, load_catalog(), [small, big], now_ms=1,
                                 max_event_bytes=4096)

    assert [o.status for o in outcomes] == [EventStatus.DISPATCHED, EventStatus.REJECTED]
    assert "NOTIFIER_MAX_EVENT_BYTES" in (outcomes[1].error or "")
    with org.session() as session:
        rows = session.scalars(select(Event).order_by(Event.pk)).all()
        rejected = next(r for r in rows if r.status == EventStatus.REJECTED)
        assert rejected.error_path == "$"
        # What names it, for the org to find it; its data is what the limit refuses to keep.
        assert rejected.payload == {"eventName": "pointsIssued", "eventId": "e-2",
                                    "orgId": ORG, "createdAt": 1}
        assert len(session.scalars(select(Delivery)).all()) == 1  # the small event's only


def test_a_claim_is_exclusive_and_parks_what_it_cannot_take(org: Database) -> None:
    webhook(org, "a")
    (queued,) = store.ingest_many(org, load_catalog(), [event()], now_ms=1000)[0].queued

    first = store.claim(org, [queued.delivery_id], now_ms=2000, lease_ms=5000)
    second = store.claim(org, [queued.delivery_id], now_ms=3000, lease_ms=5000)
    after_lease = store.claim(org, [queued.delivery_id], now_ms=8000, lease_ms=5000)

    assert [c.id for c in first.claimed] == [queued.delivery_id]
    assert second.claimed == () and second.later == ((queued.delivery_id, 7001),)
    assert [c.id for c in after_lease.claimed] == [queued.delivery_id]


def test_a_claim_parks_a_retry_not_due_as_a_retry_not_as_a_recheck(org: Database) -> None:
    webhook(org, "a")
    (queued,) = store.ingest_many(org, load_catalog(), [event()], now_ms=1000)[0].queued
    with org.session() as session:
        session.execute(update(Delivery).where(Delivery.id == queued.delivery_id).values(
            status=DeliveryStatus.RETRYING, next_attempt_at_ms=9000))

    early = store.claim(org, [queued.delivery_id], now_ms=2000, lease_ms=5000)

    assert early.claimed == () and early.later == ()
    assert early.not_due == ((queued.delivery_id, 9000),)


def test_a_claim_takes_back_its_own_held_claims_and_no_one_elses(org: Database) -> None:
    webhook(org, "a")
    (queued,) = store.ingest_many(org, load_catalog(), [event()], now_ms=1000)[0].queued
    (held,) = store.claim(org, [queued.delivery_id], now_ms=2000, lease_ms=5000).claimed

    wrong_mark = store.claim(org, [queued.delivery_id], now_ms=3000, lease_ms=5000,
                             held_until=held.lease_until_ms - 1)
    again = store.claim(org, [queued.delivery_id], now_ms=3000, lease_ms=5000,
                        held_until=held.lease_until_ms)
    old_mark = store.claim(org, [queued.delivery_id], now_ms=4000, lease_ms=5000,
                           held_until=held.lease_until_ms)

    assert wrong_mark.claimed == () and wrong_mark.later == ((queued.delivery_id, 7001),)
    (taken,) = again.claimed  # at once, not parked until 7001
    assert taken.lease_until_ms == 8000
    # The claim moved on: the mark it was taken with claims nothing any more.
    assert old_mark.claimed == () and old_mark.later == ((queued.delivery_id, 8001),)


def test_a_claim_that_loses_a_race_parks_what_it_lost(org: Database) -> None:
    if not org.is_postgresql:
        pytest.skip("SQLite has one writer at a time: a claim cannot start during another")
    webhook(org, "a")
    ids = [q.delivery_id
           for outcome in store.ingest_many(org, load_catalog(),
                                            [event(f"e-{i}") for i in range(3)], now_ms=1000)
           for q in outcome.queued]
    with org.engine.connect() as rival:
        # Another worker's claim, not committed yet, holds the rows.
        rival.execute(update(Delivery).where(Delivery.id.in_(ids))
                      .values(status=DeliveryStatus.IN_FLIGHT, lease_until_ms=7000))
        with ThreadPoolExecutor(1) as pool:
            ours = pool.submit(store.claim, org, ids, now_ms=2000, lease_ms=5000)
            wait_until(lambda: _waiting_for_a_lock(org), 30, "the claim to wait for the rows")
            rival.commit()
            lost = ours.result(timeout=30)

    # Our statement began while the rows were pending: it takes none, and parks them all until
    # the winner's lease would have ended, so none is stranded if the winner dies.
    assert lost.claimed == ()
    assert sorted(lost.later) == sorted((i, 7001) for i in ids)


def _waiting_for_a_lock(db: Database) -> bool:
    # A connection of its own: pg_stat_activity is read once per transaction.
    with db.engine.connect() as connection:
        return bool(connection.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").scalar())


def test_finish_records_the_attempt_and_respects_a_newer_holder(org: Database) -> None:
    hook = webhook(org, "a", sla_in_seconds=1)
    (queued,) = store.ingest_many(org, load_catalog(), [event()], now_ms=1000)[0].queued
    (stale,) = store.claim(org, [queued.delivery_id], now_ms=2000, lease_ms=1000).claimed
    (fresh,) = store.claim(org, [queued.delivery_id], now_ms=3500, lease_ms=1000).claimed

    # Both end past the SLA (due at 2000); only the holder's attempt stamps the breach.
    assert store.finish(org, [store.Finished(stale, 2000, 10, DeliveryStatus.FAILED, 400)]) == []
    assert store.finish(org, [store.Finished(fresh, 3500, 20, DeliveryStatus.DELIVERED, 200)]) \
        == [store.Breach(queued.delivery_id, hook, 2000)]

    with org.session() as session:
        delivery = session.get(Delivery, queued.delivery_id)
        assert delivery is not None
        assert delivery.status == DeliveryStatus.DELIVERED  # the stale holder changed nothing
        assert delivery.ended_at_ms == 3520
        assert delivery.sla_breach_at_ms == 2000  # ingested at 1000, SLA 1 s
        statuses = session.scalars(select(Attempt.status_code).order_by(Attempt.id)).all()
        assert statuses == [400, 200]


@pytest.mark.parametrize("late", [False, True], ids=["one in time", "late, in a batch"])
def test_finish_given_the_same_attempt_again_records_it_once(org: Database, late: bool) -> None:
    """A task stopped right after its record committed records the same attempts again on its
    way out (pipeline._Ledger): an attempt is the delivery, its number and its start."""
    webhook(org, "a", sla_in_seconds=1)
    ids = [outcome.queued[0].delivery_id for outcome in store.ingest_many(
        org, load_catalog(), [event(f"e-{n}") for n in range(2)], now_ms=1000)]
    claimed = store.claim(org, ids, now_ms=1100, lease_ms=60_000).claimed
    took = 3000 if late else 100
    done = [store.Finished(claimed[0], 1100, took, DeliveryStatus.DELIVERED, 200)]
    if late:
        done.append(store.Finished(claimed[1], 1100, took, DeliveryStatus.FAILED, 400))

    first = store.finish(org, done)
    assert store.finish(org, done) == []  # the breach was stamped by the first
    assert len(first) == (2 if late else 0)

    with org.session() as session:
        recorded = session.execute(select(Attempt.delivery_id, Attempt.number)
                                   .order_by(Attempt.id)).all()
    assert [tuple(row) for row in recorded] == [(f.claimed.id, 1) for f in done]
    # Two holders' attempts of one delivery, each its first, are both recorded: see
    # test_finish_records_the_attempt_and_respects_a_newer_holder.


def test_finish_of_a_batch_stamps_the_late_attempts_of_live_claims_only(org: Database) -> None:
    hook = webhook(org, "a", sla_in_seconds=1)
    (beaten,) = store.ingest_many(org, load_catalog(), [event("e-0")], now_ms=500)[0].queued
    ids = [beaten.delivery_id] + [outcome.queued[0].delivery_id for outcome in store.ingest_many(
        org, load_catalog(), [event(f"e-{n}") for n in range(1, 4)], now_ms=1000)]
    claimed = store.claim(org, ids, now_ms=1100, lease_ms=60_000).claimed
    stamped_by_beat, late, in_time, taken_over = claimed
    # Beat stamps the first while in flight (due at 1500; the others at 2000), and the last's
    # claim runs out and is taken over: their late attempts stamp nothing.
    assert store.flag_sla_breaches(org, now_ms=1800, batch=10) == [
        store.Breach(beaten.delivery_id, hook, 1500)]
    store.claim(org, [taken_over.id], now_ms=70_000, lease_ms=60_000)

    breaches = store.finish(org, [
        store.Finished(stamped_by_beat, 1100, 3000, DeliveryStatus.DELIVERED, 200),
        store.Finished(late, 1100, 3000, DeliveryStatus.DELIVERED, 200),
        store.Finished(in_time, 1100, 500, DeliveryStatus.DELIVERED, 200),
        store.Finished(taken_over, 1100, 3000, DeliveryStatus.FAILED, 400)])

    assert breaches == [store.Breach(late.id, hook, 2000)]
    assert [_sla_of(org, item.id) for item in claimed] == [
        (None, 1500), (None, 2000), (None, None), (2000, None)]


def test_sla_breaches_are_flagged_once_with_the_breach_time(org: Database) -> None:
    hook = webhook(org, "a", sla_in_seconds=10)
    (first,) = store.ingest_many(org, load_catalog(), [event("e-1")], now_ms=1000)[0].queued
    store.ingest_many(org, load_catalog(), [event("e-2")], now_ms=50_000)

    assert store.flag_sla_breaches(org, now_ms=11_000, batch=10) == []  # due, not past it
    assert store.flag_sla_breaches(org, now_ms=20_000, batch=10) == [
        store.Breach(first.delivery_id, hook, 11_000)]
    assert store.flag_sla_breaches(org, now_ms=30_000, batch=10) == []
    with org.session() as session:
        flagged = session.scalars(select(Delivery.sla_breach_at_ms).order_by(
            Delivery.ingested_at_ms)).all()
    assert flagged == [11_000, None]


def _sla_of(db: Database, delivery_id: str) -> tuple[int | None, int | None]:
    with db.session() as session:
        row = session.execute(select(Delivery.sla_due_at_ms, Delivery.sla_breach_at_ms)
                              .where(Delivery.id == delivery_id)).one()
    return row.sla_due_at_ms, row.sla_breach_at_ms


def test_a_breach_stamped_by_beat_in_flight_is_not_stamped_again_by_the_late_finish(
        org: Database) -> None:
    hook = webhook(org, "a", sla_in_seconds=1)
    (queued,) = store.ingest_many(org, load_catalog(), [event()], now_ms=1000)[0].queued
    (claimed,) = store.claim(org, [queued.delivery_id], now_ms=1100, lease_ms=60_000).claimed

    assert store.flag_sla_breaches(org, now_ms=2500, batch=10) == [
        store.Breach(queued.delivery_id, hook, 2000)]
    assert store.finish(org, [store.Finished(claimed, 1100, 3000, DeliveryStatus.DELIVERED,
                                             200)]) == []
    assert store.flag_sla_breaches(org, now_ms=9000, batch=10) == []
    assert _sla_of(org, queued.delivery_id) == (None, 2000)


def test_a_late_finish_stamps_the_breach_and_beat_then_finds_nothing(org: Database) -> None:
    hook = webhook(org, "a", sla_in_seconds=1)
    (queued,) = store.ingest_many(org, load_catalog(), [event()], now_ms=1000)[0].queued
    (claimed,) = store.claim(org, [queued.delivery_id], now_ms=1100, lease_ms=60_000).claimed

    assert store.finish(org, [store.Finished(claimed, 1100, 3000, DeliveryStatus.DELIVERED,
                                             200)]) == [store.Breach(queued.delivery_id, hook, 2000)]
    assert store.flag_sla_breaches(org, now_ms=9000, batch=10) == []
    assert _sla_of(org, queued.delivery_id) == (None, 2000)


def test_a_delivery_in_time_meets_its_sla_for_good_and_a_failure_breaches_at_its_due_time(
        org: Database) -> None:
    hook = webhook(org, "a", sla_in_seconds=1)
    (met,) = store.ingest_many(org, load_catalog(), [event("e-1")], now_ms=1000)[0].queued
    (failed,) = store.ingest_many(org, load_catalog(), [event("e-2")], now_ms=1000)[0].queued
    claimed = store.claim(org, [met.delivery_id, failed.delivery_id], now_ms=1100,
                          lease_ms=60_000).claimed

    assert store.finish(org, [store.Finished(claimed[0], 1100, 500, DeliveryStatus.DELIVERED,
                                             200),
                              store.Finished(claimed[1], 1100, 500, DeliveryStatus.FAILED,
                                             400)]) == []
    # Delivered in time: decided, out of the check's index, even when replayed later.
    assert _sla_of(org, met.delivery_id) == (None, None)
    # Failed for good before its SLA: never delivered, so it breaches when the SLA runs out.
    assert _sla_of(org, failed.delivery_id) == (2000, None)
    assert store.flag_sla_breaches(org, now_ms=2001, batch=10) == [
        store.Breach(failed.delivery_id, hook, 2000)]


def test_open_work_lists_unfinished_deliveries_with_their_due_times_and_claims(
        org: Database) -> None:
    webhook(org, "a")
    (one,) = store.ingest_many(org, load_catalog(), [event("e-1")], now_ms=1)[0].queued
    (two,) = store.ingest_many(org, load_catalog(), [event("e-2")], now_ms=1)[0].queued
    (three,) = store.ingest_many(org, load_catalog(), [event("e-3")], now_ms=1)[0].queued
    (four,) = store.ingest_many(org, load_catalog(), [event("e-4")], now_ms=1)[0].queued
    (claimed,) = store.claim(org, [four.delivery_id], now_ms=2, lease_ms=5_000).claimed
    with org.session() as session:
        session.execute(update(Delivery).where(Delivery.id == two.delivery_id).values(
            status=DeliveryStatus.RETRYING, next_attempt_at_ms=99))
        session.execute(update(Delivery).where(Delivery.id == three.delivery_id).values(
            status=DeliveryStatus.DELIVERED))

    work = {w.queued.delivery_id: (w.status, w.due_ms, w.claimed_until_ms)
            for w in store.open_work(org)}
    assert work == {one.delivery_id: (DeliveryStatus.PENDING, None, None),
                    two.delivery_id: (DeliveryStatus.RETRYING, 99, None),
                    four.delivery_id: (DeliveryStatus.IN_FLIGHT, None, 5_002)}
    assert claimed.lease_until_ms == 5_002


def test_webhook_input_errors_name_the_field(org: Database) -> None:
    webhook(org, "a")
    cases = [({"name": "a"}, "name"), ({"event_names": []}, "eventNames"),
             ({"event_names": ["pointsissued"]}, "eventNames"),
             ({"max_allowed_connections": 0}, "maxAllowedConnections")]
    for override, field in cases:
        arguments: dict[str, Any] = {"org_id": ORG, "name": "b", "url": "https://x.example/h",
                                     "event_names": ["pointsIssued"], "now_ms": 0, **override}
        with pytest.raises(InvalidInput) as caught:
            create_webhook(org, load_catalog(), VAULT, **arguments)
        assert caught.value.field == field


def test_header_values_and_secrets_are_sealed_at_rest(org: Database) -> None:
    webhook_id, secret = create_webhook(
        org, load_catalog(), VAULT, org_id=ORG, name="sealed", url="https://x.example/h",
        event_names=["pointsIssued"], now_ms=0, headers={"Authorization": "Basic c2VjcmV0"})

    with org.engine.connect() as connection:
        raw = " ".join(str(value) for row in connection.exec_driver_sql(
            "SELECT w.headers, s.secret FROM webhooks w JOIN signing_secrets s "
            "ON s.webhook_id = w.id").all() for value in row)
    assert "c2VjcmV0" not in raw and secret not in raw and "Authorization" in raw

    opened = store.target(org, VAULT, webhook_id, now_ms=1)
    assert opened.headers == {"Authorization": "Basic c2VjcmV0"}
    assert opened.secrets == (secret,)


def test_migration_0002_seals_secrets_written_in_the_clear(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = Fernet.generate_key().decode()
    for name in [n for n in os.environ if n.startswith("NOTIFIER_") and "_TEST_" not in n]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NOTIFIER_SECRET_KEYS", key)
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0001")
    old = Database(url)
    with old.engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO orgs (id, name, created_at_ms) VALUES (1, 'o', 0)")
        connection.exec_driver_sql(
            "INSERT INTO webhooks VALUES ('w1', 1, 'n', 'https://x.example', "
            "'{\"Authorization\": \"Basic old\"}', 'POST', 'HTTP', 1, 3600, 1, 'cg', 0, 0, 0, "
            "'[]', 0, 0, 0, 0, 0)")
        connection.exec_driver_sql(
            "INSERT INTO signing_secrets (webhook_id, secret, created_at_ms) "
            "VALUES ('w1', 'whsec_plain', 0)")
    old.dispose()

    upgrade(url)

    migrated = Database(url)
    opened = store.target(migrated, Vault([key]), "w1", now_ms=1)
    migrated.dispose()
    assert opened.headers == {"Authorization": "Basic old"}
    assert opened.secrets == ("whsec_plain",)


def test_ingest_many_stores_a_batch_with_each_outcome_in_order(org: Database) -> None:
    hooks = {webhook(org, "a"), webhook(org, "b")}
    store.ingest_many(org, load_catalog(), [event("e-old")], now_ms=1)
    bad = event("e-bad")
    del bad["data"]["customerIdentifiers"]
    batch: list[Any] = [event("e-2"), "not an envelope", event("e-old"), bad, event("e-1"),
                        event("e-2"), {**event("e-big"), "orgId": 2**70}]

    outcomes = store.ingest_many(org, load_catalog(), batch, now_ms=5)

    assert [(o.event_id, o.status, o.created) for o in outcomes][2:6] == [
        ("e-old", EventStatus.DISPATCHED, False), ("e-bad", EventStatus.REJECTED, True),
        ("e-1", EventStatus.DISPATCHED, True), ("e-2", EventStatus.DISPATCHED, False)]
    assert (outcomes[0].event_id, outcomes[0].created) == ("e-2", True)
    assert outcomes[1].error == "$: must be an event envelope (a JSON object), not str"
    assert outcomes[6].error == "$.orgId: is required and must be an integer from 0 to " \
        f"{2**63 - 1}"
    # e-2 twice in one batch is one event; the second outcome hands back its deliveries.
    assert {q.webhook_id for q in outcomes[0].queued} == hooks
    assert sorted(q.delivery_id for q in outcomes[5].queued) == sorted(
        q.delivery_id for q in outcomes[0].queued)
    with org.session() as session:
        stored = session.scalars(select(Event.event_id).where(
            Event.status == EventStatus.DISPATCHED)).all()
        assert sorted(stored) == ["e-1", "e-2", "e-old"]
        assert len(session.scalars(select(Delivery)).all()) == 6
        assert len(session.scalars(select(Event)).all()) == 6


def test_a_created_at_beyond_bigint_is_rejected_by_the_schema_not_the_database(
        org: Database) -> None:
    (outcome,) = store.ingest_many(org, load_catalog(), [{**event(), "createdAt": 2**63}],
                                   now_ms=9)

    assert outcome.status == EventStatus.REJECTED
    assert (outcome.error or "").startswith("$.createdAt: ")
    with org.session() as session:
        assert session.scalars(select(Event.created_at_ms)).one() == 9


def test_unstorable_text_is_rejected_naming_where_and_kept_scrubbed(org: Database) -> None:
    bad = event("e-nul")
    bad["data"]["note"] = "a\x00b"
    surrogate = event("e-sur")
    surrogate["data"]["customerIdentifiers"]["\udc80"] = 1

    (first,) = store.ingest_many(org, load_catalog(), [bad], now_ms=1)
    (second,) = store.ingest_many(org, load_catalog(), [surrogate], now_ms=1)

    assert first.status == EventStatus.REJECTED and "$.data.note" in (first.error or "")
    assert "$.data.customerIdentifiers" in (second.error or "")
    with org.session() as session:
        payloads = session.scalars(select(Event.payload).order_by(Event.pk)).all()
    assert payloads[0]["data"]["note"] == "a\ufffdb"
    assert "\ufffd" in payloads[1]["data"]["customerIdentifiers"]


def test_non_finite_numbers_are_rejected_naming_where_and_kept_by_name(org: Database) -> None:
    bad = event("e-nan")
    bad["data"]["extra"] = [1, {"deep": math.inf}]
    bad["data"]["totalPointsIssued"] = math.nan

    (outcome,) = store.ingest_many(org, load_catalog(), [bad], now_ms=1)
    (again,) = store.ingest_many(org, load_catalog(), [bad], now_ms=2)  # keyed by eventId: once

    assert outcome.status == EventStatus.REJECTED and outcome.created and not again.created
    assert outcome.error == "$.data.extra[1].deep: must be a finite number, not Infinity"
    with org.session() as session:
        (stored,) = session.scalars(select(Event)).all()
    assert stored.event_id == "e-nan" and stored.error_path == "$.data.extra[1].deep"
    assert stored.payload["data"]["totalPointsIssued"] == "NaN"


def test_a_parent_webhook_listening_to_children_hears_a_childs_events(org: Database) -> None:
    store.create_org(org, ORG + 10, "child", now_ms=0, parent_id=ORG)
    listening = webhook(org, "listening")
    webhook(org, "deaf")
    with org.session() as session:
        session.execute(update(Webhook).where(Webhook.id == listening)
                        .values(listen_to_child_events=True))

    (outcome,) = store.ingest_many(org, load_catalog(), [{**event(), "orgId": ORG + 10}], now_ms=1)

    assert [q.webhook_id for q in outcome.queued] == [listening]


def test_the_sla_check_stamps_a_backlog_in_batches_each_bounded(org: Database) -> None:
    batch = load_settings({}).sla_check_batch_size
    hook = webhook(org, "a", sla_in_seconds=1)
    held = webhook(org, "b", sla_in_seconds=1, active=False)  # held: not delivered either
    catalog = load_catalog()
    if org.is_postgresql:
        # Statistics of a table of 20 000 deliveries whose SLAs are all decided (none due), as
        # a busy table's are between two ANALYZEs: PostgreSQL then expects one row due, and
        # planned the batch's subquery to run again for each row updated; each run skipped
        # the rows stamped already and read the next ones: one check stamped the whole backlog.
        with org.transaction() as connection:
            connection.execute(text(
                "INSERT INTO events (event_id, event_name, org_id, created_at_ms, "
                "received_at_ms, payload, status) SELECT 'done-' || g, 'pointsIssued', :org, 0, "
                "0, '{}'::jsonb, 'dispatched' FROM generate_series(1, 20000) AS g"), {"org": ORG})
            connection.execute(text(
                "INSERT INTO deliveries (id, event_pk, webhook_id, status, attempt_count, "
                "ingested_at_ms, ended_at_ms) SELECT 'msg_done_' || pk, pk, :hook, "
                "'delivered', 1, 0, 5 FROM events"), {"hook": hook})
        with org.autocommit() as connection:
            connection.execute(text("ANALYZE events, deliveries"))
            connection.execute(text("DELETE FROM deliveries"))
            connection.execute(text("DELETE FROM events"))
    for start in range(0, 5000, 1000):
        store.ingest_many(org, catalog, [event(f"e-{n}") for n in range(start, start + 1000)],
                          now_ms=1000 + start)
    # 10 000 deliveries due from 2000 to 6999, and one delivered in time (out of the check).
    (stored,) = store.ingest_many(org, catalog, [event("met")], now_ms=1000, only_webhook=hook)
    (met,) = stored.queued
    (claimed,) = store.claim(org, [met.delivery_id], now_ms=1000, lease_ms=9000).claimed
    store.finish(org, [store.Finished(claimed, 1000, 10, DeliveryStatus.DELIVERED, 200)])

    runs: list[tuple[int, float]] = []
    last_due = 0
    while True:
        began = time.perf_counter()
        stamped = store.flag_sla_breaches(org, now_ms=60_000, batch=batch)
        runs.append((len(stamped), round((time.perf_counter() - began) * 1000, 1)))
        if not stamped:
            break
        # The earliest due first.
        assert min(b.breached_at_ms for b in stamped) >= last_due
        last_due = max(b.breached_at_ms for b in stamped)
    print(f"\n{org.engine.dialect.name}: SLA check, batch of {batch}: (rows stamped, ms) "
          f"per run: {runs}")

    assert [rows for rows, _ in runs] == [batch, 10_000 - batch, 0]
    with org.session() as session:
        breached = dict(session.execute(
            select(Delivery.webhook_id, func.count(Delivery.sla_breach_at_ms))
            .group_by(Delivery.webhook_id)).all())
        wrong = session.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.id != met.delivery_id,
            or_(Delivery.sla_breach_at_ms.is_(None), Delivery.sla_due_at_ms.is_not(None),
                Delivery.sla_breach_at_ms != Delivery.ingested_at_ms + 1000)))
    assert breached == {hook: 5000, held: 5000} and wrong == 0


def test_the_largest_sla_allowed_is_checked_without_overflow(org: Database) -> None:
    largest = webhooks.MAX_SLA_SECONDS  # what the webhook's validation lets through
    hook = webhook(org, "a", sla_in_seconds=largest)
    now = 1_800_000_000_000  # 2027
    due = now + largest * 1000
    first, second = (outcome.queued[0] for outcome in store.ingest_many(
        org, load_catalog(), [event("e-1"), event("e-2")], now_ms=now))
    (claimed,) = store.claim(org, [second.delivery_id], now_ms=now, lease_ms=1000).claimed

    assert _sla_of(org, first.delivery_id) == (due, None)
    assert store.flag_sla_breaches(org, now_ms=due, batch=10) == []
    # The late finish's path: delivered a millisecond past it; then beat's, for the other.
    assert store.finish(org, [store.Finished(claimed, due, 1, DeliveryStatus.DELIVERED, 200)]) \
        == [store.Breach(second.delivery_id, hook, due)]
    assert store.flag_sla_breaches(org, now_ms=due + 1, batch=10) == [
        store.Breach(first.delivery_id, hook, due)]


def test_migration_0012_gives_undecided_deliveries_their_due_time(database_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    from notifier.db import MIGRATIONS

    db = Database(database_url)
    store.create_org(db, ORG, "org", now_ms=0)
    webhook(db, "a", sla_in_seconds=10)
    ids = [outcome.queued[0].delivery_id for outcome in store.ingest_many(
        db, load_catalog(), [event(f"e-{n}") for n in range(3)], now_ms=1000)]
    waiting, delivered, stamped = ids
    with db.session() as session:
        session.execute(update(Delivery).where(Delivery.id == delivered)
                        .values(status=DeliveryStatus.DELIVERED))
        session.execute(update(Delivery).where(Delivery.id == stamped)
                        .values(status=DeliveryStatus.RETRYING, sla_breach_at_ms=11_000))
    db.dispose()
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.downgrade(config, "0011")

    upgrade(database_url)

    db = Database(database_url)
    try:
        assert [_sla_of(db, delivery_id) for delivery_id in ids] == [
            (11_000, None), (None, None), (None, 11_000)]
        assert store.flag_sla_breaches(db, now_ms=20_000, batch=10)[0].delivery_id == waiting
    finally:
        db.dispose()
