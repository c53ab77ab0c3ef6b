"""Fixtures of the abuse tests: the API under uvicorn with an org, its key and a webhook."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import requests

from tests.conftest import Receiver, Stack


@dataclass(frozen=True)
class LiveApi:
    """The API of a running stack: its base URL, an org's auth header and a webhook of it."""

    base: str
    auth: dict[str, str]
    org_id: int
    hook_path: str

    def post_event(self, event: object, timeout: float = 30) -> requests.Response:
        return requests.post(f"{self.base}/v3/events", headers=self.auth, json=event,
                             timeout=timeout)


@pytest.fixture
def live_api(stack: Stack, receiver: Receiver) -> LiveApi:
    """uvicorn on a loopback port, org 7 with a key, and a webhook of org 7 on the receiver
    subscribed to ``pointsIssued`` (no worker: tests that need one start it)."""
    auth = {"Authorization": f"Bearer {stack.org(7, 'abuse')}"}
    base = stack.web()
    created = requests.post(f"{base}/v3/webHooks", headers=auth, timeout=30, json={
        "name": "abuse", "webHookUrl": receiver.url("/abuse"), "eventNames": ["pointsIssued"],
        "maxAllowedConnections": 2})
    assert created.status_code == 201, created.text
    return LiveApi(base, auth, 7, "/abuse")
