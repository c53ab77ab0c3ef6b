"""The Redis queues and slots (Lua) against a real Redis server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from notifier.queues import Queues

pytestmark = pytest.mark.integration

LEASE = 10_000


@pytest.fixture
def queues(redis_url: str) -> Iterator[Queues]:
    made = Queues(redis_url, "t")
    yield made
    made.client.close()


def fill(queues: Queues, webhook: str, limit: int, count: int) -> None:
    queues.enqueue(webhook, limit, [(f"d{i}", i) for i in range(count)])


def test_dispatch_takes_at_most_the_limit_and_spreads_the_backlog(queues: Queues) -> None:
    fill(queues, "w", 3, 10)

    leases = queues.dispatch("w", batch=10, lease_ms=LEASE, now_ms=0)

    assert [len(lease.delivery_ids) for lease in leases] == [4, 3, 3]
    assert [i for lease in leases for i in lease.delivery_ids] == [f"d{i}" for i in range(10)]
    assert queues.dispatch("w", batch=10, lease_ms=LEASE, now_ms=1) == []
    assert queues.held("w", 1) == 3


def test_a_released_slot_is_taken_by_the_next_batch(queues: Queues) -> None:
    fill(queues, "w", 1, 3)
    (first,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
    assert queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0) == []

    assert queues.release(first)
    (second,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)

    assert second.delivery_ids == ("d1",)
    assert not queues.release(first)  # already given back


def test_batches_are_capped(queues: Queues) -> None:
    fill(queues, "w", 1, 25)
    (lease,) = queues.dispatch("w", batch=10, lease_ms=LEASE, now_ms=0)
    assert len(lease.delivery_ids) == 10 and queues.waiting("w") == 15


def test_a_lease_is_topped_up_when_its_task_starts(queues: Queues) -> None:
    fill(queues, "w", 1, 1)
    (lease,) = queues.dispatch("w", batch=3, lease_ms=LEASE, now_ms=0)
    queues.enqueue("w", 1, [(f"late{i}", 10 + i) for i in range(4)])

    held = queues.take(lease, batch=3, now_ms=1)

    assert held is not None and held.delivery_ids == ("d0", "late0", "late1")
    assert queues.waiting("w") == 2
    # What it carries now is what the sweeper re-queues if its holder dies.
    assert queues.expire_leases(LEASE + 1) == ["w"] and queues.waiting("w") == 5


def test_a_lease_no_longer_held_carries_nothing(queues: Queues) -> None:
    fill(queues, "w", 1, 2)
    (lease,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)

    assert queues.take(lease, batch=5, now_ms=LEASE + 1) is None  # expired
    queues.release(lease)
    assert queues.take(lease, batch=5, now_ms=0) is None  # given back
    assert queues.waiting("w") == 1


def test_an_expired_lease_gives_its_slot_and_deliveries_back(queues: Queues) -> None:
    fill(queues, "w", 1, 2)
    (lost,) = queues.dispatch("w", batch=10, lease_ms=LEASE, now_ms=0)
    assert queues.queued_webhooks() == []

    assert queues.expire_leases(LEASE - 1) == []
    assert queues.expire_leases(LEASE + 1) == ["w"]

    (again,) = queues.dispatch("w", batch=10, lease_ms=LEASE, now_ms=LEASE + 2)
    assert sorted(again.delivery_ids) == sorted(lost.delivery_ids)


def test_webhooks_are_independent(queues: Queues) -> None:
    fill(queues, "slow", 1, 5)
    fill(queues, "fast", 2, 2)
    queues.dispatch("slow", batch=1, lease_ms=LEASE, now_ms=0)
    assert [len(lease.delivery_ids) for lease in
            queues.dispatch("fast", batch=1, lease_ms=LEASE, now_ms=0)] == [1, 1]


def test_enqueue_is_idempotent(queues: Queues) -> None:
    fill(queues, "w", 1, 3)
    fill(queues, "w", 1, 3)
    assert queues.waiting("w") == 3
    assert queues.queued_webhooks() == ["w"]


def test_parked_retries_come_back_when_due(queues: Queues) -> None:
    queues.set_limit("w", 1)
    queues.park([("w", "d1", 500), ("w", "d2", 1500)])

    assert queues.promote_due(1000) == ["w"]
    assert queues.waiting("w") == 1
    assert queues.promote_due(1000) == []
    assert queues.promote_due(2000) == ["w"] and queues.waiting("w") == 2


def test_the_epoch_reports_a_lost_state_once(queues: Queues) -> None:
    assert queues.claim_epoch()
    assert not queues.claim_epoch()
    queues.client.flushdb()
    assert queues.claim_epoch()
