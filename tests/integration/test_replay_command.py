"""``celery -A tasks replay`` as a script runs it: what it shows, asks, sends, and exits with."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update

from notifier import store
from notifier.db import Database
from notifier.models import Delivery, DeliveryStatus, Event
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Stack, create_webhook

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 51187
NOW = 10**12


@pytest.fixture
def dead(stack: Stack) -> Iterator[tuple[Database, str, list[str]]]:
    """The stack's database with a webhook and its three dead deliveries (answered 500), no
    worker: what a replay queues stays pending, as while a backlog is being sent."""
    database = Database(stack.settings.database_url)
    store.create_org(database, ORG, "org", now_ms=0)
    webhook_id, _ = create_webhook(
        database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
        org_id=ORG, name="down", url="http://127.0.0.1:9/down", event_names=["pointsIssued"],
        now_ms=0)
    ids = []
    for n in range(3):
        (queued,) = store.ingest_many(database, load_catalog(), [{
            "eventName": "pointsIssued", "eventId": f"e{n}", "orgId": ORG, "createdAt": 1,
            "data": {"customerIdentifiers": {"customerId": n}}}], now_ms=NOW + n)[0].queued
        ids.append(queued.delivery_id)
    with database.session() as session:
        session.execute(update(Delivery).values(status=DeliveryStatus.DEAD, last_status_code=500))
    yield database, webhook_id, ids
    database.dispose()


def replay(stack: Stack, *args: str, answer: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tasks", "replay", *args],
                          env=stack.env, input=answer, capture_output=True, text=True,
                          timeout=60, check=False)


def statuses(database: Database) -> dict[str, tuple[str, int | None]]:
    with database.session() as session:
        return {row.id: (row.status, row.replay_id) for row in session.execute(
            select(Delivery.id, Delivery.status, Delivery.replay_id))}


def test_a_dry_run_shows_the_count_and_a_sample_and_sends_nothing(
        stack: Stack, dead: tuple[Database, str, list[str]]) -> None:
    database, webhook_id, ids = dead

    done = replay(stack, "--webhook", webhook_id, "--status", "dead", "--response-status",
                  "5xx", "--dry-run", "--sample", "2")

    assert done.returncode == 0, done.stderr
    assert "3 deliveries match: 3 to replay" in done.stdout
    assert ids[0] in done.stdout and ids[1] in done.stdout and "and 1 more" in done.stdout
    assert set(statuses(database).values()) == {(DeliveryStatus.DEAD, None)}
    assert store.replays(database) == []


def test_it_tells_the_deliveries_whose_event_retention_emptied_from_those_queued_already(
        stack: Stack, dead: tuple[Database, str, list[str]]) -> None:
    database, webhook_id, ids = dead
    with database.session() as session:
        session.execute(update(Event).where(Event.event_id == "e0")
                        .values(payload=store.PURGED_PAYLOAD, purged_at_ms=1))
        session.execute(update(Delivery).where(Delivery.id == ids[1])
                        .values(status=DeliveryStatus.PENDING))

    done = replay(stack, "--webhook", webhook_id, "--yes")

    assert done.returncode == 0, done.stderr
    assert ("3 deliveries match: 1 to replay, 1 pending or in flight already, 1 emptied by "
            "retention (skipped)") in done.stdout
    assert "queued 1, skipped 2 (pending or in flight already, or emptied by retention)" in \
        done.stdout
    assert statuses(database)[ids[0]] == (DeliveryStatus.DEAD, None)


def test_it_asks_first_and_the_same_replay_twice_queues_nothing_twice(
        stack: Stack, dead: tuple[Database, str, list[str]]) -> None:
    database, webhook_id, _ = dead

    declined = replay(stack, "--webhook", webhook_id, answer="n\n")
    assert declined.returncode == 1 and "Replay 3 deliveries? [y/N]" in declined.stdout
    assert set(statuses(database).values()) == {(DeliveryStatus.DEAD, None)}

    accepted = replay(stack, "--webhook", webhook_id, "--since", "2001-09-09T01:46:40Z",
                      answer="y\n")
    assert accepted.returncode == 0, accepted.stderr
    (first,) = store.replays(database)
    assert f"replay {first.id}: queued 3, skipped 0" in accepted.stdout
    assert set(statuses(database).values()) == {(DeliveryStatus.PENDING, first.id)}

    again = replay(stack, "--webhook", webhook_id, "--yes")
    assert again.returncode == 0, again.stderr
    assert "queued 0" not in again.stdout and "3 pending or in flight already" in again.stdout
    assert set(statuses(database).values()) == {(DeliveryStatus.PENDING, first.id)}

    listed = subprocess.run([sys.executable, "-m", "notifier.cli", "replays", "list", "--json"],
                            env=stack.env, capture_output=True, text=True, timeout=60,
                            check=True)
    (line,) = listed.stdout.splitlines()
    assert json.loads(line) | {"createdAt": None} == {
        "replayId": first.id, "createdAt": None, "requestedBy": first.requested_by,
        "orgId": None, "queuing": False, "queued": 3, "delivered": 0, "failed": 0, "toGo": 3,
        "selection": {"webhook": webhook_id, "since": "2001-09-09T01:46:40.000Z"}}
    assert first.requested_by.endswith("(command line)")


@pytest.mark.parametrize(("args", "code", "said"), [
    (["--status", "dead", "--event-name", "tierUpgraded"], 1, "nothing matched"),
    (["msg_nope", "--yes"], 1, "not found (nothing queued): msg_nope"),
    ([], 2, "give at least one criterion"),
    (["--since", "yesterday"], 2, "--since: 'yesterday' is neither ISO 8601"),
    (["--response-status", "6xx"], 2, "--response-status: '6xx' is neither a status class"),
    (["--status", "lost"], 2, "Invalid value for '--status'"),
    (["--org", "acme"], 2, "--org: 'acme' is not an org id"),
])
def test_exit_codes_a_script_can_trust(stack: Stack, dead: tuple[Database, str, list[str]],
                                       args: list[str], code: int, said: str) -> None:
    database, _, _ = dead

    done = replay(stack, *args)

    assert done.returncode == code, (done.stdout, done.stderr)
    assert said in done.stderr
    assert set(statuses(database).values()) == {(DeliveryStatus.DEAD, None)}


def test_redis_away_is_a_service_error_and_changes_nothing(
        stack: Stack, dead: tuple[Database, str, list[str]]) -> None:
    database, webhook_id, _ = dead
    stack.env["NOTIFIER_REDIS_URL"] = "redis://127.0.0.1:9/0"

    done = replay(stack, "--webhook", webhook_id, "--yes")

    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "redis" in done.stderr.lower()
    assert set(statuses(database).values()) == {(DeliveryStatus.DEAD, None)}
    assert [made.queued for made in store.replays(database)] == [0]
