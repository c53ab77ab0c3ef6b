"""Activating a webhook from each room offers to deliver what it held: ``deliverHeld`` in the API
body, the admin page's checkbox, the CLI's ``--deliver-held``; all through the same service."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from sqlalchemy import select

from notifier.models import Delivery, DeliveryStatus
from notifier.pipeline import now_ms
from tests.conftest import Cli, slots_held
from tests.webhooks.conftest import Rooms, form_pairs

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def held_hook(rooms: Rooms, name: str, events: int = 2) -> str:
    """An inactive webhook of org 1 holding ``events`` events."""
    hook_id = rooms.api("POST", "/v3/webHooks", json={
        "name": name, "webHookUrl": f"http://127.0.0.1:9/{name}", "eventNames": ["pointsIssued"],
        "maxAllowedConnections": 1, "active": False}).json()["data"]["webHookId"]
    for n in range(events):
        posted = rooms.api("POST", "/v3/events", json={"eventName": "pointsIssued", "data": {
            "customerIdentifiers": {"customerId": n}}})
        assert posted.status_code == 202, posted.text
    assert statuses(rooms, hook_id) == [DeliveryStatus.HELD] * events
    return hook_id


def statuses(rooms: Rooms, hook_id: str) -> list[str]:
    with rooms.services.db.session() as session:
        return sorted(session.scalars(select(Delivery.status)
                                      .where(Delivery.webhook_id == hook_id)))


def test_the_cli_activates_keeping_what_is_held_or_delivering_it(rooms: Rooms, cli: Cli) -> None:
    hook_id = held_hook(rooms, "cli-held")

    plain = cli("webhooks", "activate", hook_id, "--org", 1)
    assert plain.exit_code == 0, plain.output
    assert statuses(rooms, hook_id) == [DeliveryStatus.HELD] * 2
    assert cli("webhooks", "deactivate", hook_id, "--org", 1).exit_code == 0

    delivering = cli("webhooks", "activate", hook_id, "--org", 1, "--deliver-held")

    assert delivering.exit_code == 0, delivering.output
    assert "2 held deliveries queued" in delivering.stderr
    assert statuses(rooms, hook_id) == [DeliveryStatus.PENDING] * 2
    # Queued through the pipeline: its one slot is taken by the lease sent to the broker.
    assert slots_held(rooms.services.queues, hook_id, now_ms()) == 1


def test_the_admin_page_activates_delivering_what_is_held_when_the_box_is_ticked(
        rooms: Rooms) -> None:
    hook_id = held_hook(rooms, "ui-held")
    page = rooms.client.get(f"/ui/notifications/{hook_id}")
    assert 'data-metric="held">2<' in page.text
    ticked = form_pairs(page.text, "activate-form")
    assert ticked == [("deliverHeld", "on")]  # offered, ticked by default

    unticked = rooms.client.post(f"/ui/notifications/{hook_id}/activate", content="",
                                 headers=FORM)
    assert unticked.status_code == 200 and "stays held" in unticked.text
    assert statuses(rooms, hook_id) == [DeliveryStatus.HELD] * 2 and rooms.leases == []
    rooms.client.post(f"/ui/notifications/{hook_id}/deactivate", content="", headers=FORM)

    activated = rooms.client.post(f"/ui/notifications/{hook_id}/activate",
                                  content=urlencode(ticked), headers=FORM)

    assert activated.status_code == 200 and "2 held event(s) queued" in activated.text
    assert statuses(rooms, hook_id) == [DeliveryStatus.PENDING] * 2
    assert [lease.webhook_id for lease in rooms.leases] == [hook_id]


def test_the_api_refuses_deliver_held_for_a_webhook_left_inactive(rooms: Rooms) -> None:
    hook_id = held_hook(rooms, "api-held", events=1)
    refused = rooms.api("PUT", f"/v3/webHooks/{hook_id}", json={"deliverHeld": True})
    assert refused.status_code == 400
    assert [e["field"] for e in refused.json()["errors"]] == ["deliverHeld"]
    assert statuses(rooms, hook_id) == [DeliveryStatus.HELD]
