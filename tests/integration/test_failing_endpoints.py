"""Failing endpoints through the real path (publish -> broker -> worker -> HTTP receiver on
127.0.0.1): a receiver answering 410 Gone deactivates its webhook at once; a receiver that
always fails opens its webhook's circuit breaker, which pauses its queue (probes only) while a
healthy webhook beside it keeps delivering; mended, it gets the rest. And the worker's JSON log
line per attempt."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from notifier import alerts, publish, store, tenants
from notifier.db import Database
from notifier.models import DeliveryStatus
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import PATIENT, Receiver, Stack, create_webhook, wait_until
from tests.integration.test_pipeline import attempts_of, deliveries

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 51187


@pytest.fixture
def database(database: Database) -> Database:
    """The stack's database (tests/conftest.py), with the test org in it."""
    store.create_org(database, ORG, "test org", now_ms=0)
    return database


def hook(stack: Stack, database: Database, receiver: Receiver, path: str, *,
         limit: int = 1, headers: dict[str, str] | None = None) -> str:
    webhook_id, _ = create_webhook(
        database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
        org_id=ORG, name=path.strip("/"), url=receiver.url(path), event_names=["pointsIssued"],
        now_ms=0, max_allowed_connections=limit, headers=headers)
    return webhook_id


def operations(stack: Stack, database: Database, receiver: Receiver) -> str:
    """The org's operations webhook, hearing every alert kind, at /ops."""
    webhook_id, _ = create_webhook(
        database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
        org_id=ORG, name="ops", url=receiver.url("/ops"), event_names=sorted(alerts.KINDS),
        now_ms=0)
    alerts.set_operations_webhook(database, ORG, webhook_id)
    return webhook_id


def alerted(receiver: Receiver) -> list[tuple[str, str]]:
    """(kind, webhook) of each alert /ops got."""
    return [(body["eventName"], body["data"]["webHookId"])
            for body in (json.loads(r.body) for r in receiver.at("/ops"))]


def send(stack: Stack, n: int) -> str:
    return publish("pointsIssued", {"customerIdentifiers": {"customerId": n},
                                    "totalPointsIssued": 10},
                   org_id=ORG, broker_url=stack.settings.broker_url)


class Api:
    def __init__(self, base: str, key: str) -> None:
        self.base, self.key = base, key

    def webhook(self, webhook_id: str) -> dict[str, Any]:
        response = requests.get(f"{self.base}/v3/webHooks/{webhook_id}", timeout=30,
                                headers={"Authorization": f"Bearer {self.key}"})
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()["data"]
        return data

    def breakers(self) -> dict[str, float]:
        text = requests.get(f"{self.base}/metrics", timeout=30).text
        (family,) = [f for f in text_string_to_metric_families(text)
                     if f.name == "notifier_circuit_breakers"]
        return {sample.labels["state"]: sample.value for sample in family.samples}


def api(stack: Stack, database: Database) -> Api:
    return Api(stack.web(), tenants.create_key(database, ORG, now_ms=0))


