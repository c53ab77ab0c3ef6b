"""Beat's faults (issue 13's fault table): two beats at once, and beat SIGKILLed and started again
mid-run. Their sweeps (due retries back, expired leases taken back, queues pumped) are Lua
steps on Redis, each atomic, so a second sweep finds nothing left to do twice; these runs show
it through real processes: nothing lost, nothing sent twice, the cap held. A sweep's process
killed in the middle of rebuilding a flushed Redis leaves the rebuild to a later sweep."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis

from notifier import pipeline
from notifier.db import Database
from notifier.queues import Lease
from tests.conftest import Receiver, Reply, Stack, wait_until
from tests.reliability.faults.conftest import make_webhooks, publish_points, settle

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 1302
CAP = 2
# More worker processes than a webhook's cap, so that a slot granted twice would show as a peak.
PROCESSES = 4
PATHS = ("/b1", "/b2", "/b3")
EVENTS = 300
# Answers of 503 at the start of each path: their retries are parked and only beat brings them
# back, so every sweep step has work to do while the beats run, die and race.
ERRORS_EACH = 15


def _prepare(stack: Stack, receiver: Receiver, database: Database) -> None:
    make_webhooks(stack, receiver, database, ORG, dict.fromkeys(PATHS, CAP))
    for path in PATHS:
        receiver.script(path, *[Reply(503)] * ERRORS_EACH)
        receiver.hold(path, 0.1)


def _publish(stack: Stack, first: int, count: int) -> set[str]:
    return publish_points(stack, ORG, first, count)


def _settled(receiver: Receiver, database: Database, due: set[str]) -> str:
    line, duplicates = settle(receiver, database, dict.fromkeys(PATHS, CAP), due)
    assert duplicates == 0, line
    return line


def test_two_beats_at_once_lose_nothing_and_send_nothing_twice(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    _prepare(stack, receiver, database)
    stack.worker("w1", concurrency=PROCESSES)
    stack.beat("beat")
    stack.beat("beat2")
    due = _publish(stack, 0, EVENTS)
    line = _settled(receiver, database, due)
    for name in ("beat", "beat2"):
        assert stack.processes[name].poll() is None and "Scheduler: Sending" in stack.log(name)
    print(f"two beats: {line}")


def test_beat_killed_and_started_again_mid_run_loses_nothing_and_sends_nothing_twice(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    _prepare(stack, receiver, database)
    stack.worker("w1", concurrency=PROCESSES)
    stack.beat()
    due = _publish(stack, 0, EVENTS // 2)
    for _ in range(2):
        # Killed while retries are parked and deliveries under way; started again at once.
        under_way = 50 + len(due) // 3
        wait_until(lambda: len(receiver.requests) >= under_way, 60,  # noqa: B023 - waited here
                   "deliveries under way")
        stack.kill("beat")
        due |= _publish(stack, len(due), EVENTS // 4)
        stack.beat()
    line = _settled(receiver, database, due)
    print(f"beat killed twice: {line}")


# A sweep's process SIGKILLed in the middle of rebuilding a flushed Redis: os._exit runs no
# except or finally clause, as a kill would not.
_KILLED_WHILE_REBUILDING = """
import os
from config import load_settings
from notifier import pipeline, store
store.open_work = lambda db: os._exit(9)
pipeline.sweep(pipeline.build_services(load_settings()), lambda lease: None)
"""


def test_a_sweep_killed_while_rebuilding_a_flushed_redis_leaves_the_rebuild_to_a_later_one(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    _prepare(stack, receiver, database)
    services = pipeline.build_services(stack.settings)
    try:
        outcomes = pipeline.accept_many(services, [
            {"eventName": "pointsIssued", "orgId": ORG,
             "data": {"customerIdentifiers": {"customerId": n}, "totalPointsIssued": 1}}
            for n in range(20)], lambda lease: None)
        due = {q.delivery_id for outcome in outcomes for q in outcome.queued}
        assert len(due) == 20 * len(PATHS)
        redis.Redis.from_url(stack.settings.redis_url).flushdb()  # Redis loses its state

        killed = subprocess.run([sys.executable, "-c", _KILLED_WHILE_REBUILDING],
                                env=stack.env, capture_output=True, timeout=60, check=False)
        assert killed.returncode == 9, killed.stderr.decode()

        # Later sweeps (beat's next ticks): one of them must rebuild, within a lease or so.
        leases: list[Lease] = []
        started = time.monotonic()
        wait_until(lambda: pipeline.sweep(services, leases.append).rebuilt,
                   stack.settings.slot_lease_seconds + 10, "a sweep to rebuild the queues")
        print(f"rebuilt {time.monotonic() - started:.1f}s after the killed rebuild")
        # That sweep put every delivery back and handed each webhook's batch a slot.
        assert {d for lease in leases for d in lease.delivery_ids} == due
    finally:
        services.db.dispose()
