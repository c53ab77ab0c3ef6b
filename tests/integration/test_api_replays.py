"""Replay by selection over the HTTP API: the count, the replay's id, its progress, org scoping,
and bad criteria named by their field (in-process, both databases, a real Redis)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update

from notifier import store
from notifier.models import Delivery, DeliveryStatus, Event
from notifier.pipeline import now_ms
from tests.conftest import sign_in_form
from tests.integration import test_api
from tests.integration.test_api import Api
from tests.integration.test_api_logs import _deliveries, _publish, _set

pytestmark = pytest.mark.integration
api = test_api.api  # the in-process API fixture, shared rather than copied


def _outage(api: Api) -> tuple[str, list[str], str]:
    """A webhook with three deliveries dead on a 503 and one delivered: (its id, the dead ones,
    the delivered one)."""
    hook = api.webhook()["webHookId"]
    dead = []
    for n in range(4):
        _publish(api, f"e-{n}", customer=n)
        delivery = _deliveries(api, f"e-{n}")[hook]
        if n < 3:
            _set(api, delivery, status=DeliveryStatus.DEAD, last_status_code=503, ended_at_ms=5)
            dead.append(delivery)
        else:
            _set(api, delivery, status=DeliveryStatus.DELIVERED, last_status_code=200)
            delivered = delivery
    api.settle()
    # Nothing is left to send: Redis holds nothing of them (what ingest queued is sent).
    api.services.queues.client.flushall()
    api.services.queues.rebuilt()
    return hook, dead, delivered


def _statuses(api: Api) -> dict[str, str]:
    with api.services.db.session() as session:
        return {row.id: row.status for row in session.execute(
            select(Delivery.id, Delivery.status))}


def test_a_replay_answers_its_count_and_id_and_its_progress(api: Api) -> None:
    hook, dead, delivered = _outage(api)
    criteria = {"status": ["dead", "failed"], "responseStatus": "5xx", "since": "1h"}

    dry = api.call("POST", f"/v3/webHooks/{hook}/replay", json={**criteria, "dryRun": True})
    assert dry.status_code == 200, dry.text
    shown = dry.json()["data"]
    assert (shown["replayId"], shown["matched"], shown["queued"], shown["skipped"]) == (
        None, 3, 0, 0)
    assert {row["deliveryId"] for row in shown["sample"]} == set(dead)
    assert set(_statuses(api).values()) == {"dead", "delivered"} and api.leases == []

    made = api.call("POST", f"/v3/webHooks/{hook}/replay", json=criteria)
    assert made.status_code == 202, made.text
    answer = made.json()["data"]
    assert (answer["matched"], answer["queued"], answer["skipped"], answer["queuing"]) == (
        3, 3, 0, False)
    replay_id = answer["replayId"]
    # One short lease is sent; it takes the rest as its task starts (see Queues.take_many).
    (lease,) = api.leases
    (taken,) = api.services.queues.take_many([lease], lease_ms=60_000, batch=20, now_ms=now_ms()).leases
    assert taken is not None and sorted(taken.delivery_ids) == sorted(dead)

    progress = api.call("GET", f"/v3/webHooks/{hook}/replays/{replay_id}").json()["data"]
    assert (progress["queued"], progress["delivered"], progress["failed"], progress["toGo"]) == (
        3, 0, 0, 3)
    assert progress["requestedBy"].startswith("api key ") and progress["orgId"] == 1
    assert progress["selection"]["status"] == ["dead", "failed"] and not progress["queuing"]
    _set(api, dead[0], status=DeliveryStatus.DELIVERED)
    _set(api, dead[1], status=DeliveryStatus.DEAD)
    progress = api.call("GET", f"/v3/webHooks/{hook}/replays/{replay_id}").json()["data"]
    assert (progress["delivered"], progress["failed"], progress["toGo"]) == (1, 1, 1)
    assert _statuses(api)[delivered] == "delivered"

    # Replayed again while it waits: skipped, nothing queued twice.
    again = api.call("POST", f"/v3/webHooks/{hook}/replay", json={"deliveryIds": [dead[2]]})
    assert (again.json()["data"]["queued"], again.json()["data"]["skipped"]) == (0, 1)


def test_another_orgs_webhook_and_replay_do_not_exist(api: Api) -> None:
    hook, _, _ = _outage(api)
    replay_id = api.call("POST", f"/v3/webHooks/{hook}/replay",
                         json={"status": ["dead"]}).json()["data"]["replayId"]
    theirs = api.webhook(org_id=2)["webHookId"]

    assert api.call("POST", f"/v3/webHooks/{hook}/replay", 2,
                    json={"status": ["dead"]}).status_code == 404
    assert api.call("GET", f"/v3/webHooks/{hook}/replays/{replay_id}", 2).status_code == 404
    # Its own webhook, another's replay: no such replay of it.
    assert api.call("GET", f"/v3/webHooks/{theirs}/replays/{replay_id}", 2).status_code == 404


@pytest.mark.parametrize(("body", "field"), [
    ({}, "selection"),
    ({"dryRun": True}, "selection"),
    ({"since": "yesterday"}, "since"),
    ({"since": "1h", "until": "2h"}, "until"),
    ({"status": ["dead", "lost"]}, "status[1]"),
    ({"responseStatus": "5x"}, "responseStatus"),
    ({"statuses": ["dead"]}, "statuses"),
    ({"deliveryIds": ["msg_nope"]}, "deliveryIds[0]"),
    ({"eventName": "pointsIssued"}, "eventName"),
])
def test_bad_criteria_name_their_field(api: Api, body: dict[str, Any], field: str) -> None:
    hook, _, _ = _outage(api)

    response = api.call("POST", f"/v3/webHooks/{hook}/replay", json=body)

    assert response.status_code == 400, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]
    assert set(_statuses(api).values()) == {"dead", "delivered"}


def test_a_replay_tells_the_deliveries_whose_event_retention_emptied_from_those_queued_already(
        api: Api) -> None:
    """Past NOTIFIER_RETENTION_DAYS, the usual case for a replay of old failures: those are
    counted apart, not as pending or being sent already (in the API's answer and on the admin
    pages' count)."""
    hook, dead, _ = _outage(api)
    emptied, pending, replayable = dead
    with api.services.db.session() as session:
        session.execute(update(Event).where(Event.event_id == "e-0")
                        .values(payload=store.PURGED_PAYLOAD, purged_at_ms=6))
    _set(api, pending, status=DeliveryStatus.PENDING)
    criteria = {"deliveryIds": dead}

    form = api.client.get("/ui/login")
    api.client.post("/ui/login", data=sign_in_form(form.text, 1, api.keys[1]))
    page = api.client.post(f"/ui/notifications/{hook}/replay",
                           data={"deliveryIds": " ".join(dead), "step": "count"}).text
    dry = api.call("POST", f"/v3/webHooks/{hook}/replay", json={**criteria, "dryRun": True})
    made = api.call("POST", f"/v3/webHooks/{hook}/replay", json=criteria)

    assert "1 pending or being sent already" in page and "1 emptied by retention" in page
    assert made.status_code == 202, made.text
    assert [(answer["matched"], answer["queued"], answer["skipped"], answer["emptied"])
            for answer in (dry.json()["data"], made.json()["data"])] == [(3, 0, 2, 1),
                                                                        (3, 1, 2, 1)]
    assert _statuses(api)[replayable] == "pending" and _statuses(api)[emptied] == "dead"
