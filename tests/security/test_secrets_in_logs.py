"""Secrets never reach a log (issue 12): webhook header values, signing secrets, the API key and
the database password, through a whole run of the real stack (API, fast and slow workers, beat)
with deliveries that succeed, fail for good, are retried, and an event the schema rejects."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import requests
from sqlalchemy import make_url, select

from notifier.db import Database
from notifier.models import Delivery, DeliveryStatus
from tests.conftest import PATIENT, Receiver, Reply, Stack, wait_until
from tests.security.conftest import ORG

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

DB_PASSWORD = "db-Pa55word-7f3c9e"
HOOK_TOKEN = "hook-bearer-4b1d0c2e9a"
HOOK_CUSTOM = "custom-header-value-8e2f61"
HOOK_BASIC_PASSWORD = "basic-pw-5a7d33"
PROCESSES = ("web", "fast", "slow", "beat")


def _forms(secret: str) -> set[str]:
    """The ways a secret could show: whole, and base64 of it (how Basic auth carries it)."""
    return {secret, base64.b64encode(secret.encode()).decode()}


@pytest.fixture
def database(stack: Stack) -> Iterator[Database]:
    opened = Database(stack.settings.database_url)
    yield opened
    opened.dispose()


def _statuses(database: Database) -> dict[str, list[str]]:
    with database.session() as session:
        rows = session.execute(select(Delivery.webhook_id, Delivery.status)).all()
    seen: dict[str, list[str]] = {}
    for webhook_id, status in rows:
        seen.setdefault(webhook_id, []).append(status)
    return seen


def test_no_header_value_signing_secret_api_key_or_database_password_in_any_log(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    key = stack.org(ORG, "Secrets Org")
    # Every process of the run reaches PostgreSQL through a URL with a password (trust auth
    # ignores it): it must not be printed by any of them.
    stack.env["NOTIFIER_DATABASE_URL"] = make_url(stack.settings.database_url).set(
        password=DB_PASSWORD).render_as_string(hide_password=False)
    # None cut and sent again: it would take a scripted answer meant for the next request
    # (/flaky's retries, /bad's 400s) or the 200 that comes after them.
    stack.env.update(PATIENT)
    base = stack.web()
    stack.worker("fast", queues="notifier,notifier.deliver")
    stack.worker("slow", pool="threads", concurrency=2, queues="notifier.slow")
    stack.beat()

    bearer = {"Authorization": f"Bearer {key}"}
    basic = {"Authorization": "Basic " + base64.b64encode(f"{ORG}:{key}".encode()).decode()}
    basic_to_hook = "Basic " + base64.b64encode(f"crm:{HOOK_BASIC_PASSWORD}".encode()).decode()
    secrets = {key, DB_PASSWORD, HOOK_TOKEN, HOOK_CUSTOM, HOOK_BASIC_PASSWORD, basic_to_hook,
               basic["Authorization"].split()[1]}
    hooks = {}
    for path, auth in (("/ok", f"Bearer {HOOK_TOKEN}"), ("/bad", basic_to_hook),
                       ("/flaky", f"Bearer {HOOK_TOKEN}")):
        created = requests.post(f"{base}/v3/webHooks", headers=bearer, timeout=10, json={
            "name": path.strip("/"), "webHookUrl": receiver.url(path),
            "eventNames": ["pointsIssued"], "maxAllowedConnections": 2,
            "webHookHeaders": {"Authorization": auth, "X-Partner-Token": HOOK_CUSTOM}})
        assert created.status_code == 201, created.text
        data = created.json()["data"]
        hooks[path] = data["webHookId"]
        secrets.add(data["signingSecret"])
        secrets.add(data["signingSecret"].removeprefix("whsec_"))
        read = requests.get(f"{base}/v3/webHooks/{data['webHookId']}", headers=basic, timeout=10)
        assert read.status_code == 200, read.text
        assert HOOK_CUSTOM not in read.text  # shown masked, as before
    receiver.script("/bad", *[Reply(400)] * 3)
    receiver.script("/flaky", Reply(503), Reply(500))

    events = [{"eventName": "pointsIssued",
               "data": {"customerIdentifiers": {"customerId": n}, "totalPointsIssued": 5}}
              for n in (1, 2, 3)]
    accepted = requests.post(f"{base}/v3/events", headers=basic, json=events, timeout=10)
    assert accepted.status_code == 202, accepted.text
    rejected = requests.post(f"{base}/v3/events", headers=bearer, timeout=10, json={
        "eventName": "pointsIssued", "data": {"customerIdentifiers": {"customerId": "x"}}})
    assert rejected.status_code == 400, rejected.text

    def finished() -> bool:
        statuses = _statuses(database)
        return (statuses.get(hooks["/ok"]) == [DeliveryStatus.DELIVERED] * 3
                and statuses.get(hooks["/bad"]) == [DeliveryStatus.FAILED] * 3
                and statuses.get(hooks["/flaky"]) == [DeliveryStatus.DELIVERED] * 3)

    wait_until(finished, 90, "3 delivered to /ok and /flaky, 3 failed for good at /bad")
    flaky = receiver.at("/flaky")
    assert len(flaky) == 5  # two 5xx answers were retried
    # The secrets did travel where they belong: to the receiver, and signed with.
    assert {r.headers["x-partner-token"] for r in flaky} == {HOOK_CUSTOM}
    assert {r.headers["authorization"] for r in receiver.at("/bad")} == {basic_to_hook}
    assert all(json.loads(r.body)["eventName"] == "pointsIssued" for r in flaky)

    stack.stop()  # every process's output flushed and closed
    logs = {name: stack.log(name) for name in PROCESSES}
    assert all(logs.values()), "a process logged nothing at all"
    assert "notifier.deliver" in logs["fast"] and "notifier.sweep" in logs["fast"]
    leaks = [(name, form) for name, text in logs.items()
             for secret in secrets for form in _forms(secret) if form in text]
    assert leaks == [], f"secrets in logs: {leaks}"
