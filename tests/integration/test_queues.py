"""The Redis queues and slots (Lua) against a real Redis server."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest

from notifier.errors import StateLost
from notifier.queues import Lease, Queues, Report
from tests.conftest import slots_held, waiting

pytestmark = pytest.mark.integration

LEASE = 10_000


@pytest.fixture
def queues(redis_url: str) -> Iterator[Queues]:
    made = Queues(redis_url, "t")
    made.rebuilt()  # the state is whole, as the sweeper leaves it
    yield made
    made.client.close()


def fill(queues: Queues, webhook: str, limit: int, count: int) -> None:
    queues.enqueue(webhook, limit, [(f"d{i}", i) for i in range(count)])


def test_dispatch_takes_at_most_the_limit_in_full_batches(queues: Queues) -> None:
    fill(queues, "w", 3, 25)

    leases = queues.dispatch("w", batch=4, lease_ms=LEASE, now_ms=0)

    assert [len(lease.delivery_ids) for lease in leases] == [4, 4, 4]
    assert [i for lease in leases for i in lease.delivery_ids] == [f"d{i}" for i in range(12)]
    assert queues.dispatch("w", batch=4, lease_ms=LEASE, now_ms=1) == []
    assert slots_held(queues, "w", 1) == 3 and waiting(queues, "w") == 13


def test_one_short_batch_at_a_time_waits_to_start_and_gathers_what_queues_meanwhile(
        queues: Queues) -> None:
    lingering = Queues(queues.url, queues.prefix, linger_ms=20)
    fill(lingering, "w", 3, 1)
    (first,) = lingering.dispatch("w", batch=4, lease_ms=LEASE, now_ms=0)
    assert first.linger_ms == 0  # the webhook was idle: no reason to wait
    lingering.enqueue("w", 3, [("late0", 10)])
    # A free slot remains, but the short batch not yet started will carry it.
    assert lingering.dispatch("w", batch=4, lease_ms=LEASE, now_ms=1) == []
    (started,) = lingering.take_many([first], lease_ms=LEASE, batch=1, now_ms=1).leases
    assert started is not None and started.delivery_ids == ("d0",)

    (second,) = lingering.dispatch("w", batch=4, lease_ms=LEASE, now_ms=1)
    assert second.delivery_ids == ("late0",) and second.linger_ms == 20  # beside a busy slot

    lingering.enqueue("w", 3, [("late1", 11), ("late2", 12)])
    assert lingering.dispatch("w", batch=4, lease_ms=LEASE, now_ms=2) == []
    (held,) = lingering.take_many([second], lease_ms=LEASE, batch=4, now_ms=3).leases
    assert held is not None and held.delivery_ids == ("late0", "late1", "late2")

    lingering.enqueue("w", 3, [("late3", 13)])
    (third,) = lingering.dispatch("w", batch=4, lease_ms=LEASE, now_ms=4)  # the other started
    assert third.delivery_ids == ("late3",)
    lingering.client.close()


def test_giving_a_slot_back_dispatches_what_waits_in_the_same_call(queues: Queues) -> None:
    fill(queues, "w", 1, 3)
    (first,) = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=0)

    (released,) = queues.release_many([(first, Report(took_ms=5))], batch=2, lease_ms=LEASE,
                                      now_ms=1)

    assert released.held
    assert [lease.delivery_ids for lease in released.leases] == [("d2",)]
    (again,) = queues.release_many([(first, Report())], batch=2, lease_ms=LEASE, now_ms=2)
    assert not again.held  # given back


def test_a_webhook_that_answered_slowly_gets_slow_leases_until_it_is_fast_again(
        queues: Queues) -> None:
    def cycle(took_ms: int) -> bool:
        fill(queues, "w", 1, 1)
        (lease,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
        queues.release_many([(lease, Report(took_ms=took_ms))], batch=1, lease_ms=LEASE, now_ms=0)
        return lease.slow

    assert cycle(took_ms=10)  # never measured: presumed slow
    assert not cycle(took_ms=2000)  # measured fast last time
    assert cycle(took_ms=20)  # one slow answer is enough
    # Fast answers ease the estimate down by 30% a batch: 2000 -> 1400 -> 980 (fast again).
    assert cycle(took_ms=20)
    assert not cycle(took_ms=20)


def test_a_released_slot_is_taken_by_the_next_batch(queues: Queues) -> None:
    fill(queues, "w", 1, 3)
    (first,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
    assert queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0) == []

    (released,) = queues.release_many([(first, Report())], batch=1, lease_ms=LEASE, now_ms=0)
    (second,) = released.leases

    assert second.delivery_ids == ("d1",)


def test_a_lease_from_before_a_flush_never_gives_back_a_newer_leases_slot(
        queues: Queues) -> None:
    fill(queues, "w", 1, 2)
    (old,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=1_000)
    queues.client.flushdb()  # Redis loses its state; the sweeper rebuilds the queue
    queues.rebuilt()
    fill(queues, "w", 1, 2)
    (new,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=2_000)

    # The task that held the old lease ends only now, and gives it back.
    (released,) = queues.release_many([(old, Report())], batch=1, lease_ms=LEASE, now_ms=2_001)
    assert released.held is False

    (taken,) = queues.take_many([new], lease_ms=LEASE, batch=1, now_ms=2_002).leases
    assert taken is not None and taken.delivery_ids == new.delivery_ids


def test_batches_are_capped(queues: Queues) -> None:
    fill(queues, "w", 1, 25)
    (lease,) = queues.dispatch("w", batch=10, lease_ms=LEASE, now_ms=0)
    assert len(lease.delivery_ids) == 10 and waiting(queues, "w") == 15


def test_a_short_batch_whose_task_never_starts_holds_up_the_next_for_10_s_only(
        queues: Queues) -> None:
    fill(queues, "w", 3, 1)
    (lost,) = queues.dispatch("w", batch=4, lease_ms=60_000, now_ms=1_000)
    queues.enqueue("w", 3, [("late", 2_000)])

    assert queues.dispatch("w", batch=4, lease_ms=60_000, now_ms=10_999) == []
    (next_,) = queues.dispatch("w", batch=4, lease_ms=60_000, now_ms=11_000)
    assert next_.delivery_ids == ("late",)
    # The lost one still holds its slot until its lease runs out.
    assert slots_held(queues, "w", 11_000) == 2
    (late,) = queues.take_many([lost], lease_ms=LEASE, batch=4, now_ms=11_001).leases
    assert late is not None  # late, but still its own


def test_a_lease_is_topped_up_when_its_task_starts(queues: Queues) -> None:
    fill(queues, "w", 1, 1)
    (lease,) = queues.dispatch("w", batch=3, lease_ms=LEASE, now_ms=0)
    queues.enqueue("w", 1, [(f"late{i}", 10 + i) for i in range(4)])

    (held,) = queues.take_many([lease], lease_ms=LEASE, batch=3, now_ms=1).leases

    assert held is not None and held.delivery_ids == ("d0", "late0", "late1")
    assert waiting(queues, "w") == 2
    # What it carries now is what the sweeper re-queues if its holder dies.
    assert queues.expire_leases(LEASE + 1) == ["w"] and waiting(queues, "w") == 5


def test_a_lease_no_longer_held_carries_nothing(queues: Queues) -> None:
    fill(queues, "w", 1, 2)
    (lease,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)

    assert queues.take_many([lease], lease_ms=LEASE, batch=5, now_ms=LEASE + 1).leases == [None]  # expired
    (released,) = queues.release_many([(lease, Report())], batch=1, lease_ms=LEASE, now_ms=0)
    (following,) = released.leases
    assert queues.take_many([lease], lease_ms=LEASE, batch=5, now_ms=0).leases == [None]  # given back
    assert following.delivery_ids == ("d1",)  # the next lease has it, not the old one


def test_the_leases_of_a_task_are_taken_and_given_back_in_one_call_each(queues: Queues) -> None:
    for webhook in ("a", "b", "c"):
        fill(queues, webhook, 1, 1)
    leases = [lease for webhook in ("a", "b", "c")
              for lease in queues.dispatch(webhook, batch=2, lease_ms=LEASE, now_ms=0)]
    queues.enqueue("a", 1, [("a-late", 10)])
    queues.enqueue("c", 1, [("c-late0", 11), ("c-late1", 12), ("c-late2", 13)])
    # b's slot: no longer ours.
    queues.release_many([(leases[1], Report())], batch=2, lease_ms=LEASE, now_ms=0)

    a, b, c = queues.take_many(leases, lease_ms=LEASE, batch=2, now_ms=1).leases

    assert a is not None and a.delivery_ids == ("d0", "a-late")
    assert b is None
    assert c is not None and c.delivery_ids == ("d0", "c-late0")
    released = queues.release_many([(a, Report(5)), (c, Report(2000))], batch=2, lease_ms=LEASE, now_ms=2)
    assert [r.held for r in released] == [True, True]
    assert released[0].leases == []
    (following,) = released[1].leases  # what still waited for c, and c answered slowly
    assert following.delivery_ids == ("c-late1", "c-late2") and following.slow
    assert [slots_held(queues, webhook, 2) for webhook in ("a", "b", "c")] == [0, 0, 1]


def test_a_webhook_is_marked_failing_from_its_first_failure_after_its_last_success(
        queues: Queues) -> None:
    def batch(report: Report) -> int:
        fill(queues, "w", 1, 1)
        (lease,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
        (released,) = queues.release_many([(lease, report)], batch=1, lease_ms=LEASE, now_ms=0)
        return released.failing_since_ms

    assert batch(Report(took_ms=5)) == 0  # nothing failed
    assert batch(Report(took_ms=5, failing_since_ms=100)) == 100
    assert batch(Report(took_ms=5, failing_since_ms=200)) == 100  # still failing since 100
    assert batch(Report()) == 100  # no attempt: nothing learnt
    assert batch(Report(took_ms=5, delivered=True, failing_since_ms=300)) == 300  # failed again
    assert batch(Report(took_ms=5, delivered=True)) == 0  # a success ends it


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
    assert waiting(queues, "w") == 3
    assert queues.queued_webhooks() == ["w"]


def test_parked_retries_come_back_when_due(queues: Queues) -> None:
    queues.set_limit("w", 1)
    queues.park([("w", "d1", 500), ("w", "d2", 1500)])

    assert queues.promote_due(1000) == ["w"]
    assert waiting(queues, "w") == 1
    assert queues.promote_due(1000) == []
    assert queues.promote_due(2000) == ["w"] and waiting(queues, "w") == 2


def test_rechecks_come_back_when_due_and_are_no_parked_retries(queues: Queues) -> None:
    queues.set_limit("w", 1)
    queues.park([("w", "d1", 500)])
    queues.recheck([("w", "d2", 1500)])
    state = queues.state(now_ms=0)
    assert (state.parked, state.rechecks) == (1, 1)

    assert queues.promote_due(1000) == ["w"] and waiting(queues, "w") == 1
    assert queues.promote_due(2000) == ["w"] and waiting(queues, "w") == 2
    state = queues.state(now_ms=0)
    assert (state.parked, state.rechecks) == (0, 0)


@pytest.mark.parametrize("fast_leases", [1, 2])
def test_a_webhook_measured_fast_has_at_most_its_fast_lane_leases_in_the_fast_lane(
        queues: Queues, fast_leases: int) -> None:
    lanes = Queues(queues.url, queues.prefix, fast_leases=fast_leases)
    fill(lanes, "w", 4, 1)
    (measured,) = lanes.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
    lanes.release_many([(measured, Report(took_ms=5))], batch=1, lease_ms=LEASE, now_ms=0)
    fill(lanes, "w", 4, 8)

    leases = lanes.dispatch("w", batch=2, lease_ms=LEASE, now_ms=1)

    # Four slots: the first leases in the fast lane, the rest by the slow lane, so that if
    # the webhook turns slow at once it holds at most `fast_leases` prefork processes.
    assert [lease.slow for lease in leases] == [False] * fast_leases + [True] * (4 - fast_leases)
    # A fast lane lease given back is followed by one in the fast lane; a slow lane one by one
    # in the slow lane.
    fill(lanes, "w", 4, 10)
    (fast,) = lanes.release_many([(leases[0], Report(took_ms=5))], batch=2, lease_ms=LEASE,
                                 now_ms=2)
    (slow,) = lanes.release_many([(leases[-1], Report(took_ms=5))], batch=2, lease_ms=LEASE,
                                 now_ms=2)
    (after_fast,), (after_slow,) = fast.leases, slow.leases
    assert (after_fast.slow, after_slow.slow) == (False, True)
    lanes.client.close()


def test_a_fast_webhooks_slots_taken_together_ride_with_its_fast_lane_lease(
        queues: Queues) -> None:
    riding = Queues(queues.url, queues.prefix, riders=2, linger_ms=20)
    fill(riding, "w", 6, 1)
    (measured,) = riding.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
    riding.release_many([(measured, Report(took_ms=5))], batch=1, lease_ms=LEASE, now_ms=0)
    fill(riding, "w", 6, 5)

    leases = riding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=1)

    # The fast-lane lease and two riding with it, to go in its task and its prefork process;
    # the short one does not linger beside the busy slot: it starts with the others.
    assert [(lease.slow, lease.rides, len(lease.delivery_ids), lease.linger_ms)
            for lease in leases] == [(False, False, 2, 0), (False, True, 2, 0), (False, True, 1, 0)]
    # Past them, the webhook's leases go by the slow lane.
    riding.enqueue("w", 6, [(f"e{i}", 10 + i) for i in range(16)])
    assert [(lease.slow, lease.rides) for lease in riding.dispatch(
        "w", batch=2, lease_ms=LEASE, now_ms=2)] == [(True, False)] * 3
    # The process is held until all three are given back: one given back alone frees no fast
    # lease; the others given back together dispatch the next fast one and its rider.
    (alone,) = riding.release_many([(leases[1], Report(took_ms=5))], batch=2, lease_ms=LEASE,
                                   now_ms=3)
    assert [(lease.slow, lease.rides) for lease in alone.leases] == [(True, False)]
    together = riding.release_many([(lease, Report(took_ms=5)) for lease in (leases[0], leases[2])],
                                   batch=2, lease_ms=LEASE, now_ms=4)
    assert [(lease.slow, lease.rides) for given in together for lease in given.leases] == [
        (False, False), (False, True)]
    # A webhook not measured yet (presumed slow) has nothing ride: every lease by the slow lane.
    fill(riding, "new", 3, 6)
    assert [(lease.slow, lease.rides) for lease in riding.dispatch(
        "new", batch=2, lease_ms=LEASE, now_ms=5)] == [(True, False)] * 3
    riding.client.close()


def measured_fast(queues: Queues, webhook: str, limit: int) -> None:
    fill(queues, webhook, limit, 1)
    (measured,) = queues.dispatch(webhook, batch=1, lease_ms=LEASE, now_ms=0)
    queues.release_many([(measured, Report(took_ms=5))], batch=1, lease_ms=LEASE, now_ms=0)


def shape(leases: Iterable[Lease]) -> list[tuple[bool, bool, int]]:
    return [(lease.slow, lease.rides, len(lease.delivery_ids)) for lease in leases]


@pytest.fixture
def boarding(queues: Queues) -> Iterator[Queues]:
    """Queues whose fast-lane leases may have 3 more ride with them (NOTIFIER_SEND_CONCURRENCY
    4)."""
    made = Queues(queues.url, queues.prefix, riders=3)
    yield made
    made.client.close()


def lone_then_burst(boarding: Queues, limit: int, burst: int, *, lease_ms: int = LEASE) -> Lease:
    """Webhook w, measured fast, gets a lone event (``a``), whose fast-lane lease is dispatched
    (batches of 2) and waits to start, then ``burst`` more (``b0``, ``b1``, ...): that lease."""
    measured_fast(boarding, "w", limit)
    boarding.enqueue("w", limit, [("a", 10)])
    (leader,) = boarding.dispatch("w", batch=2, lease_ms=lease_ms, now_ms=1)
    boarding.enqueue("w", limit, [(f"b{i}", 20 + i) for i in range(burst)])
    return leader


def test_a_burst_after_a_lone_event_boards_the_fast_lane_lease_waiting_to_start(
        boarding: Queues) -> None:
    leader = lone_then_burst(boarding, 8, 6)
    assert shape([leader]) == [(False, False, 1)]  # a lone event: short, in the fast lane

    # While its task waits to start, a burst waits for it too: as much as could still ride
    # with it (3 leases of 2), not one slow-lane lease each.
    assert boarding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=2) == []

    taken = boarding.take_many([leader], lease_ms=LEASE, batch=2, now_ms=3)

    # It is topped up, and the burst boards it in three more of the webhook's slots: they ride
    # in its task (their tokens count as the fast lane's), and expire with it.
    assert [lease and lease.delivery_ids for lease in taken.leases] == [("a", "b0")]
    (boarded,) = taken.boarded
    assert [lease.delivery_ids for lease in boarded] == [("b1", "b2"), ("b3", "b4"), ("b5",)]
    assert shape(boarded) == [(False, True, 2), (False, True, 2), (False, True, 1)]
    assert all(lease.token.endswith("f") for lease in boarded)
    assert taken.held == [taken.leases[0], *boarded] and taken.dispatched == []
    assert waiting(boarding, "w") == 0 and slots_held(boarding, "w", LEASE + 2) == 0
    assert slots_held(boarding, "w", 3) == 4
    # Started, it takes no more: what queues next goes by the slow lane at once.
    boarding.enqueue("w", 8, [("c", 30)])
    assert shape(boarding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=4)) == [(True, False, 1)]
    # Given back together, the four dispatch the next fast-lane lease and those riding with it.
    boarding.enqueue("w", 8, [(f"d{i}", 40 + i) for i in range(8)])
    released = boarding.release_many(
        [(lease, Report(took_ms=5)) for lease in taken.held],
        batch=2, lease_ms=LEASE, now_ms=5)
    assert [shape(given.leases) for given in released] == [
        [(False, False, 2), (False, True, 2), (False, True, 2), (False, True, 2)], [], [], []]


def test_a_busy_webhook_leaves_its_fast_lane_lease_the_slots_it_can_board(
        boarding: Queues) -> None:
    leader = lone_then_burst(boarding, 5, 40)

    # More waits than could board: the slow lane takes what the slots beyond the three that
    # could board carry, and those three are kept for it.
    (slow,) = boarding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=2)
    assert shape([slow]) == [(True, False, 2)]
    # A slot given back meanwhile is used by the slow lane only past those three.
    (given,) = boarding.release_many([(slow, Report(took_ms=5))], batch=2, lease_ms=LEASE,
                                     now_ms=3)
    assert shape(given.leases) == [(True, False, 2)]
    assert slots_held(boarding, "w", 3) == 2

    taken = boarding.take_many([leader], lease_ms=LEASE, batch=2, now_ms=4)
    assert shape(taken.boarded[0]) == [(False, True, 2)] * 3
    assert slots_held(boarding, "w", 4) == 5 and waiting(boarding, "w") == 40 - 2 - 2 - 1 - 6


def test_a_short_lease_riding_with_a_fast_lane_one_is_topped_up_before_anything_boards(
        boarding: Queues) -> None:
    measured_fast(boarding, "w", 8)
    boarding.enqueue("w", 8, [(f"a{i}", 10 + i) for i in range(3)])
    unit = boarding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=1)
    assert shape(unit) == [(False, False, 2), (False, True, 1)]
    boarding.enqueue("w", 8, [("b0", 20)])  # left for the short rider to gather
    assert boarding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=2) == []

    taken = boarding.take_many(unit, lease_ms=LEASE, batch=2, now_ms=3)

    assert [lease and lease.delivery_ids for lease in taken.leases] == [("a0", "a1"), ("a2", "b0")]
    assert taken.boarded == [(), ()] and taken.dispatched == []
    assert slots_held(boarding, "w", 3) == 2


def test_a_fast_lane_lease_boards_no_more_than_its_webhooks_free_slots(
        boarding: Queues) -> None:
    leader = lone_then_burst(boarding, 8, 6)
    assert boarding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=2) == []
    boarding.set_limit("w", 3)  # lowered meanwhile: two slots are free, not three

    taken = boarding.take_many([leader], lease_ms=LEASE, batch=2, now_ms=3)

    assert shape(taken.boarded[0]) == [(False, True, 2), (False, True, 2)]
    assert slots_held(boarding, "w", 3) == 3 and waiting(boarding, "w") == 1
    assert taken.dispatched == []  # no slot is left: it waits for one to be given back


def test_a_fast_lane_lease_sharing_a_task_moves_out_to_one_of_its_own_with_the_burst(
        boarding: Queues) -> None:
    for webhook in ("w", "v"):
        measured_fast(boarding, webhook, 8)
        boarding.enqueue(webhook, 8, [(f"{webhook}-a", 10)])
    # Two lone events' fast-lane leases, to share a task (client.send_leases).
    leaders = [boarding.dispatch(webhook, batch=2, lease_ms=LEASE, now_ms=1)[0]
               for webhook in ("w", "v")]
    boarding.enqueue("w", 8, [(f"b{i}", 20 + i) for i in range(5)])
    assert boarding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=2) == []

    taken = boarding.take_many(leaders, lease_ms=LEASE, batch=2, now_ms=3)

    # w's lease leaves the task: its slot given back, and w's queue (what it carried first)
    # dispatched as a fast-lane lease with those riding with it, to send at once in a task of
    # their own; v's, with nothing waiting, stays.
    assert taken.leases[0] is None and taken.boarded == [(), ()]
    assert taken.leases[1] is not None and taken.leases[1].delivery_ids == ("v-a",)
    assert [lease.delivery_ids for lease in taken.dispatched] == [
        ("w-a", "b0"), ("b1", "b2"), ("b3", "b4")]
    assert shape(taken.dispatched) == [(False, False, 2), (False, True, 2), (False, True, 2)]
    assert slots_held(boarding, "w", 3) == 3 and waiting(boarding, "w") == 0
    # The lease that moved out is no longer held: given back, it frees nothing twice.
    (given,) = boarding.release_many([(leaders[0], Report(took_ms=5))], batch=2,
                                     lease_ms=LEASE, now_ms=4)
    assert not given.held and slots_held(boarding, "w", 4) == 3


def test_what_a_new_fast_lane_lease_takes_with_it_is_no_longer_left_for_an_earlier_one(
        queues: Queues) -> None:
    # Two fast-lane leases a webhook (NOTIFIER_FAST_LANE_LEASES=2): the second, dispatched
    # while the first waits to start, takes those that ride with it, and the rest goes by the
    # slow lane into the free slots: none is left for the first, which can no longer board.
    boarding = Queues(queues.url, queues.prefix, riders=3, fast_leases=2)
    measured_fast(boarding, "w", 8)
    boarding.enqueue("w", 8, [("a", 10)])
    boarding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=1)
    boarding.enqueue("w", 8, [(f"b{i}", 20 + i) for i in range(20)])

    assert shape(boarding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=2)) == [
        (False, False, 2), *[(False, True, 2)] * 3, *[(True, False, 2)] * 3]
    assert slots_held(boarding, "w", 2) == 8 and waiting(boarding, "w") == 6
    boarding.client.close()


def test_a_fast_lane_lease_not_started_in_10_s_is_no_longer_waited_for(
        boarding: Queues) -> None:
    leader = lone_then_burst(boarding, 8, 4, lease_ms=60_000)
    assert boarding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=9_999) == []

    # Presumed lost (its slot held until its lease expires): the slow lane takes the rest.
    assert shape(boarding.dispatch("w", batch=2, lease_ms=LEASE, now_ms=10_001)) == [
        (True, False, 2), (True, False, 2)]
    # Started late after all, it takes what it carries, and boards nothing.
    taken = boarding.take_many([leader], lease_ms=LEASE, batch=2, now_ms=10_002)
    assert [lease and lease.delivery_ids for lease in taken.leases] == [("a",)]
    assert taken.boarded == [()]


def test_a_lost_state_is_rebuilt_by_one_and_grants_nothing_until_it_is(
        queues: Queues) -> None:
    assert not queues.claim_rebuild(60_000)  # whole
    queues.client.flushdb()
    with pytest.raises(StateLost):
        queues.offer("w", 2, [("a", 1)], batch=1, lease_ms=LEASE, now_ms=0)
    assert waiting(queues, "w") == 1 and queues.queued_webhooks() == ["w"]  # kept for later

    assert queues.claim_rebuild(60_000)
    assert not queues.claim_rebuild(60_000)  # one rebuilds at a time
    with pytest.raises(StateLost):  # and grants nothing until it is done
        queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
    queues.rebuilt()
    (lease,) = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
    assert not queues.claim_rebuild(60_000)

    queues.client.flushdb()
    (released,) = queues.release_many([(lease, Report())], batch=1, lease_ms=LEASE, now_ms=1)
    assert released.state_lost and released.leases == []
    assert queues.claim_rebuild(60_000)
    queues.forget_rebuild()  # that rebuild failed: the next one runs
    assert queues.claim_rebuild(60_000)


def test_live_claims_rebuilt_after_a_flush_count_against_the_cap(queues: Queues) -> None:
    (old,) = queues.offer("w", 2, [("a", 1), ("b", 2)], batch=2, lease_ms=LEASE, now_ms=1_000)
    queues.client.flushdb()  # its task claimed a and b (until 6 000) and is sending them
    queues.hold_claims({("w", "c1"): (6_000, ["a", "b"]), ("w", "c0"): (900, ["gone"])},
                       now_ms=1_500)
    queues.rebuilt()
    fill(queues, "w", 2, 6)

    (one,) = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=2_000)
    assert slots_held(queues, "w", 2_000) == 2  # the claim's slot and the new lease: the cap of 2

    # The old task ends and gives back its unknown lease with its claim's token: its slot frees.
    (released,) = queues.release_many([(old, Report())], batch=2, lease_ms=LEASE, now_ms=2_001,
                                      claim="c1")
    assert released.held is False and len(released.leases) == 1
    assert slots_held(queues, "w", 2_001) == 2
    # Given back twice (a task retried): nobody else's slot goes with it.
    queues.release_many([(old, Report())], batch=2, lease_ms=LEASE, now_ms=2_002, claim="c1")
    assert slots_held(queues, "w", 2_002) == 2
    assert {one.token, released.leases[0].token} == set(
        t.decode() for t in queues.client.zrange("t:slots:w", 0, -1))


def test_a_live_claim_whose_task_died_comes_back_when_the_claim_expires(queues: Queues) -> None:
    queues.hold_claims({("w", "c1"): (6_000, ["a", "b"])}, now_ms=1_000)
    queues.set_limit("w", 1)
    assert queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=1_000) == []
    assert queues.expire_leases(6_000) == []  # live until its expiry

    assert queues.expire_leases(6_001) == ["w"]
    (lease,) = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=6_001)
    assert lease.delivery_ids == ("a", "b")


def test_what_a_dead_task_held_goes_back_to_the_head_of_its_queue_in_order(
        queues: Queues) -> None:
    # A webhook with a backlog: its first two leases' tasks die with their batches (a SIGKILL).
    fill(queues, "w", 2, 10)
    first, second = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=100)
    assert (first.delivery_ids, second.delivery_ids) == (("d0", "d1"), ("d2", "d3"))
    queues.enqueue("w", 2, [("late", 200)])  # live traffic queued meanwhile

    assert queues.expire_leases(LEASE + 101) == ["w"]
    # They were taken from the head, older than all that waits: they go first, in their order,
    # not behind the backlog (which made a cut request wait for the whole of it).
    again = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=LEASE + 102)
    assert [lease.delivery_ids for lease in again] == [("d0", "d1"), ("d2", "d3")]


def test_a_recheck_goes_back_to_the_head_of_its_queue_and_a_retry_by_its_due_time(
        queues: Queues) -> None:
    # d0 went out in a lease, yet another task's claim held it (a killed task's, still live):
    # it is looked at again when that claim runs out. Meanwhile the backlog waits.
    fill(queues, "w", 1, 4)
    queues.recheck([("w", "held", 500)])
    queues.park([("w", "retry", 600)])
    assert queues.promote_due(1_000) == ["w"]

    (lease,) = queues.dispatch("w", batch=6, lease_ms=LEASE, now_ms=1_000)
    # The re-check was at the head when it was first taken: it goes first. A retry takes its
    # place by its due time, behind what was queued before it fell due.
    assert lease.delivery_ids == ("held", "d0", "d1", "d2", "d3", "retry")


def test_replays_wait_behind_live_deliveries_however_old_they_are(queues: Queues) -> None:
    queues.enqueue("w", 1, [(f"old{i}", i) for i in range(3)], replay=True)
    queues.enqueue("w", 1, [("live0", 1000), ("live1", 1001)])

    (first,) = queues.dispatch("w", batch=2, lease_ms=LEASE, now_ms=0)
    assert first.delivery_ids == ("live0", "live1")
    queues.enqueue("w", 1, [("live2", 1002)])
    (released,) = queues.release_many([(first, Report())], batch=2, lease_ms=LEASE, now_ms=1)
    # A live one queued meanwhile goes before the replay, and tops up from it (its queue
    # empty): the slot carries both, and the cap holds.
    (second,) = released.leases
    (topped,) = queues.take_many([second], lease_ms=LEASE, batch=2, now_ms=2).leases
    # A live one queued meanwhile goes before the replay. Its lease takes no replay when it
    # starts: a webhook's replays would hold up the live deliveries that come after it.
    assert topped is not None and topped.delivery_ids == ("live2",)
    assert waiting(queues, "w", replay=True) == 3 and queues.queued_webhooks() == ["w"]
    (released,) = queues.release_many([(topped, Report())], batch=2, lease_ms=LEASE, now_ms=3)
    (third,) = released.leases
    assert third.delivery_ids == ("old0", "old1")  # its one slot: all replays may have
    (released,) = queues.release_many([(third, Report())], batch=2, lease_ms=LEASE, now_ms=4)
    (fourth,) = released.leases
    assert fourth.delivery_ids == ("old2",)
    assert queues.queued_webhooks() == [] and queues.state(5).waiting == {}


def test_a_short_live_batch_beside_replays_only_goes_at_once(queues: Queues) -> None:
    """A short batch beside a busy slot lingers to gather more (NOTIFIER_BATCH_LINGER_MS); beside
    a replay's leases only, there is nothing of its kind to gather: every live delivery during
    a replay waited the linger."""
    lingering = Queues(queues.url, queues.prefix, linger_ms=20)
    lingering.enqueue("w", 3, [(f"old{i}", i) for i in range(50)], replay=True)
    assert len(lingering.dispatch("w", batch=20, lease_ms=LEASE, now_ms=0)) == 2
    lingering.enqueue("w", 3, [("live0", 1000)])
    (live,) = lingering.dispatch("w", batch=20, lease_ms=LEASE, now_ms=1)
    assert live.delivery_ids == ("live0",) and live.linger_ms == 0
    lingering.client.close()


def test_replays_leave_a_webhook_of_several_slots_one_for_live_deliveries(
        queues: Queues) -> None:
    """A replay of many filled every slot with a full batch, and a live delivery that came
    meanwhile waited for one of them to end (python -m bench --replay 100000, cap 8: live p99
    42 ms without the replay, 438 ms during it). Replays leave one slot to live deliveries, and
    neither kind of lease takes the other's deliveries as its task starts."""
    queues.enqueue("w", 3, [(f"old{i}", i) for i in range(43)], replay=True)
    replays = queues.dispatch("w", batch=20, lease_ms=LEASE, now_ms=0)
    assert [len(lease.delivery_ids) for lease in replays] == [20, 20]

    queues.enqueue("w", 3, [("live0", 1000)])
    (live,) = queues.dispatch("w", batch=20, lease_ms=LEASE, now_ms=1)
    assert live.delivery_ids == ("live0",)
    (started,) = queues.take_many([live], lease_ms=LEASE, batch=20, now_ms=2).leases
    assert started is not None and started.delivery_ids == ("live0",)  # no replay beside it

    # A replay's slot given back beside the live one's: the free one is kept for live ones.
    (released,) = queues.release_many([(replays[0], Report())], batch=20, lease_ms=LEASE,
                                      now_ms=3)
    assert released.leases == []
    # The live one's given back: the last replays go, in a short lease...
    (released,) = queues.release_many([(started, Report())], batch=20, lease_ms=LEASE, now_ms=4)
    (tail,) = released.leases
    assert tail.delivery_ids == ("old40", "old41", "old42")
    # ... which takes no live delivery behind its replays as it starts: the live one gets the
    # slot kept for it.
    queues.enqueue("w", 3, [("live1", 1001)])
    (started,) = queues.take_many([tail], lease_ms=LEASE, batch=20, now_ms=5).leases
    assert started is not None and started.delivery_ids == ("old40", "old41", "old42")
    assert waiting(queues, "w") == 1
    (live,) = queues.dispatch("w", batch=20, lease_ms=LEASE, now_ms=6)
    assert live.delivery_ids == ("live1",)


