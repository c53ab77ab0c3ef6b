"""The HTTP API on both databases and a real Redis, called in-process (FastAPI's TestClient).

Leases the API would send to the broker are recorded instead; test_api_live.py covers the
same ingest through a real uvicorn server and worker.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from config import load_settings
from notifier import store, tenants
from notifier.api import create_app
from notifier.models import Delivery, Event, EventStatus, Org
from notifier.pipeline import build_services
from notifier.queues import Lease, Report

pytestmark = pytest.mark.integration

# The "Add request" sample of the InTouch v3 webHooks reference, unchanged but for its
# placeholder credentials ("Basic …"), written out: "…" is no character an HTTP header can carry,
# so a webhook saved with it could never be sent to (it is refused, naming the header).
INTOUCH_SAMPLE = {
    "active": True, "customerIdentifiersToBeEnriched": [],
    "eventNames": ["pointsIssued", "pointsRedeemed", "tierUpgraded", "CouponIssue", "customerAdded"],
    "maxAllowedConnections": 10, "methodType": "POST", "name": "test_post_webhook_12345",
    "slaInSeconds": 150,
    "webHookHeaders": {"Authorization": "Basic dXNlcjpwYXNz", "Content-Type": "application/json"},
    "webHookType": "HTTP", "webHookUrl": "https://example.com/hook",
}


class Api:
    def __init__(self, client: TestClient, services: Any, leases: list[Lease]) -> None:
        self.client, self.services, self.leases = client, services, leases
        self.keys: dict[int, str] = {}

    def settle(self) -> None:
        """Give back every lease sent so far, as finished delivery tasks would, and forget them."""
        for lease in self.leases:
            self.services.queues.release_many([(lease, Report())], batch=1, lease_ms=1, now_ms=0)
        self.leases.clear()

    def org(self, org_id: int) -> str:
        store.create_org(self.services.db, org_id, f"org {org_id}", now_ms=0)
        self.keys[org_id] = tenants.create_key(self.services.db, org_id, now_ms=0)
        return self.keys[org_id]

    def call(self, method: str, path: str, org_id: int = 1,
             headers_extra: dict[str, str] | None = None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.keys[org_id]}", **(headers_extra or {})}
        return self.client.request(method, path, headers=headers, **kwargs)

    def webhook(self, org_id: int = 1, **fields: Any) -> dict[str, Any]:
        body = {"name": "hook", "webHookUrl": "http://127.0.0.1:9/hook",
                "eventNames": ["pointsIssued"], "maxAllowedConnections": 2, **fields}
        response = self.call("POST", "/v3/webHooks", org_id, json=body)
        assert response.status_code == 201, response.text
        return dict(response.json()["data"])


@pytest.fixture
def api(database_url: str, redis_url: str, broker_url: str, tmp_path: Path) -> Iterator[Api]:
    settings = load_settings({
        "NOTIFIER_DATA_DIR": str(tmp_path), "NOTIFIER_DATABASE_URL": database_url,
        "NOTIFIER_REDIS_URL": redis_url, "NOTIFIER_BROKER_URL": broker_url,
        "NOTIFIER_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8"})
    services = build_services(settings)
    leases: list[Lease] = []
    with TestClient(create_app(settings, services=services, send_lease=leases.append)) as client:
        made = Api(client, services, leases)
        made.org(1)
        made.org(2)
        yield made
    services.db.dispose()


def test_the_intouch_sample_is_accepted_unchanged(api: Api) -> None:
    response = api.call("POST", "/v3/webHooks", json=INTOUCH_SAMPLE)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["errors"] is None
    hook = body["data"]
    for field in ("name", "eventNames", "maxAllowedConnections", "slaInSeconds", "webHookUrl",
                  "methodType", "webHookType", "active"):
        expected = INTOUCH_SAMPLE[field]
        assert hook[field] == (sorted(expected) if isinstance(expected, list) else expected)
    assert len(hook["webHookId"]) == 24 and len(hook["consumerGroupId"]) == 36
    assert hook["signingSecret"].startswith("whsec_")
    assert hook["webHookHeaders"] == {"Authorization": "****YXNz", "Content-Type": "****json"}
    assert hook["attribution"]["createdOnISO"].endswith("Z")


def test_header_values_are_masked_and_the_secret_shown_once(api: Api) -> None:
    created = api.webhook(webHookHeaders={"Authorization": "Bearer abcdefgh12345678"})

    fetched = api.call("GET", f"/v3/webHooks/{created['webHookId']}").json()["data"]
    listed = api.call("GET", "/v3/webHooks").json()["data"]

    assert created["webHookHeaders"] == fetched["webHookHeaders"] == {"Authorization": "****5678"}
    assert "signingSecret" not in fetched and "signingSecret" not in listed[0]
    assert "abcdefgh" not in str(fetched) + str(listed)


def test_another_orgs_webhook_does_not_exist(api: Api) -> None:
    hook_id = api.webhook(org_id=1)["webHookId"]
    for method, path, kwargs in [("GET", "", {}), ("PUT", "", {"json": {"slaInSeconds": 5}}),
                                 ("DELETE", "", {}), ("POST", "/secret/rotate", {})]:
        response = api.call(method, f"/v3/webHooks/{hook_id}{path}", org_id=2, **kwargs)
        assert response.status_code == 404, (method, path, response.text)
    assert api.call("GET", "/v3/webHooks", org_id=2).json()["data"] == []
    assert api.call("GET", f"/v3/webHooks/{hook_id}", org_id=1).status_code == 200


def test_authentication(api: Api) -> None:
    key = api.keys[1]
    basic = base64.b64encode(f"1:{key}".encode()).decode()
    wrong_org = base64.b64encode(f"2:{key}".encode()).decode()

    assert api.client.get("/v3/webHooks").status_code == 401
    assert api.client.get("/v3/webHooks", headers={"Authorization": "Bearer nk_nope"}).status_code == 401
    assert api.client.get("/v3/webHooks", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert api.client.get("/v3/webHooks", headers={"Authorization": f"Basic {wrong_org}"}).status_code == 401
    tenants.revoke_key(api.services.db, 1, key[:10], now_ms=1)
    assert api.client.get("/v3/webHooks", headers={"Authorization": f"Bearer {key}"}).status_code == 401


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"maxAllowedConnections": 0}, "maxAllowedConnections", "must be greater than zero"),
    ({"maxAllowedConnections": "many"}, "maxAllowedConnections", "integer"),
    ({"eventNames": []}, "eventNames", "can not be null"),
    ({"eventNames": ["pointsissued"]}, "eventNames", "pointsissued"),
    ({"methodType": "GET"}, "methodType", "only POST"),
    ({"webHookUrl": "ftp://example.com/x"}, "webHookUrl", "http or https"),
    ({"webHookUrl": "http://10.1.2.3/x"}, "webHookUrl", "private address"),
    ({"webHookHeaders": {"X-A": "b\r\nInjected: 1"}}, "webHookHeaders.X-A", "CR, LF"),
    ({"webHookHeaders": {"Host": "x"}}, "webHookHeaders.Host", "set by notifier"),
    ({"webHookHeaders": {"webhook-id": "x"}}, "webHookHeaders.webhook-id", "set by notifier"),
    ({"cardNumberEnrichmentEnabled": True}, "cardNumberEnrichmentEnabled", "source"),
    ({"customerIdentifiersToBeEnriched": ["Facebook"]}, "customerIdentifiersToBeEnriched",
     "unknown source"),
    ({"availablePointsBalanceEnrichmentEnabled": True},
     "availablePointsBalanceEnrichmentEnabled", "not enabled for this org"),
])
def test_invalid_webhooks_are_refused_naming_the_field(
        api: Api, fields: dict[str, Any], field: str, words: str) -> None:
    body = {"name": "h", "webHookUrl": "https://example.com/h", "eventNames": ["pointsIssued"],
            "maxAllowedConnections": 1, **fields}

    response = api.call("POST", "/v3/webHooks", json=body)

    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["field"] == field and words in error["message"]
    assert api.call("GET", "/v3/webHooks").json()["data"] == []


def test_points_balance_needs_the_org_setting(api: Api) -> None:
    with api.services.db.session() as session:
        session.execute(update(Org).where(Org.id == 1).values(
            available_points_balance_enrichment_enabled=True))
    hook = api.webhook(availablePointsBalanceEnrichmentEnabled=True)
    assert hook["availablePointsBalanceEnrichmentEnabled"] is True


def test_names_are_unique_per_org(api: Api) -> None:
    api.webhook(org_id=1, name="same")
    api.webhook(org_id=2, name="same")
    response = api.call("POST", "/v3/webHooks", json={
        "name": "same", "webHookUrl": "https://example.com/h", "eventNames": ["pointsIssued"],
        "maxAllowedConnections": 1})
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "name"


def test_update_is_partial_and_delete_is_soft(api: Api) -> None:
    hook = api.webhook(webHookHeaders={"X-Key": "value-1234"}, slaInSeconds=60)
    path = f"/v3/webHooks/{hook['webHookId']}"

    updated = api.call("PUT", path, json={"maxAllowedConnections": 7,
                                          "eventNames": ["tierUpgraded", "pointsIssued"],
                                          "noOfRetryAttempts": 3}).json()
    deleted = api.call("DELETE", path).json()["data"]

    assert updated["data"]["maxAllowedConnections"] == 7
    assert updated["data"]["slaInSeconds"] == 60  # untouched
    assert updated["data"]["webHookHeaders"] == {"X-Key": "****1234"}
    assert updated["data"]["eventNames"] == ["pointsIssued", "tierUpgraded"]
    assert updated["warnings"] and "noOfRetryAttempts" in updated["warnings"][0]
    assert deleted["active"] is False
    assert api.call("GET", path).json()["data"]["active"] is False


def test_a_changed_connection_limit_holds_at_once(api: Api) -> None:
    api.services.settings = dataclasses.replace(api.services.settings, batch_size=1)
    hook = api.webhook(maxAllowedConnections=1)
    path = f"/v3/webHooks/{hook['webHookId']}"
    for n in range(5):
        api.call("POST", "/v3/events", json={"eventName": "pointsIssued", "data": {
            "customerIdentifiers": {"customerId": n}}})
    assert len(api.leases) == 1  # one slot, four deliveries waiting

    # Raised: the slots it adds take what waits, without waiting for the next event.
    assert api.call("PUT", path, json={"maxAllowedConnections": 3}).status_code == 200
    assert len(api.leases) == 3
    # Lowered: no new lease starts until fewer than one slot is held.
    assert api.call("PUT", path, json={"maxAllowedConnections": 1}).status_code == 200
    assert len(api.leases) == 3
    now = store_now()
    following = [released.leases for lease in api.leases
                 for released in api.services.queues.release_many(
                     [(lease, Report())], batch=1, lease_ms=60_000, now_ms=now)]
    assert [len(leases) for leases in following] == [0, 0, 1]


def test_rotation_signs_with_both_secrets_during_the_overlap(api: Api) -> None:
    hook = api.webhook()
    path = f"/v3/webHooks/{hook['webHookId']}/secret/rotate"

    rotated = api.call("POST", path, json={"overlapSeconds": 3600}).json()["data"]

    target = store.target(api.services.db, api.services.vault, hook["webHookId"],
                          now_ms=store_now())
    assert target.secrets == (rotated["signingSecret"], hook["signingSecret"])
    later = store.target(api.services.db, api.services.vault, hook["webHookId"],
                         now_ms=store_now() + 3601 * 1000)
    assert later.secrets == (rotated["signingSecret"],)


def store_now() -> int:
    from notifier.pipeline import now_ms

    return now_ms()


def test_events_are_stored_and_queued(api: Api) -> None:
    hook = api.webhook()
    event = {"eventName": "pointsIssued", "eventId": "evt-1",
             "data": {"customerIdentifiers": {"customerId": 9}}}

    response = api.call("POST", "/v3/events", json=event)

    assert response.status_code == 202, response.text
    assert response.json()["data"] == [{"eventId": "evt-1", "status": "dispatched"}]
    (lease,) = api.leases
    assert lease.webhook_id == hook["webHookId"] and len(lease.delivery_ids) == 1


def test_an_invalid_event_is_stored_rejected_and_answered_with_its_field(api: Api) -> None:
    api.webhook()
    events = [{"eventName": "pointsIssued", "eventId": "good",
               "data": {"customerIdentifiers": {"customerId": 1}}},
              {"eventName": "pointsIssued", "eventId": "bad", "data": {}},
              {"eventName": "pointsIssued", "eventId": "alien", "orgId": 2, "data": {}}]

    response = api.call("POST", "/v3/events", json=events)

    assert response.status_code == 400
    errors = response.json()["errors"]
    assert [e["field"] for e in errors] == ["[1]$.data", "[2]orgId"]
    assert "customerIdentifiers" in errors[0]["message"]
    with api.services.db.session() as session:
        stored = dict(session.execute(select(Event.event_id, Event.status)).all())
        assert stored == {"good": EventStatus.DISPATCHED, "bad": EventStatus.REJECTED}
        assert len(session.scalars(select(Delivery)).all()) == 1


def test_a_rejected_event_is_answered_with_its_field_as_stored_not_read_back_from_text(
        api: Api) -> None:
    # The path names a key with a colon in it: the field is what the check found, which the
    # message's text (path, colon, problem) cannot tell apart. And a duplicate is answered as
    # its first sending was.
    event = {"eventName": "pointsIssued", "eventId": "colon",
             "data": {"customerIdentifiers": {"customerId": 1}, "note:x": "a\u0000b"}}

    first = api.call("POST", "/v3/events", json=event)
    invalid = {"eventName": "pointsIssued", "eventId": "empty", "data": {}}
    once, twice = (api.call("POST", "/v3/events", json=invalid) for _ in range(2))

    (error,) = first.json()["errors"]
    assert first.status_code == 400
    assert (error["code"], error["field"]) == ("INVALID_EVENT", "$.data.note:x"), error
    assert once.json()["errors"] == twice.json()["errors"]
    assert twice.json()["errors"][0]["field"] == "$.data"


def test_the_catalog_and_schemas(api: Api) -> None:
    catalog = api.call("GET", "/v3/events/catalog").json()["data"]
    plain = api.call("GET", "/v3/events/catalog/pointsExpired/schema").json()["data"]
    resolved = api.call("GET", "/v3/events/catalog/pointsExpired/schema",
                        params={"resolved": "true"}).json()["data"]
    missing = api.call("GET", "/v3/events/catalog/noSuchEvent/schema")

    names = {entry["eventName"]: entry for entry in catalog}
    assert len(names) >= 75 and names["CouponIssue"]["group"] == "Incentives"
    assert plain["allOf"] == [{"$ref": "commonEvent.json"}]
    assert "$ref" not in str(resolved)
    assert resolved["allOf"][0]["required"]  # the envelope, inlined
    assert missing.status_code == 404


def test_health(api: Api) -> None:
    response = api.client.get("/health")
    assert response.status_code == 200
    # No worker runs in these tests: counted, not required.
    assert response.json()["data"] == {"database": "ok", "redis": "ok", "broker": "ok", "workers": 0,
                                       "unconsumed": {}, "status": "ok"}


def test_openapi_is_served(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    assert "/v3/webHooks/{webHookId}" in spec["paths"]


def test_health_names_what_is_down(database_url: str, broker_url: str, tmp_path: Path) -> None:
    settings = load_settings({
        "NOTIFIER_DATA_DIR": str(tmp_path), "NOTIFIER_DATABASE_URL": database_url,
        "NOTIFIER_REDIS_URL": "redis://127.0.0.1:1/0", "NOTIFIER_BROKER_URL": broker_url})
    services = build_services(settings)
    with TestClient(create_app(settings, services=services)) as client:
        response = client.get("/health")
    services.db.dispose()
    assert response.status_code == 503
    checks = response.json()["data"]
    assert checks["database"] == "ok" and checks["broker"] == "ok"
    # Named, without exception text (which can carry hosts, users and paths).
    assert checks["redis"] == "down"


def test_an_org_names_its_own_operations_webhook_and_no_other(api: Api) -> None:
    own = api.webhook(1, eventNames=["webhookDisabled", "slaBreached"])["webHookId"]
    other = api.webhook(2)["webHookId"]

    refused = api.call("PUT", "/v3/org/operationsWebHook", json={"webHookId": other})
    named = api.call("PUT", "/v3/org/operationsWebHook", json={"webHookId": own})

    assert refused.status_code == 400, refused.text
    assert [e["field"] for e in refused.json()["errors"]] == ["webHookId"]
    assert named.status_code == 200 and named.json()["data"] == {"webHookId": own}
    assert api.call("GET", "/v3/org/operationsWebHook").json()["data"] == {"webHookId": own}
    assert api.call("GET", "/v3/org/operationsWebHook", 2).json()["data"] == {"webHookId": None}
    assert api.call("GET", "/v3/org/alerts").json()["data"] == []
    cleared = api.call("PUT", "/v3/org/operationsWebHook", json={"webHookId": None})
    assert cleared.json()["data"] == {"webHookId": None}


def test_recent_alerts_are_listed_in_the_api_and_on_the_notifications_page(api: Api) -> None:
    from notifier import alerts
    from tests.conftest import sign_in_form

    hook = api.webhook(1)["webHookId"]
    alerts.record(api.services.db, alerts.webhook_disabled(1, hook, "failing for 5 days",
                                                           now_ms=1000), now_ms=1000)
    alerts.record(api.services.db, alerts.webhook_disabled(2, "wh_other", "not org 1's",
                                                           now_ms=1000), now_ms=1000)

    listed = api.call("GET", "/v3/org/alerts").json()["data"]
    form = api.client.get("/ui/login")
    api.client.post("/ui/login", data=sign_in_form(form.text, 1, api.keys[1]))
    page = api.client.get("/ui/notifications").text

    assert [(a["kind"], a["webHookId"], a["data"]["reason"]) for a in listed] == [
        ("webhookDisabled", hook, "failing for 5 days")]
    assert "Recent alerts" in page and "failing for 5 days" in page and hook in page
    assert "not org 1" not in page
