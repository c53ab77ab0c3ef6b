"""The webhook page's SLA figures and its "breached only" filter of the delivery log, read from
the same consumer-group metrics and logs as the API."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select, update

from notifier.models import Delivery, DeliveryStatus
from tests.webhooks.conftest import Rooms, form_pairs

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_the_webhook_page_shows_the_share_within_sla_and_filters_the_breached(
        rooms: Rooms) -> None:
    hook_id = rooms.api("POST", "/v3/webHooks", json={
        "name": "sla", "webHookUrl": "http://127.0.0.1:9/sla", "eventNames": ["pointsIssued"],
        "maxAllowedConnections": 1, "slaInSeconds": 1}).json()["data"]["webHookId"]
    for n in range(3):
        posted = rooms.api("POST", "/v3/events", json={"eventName": "pointsIssued", "data": {
            "customerIdentifiers": {"customerId": n}}})
        assert posted.status_code == 202, posted.text
    with rooms.services.db.session() as session:
        late, met, _ = session.scalars(select(Delivery.id).where(Delivery.webhook_id == hook_id)
                                       .order_by(Delivery.ingested_at_ms, Delivery.id)).all()
        # One delivered past its SLA, one within it; the third still on its way.
        for delivery_id, breach in ((late, Delivery.sla_due_at_ms), (met, None)):
            session.execute(update(Delivery).where(Delivery.id == delivery_id).values(
                status=DeliveryStatus.DELIVERED, sla_breach_at_ms=breach, sla_due_at_ms=None,
                ended_at_ms=Delivery.ingested_at_ms + 500))

    page = rooms.client.get(f"/ui/notifications/{hook_id}")

    assert 'data-metric="sla-met-percent">50.0%<' in page.text
    assert 'data-metric="sla-breached">1<' in page.text
    assert page.text.count('class="delivery"') == 3
    assert ("slaBreached", "true") not in form_pairs(page.text, "log-filters")

    filtered = rooms.client.get(f"/ui/notifications/{hook_id}?days=7&slaBreached=true")

    assert re.findall(r'data-delivery-id="([^"]+)"', filtered.text) == [late]
    assert ("slaBreached", "true") in form_pairs(filtered.text, "log-filters")
