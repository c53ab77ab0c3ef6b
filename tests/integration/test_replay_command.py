"""``celery -A tasks replay`` as a script runs it: what it shows, asks, sends, and exits with."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterable, Iterator

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
    yield database, webhook_id, dead_deliveries(database, range(3))
    database.dispose()


def dead_deliveries(database: Database, numbers: Iterable[int]) -> list[str]:
    """The ids of a delivery each of events ``e{number}``, made dead (answered 500)."""
    ids = []
    for n in numbers:
        (queued,) = store.ingest_many(database, load_catalog(), [{
            "eventName": "pointsIssued", "eventId": f"e{n}", "orgId": ORG, "createdAt": 1,
            "data": {"customerIdentifiers": {"customerId": n}}}], now_ms=NOW + n)[0].queued
        ids.append(queued.delivery_id)
    with database.session() as session:
        session.execute(update(Delivery).where(Delivery.id.in_(ids))
                        .values(status=DeliveryStatus.DEAD, last_status_code=500))
    return ids


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


def test_the_ids_found_are_queued_and_those_not_found_named_with_exit_1(
        stack: Stack, dead: tuple[Database, str, list[str]]) -> None:
    database, _, ids = dead
    missing = [f"msg_nope{n}" for n in range(7)]
    named = "not found 7: msg_nope0, msg_nope1, msg_nope2, msg_nope3, msg_nope4 and 2 more"

    looked = replay(stack, ids[0], ids[1], *missing, "--dry-run")

    assert looked.returncode == 1, (looked.stdout, looked.stderr)
    assert "2 deliveries match: 2 to replay" in looked.stdout and named in looked.stderr
    assert set(statuses(database).values()) == {(DeliveryStatus.DEAD, None)}

    done = replay(stack, ids[0], ids[1], *missing, answer="y\n")

    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Replay 2 deliveries? [y/N]" in done.stdout
    (made,) = store.replays(database)
    assert f"replay {made.id}: queued 2, skipped 0 (pending or in flight already), {named}" \
        in done.stdout
    assert statuses(database) == {ids[0]: (DeliveryStatus.PENDING, made.id),
                                  ids[1]: (DeliveryStatus.PENDING, made.id),
                                  ids[2]: (DeliveryStatus.DEAD, None)}


def test_a_real_run_shows_its_progress_on_stderr_and_its_summary_on_stdout(
        stack: Stack, dead: tuple[Database, str, list[str]]) -> None:
    database, webhook_id, ids = dead
    ids += dead_deliveries(database, range(3, 25))
    # stderr on a terminal, as the operator's: click draws no bar into a pipe.
    screen, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tasks", "replay", "--webhook", webhook_id,
             "--yes"], env=stack.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=terminal, text=True, timeout=60, check=False)
    finally:
        os.close(terminal)
    shown = read_all(screen)

    assert done.returncode == 0, (done.stdout, shown)
    assert "replaying" in shown and "100%" in shown
    (made,) = store.replays(database)
    assert done.stdout.splitlines()[-1] == (
        f"replay {made.id}: queued 25, skipped 0 (pending or in flight already), not found 0")
    assert "replaying" not in done.stdout
    assert set(statuses(database).values()) == {(DeliveryStatus.PENDING, made.id)}
    assert set(statuses(database)) == set(ids)


def read_all(screen: int) -> str:
    """What was written to a terminal whose other end is closed."""
    chunks = []
    with os.fdopen(screen, "rb", buffering=0) as reading:
        while True:
            try:
                chunk = reading.read(4096)
            except OSError:  # EIO: the other end is closed and everything read
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode()


def test_help_states_the_exit_codes(stack: Stack) -> None:
    shown = replay(stack, "--help")

    assert shown.returncode == 0, shown.stderr
    assert """Exit codes:
    0  done: every delivery named found, the matching ones queued (those queued
       already skipped); with --dry-run, shown
    1  nothing matched, or a delivery id named is no delivery (those found are
       queued all the same), or the question was answered no
    2  bad usage: a missing criterion or a bad option, named
    3  the database or Redis did not answer: run it again (a replay skips what
       it queued already)""" in shown.stdout


@pytest.mark.parametrize(("args", "code", "said"), [
    (["--status", "dead", "--event-name", "tierUpgraded"], 1, "nothing matched"),
    (["msg_nope", "--yes"], 1, "not found 1: msg_nope"),
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
