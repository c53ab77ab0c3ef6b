"""A webhook read and written back (API, admin form, CLI) keeps its stored header values: the
next delivery, to a real receiver, carries the real value, never its mask."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import Receiver, Stack

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SECRET = "Bearer s3cret-token-5678"
EVENT = {"eventName": "tierUpgraded",
         "data": {"customerIdentifiers": {"customerId": 3}, "upgradedTierNumber": 2}}


def test_get_then_put_through_the_api_keeps_the_header_value(
        stack: Stack, receiver: Receiver) -> None:
    auth = {"Authorization": f"Bearer {stack.org(5, 'round trip')}"}
    base = stack.web()
    stack.worker()
    created = requests.post(f"{base}/v3/webHooks", headers=auth, timeout=10, json={
        "name": "rt", "webHookUrl": receiver.url("/rt"), "eventNames": ["tierUpgraded"],
        "maxAllowedConnections": 2, "webHookHeaders": {"Authorization": SECRET}})
    assert created.status_code == 201, created.text
    hook_id = created.json()["data"]["webHookId"]

    fetched = requests.get(f"{base}/v3/webHooks/{hook_id}", headers=auth, timeout=10)
    view = fetched.json()["data"]
    assert view["webHookHeaders"] == {"Authorization": "****5678"}
    view["slaInSeconds"] = 120  # the one change; everything else goes back as it was read
    put = requests.put(f"{base}/v3/webHooks/{hook_id}", headers=auth, timeout=10, json=view)
    assert put.status_code == 200, put.text
    assert put.json()["data"]["slaInSeconds"] == 120

    posted = requests.post(f"{base}/v3/events", headers=auth, timeout=10, json=EVENT)
    assert posted.status_code == 202, posted.text
    (request,) = receiver.wait_for(1, "/rt", timeout=60)
    assert request.headers["authorization"] == SECRET
