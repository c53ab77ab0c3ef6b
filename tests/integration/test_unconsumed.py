"""A deployment cannot stall silently: real workers and beat, real Redis and PostgreSQL, a
receiver on 127.0.0.1.

A webhook never measured is presumed slow, so its leases go by the slow lane
(``notifier.slow``); a deployment that runs only the Procfile's ``web``, ``worker`` and ``beat``
once delivered nothing to it, and said nothing."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from celery import Celery
from sqlalchemy import select

from notifier import consumers, publish, store
from notifier.client import DELIVER_QUEUE, QUEUE, SLOW_QUEUE
from notifier.db import Database
from notifier.models import Delivery, DeliveryStatus
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Receiver, Stack, create_webhook, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 71
# The Procfile's worker line: ingest and the fast lane, not the slow lane.
PROCFILE_WORKER = Path(__file__).resolve().parents[2].joinpath("Procfile").read_text()


def _hook(stack: Stack, receiver: Receiver, path: str) -> str:
    database = Database(stack.settings.database_url)
    try:
        store.create_org(database, ORG, "org", now_ms=0)
        webhook_id, _ = create_webhook(
            database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
            org_id=ORG, name=path, url=receiver.url(path), event_names=["pointsIssued"],
            now_ms=0)
    finally:
        database.dispose()
    return webhook_id


def _publish(stack: Stack, n: int) -> str:
    return publish("pointsIssued", {"customerIdentifiers": {"customerId": n}}, org_id=ORG,
                   broker_url=stack.settings.broker_url)


def _statuses(stack: Stack) -> list[DeliveryStatus]:
    database = Database(stack.settings.database_url)
    try:
        with database.session() as session:
            return list(session.scalars(select(Delivery.status)))
    finally:
        database.dispose()


def test_the_procfile_worker_queues_are_those_of_the_test() -> None:
    (worker,) = [line for line in PROCFILE_WORKER.splitlines() if line.startswith("worker:")]
    assert f"--queues {QUEUE},{DELIVER_QUEUE}" in worker and SLOW_QUEUE not in worker


def test_without_a_slow_worker_a_new_webhook_is_still_delivered_to(
        stack: Stack, receiver: Receiver) -> None:
    _hook(stack, receiver, "/new")
    stack.worker("worker", queues=f"{QUEUE},{DELIVER_QUEUE}")  # as the Procfile's worker
    stack.beat()

    event_id = _publish(stack, 1)

    (got,) = receiver.wait_for(1, "/new", timeout=60)
    assert event_id.encode() in got.body
    wait_until(lambda: _statuses(stack) == [DeliveryStatus.DELIVERED], 30,
               "the delivery recorded as delivered")
    # And the log says why the worker took the slow lane.
    assert f"no worker consumes {SLOW_QUEUE}" in stack.log("worker")


def _consumed(stack: Stack) -> dict[str, frozenset[str]]:
    with consumers.connect(stack.settings.broker_url, 2.0) as connection:
        return dict(consumers.survey(connection, 1.0, lengths=False).workers)


def test_the_fast_worker_leaves_the_slow_lane_once_a_slow_worker_answers(stack: Stack) -> None:
    stack.worker("worker", queues=f"{QUEUE},{DELIVER_QUEUE}")
    wait_until(lambda: SLOW_QUEUE in _consumed(stack).get(f"worker@{socket.gethostname()}", ()),
               30, "the fast worker to take the slow lane, none other consuming it")

    stack.worker("slow", pool="threads", concurrency=4, queues=SLOW_QUEUE)

    # Its prefork processes are kept from slow receivers again.
    wait_until(lambda: _consumed(stack).get(f"worker@{socket.gethostname()}")
               == {QUEUE, DELIVER_QUEUE}, 30, "the fast worker to leave the slow lane")


@pytest.fixture
def control(stack: Stack) -> Iterator[Any]:
    """Celery's remote control, as an operator's ``celery control`` uses it, on the stack's
    broker."""
    app = Celery("operator", broker=stack.settings.broker_url, set_as_current=False)
    yield app.control
    app.close()


def _lanes(control: Any, name: str) -> dict[str, Any]:
    """What worker ``name`` says of its queues and of its slow lane cover's looks."""
    hostname = f"{name}@{socket.gethostname()}"
    for reply in control.broadcast(consumers.LANES_COMMAND, destination=[hostname], reply=True,
                                   timeout=2.0):
        if hostname in reply:
            answer: dict[str, Any] = reply[hostname]
            return answer
    pytest.fail(f"{hostname} did not answer {consumers.LANES_COMMAND}")


