"""The connection cap holds through a Redis that loses its state (flushed, or restarted) while
requests are open: the rebuilt slots count the database's live claims before granting any."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from notifier.db import Database
from tests.conftest import Receiver, Stack, wait_until
from tests.reliability.redis_lost.conftest import hook, publish_events, settle, stored_events

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

CAP = 5
EVENTS = 300


def start(stack: Stack, receiver: Receiver, database: Database, path: str) -> set[str]:
    """A capped webhook answering after 0.3 s, so that its requests overlap, fed by enough
    worker threads to open more than its cap at once; returns the events published.

    Returns once they are all stored (the fault wipes the broker too) and the cap's worth of
    requests is open at the receiver: their claims are live, and their tasks carry on after
    the fault."""
    hook(stack, database, receiver, path, cap=CAP)
    receiver.hold(path, 0.3)
    # 0.3 s answers keep the webhook in the slow lane: twelve threads, more than the cap.
    stack.env["NOTIFIER_SLOW_WEBHOOK_MS"] = "200"
    # A task sends for 2.5 s (eight requests) before it gives the rest back: the tasks out when
    # Redis loses its state still send well after it is rebuilt (a lease of 8 s outlasts this,
    # a request's 2 s deadline and the second to hand on).
    stack.env.update({"NOTIFIER_BATCH_TIME_BUDGET": "2.5", "NOTIFIER_SLOT_LEASE_SECONDS": "8"})
    stack.worker("w1", concurrency=2, queues="notifier,notifier.deliver")
    stack.worker("slow", pool="threads", concurrency=12, queues="notifier.slow")
    stack.beat()
    sent = publish_events(stack, EVENTS)
    wait_until(lambda: stored_events(database) == EVENTS, 60, f"{EVENTS} events stored")
    wait_until(lambda: len(receiver.at(path)) >= 20 and requests_open(receiver, path, CAP),
               90, f"{CAP} requests open after the first 20")
    return sent


def requests_open(receiver: Receiver, path: str, count: int) -> bool:
    with receiver.lock:
        return receiver.in_flight[path] >= count


def test_a_redis_flushed_while_requests_are_open_keeps_the_cap(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    sent = start(stack, receiver, database, "/flush")
    fault_at = time.monotonic()
    redis.Redis.from_url(stack.settings.redis_url).flushall()

    outcome = settle(stack, receiver, database, "/flush", sent, cap=CAP, fault_at=fault_at)
    assert outcome.arrived == EVENTS and outcome.left_open == 0
    assert outcome.peak <= CAP, str(outcome)


def test_events_arriving_before_the_rebuild_of_a_flushed_redis_keep_the_cap(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    sent = start(stack, receiver, database, "/arrive")
    fault_at = time.monotonic()
    redis.Redis.from_url(stack.settings.redis_url).flushall()
    # Ingest offers these at once, before beat's next sweep: slots are asked for before any rebuild.
    sent |= publish_events(stack, 50)

    outcome = settle(stack, receiver, database, "/arrive", sent, cap=CAP, fault_at=fault_at)
    assert outcome.arrived == EVENTS + 50 and outcome.left_open == 0
    assert outcome.peak <= CAP, str(outcome)


def test_a_redis_restarted_while_requests_are_open_keeps_the_cap(
        stack: Stack, receiver: Receiver, database: Database,
        restart_redis: Callable[[], None]) -> None:
    sent = start(stack, receiver, database, "/restart")
    fault_at = time.monotonic()
    restart_redis()  # queues, slots and broker all lost, and Redis away for a moment
    print(f"Redis restarted in {time.monotonic() - fault_at:.2f} s")

    outcome = settle(stack, receiver, database, "/restart", sent, cap=CAP, fault_at=fault_at)
    assert outcome.arrived == EVENTS and outcome.left_open == 0
    assert outcome.peak <= CAP, str(outcome)
