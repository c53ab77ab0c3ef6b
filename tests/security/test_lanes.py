"""One webhook can never hold every process of the fast lane: real prefork and threads workers,
real Redis and PostgreSQL, a receiver on 127.0.0.1 that turns one tenant's webhook slow."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from notifier import publish, store
from notifier.db import Database
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Receiver, Reply, Stack, create_webhook, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SLOW, OTHER = 61, 62


def _event(stack: Stack, org_id: int, n: int) -> str:
    return publish("pointsIssued", {"customerIdentifiers": {"customerId": n}}, org_id=org_id,
                   broker_url=stack.settings.broker_url)


def _hook(stack: Stack, database: Database, receiver: Receiver, org_id: int, path: str,
          **options: Any) -> str:
    store.create_org(database, org_id, f"org {org_id}", now_ms=0)
    webhook_id, _ = create_webhook(database, load_catalog(),
                         vault_for(stack.settings.secret_keys, stack.settings.data_dir),
                         org_id=org_id, name=path, url=receiver.url(path),
                         event_names=["pointsIssued"], now_ms=0, **options)
    return webhook_id


def test_a_webhook_that_turns_slow_leaves_a_prefork_process_to_another_org(
        stack: Stack, receiver: Receiver) -> None:
    database = Database(stack.settings.database_url)
    try:
        hooks = [_hook(stack, database, receiver, SLOW, "/slow", max_allowed_connections=4),
                 _hook(stack, database, receiver, OTHER, "/other")]
    finally:
        database.dispose()
    stack.env["NOTIFIER_BATCH_SIZE"] = "1"  # one delivery a lease: four leases at once
    # The slow answers are waited for (a request cut at its deadline would stay open at the
    # receiver, which answers after its delay whoever still listens).
    stack.env.update({"NOTIFIER_HTTP_READ_TIMEOUT": "5", "NOTIFIER_HTTP_DEADLINE": "5",
                      "NOTIFIER_SLOT_LEASE_SECONDS": "10"})
    stack.worker("prefork", concurrency=2, queues="notifier,notifier.deliver")
    stack.worker("threads", pool="threads", concurrency=4, queues="notifier.slow")
    for n, (org_id, path) in enumerate(((SLOW, "/slow"), (OTHER, "/other"))):
        _event(stack, org_id, n)  # each answers fast first, and is measured fast
        receiver.wait_for(1, path, timeout=60)
    latency = redis.Redis.from_url(stack.settings.redis_url)
    try:
        wait_until(lambda: all(latency.hmget(f"{stack.settings.redis_prefix}:latency", hooks)),
                   30, "both webhooks to be measured fast")
    finally:
        latency.close()

    receiver.script("/slow", *[Reply(200, delay=3.0)] * 8)
    for n in range(8):
        _event(stack, SLOW, 10 + n)
    wait_until(lambda: receiver.in_flight["/slow"] >= 2, 30, "the slow webhook's requests")
    _event(stack, OTHER, 99)

    (other,) = receiver.wait_for(2, "/other", timeout=60)[1:]
    slow_answers = receiver.wait_for(1 + 8, "/slow", timeout=90)[1:]
    # The other org's event was ingested and delivered while the slow webhook's first requests
    # were still open: they held one prefork process at most (NOTIFIER_FAST_LANE_LEASES), the
    # rest of its leases went by the threads worker. Before, its fast-lane leases took both
    # prefork processes, and the other org's event waited for one of them to answer.
    assert other.at < min(answer.at for answer in slow_answers)
    assert receiver.peak["/slow"] <= 4
