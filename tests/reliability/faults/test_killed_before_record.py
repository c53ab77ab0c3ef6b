"""A worker SIGKILLed between its sends and their record (issue 17: a task's attempts recorded
in one commit, not one per attempt).

A delivery task records the attempts of its batch together, once it has sent them. A worker
killed in between loses those records, never a delivery: the claims expire, the deliveries go
again with the same ``webhook-id`` (at-least-once; the receiver dedups by it), and the re-sends
are recorded. "In between" is shown, not hoped for: the receiver answers the batch's first two
requests and holds the third open, and the kill goes only while it is open and the database
holds no attempt of the batch yet.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from notifier import publish_many
from notifier.db import Database
from notifier.models import Attempt, Delivery, DeliveryStatus
from notifier.pipeline import now_ms
from tests.conftest import Receiver, Reply, Stack, wait_until
from tests.reliability.faults.conftest import make_webhooks, settle

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 1317
PATH = "/ledger"
EVENTS = 5  # one batch: one broker message, one lease (a cap of 1), one task
HELD = 4.0  # the third request is held open this long, past the kill


def _recorded(database: Database) -> tuple[dict[str, str], list[Attempt]]:
    with database.session() as session:
        statuses = {d.id: str(d.status) for d in session.scalars(select(Delivery))}
        attempts = list(session.scalars(select(Attempt)))
    return statuses, attempts


def test_a_worker_killed_between_its_sends_and_their_record_loses_their_records_not_deliveries(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    # Room for the held request (a 5 s deadline) inside a lease that outlives the task's hard
    # time limit (2 s budget + 5 s + margins < 10 s).
    stack.env.update({"NOTIFIER_HTTP_READ_TIMEOUT": "5", "NOTIFIER_HTTP_DEADLINE": "5",
                      "NOTIFIER_BATCH_TIME_BUDGET": "2", "NOTIFIER_SLOT_LEASE_SECONDS": "10"})
    make_webhooks(stack, receiver, database, ORG, {PATH: 1})
    receiver.script(PATH, 200, 200, Reply(200, delay=HELD))
    stack.beat()
    stack.worker("w1")
    due = set(publish_many([{"eventName": "pointsIssued",
                             "data": {"customerIdentifiers": {"customerId": n},
                                      "totalPointsIssued": 1}} for n in range(EVENTS)],
                           org_id=ORG, broker_url=stack.settings.broker_url))

    def third_open() -> bool:
        return (len(receiver.at(PATH)) == 2 and receiver.in_flight[PATH] == 1
                and time.monotonic() - receiver.last_began < HELD / 2)

    wait_until(third_open, 60, "two answers and the third request open")
    statuses, attempts = _recorded(database)
    # Two sends answered, none recorded: the task records its batch once, after its sends.
    assert attempts == [] and len(statuses) == EVENTS, (statuses, attempts)
    killed_at = now_ms()
    stack.kill("w1")
    assert receiver.in_flight[PATH] == 1  # the kill landed while the third was open
    answered = [r.headers["webhook-id"] for r in receiver.at(PATH)]
    stack.worker("w2")

    line, duplicates = settle(receiver, database, {PATH: 1}, due, timeout=60)
    statuses, attempts = _recorded(database)
    assert set(statuses.values()) == {DeliveryStatus.DELIVERED}, statuses
    sent = [r.headers["webhook-id"] for r in sorted(receiver.requests, key=lambda r: r.began)]
    cut = sent[2]
    # The two answered and the one cut went again, with the same webhook-ids; nothing else did.
    assert sorted(sent.count(d) for d in statuses) == [1, 1, 2, 2, 2], sent
    assert {d for d in statuses if sent.count(d) == 2} == {*answered, cut}
    assert duplicates >= 2, line  # the two answered twice (and the cut one, as the receiver saw it)
    # What the kill cost: the records of the three sends it cut off; each delivery holds one
    # attempt, the re-send's, made after the kill.
    assert sorted((a.delivery_id, a.number, a.status_code) for a in attempts) == sorted(
        (d, 1, 200) for d in statuses)
    assert all(a.started_at_ms > killed_at for a in attempts)
    print(f"killed between send and record: {line}; the records of {len(answered) + 1} sends "
          "lost, re-sent and recorded")
