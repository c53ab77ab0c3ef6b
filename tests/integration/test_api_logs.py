"""Logs, metrics, delivery detail, replay and test sends over the HTTP API.

In-process (TestClient) on both databases and a real Redis, as test_api.py: events go in
through ``POST /v3/events``, their deliveries are then put in known states with SQL (or
``store.claim``/``store.finish``), and the endpoints are read back. The last test runs the real
path: uvicorn, a worker and a receiver.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import requests
from sqlalchemy import insert, select, update

from notifier import store
from notifier.models import Attempt, Delivery, DeliveryStatus, Event
from notifier.pipeline import now_ms
from tests.conftest import Receiver, Stack, wait_until
from tests.integration import test_api
from tests.integration.test_api import Api

pytestmark = pytest.mark.integration
api = test_api.api  # the in-process API fixture, shared rather than copied

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
RECORD_FIELDS = {"refId", "requestId", "eventName", "eventId", "consumerGroupId",
                 "eventIngestionTimestamp", "eventStartTimestamp", "eventEndTimestamp",
                 "slaBreachTimestamp", "consumerResponse", "status", "webHookId", "deliveryId",
                 "attemptCount"}


def _publish(api: Api, event_id: str, name: str = "pointsIssued", org_id: int = 1,
             customer: int = 7, **fields: Any) -> None:
    data: dict[str, Any] = {"customerIdentifiers": {"customerId": customer}}
    if name == "tierUpgraded":
        data["upgradedTierNumber"] = 2
    response = api.call("POST", "/v3/events", org_id, json={
        "eventName": name, "eventId": event_id, "data": data, **fields})
    assert response.status_code == 202, response.text


def _deliveries(api: Api, event_id: str) -> dict[str, str]:
    """webhook id -> delivery id, for one event."""
    with api.services.db.session() as session:
        rows = session.execute(select(Delivery.webhook_id, Delivery.id)
                               .join(Event, Event.pk == Delivery.event_pk)
                               .where(Event.event_id == event_id)).all()
    return {hook: delivery for hook, delivery in rows}


def _set(api: Api, delivery_id: str, **values: Any) -> None:
    with api.services.db.session() as session:
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))


def _attempt(api: Api, delivery_id: str, number: int, status_code: int | None,
             excerpt: str | None = None, error: str | None = None) -> None:
    with api.services.db.session() as session:
        session.execute(insert(Attempt).values(
            delivery_id=delivery_id, number=number, started_at_ms=1_000 * number,
            latency_ms=10, status_code=status_code, outcome="x", error_message=error,
            response_excerpt=excerpt))


def test_event_log_by_event_ref_and_request_id(api: Api) -> None:
    first, second = api.webhook(name="a"), api.webhook(name="b")
    _publish(api, "e-1", refId="1_ref", apiRequestId="req-1")
    _publish(api, "e-2", apiRequestId="req-1")
    delivery = _deliveries(api, "e-1")[first["webHookId"]]
    ingested = 1_741_189_423_549  # 2025-03-05T15:43:43.549Z
    _set(api, delivery, status=DeliveryStatus.DELIVERED, ingested_at_ms=ingested - 1,
         started_at_ms=ingested, ended_at_ms=ingested + 20, last_status_code=200,
         attempt_count=2)
    _attempt(api, delivery, 1, 503, "busy")
    _attempt(api, delivery, 2, 200, "ok")

    by_event = api.call("GET", "/v3/webHooks/eventLog/e-1")
    by_ref = api.call("GET", "/v3/webHooks/eventLog/refId/1_ref").json()["data"]
    by_request = api.call("GET", "/v3/webHooks/eventLog/requestId/req-1").json()["data"]

    assert by_event.status_code == 200, by_event.text
    record = by_event.json()["data"]
    assert isinstance(record, dict) and set(record) == RECORD_FIELDS | {"deliveries"}
    assert [d["webHookId"] for d in record["deliveries"]] == [  # oldest first
        first["webHookId"], second["webHookId"]]
    delivered = next(d for d in record["deliveries"] if d["deliveryId"] == delivery)
    assert delivered == {
        "refId": "1_ref", "requestId": "req-1", "eventName": "pointsIssued", "eventId": "e-1",
        "consumerGroupId": first["consumerGroupId"],
        "eventIngestionTimestamp": "2025-03-05T15:43:43.548Z",
        "eventStartTimestamp": "2025-03-05T15:43:43.549Z",
        "eventEndTimestamp": "2025-03-05T15:43:43.569Z", "slaBreachTimestamp": None,
        "consumerResponse": {"statusCode": 200, "body": "ok", "error": None},
        "status": "delivered", "webHookId": first["webHookId"], "deliveryId": delivery,
        "attemptCount": 2}
    pending = next(d for d in record["deliveries"] if d["deliveryId"] != delivery)
    assert pending["status"] == "pending" and pending["consumerResponse"] is None
    assert ISO_MS.match(pending["eventIngestionTimestamp"])
    assert record["deliveryId"] == record["deliveries"][0]["deliveryId"]
    assert by_ref["deliveries"] == record["deliveries"]
    assert api.call("GET", "/v3/webhooks/eventLog/e-1").json()["data"] == record  # InTouch's h
    assert isinstance(by_request, list) and len(by_request) == 4
    assert {r["eventId"] for r in by_request} == {"e-1", "e-2"}


def test_an_event_without_deliveries_has_its_own_record(api: Api) -> None:
    response = api.call("POST", "/v3/events", json={
        "eventName": "pointsIssued", "eventId": "bad", "data": {}})
    assert response.status_code == 400
    _publish(api, "lonely")  # no webhook subscribed

    rejected = api.call("GET", "/v3/webHooks/eventLog/bad").json()["data"]
    lonely = api.call("GET", "/v3/webHooks/eventLog/lonely").json()["data"]

    assert rejected["status"] == "rejected" and rejected["deliveryId"] is None
    assert "customerIdentifiers" in rejected["consumerResponse"]["error"]
    assert lonely["status"] == "dispatched" and lonely["deliveryId"] is None
    assert lonely["consumerResponse"] is None and len(lonely["deliveries"]) == 1


def test_another_orgs_logs_do_not_exist(api: Api) -> None:
    hook = api.webhook()
    _publish(api, "e-1", refId="1_ref", apiRequestId="req-1")
    delivery = _deliveries(api, "e-1")[hook["webHookId"]]
    group = hook["consumerGroupId"]
    paths = [("GET", "/v3/webHooks/eventLog/e-1"), ("GET", "/v3/webHooks/eventLog/refId/1_ref"),
             ("GET", "/v3/webHooks/eventLog/requestId/req-1"),
             ("GET", f"/v3/events/consumer-groups/{group}/logs"),
             ("GET", f"/v3/events/consumer-groups/{group}/metrics"),
             ("GET", f"/v3/deliveries/{delivery}"), ("POST", f"/v3/deliveries/{delivery}/replay"),
             ("POST", f"/v3/webHooks/{hook['webHookId']}/test")]
    api.settle()

    for method, path in paths:
        response = api.call(method, path, org_id=2)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["errors"][0]["code"] == "NOT_FOUND"
    for method, path in paths:
        assert api.call(method, path, org_id=1).status_code in (200, 202), path
    assert api.call("GET", "/v3/events/consumer-groups/no-such-group/logs").status_code == 404
    assert api.call("GET", "/v3/webHooks/eventLog/no-such-event").status_code == 404
    assert api.call("GET", "/v3/deliveries/msg_nope").status_code == 404


def _five_deliveries(api: Api) -> tuple[str, dict[str, str]]:
    """One webhook with five deliveries in known states; returns (group, eventId -> delivery)."""
    hook = api.webhook(eventNames=["pointsIssued", "tierUpgraded"])
    states = {  # eventId: (name, customer, ingested, started, ended, status)
        "e-1": ("pointsIssued", 11, 1000, 1100, 1600, DeliveryStatus.DELIVERED),   # 500 ms
        "e-2": ("tierUpgraded", 12, 2000, 2100, 2200, DeliveryStatus.DELIVERED),   # 100 ms
        "e-3": ("pointsIssued", 13, 3000, 3100, 5100, DeliveryStatus.FAILED),      # 2000 ms
        "e-4": ("tierUpgraded", 14, 4000, None, None, DeliveryStatus.PENDING),
        "e-5": ("pointsIssued", 15, 5000, 5100, None, DeliveryStatus.RETRYING),
    }
    base = now_ms() - 10_000
    ids = {}
    for event_id, (name, customer, ingested, started, ended, status) in states.items():
        _publish(api, event_id, name, customer=customer, refId=f"1_{event_id}",
                 apiRequestId=f"req-{event_id}", eventSearchKey=f"key-{customer}")
        ids[event_id] = _deliveries(api, event_id)[hook["webHookId"]]
        _set(api, ids[event_id], status=status, ingested_at_ms=base + ingested,
             started_at_ms=None if started is None else base + started,
             ended_at_ms=None if ended is None else base + ended)
    # e-3 missed its SLA (failed past it); e-1 and e-2 were delivered within it.
    _set(api, ids["e-3"], sla_breach_at_ms=base + 4000, sla_due_at_ms=None)
    _set(api, ids["e-1"], sla_due_at_ms=None)
    _set(api, ids["e-2"], sla_due_at_ms=None)
    return hook["consumerGroupId"], ids


def _logs(api: Api, group: str, **params: Any) -> dict[str, Any]:
    response = api.call("GET", f"/v3/events/consumer-groups/{group}/logs", params=params)
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


def _event_ids(page: dict[str, Any]) -> list[str]:
    return [record["eventId"] for record in page["content"]]


def test_consumer_group_logs_page_filter_and_sort(api: Api) -> None:
    api.webhook(name="other")  # gets the pointsIssued events too: not in these logs
    group, ids = _five_deliveries(api)

    first = _logs(api, group, size=2)
    last = _logs(api, group, size=2, page=2)
    newest_first = _event_ids(_logs(api, group))

    assert newest_first == ["e-5", "e-4", "e-3", "e-2", "e-1"]
    assert _event_ids(first) == ["e-5", "e-4"] and _event_ids(last) == ["e-1"]
    assert (first["page"], first["size"], first["totalElements"], first["totalPages"]) == (0, 2, 5, 3)
    assert set(first["content"][0]) == RECORD_FIELDS
    assert _event_ids(_logs(api, group, page=3, size=2)) == []
    assert _event_ids(_logs(api, group, sortBy="ingestion:asc")) == newest_first[::-1]
    assert _event_ids(_logs(api, group, sortBy="webhookDuration:desc")) == \
        ["e-3", "e-1", "e-2", "e-5", "e-4"]  # unfinished last, newest first
    assert _event_ids(_logs(api, group, sortBy="webhookDuration:asc")) == \
        ["e-2", "e-1", "e-3", "e-5", "e-4"]
    assert _event_ids(_logs(api, group, sortBy="eventType:asc")) == \
        ["e-5", "e-3", "e-1", "e-4", "e-2"]
    assert _event_ids(_logs(api, group, sortBy="eventType:desc"))[:2] == ["e-4", "e-2"]
    assert _event_ids(_logs(api, group, eventType="tierUpgraded")) == ["e-4", "e-2"]
    assert _event_ids(_logs(api, group, status="delivered")) == ["e-2", "e-1"]
    assert _event_ids(_logs(api, group, status="failed,RETRYING")) == ["e-5", "e-3"]
    breached = _logs(api, group, slaBreached="true")
    assert _event_ids(breached) == ["e-3"] and breached["totalElements"] == 1
    assert breached["content"][0]["slaBreachTimestamp"] is not None
    assert _event_ids(_logs(api, group, slaBreached="false")) == ["e-5", "e-4", "e-2", "e-1"]
    assert _event_ids(_logs(api, group, slaBreached="true", status="delivered")) == []
    for key in ("13", "1_e-3", "req-e-3", "e-3", "key-13"):  # customerId, refId, request, ...
        assert _event_ids(_logs(api, group, eventSearchKey=key)) == ["e-3"], key
    assert _event_ids(_logs(api, group, eventSearchKey="e-3", eventType="tierUpgraded")) == []
    with api.services.db.session() as session:
        ingested = dict(session.execute(
            select(Event.event_id, Delivery.ingested_at_ms)
            .join(Delivery, Delivery.event_pk == Event.pk)
            .where(Delivery.id.in_(list(ids.values())))).all())
    assert _event_ids(_logs(api, group, startDate=ingested["e-2"], endDate=ingested["e-4"])) == \
        ["e-4", "e-3", "e-2"]
    assert _event_ids(_logs(api, group, endDate=ingested["e-1"] - 1)) == []


@pytest.mark.parametrize(("params", "field"), [
    ({"sortBy": "speed:desc"}, "sortBy"),
    ({"status": "lost"}, "status"),
    ({"size": 0}, "size"),
    ({"size": 201}, "size"),
    ({"size": "ten"}, "size"),
    ({"slaBreached": "maybe"}, "slaBreached"),
    ({"page": -1}, "page"),
    ({"page": 10**20}, "page"),  # page * size past a BIGINT offset
    ({"startDate": 2000, "endDate": 1000}, "endDate"),
    ({"startDate": -5}, "startDate"),
    ({"endDate": 10**20}, "endDate"),
])
def test_bad_log_queries_name_the_parameter(api: Api, params: dict[str, Any], field: str) -> None:
    group = api.webhook()["consumerGroupId"]

    response = api.call("GET", f"/v3/events/consumer-groups/{group}/logs", params=params)

    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == field


def test_metrics_count_by_state_with_the_mean_delivery_time(api: Api) -> None:
    group, ids = _five_deliveries(api)
    _set(api, ids["e-4"], status=DeliveryStatus.IN_FLIGHT)
    _publish(api, "e-6")
    with api.services.db.session() as session:
        hook_id = session.scalar(select(Delivery.webhook_id).where(Delivery.id == ids["e-1"]))
    _set(api, _deliveries(api, "e-6")[str(hook_id)], status=DeliveryStatus.DEAD)
    _publish(api, "e-7")
    _set(api, _deliveries(api, "e-7")[str(hook_id)], status=DeliveryStatus.HELD)
    path = f"/v3/events/consumer-groups/{group}/metrics"

    metrics = api.call("GET", path).json()["data"]
    old = api.call("GET", path, params={"startDate": 0, "endDate": 10_000}).json()["data"]

    assert {k: v for k, v in metrics.items() if k not in ("startDate", "endDate")} == {
        "totalEvents": 7, "deliveredEvents": 2, "failedEvents": 2, "retryingEvents": 1,
        "pendingEvents": 1, "heldEvents": 1,  # held: not failed, never tried while inactive
        "averageDeliveryTime": 400,  # (600 + 200) / 2: ingested -> ended
        # e-1 and e-2 within their SLA, e-3 not; the others are undecided yet.
        "slaBreachedEvents": 1, "slaMetEvents": 2, "slaMetPercent": 66.67}
    assert metrics["endDate"] - metrics["startDate"] == 30 * 24 * 3600 * 1000
    assert old == {"totalEvents": 0, "deliveredEvents": 0, "failedEvents": 0,
                   "retryingEvents": 0, "pendingEvents": 0, "heldEvents": 0,
                   "averageDeliveryTime": 0, "slaBreachedEvents": 0, "slaMetEvents": 0,
                   "slaMetPercent": None, "startDate": 0, "endDate": 10_000}
    bad = api.call("GET", path, params={"startDate": 5, "endDate": 1})
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "endDate"


def test_delivery_detail_has_every_attempt_and_both_payloads(api: Api) -> None:
    hook = api.webhook()
    _publish(api, "e-1", refId="1_ref")
    delivery = _deliveries(api, "e-1")[hook["webHookId"]]
    db = api.services.db
    (first,) = store.claim(db, [delivery], now_ms=now_ms(), lease_ms=5000).claimed
    store.finish(db, [store.Finished(first, 1000, 30, DeliveryStatus.RETRYING, 503,
                                     response_excerpt="busy", next_attempt_at_ms=0)])
    (second,) = store.claim(db, [delivery], now_ms=now_ms(), lease_ms=5000).claimed
    store.finish(db, [store.Finished(second, 2000, 40, DeliveryStatus.DELIVERED, 200,
                                     response_excerpt="ok")])

    response = api.call("GET", f"/v3/deliveries/{delivery}")

    assert response.status_code == 200, response.text
    detail = response.json()["data"]
    assert detail["status"] == "delivered" and detail["refId"] == "1_ref"
    assert detail["consumerResponse"] == {"statusCode": 200, "body": "ok", "error": None}
    assert [(a["number"], a["statusCode"], a["outcome"], a["latencyMs"], a["responseExcerpt"])
            for a in detail["attempts"]] == [(1, 503, "retrying", 30, "busy"),
                                            (2, 200, "delivered", 40, "ok")]
    assert detail["attempts"][0]["startedAt"] == "1970-01-01T00:00:01.000Z"
    assert detail["originalPayload"]["eventId"] == "e-1"
    assert detail["originalPayload"]["data"] == {"customerIdentifiers": {"customerId": 7}}
    assert detail["deliveredPayload"] == detail["originalPayload"]  # enrichment: pass-through


def test_replay_queues_a_lease_with_the_same_delivery_id(api: Api) -> None:
    hook = api.webhook()
    _publish(api, "e-1")
    delivery = _deliveries(api, "e-1")[hook["webHookId"]]
    _set(api, delivery, status=DeliveryStatus.DEAD, ended_at_ms=5)
    api.settle()

    response = api.call("POST", f"/v3/deliveries/{delivery}/replay")

    assert response.status_code == 202, response.text
    assert response.json()["data"] == {"deliveryId": delivery, "queued": 1}
    (lease,) = api.leases
    assert lease.webhook_id == hook["webHookId"] and lease.delivery_ids == (delivery,)
    status = api.call("GET", f"/v3/deliveries/{delivery}").json()["data"]["status"]
    assert status == "pending"


def test_a_replay_of_a_delivery_whose_event_retention_emptied_says_so(api: Api) -> None:
    hook = api.webhook()
    _publish(api, "e-1")
    delivery = _deliveries(api, "e-1")[hook["webHookId"]]
    _set(api, delivery, status=DeliveryStatus.FAILED, ended_at_ms=5)
    with api.services.db.session() as session:
        session.execute(update(Event).values(payload=store.PURGED_PAYLOAD, purged_at_ms=6))
    api.settle()

    response = api.call("POST", f"/v3/deliveries/{delivery}/replay")

    # Not "being sent right now": a delivery past NOTIFIER_RETENTION_DAYS is the usual case.
    assert response.status_code == 202, response.text
    assert response.json()["data"] == {"deliveryId": delivery, "queued": 0}
    (warning,) = response.json()["warnings"]
    assert "emptied by retention" in warning and "being sent" not in warning
    assert api.leases == []


def test_a_test_send_reaches_only_the_tested_webhook(api: Api) -> None:
    tested = api.webhook(name="tested", eventNames=["pointsIssued", "tierUpgraded"])
    other = api.webhook(name="other", eventNames=["pointsIssued", "tierUpgraded"])
    api.settle()

    response = api.call("POST", f"/v3/webHooks/{tested['webHookId']}/test",
                        json={"eventName": "tierUpgraded"})

    assert response.status_code == 202, response.text
    sent = response.json()["data"]
    assert sent["eventName"] == "tierUpgraded" and sent["status"] == "dispatched"
    with api.services.db.session() as session:
        event = session.scalar(select(Event).where(Event.event_id == sent["eventId"]))
        assert event is not None and event.org_id == 1
        api.services.catalog.validate(event.payload)
        assert event.payload["orgId"] == 1 and event.payload["eventId"] == sent["eventId"]
    assert _deliveries(api, sent["eventId"]) == {tested["webHookId"]: sent["deliveryIds"][0]}
    (lease,) = api.leases
    assert lease.webhook_id == tested["webHookId"] and lease.delivery_ids == tuple(
        sent["deliveryIds"])
    assert other["webHookId"] not in {lease.webhook_id for lease in api.leases}
    default = api.call("POST", f"/v3/webHooks/{tested['webHookId']}/test").json()["data"]
    assert default["eventName"] == "pointsIssued"


@pytest.mark.parametrize(("body", "field"), [
    ({"eventName": "CouponIssue"}, "eventName"),  # in the catalog, not subscribed
    ({"eventName": "noSuchEvent"}, "eventName"),
])
def test_a_test_send_names_what_is_wrong(api: Api, body: dict[str, Any], field: str) -> None:
    hook = api.webhook()

    response = api.call("POST", f"/v3/webHooks/{hook['webHookId']}/test", json=body)

    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == field


def test_an_inactive_webhook_is_not_test_sent(api: Api) -> None:
    hook = api.webhook(active=False)

    response = api.call("POST", f"/v3/webHooks/{hook['webHookId']}/test")

    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "webHookId"


@pytest.mark.postgres
def test_a_test_send_over_http_is_delivered_and_logged(stack: Stack, receiver: Receiver) -> None:
    auth = {"Authorization": f"Bearer {stack.org(5, 'live')}"}
    base = stack.web()
    stack.worker()
    created = requests.post(f"{base}/v3/webHooks", headers=auth, timeout=10, json={
        "name": "live", "webHookUrl": receiver.url("/test"), "eventNames": ["tierUpgraded"],
        "maxAllowedConnections": 1})
    assert created.status_code == 201, created.text
    hook_id = created.json()["data"]["webHookId"]

    sent = requests.post(f"{base}/v3/webHooks/{hook_id}/test", headers=auth, timeout=10,
                         json={"eventName": "tierUpgraded"})

    assert sent.status_code == 202, sent.text
    event_id = sent.json()["data"]["eventId"]
    (request,) = receiver.wait_for(1, "/test", timeout=60)
    body = json.loads(request.body)
    assert body["eventId"] == event_id and body["eventName"] == "tierUpgraded"
    assert body["orgId"] == 5

    def delivered() -> Any:
        record = requests.get(f"{base}/v3/webHooks/eventLog/{event_id}", headers=auth,
                              timeout=10).json()["data"]
        return record if record["status"] == "delivered" else None

    record = wait_until(delivered, 30, "the event log to show the test event delivered")
    assert record["consumerResponse"] == {"statusCode": 200, "body": "ok", "error": None}
    assert record["webHookId"] == hook_id and ISO_MS.match(record["eventEndTimestamp"])
