"""The pure steps of one delivery (render, request_for, judge) and envelope normalization."""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import replace
from typing import Any

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from config import load_settings
from notifier.client import build_envelope
from notifier.errors import InvalidEvent
from notifier.models import DeliveryStatus
from notifier.pipeline import Services, judge, render, request_for
from notifier.sender import Result
from notifier.signing import new_secret
from notifier.store import Claimed, Target, normalize_envelope

HOUR_MS = 3_600_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _services() -> Services:
    settings = replace(load_settings({}), retry_schedule=(10.0,), retry_jitter=0.0,
                       retry_horizon=24 * 3600.0, retry_after_max=3600.0)
    return Services(settings=settings, db=None, queues=None, catalog=None,  # type: ignore[arg-type]
                    sender=None, vault=None, rng=random.Random(0))  # type: ignore[arg-type]


def _claimed(ingested_at_ms: int, attempt_count: int = 0) -> Claimed:
    return Claimed(id="msg_1", event={"eventName": "pointsIssued"}, attempt_count=attempt_count,
                   ingested_at_ms=ingested_at_ms, lease_until_ms=ingested_at_ms + 120_000)


def _target(headers: dict[str, str], secrets: tuple[str, ...]) -> Target:
    return Target(id="hook1", url="https://93.184.216.34/hook", headers=headers, secrets=secrets,
                  active=True, sla_in_seconds=3600, max_allowed_connections=4)


def test_render_is_compact_utf8_json() -> None:
    payload: dict[str, Any] = {"eventName": "pointsIssued", "data": {"points": [1, 2],
                                                                      "name": "Zoë"}}

    body = render(payload)

    assert body == '{"eventName":"pointsIssued","data":{"points":[1,2],"name":"Zoë"}}'.encode()
    assert json.loads(body) == payload


def test_request_for_carries_webhook_headers_and_ours() -> None:
    secret = new_secret()
    body = render({"a": 1})
    timestamp = int(time.time())

    request = request_for(_target({"Authorization": "Bearer t"}, (secret,)), "msg_1", body,
                          timestamp)

    assert request.url == "https://93.184.216.34/hook"
    assert request.body == body
    assert request.headers["Authorization"] == "Bearer t"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["webhook-id"] == "msg_1"
    assert request.headers["webhook-timestamp"] == str(timestamp)
    Webhook(secret).verify(body, dict(request.headers))


def test_a_webhook_header_cannot_override_ours() -> None:
    secret = new_secret()
    target = _target({"webhook-id": "forged", "Content-Type": "text/plain"}, (secret,))

    request = request_for(target, "msg_1", b"{}", int(time.time()))

    assert request.headers["webhook-id"] == "msg_1"
    assert request.headers["Content-Type"] == "application/json"


def test_judge_delivered() -> None:
    started = _now_ms()
    result = Result(latency_ms=12, status_code=200, body_excerpt=b"thanks")

    finished = judge(_services(), _claimed(started), result, started)

    assert finished.outcome is DeliveryStatus.DELIVERED
    assert finished.status_code == 200
    assert finished.latency_ms == 12
    assert finished.response_excerpt == "thanks"
    assert finished.next_attempt_at_ms is None
    assert finished.error_class is None


def test_judge_client_error_fails_without_retry() -> None:
    started = _now_ms()

    finished = judge(_services(), _claimed(started), Result(latency_ms=5, status_code=400),
                     started)

    assert finished.outcome is DeliveryStatus.FAILED
    assert finished.next_attempt_at_ms is None


def test_judge_server_error_retries_after_the_step() -> None:
    before = _now_ms()

    finished = judge(_services(), _claimed(before), Result(latency_ms=5, status_code=503), before)

    after = _now_ms()
    assert finished.outcome is DeliveryStatus.RETRYING
    assert finished.next_attempt_at_ms is not None
    assert before + 10_000 <= finished.next_attempt_at_ms <= after + 10_000


def test_judge_honours_retry_after() -> None:
    before = _now_ms()
    result = Result(latency_ms=5, status_code=429, headers={"Retry-After": "60"})

    finished = judge(_services(), _claimed(before), result, before)

    after = _now_ms()
    assert finished.next_attempt_at_ms is not None
    assert before + 60_000 <= finished.next_attempt_at_ms <= after + 60_000


def test_judge_connection_error_retries_and_records_the_error() -> None:
    started = _now_ms()
    result = Result(latency_ms=5, error=requests.ConnectionError("refused"))

    finished = judge(_services(), _claimed(started), result, started)

    assert finished.outcome is DeliveryStatus.RETRYING
    assert finished.status_code is None
    assert finished.error_class == "ConnectionError"
    assert finished.error_message == "refused"


def test_judge_past_the_horizon_is_dead() -> None:
    ingested = _now_ms() - 24 * HOUR_MS

    finished = judge(_services(), _claimed(ingested, attempt_count=30),
                     Result(latency_ms=5, status_code=503), _now_ms())

    assert finished.outcome is DeliveryStatus.DEAD
    assert finished.next_attempt_at_ms is None


def test_judge_cuts_the_excerpt_and_survives_bad_utf8() -> None:
    started = _now_ms()
    result = Result(latency_ms=5, status_code=500, body_excerpt=b"\xff" + b"x" * 5000)

    finished = judge(_services(), _claimed(started), result, started)

    assert finished.response_excerpt == "\ufffd" + "x" * 1023


def test_normalize_envelope_fills_event_id_and_created_at() -> None:
    envelope = {"eventName": "pointsIssued", "orgId": 51186, "data": {}}

    event = normalize_envelope(envelope, now_ms=1_750_000_000_000)

    assert str(uuid.UUID(event["eventId"])) == event["eventId"]
    assert event["createdAt"] == 1_750_000_000_000
    assert "eventId" not in envelope


def test_normalize_envelope_keeps_given_values() -> None:
    envelope = {"eventId": "e-1", "createdAt": 5, "orgId": 1}

    assert normalize_envelope(envelope, now_ms=9) == envelope


@pytest.mark.parametrize("org_id", [True, "51186", None, 1.0])
def test_normalize_envelope_rejects_a_non_int_org_id(org_id: object) -> None:
    with pytest.raises(InvalidEvent) as caught:
        normalize_envelope({"eventName": "pointsIssued", "orgId": org_id}, now_ms=1)

    assert caught.value.field == "$.orgId"


def test_normalize_envelope_rejects_a_long_event_id() -> None:
    with pytest.raises(InvalidEvent) as caught:
        normalize_envelope({"eventId": "e" * 101, "orgId": 1}, now_ms=1)

    assert caught.value.field == "$.eventId"


@pytest.mark.parametrize("org_id", ["51186", True, 51186.0])
def test_build_envelope_rejects_a_non_int_org_id(org_id: Any) -> None:
    with pytest.raises(InvalidEvent) as caught:
        build_envelope("pointsIssued", {}, org_id=org_id)

    assert caught.value.field == "orgId"


def test_build_envelope_fills_what_is_missing() -> None:
    before = _now_ms()

    envelope = build_envelope("pointsIssued", {"points": 1}, org_id=51186, ref_id="r-1")

    assert str(uuid.UUID(envelope["eventId"])) == envelope["eventId"]
    assert before <= envelope["createdAt"] <= _now_ms()
    assert envelope["orgId"] == 51186
    assert envelope["refId"] == "r-1"
    assert envelope["data"] == {"points": 1}