def test_a_receiver_answering_410_gone_deactivates_its_webhook_after_one_attempt(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    gone = hook(stack, database, receiver, "/gone")
    operations(stack, database, receiver)
    receiver.script("/gone", *[410] * 10)
    stack.worker()
    stack.beat()
    client = api(stack, database)

    for n in range(3):
        send(stack, n)

    wait_until(lambda: not client.webhook(gone)["active"], 30, "/gone inactive")
    reason = client.webhook(gone)["disabledReason"]
    assert reason.startswith("deactivated by notifier: its endpoint answered 410 Gone")
    # Every delivery held (none failed or retried): the one answered 410 after its one
    # attempt, the others without a request; activation with deliverHeld, or a replay, sends
    # them all.
    held = wait_until(lambda: len(found := deliveries(database, webhook_id=gone,
                                                      status=DeliveryStatus.HELD)) == 3 and found,
                      30, "three held")
    answered = [a for d in held for a in attempts_of(database, d.id) if a.status_code is not None]
    assert [(a.status_code, a.outcome) for a in answered] == [(410, DeliveryStatus.HELD)]
    assert len(receiver.at("/gone")) == 1
    time.sleep(1)  # a moment for a stray retry, which must not come (3 beat sweeps)
    assert len(receiver.at("/gone")) == 1
    assert f"webhook {gone} deactivated by notifier: its endpoint answered 410 Gone" in \
        stack.log("w1")
    # Told once, with the reason.
    receiver.wait_for(1, "/ops", timeout=30)
    assert alerted(receiver) == [("webhookDisabled", gone)]
    assert json.loads(receiver.at("/ops")[0].body)["data"]["reason"] == reason


COOLDOWN = 0.5
COOLDOWN_MAX = 1.0


def test_a_dead_endpoint_opens_its_breaker_and_gets_probes_only_until_it_recovers(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    stack.env.update({"NOTIFIER_BREAKER_FAILURES": "3",
                      "NOTIFIER_BREAKER_COOLDOWN": str(COOLDOWN),
                      "NOTIFIER_BREAKER_COOLDOWN_MAX": str(COOLDOWN_MAX),
                      "NOTIFIER_DISABLE_FAILING_AFTER": "0"})
    stack.env.update(PATIENT)  # (its 503s come at once) it counts requests against attempts
    dead = hook(stack, database, receiver, "/dead")
    healthy = hook(stack, database, receiver, "/healthy")
    operations(stack, database, receiver)
    receiver.script("/dead", *[503] * 10_000)
    stack.worker()
    stack.beat()
    client = api(stack, database)
    count = 12

    events = [send(stack, n) for n in range(count)]

    wait_until(lambda: client.webhook(dead)["circuitBreaker"]["state"] != "closed", 30,
               "/dead's breaker open")
    opened_at = time.monotonic()
    breaker = client.webhook(dead)["circuitBreaker"]
    assert breaker["consecutiveFailures"] >= 3 and breaker["nextProbeAt"] is not None
    # One slot, so one lease at a time: exactly the run of 3 failures went before it opened.
    # Its first probe may have come already (the API calls above can take longer than the
    # cool-down on a busy machine): it is the 4th, and it began a cool-down after the 3rd's
    # answer, where a 4th failure before the breaker opened would have followed at once.
    so_far = sorted(receiver.at("/dead"), key=lambda r: r.began)
    before = so_far[:3]
    assert len(before) == 3
    assert all(r.began - before[-1].at >= COOLDOWN - 0.05 for r in so_far[3:]), so_far
    # The healthy webhook beside it got everything while the breaker stayed open.
    receiver.wait_for(count, "/healthy", timeout=30, unique=True)
    assert client.webhook(dead)["circuitBreaker"]["state"] != "closed"
    breakers = client.breakers()  # read once: between two reads it may turn half open
    assert breakers["open"] + breakers["halfOpen"] == 1, breakers

    window = 4.0
    time.sleep(window)  # counting what the dead endpoint receives over a window of probes
    probes = [r for r in receiver.at("/dead") if r.began > before[-1].began]
    # Counted since the breaker opened: over the window, and the API calls before it.
    spanned = time.monotonic() - before[-1].at
    # Probes only: one at a time, each at least a cool-down after the last one's answer.
    gaps = [later.began - earlier.at for earlier, later in zip(
        [before[-1], *probes], probes, strict=False)]
    assert probes and all(gap >= COOLDOWN - 0.05 for gap in gaps), gaps
    assert len(probes) <= spanned / COOLDOWN + 1, (len(probes), spanned)
    first_span = max(before[-1].at - before[0].began, 1e-3)
    print(f"\n/dead attempts: {len(before)} in {first_span * 1000:.0f} ms before its breaker "
          f"opened ({len(before) / first_span * 60:.0f}/min); {len(probes)} probes in the "
          f"{time.monotonic() - opened_at:.1f} s after ({len(probes) / window * 60:.0f}/min)")
    # No retry was burnt while paused: every attempt made is one the receiver got. Probes keep
    # coming meanwhile, and the receiver records each before its answer, which the worker
    # reads before it records the attempt: wait until the attempts of the requests received
    # so far are recorded; any more recorded by then are of probes the receiver got since.
    received = len(receiver.at("/dead"))

    def made() -> list[Any]:
        return [a for d in deliveries(database, webhook_id=dead)
                for a in attempts_of(database, d.id)]

    recorded = wait_until(lambda: len(found := made()) >= received and found, 30,
                          "the attempts of the requests /dead received to be recorded")
    assert received <= len(recorded) <= len(receiver.at("/dead"))

    receiver.scripts["/dead"].clear()  # mended: it answers 200 from now on
    wait_until(lambda: len(deliveries(database, webhook_id=dead,
                                      status=DeliveryStatus.DELIVERED)) == count, 60,
               "every /dead delivery delivered")
    assert client.webhook(dead)["circuitBreaker"] == {
        "state": "closed", "consecutiveFailures": 0, "nextProbeAt": None}
    assert client.breakers()["open"] == 0
    delivered = [r for r in receiver.at("/dead") if r.status == 200]
    assert len(delivered) == count  # each once
    assert Counter(r.headers["webhook-id"] for r in delivered).most_common(1)[0][1] == 1
    # Those never tried before it recovered went in the order of their ingestion (the queue's;
    # the retried ones went by their retry's due time).
    tried = {r.headers["webhook-id"] for r in receiver.at("/dead") if r.status != 200}
    ingested = {d.id: d.ingested_at_ms for d in deliveries(database, webhook_id=dead)}
    untried = [ingested[r.headers["webhook-id"]] for r in sorted(delivered, key=lambda r: r.began)
               if r.headers["webhook-id"] not in tried]
    assert untried and untried == sorted(untried)
    assert {json.loads(r.body)["eventId"] for r in delivered} == set(events)
    assert f"webhook {dead}: circuit breaker open" in stack.log("w1")
    assert f"webhook {dead}: circuit breaker closed" in stack.log("w1")
    # Its recovery told once (its failures alone raise nothing: it was never deactivated).
    receiver.wait_for(1, "/ops", timeout=30)
    assert alerted(receiver) == [("webhookRecovered", dead)]
    assert healthy  # delivered, above


def test_json_logs_give_one_line_per_attempt_without_payload_or_header_values(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    stack.env["NOTIFIER_LOG_FORMAT"] = "json"
    logged = hook(stack, database, receiver, "/logged",
                  headers={"Authorization": "Bearer sekrit-header-value"})
    receiver.script("/logged", 503)  # one failed attempt, then a retry that succeeds
    stack.worker()
    stack.beat()

    event_id = send(stack, 424242)
    receiver.wait_for(2, "/logged", timeout=30)
    (delivery,) = wait_until(lambda: deliveries(database, webhook_id=logged,
                                                status=DeliveryStatus.DELIVERED), 30, "delivered")

    def attempts() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in stack.log("w1").splitlines()
                 if line.startswith("{")]
        return [line for line in lines if line.get("message", "").startswith("attempt ")]

    lines = wait_until(lambda: len(found := attempts()) == 2 and found, 30, "two attempt lines")
    assert [(line["statusCode"], line["outcome"]) for line in lines] == [
        (503, "retrying"), (200, "delivered")]
    for line in lines:
        assert (line["eventId"], line["deliveryId"], line["webhookId"]) == (
            event_id, delivery.id, logged)
        assert isinstance(line["latencyMs"], int) and line["level"] == "INFO"
    log = stack.log("w1")
    assert "sekrit-header-value" not in log and "424242" not in log
    # Logged lines are JSON only (what is not JSON is written straight to the output by
    # Celery and Python, such as the worker's banner and its warnings at start-up).
    assert not [line for line in log.splitlines()
                if delivery.id in line and not line.startswith("{")]
