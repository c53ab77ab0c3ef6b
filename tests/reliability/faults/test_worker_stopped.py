"""A worker stopped with SIGTERM in the middle of a request (issue 13's fault table).

Stopped the way a supervisor stops one process (Docker, Kubernetes, systemd's
``KillMode=mixed``: the signal to Celery's main process only), the worker shuts down warm: the
open request finishes and is recorded, nothing is sent twice. Sent to the whole process group
(``kill -TERM -<pgid>``, systemd's default ``KillMode=control-group``), the prefork children die
of it at once (Celery resets SIGTERM to its default in them): the request is cut, and the
delivery goes again, with the same ``webhook-id``. Either way nothing is lost and the cap holds.

"Mid-request" is shown, not hoped for: every request is held open by the receiver until the
signal has gone, and the signal goes only while the receiver counts a request open and has
answered none.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from sqlalchemy import select

from notifier.db import Database
from notifier.models import Attempt, Delivery, DeliveryStatus
from tests.conftest import Receiver, Stack, wait_until
from tests.reliability.faults.conftest import make_webhooks, publish_points, settle

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 1303
PATH = "/term"
CAP = 2
EVENTS = 40
# Every request the stopped worker makes is held this long: the signal lands inside it.
HELD = 2.0


def _recorded(database: Database, delivery_id: str) -> tuple[str, list[int | None]]:
    """A delivery's status and the status codes of its recorded attempts."""
    with database.session() as session:
        status = session.scalar(select(Delivery.status).where(Delivery.id == delivery_id))
        codes = session.scalars(select(Attempt.status_code).where(
            Attempt.delivery_id == delivery_id)).all()
    return str(status), list(codes)


@pytest.mark.parametrize("group", [False, True], ids=["main-process", "process-group"])
def test_a_worker_stopped_with_sigterm_mid_request_loses_nothing(
        stack: Stack, receiver: Receiver, database: Database, group: bool) -> None:
    # Room for a held request: a 5 s deadline, so a lease outlives the task's hard time limit
    # (1 s budget + 5 s + margins = 7 s < 8 s).
    stack.env.update({"NOTIFIER_HTTP_READ_TIMEOUT": "5", "NOTIFIER_HTTP_DEADLINE": "5",
                      "NOTIFIER_SLOT_LEASE_SECONDS": "8"})
    make_webhooks(stack, receiver, database, ORG, {PATH: CAP})
    receiver.hold(PATH, HELD)
    stack.worker("w1", concurrency=CAP + 1)
    stack.beat()
    due = publish_points(stack, ORG, 0, EVENTS)

    open_at_signal = wait_until(
        lambda: not receiver.at(PATH) and receiver.in_flight[PATH], 60,
        "a request open at the receiver")
    signalled = time.monotonic()
    worker = stack.processes["w1"]
    if group:
        os.killpg(worker.pid, signal.SIGTERM)
    else:
        os.kill(worker.pid, signal.SIGTERM)
    stopped_with = worker.wait(timeout=60)
    stop_took = time.monotonic() - signalled

    def begun_before() -> set[str]:
        return {r.headers["webhook-id"] for r in receiver.at(PATH) if r.began < signalled}

    # The requests open at the signal: begun before it (none had been answered then), and
    # answered by now (a cut one is answered into a closed connection, when its hold ends).
    was_open = wait_until(lambda: len(begun_before()) >= open_at_signal and begun_before(),
                          HELD + 30, "the requests open at the signal answered")
    finished = {d: _recorded(database, d) for d in was_open}
    if not group:
        # Warm shutdown: the worker waited for its request, recorded it and exited cleanly.
        assert stopped_with == 0, stack.log("w1")
        assert finished == dict.fromkeys(was_open, (DeliveryStatus.DELIVERED, [200])), finished

    receiver.hold(PATH, 0.05)
    restarted = time.monotonic()
    stack.worker("w2", concurrency=CAP + 1)
    line, duplicates = settle(receiver, database, {PATH: CAP}, due, timeout=90)
    recovered = time.monotonic() - restarted
    sent = [r.headers["webhook-id"] for r in receiver.at(PATH)]
    if group:
        # Each request open at the signal went again with the same webhook-id (its process died
        # of the signal), or was recorded delivered before the worker went.
        for delivery_id, (status, codes) in finished.items():
            assert (sent.count(delivery_id) >= 2
                    or (status, codes) == (DeliveryStatus.DELIVERED, [200])), (
                delivery_id, status, codes)
    else:
        assert duplicates == 0, line
    how = "process group" if group else "main process"
    print(f"SIGTERM to the {how} with {open_at_signal} request(s) open: {line}; "
          f"worker gone {stop_took:.1f}s after the signal (exit {stopped_with}), "
          f"{sum(sent.count(d) >= 2 for d in was_open)} of {len(was_open)} sent again; "
          f"settled {recovered:.1f}s after a new worker was started")
