"""Workers SIGKILLed at random moments, several times, during a run (issue 13's fault table).

The prefork worker's whole process group (its main process and pool at once, as the OOM killer
or a lost machine would) is killed at moments a seeded generator picks, and a new worker is
started after each kill. Every kill is shown to land on work in flight: a request open at the
receiver across it, whose delivery a lease held in Redis carried and nobody gave back. The run
ends as every row of the table does: all delivered, duplicates (a request cut by the kill, sent
again with the same ``webhook-id``) counted, the cap held, none left open.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import pytest
import redis
from sqlalchemy import func, select

from notifier.db import Database
from notifier.models import Delivery, DeliveryStatus
from notifier.pipeline import now_ms
from tests.conftest import Receiver, Stack, wait_until
from tests.reliability.faults.conftest import make_webhooks, publish_points, settle

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 1304
CAPS = {"/k1": 2, "/k2": 3, "/k3": 2}
EVENTS = 200  # 600 deliveries
KILLS = 4
SEED = 1313
# More pool processes than any cap, so that a slot granted twice would show as a peak.
PROCESSES = 4
# Each request held this long: long enough that one open when the kill is decided is still
# open when it lands (the cut requests are counted from the receiver's record, not presumed).
HELD = 0.2


@dataclass
class Kill:
    requests_open: int  # at the receiver, when the kill was sent
    leases: dict[str, list[str]]  # live in Redis then: lease -> the deliveries it carried
    orphaned: set[str]  # of those, still live after the kill: nobody gave them back
    looked: float  # time.monotonic() when the leases were looked at
    at: float  # time.monotonic() of the kill, as the receiver's records are
    at_ms: int  # and as the database's
    # webhook-ids of requests open across the kill (begun before, ended after): read from the
    # receiver's record once the run has settled (a request cut is recorded when it ends)
    cut: set[str] = field(default_factory=set)

    def sent_again(self, receiver: Receiver) -> float:
        """Seconds from the kill until every request it cut had begun again."""
        return max(min(r.began for r in receiver.requests
                       if r.headers["webhook-id"] == d and r.began > self.at) - self.at
                   for d in self.cut)

    def recovered(self, database: Database) -> float:
        """Seconds from the kill until every request it cut was sent again and delivered (the
        rest of its leases' batches go at their webhooks' pace, behind them)."""
        with database.session() as session:
            ended = session.scalar(select(func.max(Delivery.ended_at_ms)).where(
                Delivery.id.in_(self.cut)))
        return ((ended or self.at_ms) - self.at_ms) / 1000


def _live_leases(client: redis.Redis, prefix: str) -> dict[str, list[str]]:
    names = [n.decode() for n in client.zrangebyscore(f"{prefix}:leases", now_ms(), "+inf")]
    items = client.hmget(f"{prefix}:lease:items", names) if names else []
    return {name: (ids.decode().split(",") if ids else []) for name, ids in zip(names, items, strict=True)}


def test_workers_sigkilled_at_random_moments_lose_nothing_and_hold_the_cap(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    # A killed worker's unacknowledged messages (an event not yet stored, a lease's task) come
    # back after the visibility timeout: 10 s here (it must outlast the 5 s slot lease).
    stack.env["NOTIFIER_VISIBILITY_TIMEOUT"] = "10"
    make_webhooks(stack, receiver, database, ORG, CAPS)
    for path in CAPS:
        receiver.hold(path, HELD)
    client = redis.Redis.from_url(stack.settings.redis_url)
    prefix = stack.settings.redis_prefix
    moments = random.Random(SEED)
    stack.beat()
    stack.worker("w0", concurrency=PROCESSES)
    started = time.monotonic()
    due = publish_points(stack, ORG, 0, EVENTS)

    kills: list[Kill] = []
    answered = 0
    for n in range(KILLS):
        # The moment: after a random number of answers more, with a request open that began
        # less than half its hold ago, so that it is still open when the kill lands (one open
        # for longer may end before it, and the kill then cuts nothing).
        answered += moments.randint(40, 110)

        def busy(after: int = answered) -> int:
            return (len(receiver.requests) >= after
                    and time.monotonic() - receiver.last_began < HELD / 2
                    and sum(receiver.in_flight.values()))

        requests_open = wait_until(busy, 60, f"{answered} answers and a request open")
        looked = time.monotonic()
        leases = _live_leases(client, prefix)
        killed, killed_ms = time.monotonic(), now_ms()
        stack.kill(f"w{n}")
        orphaned = set(leases) & set(_live_leases(client, prefix))
        stack.worker(f"w{n + 1}", concurrency=PROCESSES)
        kills.append(Kill(requests_open, leases, orphaned, looked, killed, killed_ms))

    line, duplicates = settle(receiver, database, CAPS, due, timeout=90)
    took = time.monotonic() - started
    for kill in kills:
        # Begun before the leases were looked at (so a lease seen carried it), and answered
        # only after the kill was sent (no earlier than its hold after it began).
        kill.cut = {r.headers["webhook-id"] for r in receiver.requests
                    if r.began < kill.looked and r.began + HELD > kill.at}
        # The kill landed on work in flight: a request open across it, of a delivery that a
        # lease held at the kill carried, and that lease was never given back.
        assert kill.cut, kill
        assert kill.cut <= {d for lease in kill.orphaned for d in kill.leases[lease]}, kill
    # A request cut by a kill was never recorded: it went again, with the same webhook-id.
    sent = [r.headers["webhook-id"] for r in receiver.requests]
    cut = {d for kill in kills for d in kill.cut}
    assert all(sent.count(d) >= 2 for d in cut), [d for d in cut if sent.count(d) < 2]
    assert duplicates >= len(cut), line
    with database.session() as session:
        statuses = dict(session.execute(select(Delivery.status, func.count())
                                        .group_by(Delivery.status)).all())
    assert statuses == {DeliveryStatus.DELIVERED: EVENTS * len(CAPS)}, statuses
    print(f"{KILLS} SIGKILLs (seed {SEED}): {line} ({len(cut)} cut by a kill); "
          f"run {took:.0f}s; " + "; ".join(
        f"kill {n + 1}: {k.requests_open} open, {len(k.cut)} cut, {len(k.orphaned)} of "
        f"{len(k.leases)} leases orphaned, recovered in {k.recovered(database):.1f}s "
        f"(sent again within {k.sent_again(receiver):.1f}s)"
        for n, k in enumerate(kills)))