def _two_looks(control: Any, name: str, what: str) -> None:
    """Wait for two whole looks of worker ``name``'s slow lane cover from now: the second began
    after this call, and saw what the workers answered then."""
    looks = _lanes(control, name)["slow_lane_looks"]
    wait_until(lambda: _lanes(control, name)["slow_lane_looks"] >= looks + 2, 60, what)


def test_a_slow_lane_paused_by_an_operator_stays_paused_while_its_worker_lives(
        stack: Stack, receiver: Receiver, control: Any) -> None:
    _hook(stack, receiver, "/paused")  # never measured: by the slow lane
    stack.worker("worker", queues=f"{QUEUE},{DELIVER_QUEUE}")
    stack.worker("slow", pool="threads", concurrency=4, queues=SLOW_QUEUE)
    stack.beat()

    # The operator pauses the slow lane: ``celery control cancel_consumer notifier.slow``.
    slow = f"slow@{socket.gethostname()}"
    assert control.cancel_consumer(SLOW_QUEUE, destination=[slow], reply=True, timeout=10)
    # (The worker answers before it cancels, on its next turn of its loop.)
    wait_until(lambda: _lanes(control, "slow")["consuming"] == [], 30,
               "the slow worker to stop consuming its lane")
    assert _lanes(control, "slow")["told"] == [SLOW_QUEUE]
    # (A poll of the queue that the slow worker began before the cancel ends within 1 s.)
    _two_looks(control, "worker", "the fast worker's cover to look at the paused lane")
    event_id = _publish(stack, 1)

    def waiting_in_the_slow_lane() -> bool:
        with consumers.connect(stack.settings.broker_url, 2.0) as connection:
            return consumers.survey(connection, 1.0).lengths[SLOW_QUEUE] > 0

    wait_until(waiting_in_the_slow_lane, 30, "the delivery to wait in the paused slow lane")
    _two_looks(control, "worker", "the fast worker's cover to look again")

    # The fast worker has not taken the paused lane over: nothing was sent.
    assert SLOW_QUEUE not in _lanes(control, "worker")["consuming"]
    assert receiver.at("/paused") == []
    assert waiting_in_the_slow_lane()
    assert f"no worker consumes {SLOW_QUEUE}" not in stack.log("worker")

    # Its worker gone, the lane is no one's: the fast worker covers it, and delivers.
    stack.kill("slow")
    got = receiver.wait_for(1, "/paused", timeout=60)
    assert event_id.encode() in got[0].body
    wait_until(lambda: _statuses(stack) == [DeliveryStatus.DELIVERED], 30,
               "the delivery recorded as delivered")
    assert f"no worker consumes {SLOW_QUEUE}" in stack.log("worker")


def test_health_and_metrics_name_the_queue_that_no_worker_consumes(
        stack: Stack, receiver: Receiver) -> None:
    _hook(stack, receiver, "/unconsumed")
    stack.worker("ingest", queues=QUEUE)  # ingests; no worker of either delivery lane
    base = stack.web()

    _publish(stack, 1)

    def unconsumed() -> dict[str, object]:
        answer = requests.get(f"{base}/health", timeout=30)
        assert answer.status_code == 200, answer.text  # the API serves; its deliveries wait
        data: dict[str, object] = answer.json()["data"]
        # The ingest worker answers the survey in 0.3 s or is not counted (a busy one, late):
        # a later check, a second on, asks again.
        return data if data["unconsumed"] and data["workers"] == 1 else {}

    # The new webhook's delivery went by the slow lane, which nothing consumes.
    health = wait_until(unconsumed, 30,
                        "/health to name the unconsumed queue and count the ingest worker")
    assert health["unconsumed"] == {SLOW_QUEUE: 1} and health["status"] == "degraded"
    assert health["workers"] == 1
    metrics = requests.get(f"{base}/metrics", timeout=30).text
    assert f'notifier_queue_unconsumed_messages{{queue="{SLOW_QUEUE}"}} 1.0' in metrics
    assert f'notifier_queue_unconsumed_messages{{queue="{QUEUE}"}} 0.0' in metrics
    assert receiver.at("/unconsumed") == []
