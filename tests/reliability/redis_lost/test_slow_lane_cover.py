"""A deployment without the slow process still delivers after its broker restarts: the fast
worker's consumer, rebuilt on the new connection, consumes the queues it was told to again, and
takes the slow lane over again while no other worker consumes it."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from notifier import consumers
from notifier.client import DELIVER_QUEUE, QUEUE, SLOW_QUEUE
from notifier.db import Database
from tests.conftest import Receiver, Stack, wait_until
from tests.reliability.redis_lost.conftest import hook, publish_events

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def _takes_the_slow_lane(stack: Stack) -> bool:
    try:
        with consumers.connect(stack.settings.broker_url, 2.0) as connection:
            found = consumers.survey(connection, 1.0, lengths=False)
    except OSError:
        return False  # the broker still starting
    return SLOW_QUEUE in found.workers.get(f"worker@{socket.gethostname()}", ())


def test_the_fast_worker_takes_the_slow_lane_again_after_the_broker_restarts(
        stack: Stack, restart_redis: Callable[[], None], database: Database,
        receiver: Receiver) -> None:
    stack.worker("worker", queues=f"{QUEUE},{DELIVER_QUEUE}")  # as the Procfile's, no slow one
    stack.beat()
    wait_until(lambda: _takes_the_slow_lane(stack), 30, "the worker to take the slow lane")

    restart_redis()
    hook(stack, database, receiver, "/after-restart", cap=2)  # new: presumed slow
    (event_id,) = publish_events(stack, 1)

    (got,) = receiver.wait_for(1, "/after-restart", timeout=90)
    assert event_id.encode() in got.body
    assert _takes_the_slow_lane(stack)
