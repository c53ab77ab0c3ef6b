"""What may outlast a request's whole-request deadline, through the real path: workers whose DNS
answers ``.test`` names from a file (``stub_dns_celery``), receivers on 127.0.0.1.

A name whose lookup hangs is bounded by the deadline itself, in either lane: on the slow lane
(threads, which no time limit can stop) its attempt ends at the deadline, long before the slot's
lease; so are connects, however many addresses the name has. What the deadline does not bound
(a stalled database, a long computation: here a step the stub worker holds) the prefork lane's
Celery soft time limit stops: the task records the attempt it cut as a timeout, carries its
lease on, and the delivery is sent once when it is due again. A task that sends several leases
side by side cuts the requests its other threads hold open as it stops: none outlives it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa

from notifier.db import Database
from notifier.models import Delivery, DeliveryStatus
from tests.conftest import Receiver, Stack, wait_until
from tests.security.conftest import attempts_of_hook, make_hook, send

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

STUB_DNS_WORKER = ("tests.security.stub_dns_celery",)


def settled(database: Database, status: DeliveryStatus, count: int) -> Callable[[], bool]:
    def enough() -> bool:
        with database.session() as session:
            return session.scalar(sa.select(sa.func.count()).select_from(Delivery)
                                  .where(Delivery.status == status)) >= count
    return enough


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


def test_a_task_stopped_by_its_time_limit_cuts_the_requests_it_sends_side_by_side(
        stack: Stack, receiver: Receiver, database: Database, hosts_file: object) -> None:
    # Limits as above: deadline 2 s, soft time limit 3.5 s, hard 4 s. Two webhooks, each
    # measured fast first, so that one event's two deliveries ride one task, side by side.
    hosts_file({"one.test": ["127.0.0.1"], "two.test": ["127.0.0.1"]})  # type: ignore[operator]
    port = receiver.server.server_port
    host_of = {make_hook(stack, database, f"http://{name}:{port}/{name}", name=name,
                         max_allowed_connections=1): name for name in ("one.test", "two.test")}
    stack.env["NOTIFIER_HTTP_READ_TIMEOUT"] = "10"  # a held request ends at its deadline
    stack.worker(program=STUB_DNS_WORKER)
    stack.beat()  # brings the retries back
    for n in range(2):
        send(stack, customer=n)
    wait_until(settled(database, DeliveryStatus.DELIVERED, 4), 60, "4 delivered rows")

    # The task's own lease (the lower webhook id's) is held 30 s in the task's thread before
    # its request, by a step no deadline bounds; the other lease's thread is held 2.5 s, then
    # its request is held open by the receiver: open when the soft limit lands, 1.5 s before
    # its own deadline would cut it.
    own, other = sorted(host_of)
    hosts_file({"one.test": ["127.0.0.1"], "two.test": ["127.0.0.1"],  # type: ignore[operator]
                "hold": {host_of[own]: [30, 0], host_of[other]: [2.5, 0]}})
    opened = receiver.gate(f"/{host_of[other]}")
    send(stack, customer=9)

    def cut() -> list[object] | None:
        attempts = [attempts_of_hook(database, hook)[2:] for hook in (own, other)]
        return [a[0] for a in attempts] if all(attempts) else None

    own_cut, other_cut = wait_until(cut, 30, "both attempts recorded")  # type: ignore[misc]
    for attempt in (own_cut, other_cut):
        assert (attempt.outcome, attempt.error_class) == ("retrying", "Timeout"), attempt
        assert attempt.error_message == "cut by the delivery task's time limit"
    # Cut by the task as it stopped, before the request's own deadline: with nothing to cut
    # it, the other thread's request went on after its task had stopped, and its attempt
    # was recorded by no one.
    assert other_cut.latency_ms < stack.settings.http_deadline * 1000
    assert receiver.in_flight[f"/{host_of[other]}"] == 1  # (the receiver still holds it)
    opened.set()

    wait_until(settled(database, DeliveryStatus.DELIVERED, 6), 60, "6 delivered rows")
    for hook, cut_attempt in ((own, own_cut), (other, other_cut)):
        delivered = attempts_of_hook(database, hook)[3]
        assert (delivered.delivery_id, delivered.outcome) == (cut_attempt.delivery_id,
                                                              "delivered")
        assert cut_attempt.started_at_ms + cut_attempt.latency_ms <= delivered.started_at_ms
    assert receiver.peak[f"/{host_of[other]}"] == 1
