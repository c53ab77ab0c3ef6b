"""Delivery SLA through the real path: a worker, beat's SLA check, a receiver on 127.0.0.1, and
what they recorded (the deliveries' rows, ``/metrics``, the consumer-group metrics API).

A breach is stamped by whichever comes first, beat's check while the request is still open or
the attempt that ends late, and counted once either way."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from notifier import publish
from notifier.db import Database
from notifier.models import Delivery, DeliveryStatus, Webhook
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import PATIENT, Receiver, Reply, Stack, create_webhook, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 51315


@pytest.fixture
def stack_env(stack_env: dict[str, str]) -> dict[str, str]:
    """The shared fast settings, with deadlines that let a request stay open for seconds (and a
    slot lease above the delivery task's limit they make), and beat's SLA check at its
    default interval."""
    stack_env.update(PATIENT)
    del stack_env["NOTIFIER_SLA_CHECK_INTERVAL"]
    return stack_env


@pytest.fixture
def api_key(stack: Stack, database: Database) -> str:
    return stack.org(ORG)


def hook(stack: Stack, database: Database, receiver: Receiver, path: str,
         sla_in_seconds: int) -> str:
    webhook_id, _ = create_webhook(
        database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
        org_id=ORG, name=path.strip("/"), url=receiver.url(path), event_names=["pointsIssued"],
        now_ms=0, sla_in_seconds=sla_in_seconds)
    return webhook_id


def send(stack: Stack) -> str:
    return publish("pointsIssued", {"customerIdentifiers": {"customerId": 1}}, org_id=ORG,
                   broker_url=stack.settings.broker_url)


def delivery_of(database: Database, webhook_id: str) -> Delivery | None:
    with database.session() as session:
        return session.query(Delivery).filter_by(webhook_id=webhook_id).one_or_none()


def scraped(base: str, name: str) -> float:
    """The sum of the samples named ``name`` that ``/metrics`` serves."""
    response = requests.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200
    return sum(sample.value for family in text_string_to_metric_families(response.text)
               for sample in family.samples if sample.name == name)


def breaches_counted(base: str) -> float:
    return scraped(base, "notifier_sla_breaches_total")


def checks_done(stack: Stack) -> int:
    """How many of beat's SLA checks the worker finished (its log says each)."""
    return len(re.findall(r"Task notifier\.check_sla\[[^]]*\] succeeded", stack.log("w1")))


def test_a_late_finish_is_counted_once_and_beat_does_not_count_it_again(
        stack: Stack, receiver: Receiver, database: Database, api_key: str) -> None:
    webhook_id = hook(stack, database, receiver, "/late", sla_in_seconds=1)
    receiver.script("/late", Reply(200, delay=3))
    stack.worker()
    base = stack.web()

    send(stack)  # no beat yet: only the attempt's end can find the breach

    done = wait_until(lambda: (d := delivery_of(database, webhook_id)) is not None
                      and d.status == DeliveryStatus.DELIVERED and d, 60, "the late delivery")
    assert done.sla_breach_at_ms == done.ingested_at_ms + 1000
    assert done.ended_at_ms is not None and done.ended_at_ms - done.ingested_at_ms >= 3000
    wait_until(lambda: breaches_counted(base) == 1, 30, "the late finish's breach counted")

    stack.beat()
    wait_until(lambda: checks_done(stack) >= 2, 30, "beat's SLA check to run twice")
    assert breaches_counted(base) == 1


def group_metrics(base: str, api_key: str, database: Database, webhook_id: str) -> Any:
    """The consumer-group metrics API's answer for the webhook (the last 30 days)."""
    with database.session() as session:
        group = session.get(Webhook, webhook_id).consumer_group_id  # type: ignore[union-attr]
    response = requests.get(f"{base}/v3/events/consumer-groups/{group}/metrics",
                            headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_beat_stamps_a_breach_while_the_request_is_open_and_counts_it_once(
        stack: Stack, receiver: Receiver, database: Database, api_key: str) -> None:
    late = hook(stack, database, receiver, "/slow", sla_in_seconds=1)
    met = hook(stack, database, receiver, "/fast", sla_in_seconds=3600)
    answer = receiver.gate("/slow")  # held open (4 s at least) until the breach was seen
    receiver.script("/slow", Reply(200, delay=4))
    stack.worker()
    stack.beat()
    base = stack.web()
    interval_ms = stack.settings.sla_check_interval * 1000
    assert interval_ms == 5000  # the default

    send(stack)  # to both webhooks

    def stamped() -> Delivery | None:
        delivery = delivery_of(database, late)
        return delivery if delivery is not None and delivery.sla_breach_at_ms else None

    breached = wait_until(stamped, 30, "beat to stamp the breach")
    seen_ms = time.time_ns() // 1_000_000
    assert breached.sla_breach_at_ms == breached.ingested_at_ms + 1000
    # The request is still open: sent, unanswered, no attempt recorded.
    assert breached.status == DeliveryStatus.IN_FLIGHT and breached.attempt_count == 0
    assert receiver.in_flight["/slow"] == 1 and receiver.at("/slow") == []
    lag = seen_ms - breached.sla_breach_at_ms
    print(f"\nbreach seen {lag} ms after it happened (beat checks every {interval_ms:g} ms)")
    # Within one interval, and the beat message's trip to a worker (and this poll).
    assert lag <= interval_ms + 1000

    answer.set()
    done = wait_until(lambda: (d := delivery_of(database, late)) is not None
                      and d.status == DeliveryStatus.DELIVERED and d, 30, "the late answer")
    assert done.sla_breach_at_ms == breached.sla_breach_at_ms
    assert done.ended_at_ms is not None and done.ended_at_ms - done.ingested_at_ms >= 4000
    on_time = wait_until(lambda: (d := delivery_of(database, met)) is not None
                         and d.status == DeliveryStatus.DELIVERED and d, 30, "the other one")
    assert on_time.sla_breach_at_ms is None and on_time.sla_due_at_ms is None

    # Counted once: by beat; neither the late finish nor the checks since count it again.
    checks = checks_done(stack)
    wait_until(lambda: checks_done(stack) >= checks + 1, 30, "another SLA check")
    wait_until(lambda: scraped(base, "notifier_delivery_attempts_total") == 2, 30,
               "both attempts counted")
    assert scraped(base, "notifier_sla_breaches_total") == 1
    assert {k: v for k, v in group_metrics(base, api_key, database, late).items()
            if k.startswith("sla")} == {
        "slaBreachedEvents": 1, "slaMetEvents": 0, "slaMetPercent": 0.0}
    assert {k: v for k, v in group_metrics(base, api_key, database, met).items()
            if k.startswith("sla")} == {
        "slaBreachedEvents": 0, "slaMetEvents": 1, "slaMetPercent": 100.0}