def test_replays_count_as_waiting_work(queues: Queues) -> None:
    queues.enqueue("w", 1, [("old0", 0)], replay=True)
    queues.enqueue("w", 1, [("live0", 5)])

    assert queues.state(0).waiting == {"w": 2} and queues.queued_webhooks() == ["w"]


def test_counts_add_up_across_calls(queues: Queues) -> None:
    queues.add_counts({"delivered": 2, "failed": 1})
    queues.add_counts({"delivered": 3})
    queues.add_counts({})

    assert queues.counts() == {"delivered": 5, "failed": 1}
    assert queues.ping() is True


def test_a_lease_is_still_held_until_given_back_or_expired(queues: Queues) -> None:
    fill(queues, "w", 2, 2)
    first, second = queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)
    queues.release_many([(first, Report())], batch=1, lease_ms=LEASE, now_ms=1)

    assert queues.still_held([first, second], now_ms=2) == [False, True]
    assert queues.still_held([second], now_ms=LEASE + 1) == [False]
    assert queues.still_held([], now_ms=2) == []


def test_the_state_counts_each_queue_and_the_slots_held_at_that_moment(queues: Queues) -> None:
    fill(queues, "w", 1, 3)
    fill(queues, "v", 1, 5)
    queues.dispatch("w", batch=1, lease_ms=LEASE, now_ms=0)

    now = queues.state(now_ms=1)
    assert (now.waiting, now.slots_held) == ({"w": 2, "v": 5}, 1)
    assert queues.state(now_ms=LEASE + 1).slots_held == 0


