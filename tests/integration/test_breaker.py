"""A webhook's circuit breaker, as the Redis queues keep it (Lua), against a real Redis server:
a run of failures opens it, its queue pauses but for one probe after the cool-down, a failed
probe doubles the cool-down (up to its most), a success closes it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from notifier.queues import Breaker, Lease, Queues, Report
from tests.conftest import waiting

pytestmark = pytest.mark.integration

LEASE = 60_000
COOL = 1_000


@pytest.fixture
def queues(redis_url: str) -> Iterator[Queues]:
    made = Queues(redis_url, "t", breaker_failures=3, breaker_cooldown_ms=COOL,
                  breaker_cooldown_max_ms=3_000)
    made.rebuilt()
    yield made
    made.client.close()


def fill(queues: Queues, count: int, limit: int = 1, first: int = 0) -> None:
    queues.enqueue("w", limit, [(f"d{i}", i) for i in range(first, first + count)])


def taken(queues: Queues, lease: Lease, now: int, batch: int = 2) -> Lease:
    (started,) = queues.take_many([lease], lease_ms=LEASE, batch=batch, now_ms=now).leases
    assert started is not None
    return started


def fail(queues: Queues, lease: Lease, failures: int, now: int, batch: int = 2) -> list[Lease]:
    report = Report(took_ms=5, failing_since_ms=1, failures=failures)
    (released,) = queues.release_many([(lease, report)], batch=batch, lease_ms=LEASE, now_ms=now)
    return released.leases


def test_a_run_of_failures_opens_the_breaker_and_pauses_the_queue(queues: Queues) -> None:
    fill(queues, 10)
    (lease,) = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=100)
    lease = taken(queues, lease, 100)
    assert lease.failures_allowed == 3
    (lease,) = fail(queues, lease, 2, 100)  # 2 in a row: still closed, the next lease goes
    assert queues.breakers(["w"], now_ms=100)["w"] == Breaker("closed", 2)
    lease = taken(queues, lease, 101)
    assert lease.failures_allowed == 1  # the run has one failure left before it opens
    report = Report(took_ms=5, failing_since_ms=1, failures=1)
    (released,) = queues.release_many([(lease, report)], batch=2, lease_ms=LEASE, now_ms=200)

    assert released.breaker_opened and released.leases == []
    assert queues.breakers(["w"], now_ms=200)["w"] == Breaker("open", 3, 200 + COOL, COOL)
    # Paused: nothing is claimable until the cool-down is over, whoever pumps it.
    assert queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=200 + COOL - 1) == []
    assert waiting(queues, "w") == 6  # waiting, not sent, not failed
    assert "w" in queues.queued_webhooks()  # the sweeper keeps looking at it


def test_after_the_cool_down_one_probe_of_one_delivery_goes_and_nothing_beside_it(
        queues: Queues) -> None:
    fill(queues, 10, limit=3)
    leases = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=0)
    assert len(leases) == 3
    first = taken(queues, leases[0], 1)
    # The first lease fails three times in a row: open, while the other two wait to start.
    assert fail(queues, first, 3, 2) == []
    # A lease dispatched before it opened carries nothing when it starts: its deliveries go back
    # to the head of the queue (with several slots, a webhook's deliveries go in parallel: no
    # order between leases to keep).
    late = taken(queues, leases[1], 3)
    assert late.delivery_ids == () and late.failures_allowed == 1
    queues.release_many([(late, Report())], batch=2, lease_ms=LEASE, now_ms=3)
    queues.release_many([(taken(queues, leases[2], 3), Report())], batch=2, lease_ms=LEASE,
                        now_ms=3)
    head = queues.client.zrange("t:q:w", 0, 3)
    assert sorted(head) == [b"d2", b"d3", b"d4", b"d5"] and waiting(queues, "w") == 8

    (probe,) = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=2 + COOL)
    assert len(probe.delivery_ids) == 1 and probe.delivery_ids[0].encode() == head[0]
    assert queues.breakers(["w"], now_ms=2 + COOL)["w"].state == "halfOpen"
    # One probe at a time, and it is not topped up with what waits.
    assert queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=3 + COOL) == []
    probe = taken(queues, probe, 3 + COOL)
    assert probe.delivery_ids == (head[0].decode(),) and probe.failures_allowed == 1


def test_a_failed_probe_opens_it_again_for_twice_as_long_up_to_the_most(queues: Queues) -> None:
    fill(queues, 10)
    (lease,) = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=0)
    fail(queues, taken(queues, lease, 0), 3, 0)
    now, cooldowns = COOL, []
    for _ in range(3):
        (probe,) = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=now)
        report = Report(took_ms=5, failing_since_ms=1, failures=1)
        (released,) = queues.release_many([(taken(queues, probe, now), report)], batch=2,
                                          lease_ms=LEASE, now_ms=now)
        assert released.leases == [] and not released.breaker_opened  # opened already
        breaker = queues.breakers(["w"], now_ms=now)["w"]
        cooldown = breaker.cooldown_ms
        assert cooldown is not None
        assert breaker.state == "open" and breaker.next_probe_at_ms == now + cooldown
        cooldowns.append(cooldown)
        assert queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=now + cooldown - 1) == []
        now += cooldown
    assert cooldowns == [2_000, 3_000, 3_000]
    assert queues.breakers(["w"], now_ms=now)["w"].consecutive_failures == 6


def test_a_successful_probe_closes_it_and_the_queue_drains(queues: Queues) -> None:
    fill(queues, 5, limit=2)
    (first, _) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
    fail(queues, taken(queues, first, 0, batch=1), 3, 0, batch=1)
    (probe,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=COOL)

    report = Report(took_ms=5, delivered=True)
    (released,) = queues.release_many([(taken(queues, probe, COOL, batch=1), report)], batch=1,
                                      lease_ms=LEASE, now_ms=COOL)

    assert released.breaker_closed and not released.breaker_opened
    assert queues.breakers(["w"], now_ms=COOL)["w"] == Breaker("closed", 0)
    assert len(released.leases) == 1  # the other slot is still held by the lease from before
    assert taken(queues, released.leases[0], COOL, batch=1).failures_allowed == 3


def test_a_probe_that_asked_nothing_lets_the_next_go_and_a_lost_probe_is_replaced(
        queues: Queues) -> None:
    fill(queues, 5)
    (lease,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
    fail(queues, taken(queues, lease, 0, batch=1), 3, 0, batch=1)
    (probe,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=COOL)
    # Its delivery was finished meanwhile: no request, no verdict; the next probe goes at once.
    (released,) = queues.release_many([(taken(queues, probe, COOL, batch=1), Report())], batch=1,
                                      lease_ms=LEASE, now_ms=COOL)
    (following,) = released.leases
    assert following.delivery_ids == ("d2",)
    # Its worker dies: once its lease expires, another probe may go.
    assert queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=COOL + LEASE - 1) == []
    queues.expire_leases(COOL + LEASE + 1)
    (again,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=COOL + LEASE + 1)
    assert again.delivery_ids == ("d2",)


def test_a_success_in_a_batch_starts_the_run_again_and_no_breaker_when_off(
        queues: Queues, redis_url: str) -> None:
    fill(queues, 5)
    (lease,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
    (lease,) = fail(queues, taken(queues, lease, 0, batch=1), 2, 0, batch=1)
    report = Report(took_ms=5, delivered=True, failures=1)
    queues.release_many([(taken(queues, lease, 0, batch=1), report)], batch=1, lease_ms=LEASE,
                        now_ms=0)
    assert queues.breakers(["w"], now_ms=0)["w"] == Breaker("closed", 1)

    off = Queues(redis_url, "off", breaker_failures=0)
    off.rebuilt()
    off.enqueue("w", 1, [(f"d{i}", i) for i in range(20)])
    (lease,) = off.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
    for now in range(10):
        (started,) = off.take_many([lease], lease_ms=LEASE, batch=1, now_ms=now).leases
        assert started is not None and started.failures_allowed == 0
        (released,) = off.release_many([(lease, Report(took_ms=5, failures=1))], batch=1,
                                       lease_ms=LEASE, now_ms=now)
        assert not released.breaker_opened
        (lease,) = released.leases
    assert off.breakers(["w"], now_ms=10)["w"] == Breaker("closed", 10)
    off.client.close()


def test_resetting_closes_an_open_breaker_and_forgets_its_failures(queues: Queues) -> None:
    fill(queues, 4)
    (lease,) = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=100)
    fail(queues, taken(queues, lease, 100), 3, 200)
    assert queues.breakers(now_ms=200) == {"w": Breaker("open", 3, 200 + COOL, COOL)}

    queues.reset_breaker("w")

    assert queues.breakers(["w"], now_ms=200) == {"w": Breaker("closed", 0)}
    assert queues.breakers(now_ms=200) == {}  # closed with no failures: not listed
    assert [len(lease.delivery_ids) for lease in queues.dispatch(
        "w", batch=2, lease_ms=LEASE, now_ms=201)] == [2]


def test_breakers_of_no_webhook_and_of_one_unknown(queues: Queues) -> None:
    assert queues.breakers([], now_ms=0) == {}
    assert queues.breakers(["nobody"], now_ms=0) == {"nobody": Breaker("closed", 0)}


def test_a_webhook_with_only_replays_waiting_is_still_probed(queues: Queues) -> None:
    """Replays leave a webhook of several slots one for live deliveries; but a probe is one
    slot in all: with only replays waiting, one of them is the probe, or the breaker would
    never close."""
    fill(queues, 3, limit=2)
    (first, second) = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=0)
    fail(queues, taken(queues, first, 0), 3, 0)
    queues.release_many([(taken(queues, second, 0), Report())], batch=2, lease_ms=LEASE, now_ms=0)
    queues.client.delete("t:q:w")  # what waited live was sent elsewhere: only replays wait
    queues.enqueue("w", 2, [("old0", 0), ("old1", 1)], replay=True)

    (probe,) = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=COOL)
    assert probe.delivery_ids == ("old0",)
    report = Report(took_ms=5, delivered=True)
    (released,) = queues.release_many([(taken(queues, probe, COOL), report)], batch=2,
                                      lease_ms=LEASE, now_ms=COOL)
    assert released.breaker_closed
    assert [lease.delivery_ids for lease in released.leases] == [("old1",)]
