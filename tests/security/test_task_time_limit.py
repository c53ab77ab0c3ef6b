"""What may outlast a request's whole-request deadline, through the real path: workers whose DNS
answers ``.test`` names from a file (``stub_dns_celery``), receivers on 127.0.0.1.

A name whose lookup hangs is bounded by the deadline itself, in either lane: on the slow lane
(threads, which no time limit can stop) its attempt ends at the deadline, long before the slot's
lease. What the deadline does not cut (a connect waits up to its own timeout) the prefork
lane's Celery soft time limit stops: the task records the attempt it cut as a timeout, carries
its lease on, and the delivery is sent once when it is due again.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

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


@pytest.fixture
def unanswered(receiver: Receiver) -> Iterator[str]:
    """127.0.0.2 on the receiver's port, a listener whose backlog is full: the kernel drops
    each new connection's SYN, so a connect there waits for its timeout."""
    listener = socket.create_server(("127.0.0.2", receiver.server.server_port), backlog=0)
    queued = socket.create_connection(listener.getsockname(), timeout=5)  # fills the backlog
    try:
        yield "127.0.0.2"
    finally:
        queued.close()
        listener.close()


def test_a_task_held_past_its_deadline_is_stopped_by_its_time_limit(
        stack: Stack, receiver: Receiver, database: Database, hosts_file: object,
        unanswered: str) -> None:
    # The stack's limits: deadline 2 s, soft time limit 3.5 s, hard 4 s, slot lease 5 s. The
    # deadline cuts a socket once it is connected; a connect waits for its own timeout, here
    # 30 s. The first lookup leads to an address that never accepts; the next ones to the
    # receiver.
    hosts_file({"hangs.test": [unanswered, "127.0.0.1"]})  # type: ignore[operator]
    stack.env["NOTIFIER_HTTP_CONNECT_TIMEOUT"] = "30"
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
    # The same delivery, sent again only once the cut send had ended (with no time limit, its
    # lease expires during the hang and another task sends it meanwhile).
    assert (delivered.delivery_id, delivered.outcome) == (cut.delivery_id, "delivered")
    assert cut.started_at_ms + cut.latency_ms <= delivered.started_at_ms
    assert arrived.headers["webhook-id"] == cut.delivery_id
    assert receiver.at("/hangs") == [arrived] and receiver.peak["/hangs"] == 1
