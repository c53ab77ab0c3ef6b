"""What a reliability test ends on: every due delivery arrived, duplicates counted, none left
open, and the receiver never saw more requests at once than the webhook's cap."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from notifier import publish, store
from notifier.db import Database
from notifier.models import FINAL_STATUSES, Delivery, Event
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import REDIS_URL, Receiver, Stack, wait_until

ORG = 61_013


@pytest.fixture
def database(stack: Stack) -> Iterator[Database]:
    """The stack's database, with the test org in it."""
    opened = Database(stack.settings.database_url)
    store.create_org(opened, ORG, "reliability org", now_ms=0)
    yield opened
    opened.dispose()


@pytest.fixture
def restart_redis(redis_base: tuple[str, str]) -> Callable[[], None]:
    """Restart the test Redis server on its loopback port, losing what it held unless it
    persists it, and start it again as it was started (its binary, address, folder, log and
    persistence options). Anything else using that server sees it go away for a moment."""
    if not redis_base[0].startswith("redis://127.0.0.1:"):
        pytest.skip("only a Redis server of its own on 127.0.0.1 is restarted by a test")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, decode_responses=True)
    server = client.info("server")
    port = str(server["tcp_port"])
    # Started again with the options it runs with (a fresh one has no data: it lost its state).
    options = []
    for name in ("bind", "dir", "logfile", "save", "appendonly"):
        options += [f"--{name}", client.config_get(name)[name]]
    client.close()

    def up() -> bool:
        try:
            return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
        except redis.exceptions.ConnectionError:
            return False

    def restart() -> None:
        # SHUTDOWN NOSAVE closes the connection that sends it, as it should.
        subprocess.run(["redis-cli", "-p", port, "shutdown", "nosave"], check=False,
                       capture_output=True, timeout=30)
        wait_until(lambda: not up(), 30, "Redis to stop")
        subprocess.run([server["executable"], "--daemonize", "yes", "--port", port, *options],
                       check=True, timeout=30)
        wait_until(up, 30, "Redis to start again")

    return restart


def hook(stack: Stack, database: Database, receiver: Receiver, path: str, *,
         cap: int) -> str:
    """A webhook of the test org on ``receiver``'s ``path``, taking ``cap`` connections."""
    webhook_id, _ = store.create_webhook(
        database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
        org_id=ORG, name=path.strip("/"), url=receiver.url(path), event_names=["pointsIssued"],
        now_ms=0, max_allowed_connections=cap)
    return webhook_id


def publish_events(stack: Stack, count: int) -> set[str]:
    """``count`` pointsIssued events of the test org; returns their eventIds."""
    return {publish("pointsIssued", {"customerIdentifiers": {"customerId": n},
                                     "totalPointsIssued": 10},
                    org_id=ORG, broker_url=stack.settings.broker_url) for n in range(count)}


def stored_events(database: Database) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).select_from(Event)) or 0)


def open_deliveries(database: Database) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).select_from(Delivery)
                                  .where(Delivery.status.not_in(FINAL_STATUSES))) or 0)


@dataclass(frozen=True)
class Outcome:
    due: int
    arrived: int
    duplicates: int
    left_open: int
    peak: int
    cap: int
    # From the fault until every due delivery arrived and none was left open.
    settled_s: float

    def __str__(self) -> str:
        return (f"{self.arrived} of {self.due} due arrived, {self.duplicates} duplicates, "
                f"{self.left_open} left open, peak {self.peak} (cap {self.cap}), "
                f"settled {self.settled_s:.1f} s after the fault")


def settle(stack: Stack, receiver: Receiver, database: Database, path: str, sent: set[str], *,
           cap: int, fault_at: float, timeout: float = 150) -> Outcome:
    """Wait until every event of ``sent`` arrived at ``path`` and no delivery is left open, then
    say what the receiver saw. Duplicates carry the same ``webhook-id`` as their first.
    ``fault_at``: when the fault was made (``time.monotonic()``)."""
    receiver.wait_for(len(sent), path, timeout=timeout, unique=True)
    wait_until(lambda: open_deliveries(database) == 0, 60, "every delivery in a final state")
    settled_s = time.monotonic() - fault_at
    with receiver.lock:
        got = [r for r in receiver.requests if r.path == path]
        peak, still_open = receiver.peak[path], receiver.in_flight[path]
    events = {json.loads(r.body)["eventId"] for r in got}
    assert events == sent, f"{len(sent - events)} never arrived, {len(events - sent)} unknown"
    by_id: dict[str, Any] = {}
    for r in got:  # a duplicate is the same delivery (webhook-id) of the same event again
        assert by_id.setdefault(r.headers["webhook-id"], json.loads(r.body)["eventId"]) == (
            json.loads(r.body)["eventId"])
    outcome = Outcome(len(sent), len(by_id), len(got) - len(by_id),
                      open_deliveries(database) + still_open, peak, cap, settled_s)
    print(outcome)  # the figures of the fault table (pytest -s)
    return outcome
