"""What may outlast a request's whole-request deadline, through the real path: workers whose DNS
answers ``.test`` names from a file (``stub_dns_celery``), receivers on 127.0.0.1.

A name whose lookup hangs is bounded by the deadline itself, in either lane: on the slow lane
(threads, which no time limit can stop) its attempt ends at the deadline, long before the slot's
lease; so are connects, however many addresses the name has. What the deadline does not bound
(a stalled database, a long computation: here a step the stub worker holds) the prefork lane's
Celery soft time limit stops: the task records the attempt it cut as a timeout, carries its
lease on, and the delivery is sent once when it is due again.
"""

from __future__ import annotations

import pytest

from notifier.db import Database
from tests.conftest import Receiver, Stack, wait_until
from tests.security.conftest import attempts_of_hook, make_hook, send

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

STUB_DNS_WORKER = ("tests.security.stub_dns_celery",)


def _two_attempts(database: Database, hook: str) -> list[object] | None:
    attempts = attempts_of_hook(database, hook)
    return attempts if len(attempts) >= 2 else None


def test_a_lookup_that_hangs_on_the_slow_lane_ends_at_the_deadline(
        stack: Stack, receiver: Receiver, database: Database, hosts_file: object) -> None:
    # The stack's deadline is 2 s, its slot lease 5 s. The first lookup answers after 30 s (a
    # tenant's DNS server that never answers); the next ones at once. A webhook never
    # measured goes by the slow lane, whose threads no time limit stops: only the deadline.
    hosts_file({"hangs.test": ["slow:30:127.0.0.1", "127.0.0.1"]})  # type: ignore[operator]
    port = receiver.server.server_port
    hook = make_hook(stack, database, f"http://hangs.test:{port}/hangs",
                     max_allowed_connections=1)
    stack.worker("slow", pool="threads", concurrency=4, queues="notifier.slow",
                 program=STUB_DNS_WORKER)
    stack.worker("w1", queues="notifier,notifier.deliver", program=STUB_DNS_WORKER)
    stack.beat()  # brings the retry back

    send(stack)
    (arrived,) = receiver.wait_for(1, "/hangs", timeout=60)
    cut, delivered = wait_until(lambda: _two_attempts(database, hook), 30,  # type: ignore[misc]
                                "the attempt cut in its lookup and the delivered one")

    assert (cut.outcome, cut.error_class) == ("retrying", "DeadlineExceeded"), cut.error_message
    assert "lookup of 'hangs.test'" in cut.error_message
    # Recorded (and its slot given back) before the lease could run out: with the lookup
    # unbounded, the lease expired during the hang and another task delivered meanwhile.
    assert cut.latency_ms < stack.settings.slot_lease_seconds * 1000
    assert (delivered.delivery_id, delivered.outcome) == (cut.delivery_id, "delivered")
    assert cut.started_at_ms + cut.latency_ms <= delivered.started_at_ms
    assert arrived.headers["webhook-id"] == cut.delivery_id
    assert receiver.at("/hangs") == [arrived] and receiver.peak["/hangs"] == 1
    assert "Task notifier.deliver[" in stack.log("slow")  # sent by the threads worker


def test_a_task_held_past_its_deadline_is_stopped_by_its_time_limit(
        stack: Stack, receiver: Receiver, database: Database, hosts_file: object) -> None:
    # The stack's limits: deadline 2 s, soft time limit 3.5 s, hard 4 s, slot lease 5 s. The
    # sender's own waits (lookup, connects, handshake, reads) all end at the deadline; the
    # first attempt is held 30 s before its request, by a step that no deadline bounds (the
    # stub worker's hold). The next ones go at once.
    hosts_file({"hangs.test": ["127.0.0.1"], "hold": {"hangs.test": [30, 0]}})  # type: ignore[operator]
    port = receiver.server.server_port
    hook = make_hook(stack, database, f"http://hangs.test:{port}/hangs",
                     max_allowed_connections=1)
    stack.worker(program=STUB_DNS_WORKER)
    stack.beat()  # brings the retry back

    send(stack)
    (arrived,) = receiver.wait_for(1, "/hangs", timeout=60)
    cut, delivered = wait_until(lambda: _two_attempts(database, hook), 30,  # type: ignore[misc]
                                "the cut attempt and the delivered one")

    assert (cut.outcome, cut.error_class) == ("retrying", "Timeout"), cut.error_message
    assert cut.error_message == "cut by the delivery task's time limit"
    assert cut.latency_ms < stack.settings.slot_lease_seconds * 1000
    # The same delivery, sent again only once the cut send had ended (with no time limit, its
    # lease expires during the hold and another task sends it meanwhile, then the held one).
    assert (delivered.delivery_id, delivered.outcome) == (cut.delivery_id, "delivered")
    assert cut.started_at_ms + cut.latency_ms <= delivered.started_at_ms
    assert arrived.headers["webhook-id"] == cut.delivery_id
    assert receiver.at("/hangs") == [arrived] and receiver.peak["/hangs"] == 1
