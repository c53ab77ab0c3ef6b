"""A delivery task that outlives its request's deadline is stopped by its Celery soft time
limit, through the real path: a prefork worker whose DNS answers a ``.test`` name only after
a long wait (``stub_dns_celery``), a receiver on 127.0.0.1.

The whole-request deadline cuts sockets; a name that takes long to resolve holds no socket yet,
so only the task's time limits (``tasks.celeryconfig``) bound it. The task records the attempt
it cut as a timeout, carries its lease on, and the delivery is sent once when it is due again.
"""

from __future__ import annotations

import pytest

from notifier.db import Database
from tests.conftest import Receiver, Stack, wait_until
from tests.security.conftest import attempts_of_hook, make_hook, send

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

STUB_DNS_WORKER = ("tests.security.stub_dns_celery",)


def test_a_task_held_past_its_deadline_is_stopped_by_its_time_limit(
        stack: Stack, receiver: Receiver, database: Database, hosts_file: object) -> None:
    # The stack's limits: deadline 2 s, soft time limit 3.5 s, hard 4 s, slot lease 5 s. The
    # first lookup answers after 30 s (a resolver that hangs); the next ones at once.
    hosts_file({"hangs.test": ["slow:30:127.0.0.1", "127.0.0.1"]})  # type: ignore[operator]
    port = receiver.server.server_port
    hook = make_hook(stack, database, f"http://hangs.test:{port}/hangs",
                     max_allowed_connections=1)
    stack.worker(program=STUB_DNS_WORKER)
    stack.beat()  # brings the retry back

    send(stack)
    (arrived,) = receiver.wait_for(1, "/hangs", timeout=60)
    attempts = wait_until(lambda: (lambda a: a if len(a) >= 2 else None)(
        attempts_of_hook(database, hook)), 30, "the cut attempt and the delivered one")

    cut, delivered = attempts
    assert (cut.outcome, cut.error_class) == ("retrying", "Timeout"), cut.error_message
    assert cut.error_message == "cut by the delivery task's time limit"
    # The same delivery, sent again only once the cut send had ended (with no time limit, its
    # lease expires during the hang and another task sends it meanwhile).
    assert (delivered.delivery_id, delivered.outcome) == (cut.delivery_id, "delivered")
    assert cut.started_at_ms + cut.latency_ms <= delivered.started_at_ms
    assert arrived.headers["webhook-id"] == cut.delivery_id
    assert receiver.at("/hangs") == [arrived] and receiver.peak["/hangs"] == 1
