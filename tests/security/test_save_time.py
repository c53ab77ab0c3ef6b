"""Save time, through the API: every ambiguous URL form is refused with 400 naming
``webHookUrl`` and nothing is saved, even where the operator allows loopback (the API test
stack allows 127.0.0.0/8, so ``2130706433`` is refused for its form, not for its address)."""

from __future__ import annotations

import pytest

from tests.integration.test_api import Api
from tests.unit.test_destination import AMBIGUOUS

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("url", AMBIGUOUS)
def test_an_ambiguous_url_is_refused_naming_webhookurl(api: Api, url: str) -> None:
    body = {"name": "h", "webHookUrl": url, "eventNames": ["pointsIssued"],
            "maxAllowedConnections": 1}

    response = api.call("POST", "/v3/webHooks", json=body)

    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["field"] == "webHookUrl", error
    assert api.call("GET", "/v3/webHooks").json()["data"] == []
