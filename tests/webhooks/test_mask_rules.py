"""What the mask rule must not allow: a stored header value kept for a URL on another host
(an API key holder, who can only ever read it masked, would have it sent to a server of their
choosing), and two headers of one name in different case (one of them silently lost, and a
mask matched against the other's value). Through the API on PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from tests.webhooks.conftest import Rooms

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SECRET = "Bearer s3cret-token-5678"


def _create(rooms: Rooms, url: str, headers: dict[str, str]) -> Any:
    return rooms.api("POST", "/v3/webHooks", json={
        "name": "masked", "webHookUrl": url, "eventNames": ["tierUpgraded"],
        "maxAllowedConnections": 2, "webHookHeaders": headers})


def _stored(rooms: Rooms, hook_id: str) -> tuple[str, dict[str, str]]:
    from notifier import store

    target = store.target(rooms.services.db, rooms.services.vault, hook_id, now_ms=0)
    return target.url, dict(target.headers)


def test_a_url_moved_to_another_host_does_not_keep_the_stored_header_values(
        rooms: Rooms) -> None:
    created = _create(rooms, "http://127.0.0.1:9/hook", {"Authorization": SECRET})
    assert created.status_code == 201, created.text
    hook_id = created.json()["data"]["webHookId"]
    view = rooms.api("GET", f"/v3/webHooks/{hook_id}").json()["data"]

    moved = rooms.api("PUT", f"/v3/webHooks/{hook_id}",
                      json={**view, "webHookUrl": "http://127.0.0.2:9/steal"})
    moved_alone = rooms.api("PUT", f"/v3/webHooks/{hook_id}",
                            json={"webHookUrl": "http://127.0.0.2:9/steal"})

    for answer in (moved, moved_alone):
        assert answer.status_code == 400, answer.text
        (error,) = answer.json()["errors"]
        assert error["field"].startswith("webHookHeaders"), error
        assert "host" in error["message"], error
    assert _stored(rooms, hook_id) == ("http://127.0.0.1:9/hook", {"Authorization": SECRET})
    # Another path on the same host keeps them; the real value sent again goes anywhere.
    same_host = rooms.api("PUT", f"/v3/webHooks/{hook_id}",
                          json={**view, "webHookUrl": "http://127.0.0.1:9/other"})
    assert same_host.status_code == 200, same_host.text
    assert _stored(rooms, hook_id) == ("http://127.0.0.1:9/other", {"Authorization": SECRET})
    resent = rooms.api("PUT", f"/v3/webHooks/{hook_id}", json={
        "webHookUrl": "http://127.0.0.2:9/new", "webHookHeaders": {"Authorization": "Bearer new"}})
    assert resent.status_code == 200, resent.text
    assert _stored(rooms, hook_id) == ("http://127.0.0.2:9/new", {"Authorization": "Bearer new"})


def test_two_headers_of_one_name_in_different_case_are_refused_naming_it(
        rooms: Rooms) -> None:
    both = _create(rooms, "http://127.0.0.1:9/hook",
                   {"X-Key": "first-value-1111", "x-key": "second-value-2222"})

    assert both.status_code == 400, both.text
    (error,) = both.json()["errors"]
    assert error["field"] == "webHookHeaders.x-key" and "X-Key" in error["message"], error
    assert rooms.api("GET", "/v3/webHooks").json()["data"] == []
