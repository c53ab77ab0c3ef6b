"""A poison delivery ends with a recorded reason and keeps its fault to itself (issue 13,
item 2), through real worker processes, PostgreSQL, Redis and a real receiver on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from sqlalchemy import select

from notifier.db import Database
from notifier.models import Attempt, Delivery, DeliveryStatus
from notifier.queues import Queues
from notifier.vault import Vault
from tests.conftest import Receiver, Stack, slots_held, wait_until
from tests.reliability.conftest import assert_nothing_open, customer, deliveries, send

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_a_webhook_whose_secret_no_key_opens_fails_its_deliveries_and_its_neighbour_goes_on(
        stack: Stack, receiver: Receiver, database: Database,
        hook: Callable[..., str]) -> None:
    healthy, poisoned = hook("/healthy"), hook("/poisoned")
    # Long leases: a slot that is not given back cannot come back by expiring in the test's time.
    stack.env["NOTIFIER_SLOT_LEASE_SECONDS"] = "20"
    stack.worker()
    send(stack, customer(1))  # both answer at once, so both are measured fast: their leases
    receiver.wait_for(1, "/healthy", timeout=30)  # share delivery tasks from now on
    receiver.wait_for(1, "/poisoned", timeout=30)
    wait_until(lambda: len([d for d in deliveries(database)
                            if d.status == DeliveryStatus.DELIVERED]) == 2, 30, "2 delivered")
    # The poisoned webhook's secret, sealed with a key that is no longer configured.
    removed = Vault([Fernet.generate_key().decode()])
    engine = sa.create_engine(stack.settings.database_url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE signing_secrets SET secret = :sealed "
                                   "WHERE webhook_id = :hook"),
                           {"sealed": removed.seal("whsec_" + "A" * 32), "hook": poisoned})
    engine.dispose()

    for n in range(2, 5):
        send(stack, customer(n))

    receiver.wait_for(4, "/healthy", timeout=12)

    for attempt in _only_attempts_of_failed(database, poisoned, 3):
        assert attempt.error_class == "VaultError"
        assert "NOTIFIER_SECRET_KEYS" in (attempt.error_message or "")
    assert len(receiver.at("/poisoned")) == 1
    queues = Queues(stack.settings.redis_url, stack.settings.redis_prefix)
    # Given back, not left to expire (20 s): no slot of either webhook is held.
    wait_until(lambda: slots_held(queues, poisoned, time.time_ns() // 1_000_000) == 0
               and slots_held(queues, healthy, time.time_ns() // 1_000_000) == 0, 5,
               "slots given back")
    assert_nothing_open(database)


_REFUSE_DELIVERED = """
CREATE OR REPLACE FUNCTION notifier_test_refuse_delivered() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'check_violation',
        MESSAGE = 'outcome refused by the test trigger';
END $$ LANGUAGE plpgsql
"""


def test_a_lease_whose_outcome_the_database_refuses_fails_with_the_reason_and_its_neighbour_goes_on(
        stack: Stack, receiver: Receiver, database: Database,
        hook: Callable[..., str]) -> None:
    healthy, poisoned = hook("/fine"), hook("/refused")
    stack.env["NOTIFIER_SLOT_LEASE_SECONDS"] = "20"  # a slot not given back stays held meanwhile
    stack.worker()
    send(stack, customer(1))  # both measured fast: their leases share delivery tasks from now on
    receiver.wait_for(1, "/fine", timeout=30)
    receiver.wait_for(1, "/refused", timeout=30)
    wait_until(lambda: len([d for d in deliveries(database)
                            if d.status == DeliveryStatus.DELIVERED]) == 2, 30, "2 delivered")
    engine = sa.create_engine(stack.settings.database_url)
    with engine.begin() as connection:  # the poisoned webhook's successes cannot be recorded
        connection.exec_driver_sql(_REFUSE_DELIVERED)
        connection.exec_driver_sql(
            "CREATE TRIGGER notifier_test_refuse_delivered BEFORE UPDATE ON deliveries "
            f"FOR EACH ROW WHEN (NEW.status = 'delivered' AND NEW.webhook_id = '{poisoned}') "
            "EXECUTE FUNCTION notifier_test_refuse_delivered()")
    try:
        for n in range(2, 5):
            send(stack, customer(n))

        receiver.wait_for(4, "/fine", timeout=12)

        for attempt in _only_attempts_of_failed(database, poisoned, 3):
            assert attempt.error_class == "StoreRefused"
            assert "outcome refused by the test trigger" in (attempt.error_message or "")
        queues = Queues(stack.settings.redis_url, stack.settings.redis_prefix)
        wait_until(lambda: slots_held(queues, poisoned, time.time_ns() // 1_000_000) == 0
                   and slots_held(queues, healthy, time.time_ns() // 1_000_000) == 0, 5,
                   "slots given back")
        assert_nothing_open(database)
    finally:
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "DROP TRIGGER IF EXISTS notifier_test_refuse_delivered ON deliveries")
        engine.dispose()


def _only_attempts_of_failed(database: Database, webhook_id: str, count: int) -> list[Attempt]:
    """Once ``count`` deliveries of the webhook have failed, the one attempt of each."""
    def failed() -> list[Delivery]:
        mine = [d for d in deliveries(database) if d.webhook_id == webhook_id]
        done = [d for d in mine if d.status == DeliveryStatus.FAILED]
        return done if len(done) == count else []

    attempts = []
    for delivery in wait_until(failed, 12, f"the poisoned webhook's {count} deliveries failed"):
        with database.session() as session:
            (attempt,) = session.scalars(select(Attempt).where(
                Attempt.delivery_id == delivery.id)).all()
        attempts.append(attempt)
    return attempts
