"""Fixtures of the fault-table tests (issue 13): the stack's database, and the one closing check
every row of the table ends with: all due arrived, duplicates counted, none left open, the cap."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import pytest
from sqlalchemy import func, select

from notifier import publish, store
from notifier.db import Database
from notifier.models import FINAL_STATUSES, Delivery
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Received, Receiver, Stack, create_webhook, wait_until


@pytest.fixture
def database(stack: Stack) -> Iterator[Database]:
    """The stack's database, reached directly (never through a test's gate)."""
    opened = Database(stack.settings.database_url)
    yield opened
    opened.dispose()


def make_webhooks(stack: Stack, receiver: Receiver, database: Database, org_id: int,
                  caps: Mapping[str, int]) -> None:
    """An org and, for each path of ``caps``, a webhook of it on the receiver's path with that
    cap, subscribed to pointsIssued."""
    store.create_org(database, org_id, f"org {org_id}", now_ms=0)
    vault = vault_for(stack.settings.secret_keys, stack.settings.data_dir)
    for path, cap in caps.items():
        create_webhook(database, load_catalog(), vault, org_id=org_id,
                             name=path.strip("/"), url=receiver.url(path),
                             event_names=["pointsIssued"], max_allowed_connections=cap, now_ms=0)


def publish_points(stack: Stack, org_id: int, first: int, count: int) -> set[str]:
    """Publish ``count`` pointsIssued events of ``org_id`` through the broker; their eventIds."""
    return {publish("pointsIssued", {"customerIdentifiers": {"customerId": n},
                                     "totalPointsIssued": 1},
                    org_id=org_id, broker_url=stack.settings.broker_url)
            for n in range(first, first + count)}


def _open_deliveries(database: Database) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.status.not_in([str(s) for s in FINAL_STATUSES]))) or 0)


def settle(receiver: Receiver, database: Database, paths: dict[str, int], due: set[str],
           timeout: float = 120) -> tuple[str, int]:
    """Wait until every event id of ``due`` has been answered 2xx at every path of ``paths``
    (each with its cap) and no delivery is left open; assert the cap held; return the fault
    table's line and the number of duplicates: 2xx answers beyond one per ``webhook-id`` (a
    retry after an error answer is no duplicate)."""
    expected = len(due) * len(paths)

    def answered() -> list[Received]:
        return [r for path in paths for r in receiver.at(path) if 200 <= r.status < 300]

    def arrived() -> set[tuple[str, str]]:
        return {(r.path, json.loads(r.body)["eventId"]) for r in answered()}

    wait_until(lambda: len(arrived()) >= expected, timeout,
               f"{expected} deliveries to arrive at {sorted(paths)}")
    assert {event for _, event in arrived()} == due
    wait_until(lambda: _open_deliveries(database) == 0, 60, "no delivery left open")
    delivered = answered()
    duplicates = len(delivered) - len({r.headers["webhook-id"] for r in delivered})
    peaks = {path: receiver.peak[path] for path in paths}
    assert all(peaks[path] <= cap for path, cap in paths.items()), (peaks, paths)
    return (f"all {expected} due arrived, {duplicates} duplicates, none left open, "
            f"peak {max(peaks.values())} <= cap {max(paths.values())}"), duplicates
