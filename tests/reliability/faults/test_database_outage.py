"""The database away, the API honest (issue 13's fault table): while PostgreSQL is unreachable,
refusing or silent, ``POST /v3/events`` answers 503 within 5 s with a clear error and no
exception text; once it is back the API recovers by itself and what was accepted is delivered."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from sqlalchemy import make_url

from notifier.db import Database
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Receiver, Stack, create_webhook, wait_until
from tests.integration.test_pipeline import Gate
from tests.reliability.faults.conftest import settle

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 1301
CAP = 2
# Fragments of what the driver says when it cannot connect: none may reach the API's answer.
EXCEPTION_TEXT = ("127.0.0.1", "psycopg", "OperationalError", "failed:", "refused",
                  "server closed", "timeout expired")


def _events(first: int, count: int) -> list[dict[str, Any]]:
    return [{"eventName": "pointsIssued",
             "data": {"customerIdentifiers": {"customerId": n}, "totalPointsIssued": 1}}
            for n in range(first, first + count)]


def _post(base: str, key: str, events: list[dict[str, Any]]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    answer = requests.post(f"{base}/v3/events", json=events, timeout=60,
                           headers={"Authorization": f"Bearer {key}"})
    return answer, time.monotonic() - started


def _assert_unavailable(answer: requests.Response, took: float, gate: Gate) -> None:
    assert answer.status_code == 503 and took < 5, (answer.status_code, took, answer.text)
    (error,) = answer.json()["errors"]
    assert error["code"] == "UNAVAILABLE" and "database" in error["message"], error
    assert not [t for t in (*EXCEPTION_TEXT, str(gate.port)) if t in error["message"]], error


def test_events_posted_while_the_database_is_away_get_503_in_time_and_the_rest_is_delivered(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    key = stack.org(ORG, "Outage Org")
    create_webhook(database, load_catalog(),
                         vault_for(stack.settings.secret_keys, stack.settings.data_dir),
                         org_id=ORG, name="outage", url=receiver.url("/outage"),
                         event_names=["pointsIssued"], max_allowed_connections=CAP, now_ms=0)
    url = make_url(stack.settings.database_url)
    gate = Gate(url.host or "127.0.0.1", url.port or 5432)
    try:
        gate.open()
        stack.env["NOTIFIER_DATABASE_URL"] = url.set(
            host="127.0.0.1", port=gate.port).render_as_string(hide_password=False)
        base = stack.web()
        stack.worker("w1")
        stack.beat()
        receiver.hold("/outage", 0.2)  # deliveries still under way when the database goes
        accepted, _ = _post(base, key, _events(0, 30))
        assert accepted.status_code == 202, accepted.text
        due = {e["eventId"] for e in accepted.json()["data"]}
        receiver.wait_for(3, "/outage", timeout=60)

        # Refused: every connection cut, new ones closed at once.
        gate.shut()
        for _ in range(3):
            _assert_unavailable(*_post(base, key, _events(100, 1)), gate)
        # Silent: new connections held open, nothing answers; concurrent callers all the same.
        gate.stall()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda n: _post(base, key, _events(200 + n, 1)), range(8)))
        for answer, took in answers:
            _assert_unavailable(answer, took, gate)
        slowest = max(took for _, took in answers)

        gate.open()
        back = time.monotonic()
        recovered = wait_until(lambda: (a := _post(base, key, _events(300, 5))[0]).status_code
                               == 202 and a, 60, "the API to accept events again")
        took_to_recover = time.monotonic() - back
        due |= {e["eventId"] for e in recovered.json()["data"]}
        line, _duplicates = settle(receiver, database, {"/outage": CAP}, due)
        print(f"database outage: {line}; 503 at most {slowest:.1f}s after the call while silent; "
              f"API back {took_to_recover:.1f}s after the database")
    finally:
        gate.close()
