"""Poison events end with a recorded reason, never in a loop (issue 13, item 1), through
real worker processes, PostgreSQL, Redis and a real receiver on 127.0.0.1."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from notifier import tenants
from notifier.db import Database
from notifier.models import DeliveryStatus, EventStatus
from tests.conftest import Receiver, Stack, wait_until
from tests.reliability.conftest import (
    ORG,
    assert_nothing_open,
    customer,
    deliveries,
    event_row,
    send,
)

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def _cli(stack: Stack, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "notifier.cli", *args], env=stack.env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _listed(stack: Stack) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _cli(stack, "dead-letters", "list").splitlines()
            if line.strip()]


def _gauge(base: str, name: str) -> float:
    response = requests.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200
    return next(sample.value for family in text_string_to_metric_families(response.text)
                for sample in family.samples if sample.name == name)


def test_a_nan_event_from_the_broker_is_stored_rejected_naming_its_path(
        stack: Stack, receiver: Receiver, database: Database, hook: Callable[..., str]) -> None:
    hook("/nan")
    stack.worker()

    poisoned = send(stack, customer(1, totalPointsIssued=math.nan))
    healthy = send(stack, customer(2))

    (got,) = receiver.wait_for(1, "/nan", timeout=30)
    assert json.loads(got.body)["eventId"] == healthy
    row = wait_until(lambda: event_row(database, poisoned), 30, "the NaN event's row")
    assert row.status == EventStatus.REJECTED
    assert row.error_path == "$.data.totalPointsIssued"
    assert "NaN" in (row.error_message or "")
    wait_until(lambda: [d.status for d in deliveries(database)] == [DeliveryStatus.DELIVERED],
               30, "the healthy event's delivery recorded")
    assert_nothing_open(database)


def test_non_finite_numbers_posted_are_answered_400_naming_their_path(
        stack: Stack, receiver: Receiver, database: Database, hook: Callable[..., str]) -> None:
    hook("/posted")
    stack.worker()
    base = stack.web()
    key = tenants.create_key(database, ORG, now_ms=0)
    good = '{"eventName": "pointsIssued", "data": {"customerIdentifiers": {"customerId": 3}}}'
    body = ('[{"eventName": "pointsIssued", "data": {"customerIdentifiers": {"customerId": 1},'
            ' "totalPointsIssued": NaN}},'
            ' {"eventName": "pointsIssued", "data": {"customerIdentifiers": {"customerId": 2},'
            ' "extra": [1, -Infinity]}}, ' + good + ']')

    response = requests.post(f"{base}/v3/events", data=body, timeout=30, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})

    assert response.status_code == 400, response.text
    errors = response.json()["errors"]
    assert [e["field"] for e in errors] == ["[0]$.data.totalPointsIssued", "[1]$.data.extra[1]"]
    accepted = [r["status"] for r in response.json()["data"]]
    assert accepted == [EventStatus.REJECTED, EventStatus.REJECTED, EventStatus.DISPATCHED]
    receiver.wait_for(1, "/posted", timeout=30)
    wait_until(lambda: [d.status for d in deliveries(database)] == [DeliveryStatus.DELIVERED],
               30, "the good event's delivery recorded")
    assert_nothing_open(database)


def test_an_event_the_database_refuses_is_stored_rejected_with_the_reason(
        stack: Stack, receiver: Receiver, database: Database, hook: Callable[..., str],
        refuse_poison: Callable[[str, str], None]) -> None:
    hook("/refused")
    refuse_poison("22023", "dispatched")  # invalid_parameter_value: a DataError, not NaN
    stack.worker()

    poisoned = send(stack, customer(1, poison=True))
    healthy = send(stack, customer(2))

    (got,) = receiver.wait_for(1, "/refused", timeout=30)
    assert json.loads(got.body)["eventId"] == healthy
    row = wait_until(lambda: event_row(database, poisoned), 30, "the refused event's row")
    assert row.status == EventStatus.REJECTED
    assert "refused by the test trigger" in (row.error_message or "")
    assert "22023" in (row.error_message or "")
    wait_until(lambda: [d.status for d in deliveries(database)] == [DeliveryStatus.DELIVERED],
               30, "the healthy event's delivery recorded")
    assert_nothing_open(database)


def test_an_event_the_database_refuses_when_posted_is_kept_rejected_and_answered_400(
        stack: Stack, receiver: Receiver, database: Database, hook: Callable[..., str],
        refuse_poison: Callable[[str, str], None]) -> None:
    hook("/posted-refused")
    refuse_poison("22023", "dispatched")
    stack.worker()
    base = stack.web()
    key = tenants.create_key(database, ORG, now_ms=0)

    response = requests.post(f"{base}/v3/events", timeout=30, headers={
        "Authorization": f"Bearer {key}"}, json=[
            {"eventName": "pointsIssued", "eventId": "refused-1", "data": customer(1, poison=1)},
            {"eventName": "pointsIssued", "eventId": "fine-2", "data": customer(2)}])

    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "NOT_STORED" and "refused by the test trigger" in error["message"]
    assert [r["status"] for r in response.json()["data"]] == [EventStatus.REJECTED,
                                                               EventStatus.DISPATCHED]
    row = event_row(database, "refused-1")
    assert row is not None and row.status == EventStatus.REJECTED
    assert "22023" in (row.error_message or "")
    (got,) = receiver.wait_for(1, "/posted-refused", timeout=30)
    assert json.loads(got.body)["eventId"] == "fine-2"
    wait_until(lambda: [d.status for d in deliveries(database)] == [DeliveryStatus.DELIVERED],
               30, "the good event's delivery recorded")
    assert_nothing_open(database)


def test_an_event_refused_even_as_rejected_is_dead_lettered_listed_counted_and_replayed(
        stack: Stack, receiver: Receiver, database: Database, hook: Callable[..., str],
        refuse_poison: Any) -> None:
    hook("/after")
    refuse_poison("22023", "all")
    stack.worker()
    base = stack.web()

    poisoned = send(stack, customer(1, poison=True))

    (letter,) = wait_until(lambda: _listed(stack), 30, "a dead letter listed")
    assert letter["eventId"] == poisoned
    assert "refused by the test trigger" in letter["reason"]
    assert event_row(database, poisoned) is None
    assert _gauge(base, "notifier_dead_letters") == 1

    refuse_poison.lift()  # the cause is fixed
    _cli(stack, "dead-letters", "replay", str(letter["id"]))

    (got,) = receiver.wait_for(1, "/after", timeout=30)
    assert json.loads(got.body)["eventId"] == poisoned
    wait_until(lambda: [d.status for d in deliveries(database)] == [DeliveryStatus.DELIVERED],
               30, "the replayed event's delivery recorded")
    assert _listed(stack) == []
    assert _gauge(base, "notifier_dead_letters") == 0
    assert_nothing_open(database)


def test_an_event_still_failing_transiently_past_the_horizon_is_dead_lettered(
        stack: Stack, receiver: Receiver, database: Database, hook: Callable[..., str],
        refuse_poison: Callable[[str, str], None]) -> None:
    hook("/horizon")
    refuse_poison("40001", "all")  # serialization_failure: transient, yet every time
    stack.env["NOTIFIER_INGEST_RETRY_HORIZON"] = "3"
    stack.worker()

    stuck = send(stack, customer(1, poison=True))
    healthy = send(stack, customer(2))

    (got,) = receiver.wait_for(1, "/horizon", timeout=30)
    assert json.loads(got.body)["eventId"] == healthy
    (letter,) = wait_until(lambda: _listed(stack), 40, "a dead letter listed")
    assert letter["eventId"] == stuck
    assert "40001" in letter["reason"] and "NOTIFIER_INGEST_RETRY_HORIZON" in letter["reason"]
    assert event_row(database, stuck) is None
    wait_until(lambda: [d.status for d in deliveries(database)] == [DeliveryStatus.DELIVERED],
               30, "the healthy event's delivery recorded")
    assert_nothing_open(database)