def test_offer_queues_every_item_and_set_limit_caps_the_next_dispatch(queues: Queues) -> None:
    queues.offer("w", 1, [("a", 1), ("b", 2), ("c", 3)], batch=1, lease_ms=LEASE, now_ms=0)
    assert waiting(queues, "w") == 2

    queues.set_limit("w", 3)

    assert [lease.delivery_ids for lease in queues.dispatch(
        "w", batch=1, lease_ms=LEASE, now_ms=1)] == [("b",), ("c",)]


def _script_calls(queues: Queues) -> int:
    stats = queues.client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in ("evalsha", "eval"))


def test_offer_many_reaches_every_webhook_in_one_call_up_to_its_size(
        queues: Queues, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ingest reaches the webhooks of an ingest batch in one round trip, not one a webhook; each
    webhook's leases as ``offer`` gives them; a call is split, at a webhook, past its size in
    deliveries or in webhooks."""
    queues.client  # noqa: B018 - its scripts registered before counting
    before = _script_calls(queues)
    replies = list(queues.offer_many(
        [("w1", 2, [("a", 1), ("b", 2), ("c", 3)]), ("w2", 1, [("d", 4)]), ("w3", 1, [])],
        batch=2, lease_ms=LEASE, now_ms=0))
    assert _script_calls(queues) == before + 1
    assert [[lease.delivery_ids for lease in leases or ()] for leases in replies] == [
        [("a", "b"), ("c",)], [("d",)], []]
    assert [lease.webhook_id for leases in replies for lease in leases or ()] == ["w1", "w1", "w2"]
    assert slots_held(queues, "w1", 1) == 2 and slots_held(queues, "w2", 1) == 1

    monkeypatch.setattr("notifier.queues.OFFER_CALL_ITEMS", 3)
    before = _script_calls(queues)
    offered = queues.offer_many(
        [("x1", 1, [("e", 5), ("f", 6)]), ("x2", 1, [("g", 7)]),
         ("x3", 1, [("h", 8), ("i", 9), ("j", 10), ("k", 11)])], batch=5, lease_ms=LEASE, now_ms=0)
    replies = [next(offered), next(offered)]
    # A call's leases are the caller's before the next call is made (which may fail).
    assert _script_calls(queues) == before + 1
    replies += offered
    assert _script_calls(queues) == before + 2  # x1 and x2 together, x3 (past the size) alone
    assert [[lease.delivery_ids for lease in leases or ()] for leases in replies] == [
        [("e", "f")], [("g",)], [("h", "i", "j", "k")]]

    monkeypatch.setattr("notifier.queues.OFFER_CALL_WEBHOOKS", 2)
    before = _script_calls(queues)
    replies = list(queues.offer_many([(f"z{n}", 1, [(f"zd{n}", n)]) for n in range(5)],
                                     batch=5, lease_ms=LEASE, now_ms=0))
    assert _script_calls(queues) == before + 3  # two webhooks a call at most
    assert [lease.delivery_ids for leases in replies for lease in leases or ()] == [
        (f"zd{n}",) for n in range(5)]

    queues.client.flushdb()  # lost: queued all the same, nothing dispatched
    assert list(queues.offer_many([("y1", 1, [("l", 1)]), ("y2", 1, [("m", 2)])],
                                  batch=1, lease_ms=LEASE, now_ms=0)) == [None, None]
    assert waiting(queues, "y1") == 1 and waiting(queues, "y2") == 1
