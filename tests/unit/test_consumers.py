"""Who covers the slow lane, decided from the workers' answers (``notifier.consumers``)."""

from __future__ import annotations

from notifier.consumers import Survey
from notifier.routes import DELIVER_QUEUE, QUEUE, SLOW_QUEUE

FAST = frozenset({QUEUE, DELIVER_QUEUE})
SLOW = frozenset({SLOW_QUEUE})


def test_a_slow_worker_paused_by_an_operator_keeps_its_lane() -> None:
    found = Survey({"me": FAST, "slow": frozenset()}, told={"me": FAST, "slow": SLOW})
    assert found.slow_lane_kept(other_than="me")
    assert found.slow_lane_worker(other_than="me")


def test_without_a_slow_worker_the_lane_is_no_ones() -> None:
    found = Survey({"me": FAST, "other": FAST}, told={"me": FAST, "other": FAST})
    assert not found.slow_lane_kept(other_than="me")
    assert not found.slow_lane_worker(other_than="me")


def test_a_fast_worker_covering_keeps_the_lane_from_another_but_is_not_its_own_worker() -> None:
    found = Survey({"me": FAST, "other": FAST | SLOW}, told={"me": FAST, "other": FAST})
    assert found.slow_lane_kept(other_than="me")
    assert not found.slow_lane_worker(other_than="me")


def test_a_worker_of_every_queue_keeps_the_lane_but_is_not_its_own_worker() -> None:
    every = FAST | SLOW
    found = Survey({"me": FAST, "all": every}, told={"me": FAST, "all": every})
    assert found.slow_lane_kept(other_than="me")
    assert not found.slow_lane_worker(other_than="me")


def test_only_the_others_count() -> None:
    found = Survey({"me": FAST | SLOW}, told={"me": SLOW})
    assert not found.slow_lane_kept(other_than="me")
    assert not found.slow_lane_worker(other_than="me")
