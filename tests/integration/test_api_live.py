"""The API as deployed: uvicorn in its own process, a Celery worker, a real receiver."""

from __future__ import annotations

import json

import pytest
import requests
from standardwebhooks.webhooks import Webhook as StandardWebhook

from tests.conftest import Receiver, Stack

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_a_webhook_created_and_an_event_posted_over_http_are_delivered(
        stack: Stack, receiver: Receiver) -> None:
    auth = {"Authorization": f"Bearer {stack.org(5, 'live')}"}
    base = stack.web()
    stack.worker()

    created = requests.post(f"{base}/v3/webHooks", headers=auth, timeout=10, json={
        "name": "live", "webHookUrl": receiver.url("/live"), "eventNames": ["tierUpgraded"],
        "maxAllowedConnections": 2, "webHookHeaders": {"X-Token": "t0ken-value"}})
    assert created.status_code == 201, created.text
    posted = requests.post(f"{base}/v3/events", headers=auth, timeout=10, json={
        "eventName": "tierUpgraded", "data": {"customerIdentifiers": {"customerId": 3},
                                              "upgradedTierNumber": 2}})
    assert posted.status_code == 202, posted.text

    (request,) = receiver.wait_for(1, "/live", timeout=60)
    StandardWebhook(created.json()["data"]["signingSecret"]).verify(request.body, request.headers)
    assert request.headers["x-token"] == "t0ken-value"
    assert json.loads(request.body)["eventId"] == posted.json()["data"][0]["eventId"]
    assert requests.get(f"{base}/health", timeout=10).status_code == 200
