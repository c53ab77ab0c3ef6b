"""Every webhook field is bounded, and out of bounds is a 400 (an exit 1 from the CLI) naming
the field, from the API, the admin pages and the CLI alike; never a 500, never saved."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

import pytest

from notifier.webhooks import MAX_OVERLAP_SECONDS, MAX_SLA_SECONDS, MAX_URL_CHARS
from tests.conftest import Cli
from tests.webhooks.conftest import Rooms, created_id

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

BASE = {"name": "bounded", "webHookUrl": "http://127.0.0.1:9/hook", "eventNames": ["pointsIssued"],
        "maxAllowedConnections": 2}
MANY_HEADERS = {f"X-H{i}": "v" for i in range(51)}
BIG_HEADERS = {"X-A": "a" * 4000, "X-B": "b" * 4200}  # 8 206 bytes with the names
# (fields, the field named, words of the problem)
CASES = [
    ({"webHookHeaders": MANY_HEADERS}, "webHookHeaders", "at most 50 headers"),
    ({"webHookHeaders": BIG_HEADERS}, "webHookHeaders", "at most 8192 bytes"),
    ({"maxAllowedConnections": 101}, "maxAllowedConnections", "at most 100"),
    ({"maxAllowedConnections": 10**12}, "maxAllowedConnections", "at most 100"),
    ({"maxAllowedConnections": 10**20}, "maxAllowedConnections", "at most 100"),
    ({"maxAllowedConnections": 0}, "maxAllowedConnections", "greater than zero"),
    ({"slaInSeconds": MAX_SLA_SECONDS + 1}, "slaInSeconds", f"at most {MAX_SLA_SECONDS}"),
    ({"slaInSeconds": 10**20}, "slaInSeconds", f"at most {MAX_SLA_SECONDS}"),
    ({"slaInSeconds": -1}, "slaInSeconds", "not be negative"),
    ({"webHookUrl": "http://127.0.0.1:9/" + "a" * MAX_URL_CHARS}, "webHookUrl",
     f"at most {MAX_URL_CHARS} characters"),
    # HTTP cannot carry them: every delivery would fail in notifier, not the save.
    ({"webHookHeaders": {"X-Name": "ok \u2713"}}, "webHookHeaders.X-Name", "visible characters"),
    ({"webHookHeaders": {"X-Name": "a\x01b"}}, "webHookHeaders.X-Name", "visible characters"),
]
IDS = ["51 headers", "8 KiB of headers", "101 connections", "1e12 connections",
       "1e20 connections", "0 connections", "SLA past 32 bits", "1e20 SLA", "negative SLA",
       "long URL", "a header value beyond Latin-1", "a control character in a header value"]


def _refused(response: Any, field: str, words: str) -> None:
    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["field"] == field and words in error["message"], error


@pytest.mark.parametrize(("fields", "field", "words"), CASES, ids=IDS)
def test_the_api_refuses_out_of_bounds_naming_the_field(
        rooms: Rooms, fields: dict[str, Any], field: str, words: str) -> None:
    _refused(rooms.api("POST", "/v3/webHooks", json={**BASE, **fields}), field, words)
    assert rooms.api("GET", "/v3/webHooks").json()["data"] == []

    hook_id = rooms.api("POST", "/v3/webHooks", json=BASE).json()["data"]["webHookId"]
    before = rooms.api("GET", f"/v3/webHooks/{hook_id}").json()["data"]
    _refused(rooms.api("PUT", f"/v3/webHooks/{hook_id}", json=fields), field, words)
    assert rooms.api("GET", f"/v3/webHooks/{hook_id}").json()["data"] == before


def test_the_largest_values_in_bounds_are_saved(rooms: Rooms) -> None:
    headers = {f"X-H{i}": "v" for i in range(50)}
    created = rooms.api("POST", "/v3/webHooks", json={
        **BASE, "webHookHeaders": headers, "maxAllowedConnections": 100,
        "slaInSeconds": MAX_SLA_SECONDS})
    assert created.status_code == 201, created.text
    rotated = rooms.api("POST", f"/v3/webHooks/{created.json()['data']['webHookId']}"
                        "/secret/rotate", json={"overlapSeconds": MAX_OVERLAP_SECONDS})
    assert rotated.status_code == 200, rotated.text


@pytest.mark.parametrize("overlap", [MAX_OVERLAP_SECONDS + 1, 10**20, -1])
def test_the_rotation_overlap_is_bounded(rooms: Rooms, overlap: int) -> None:
    hook = rooms.api("POST", "/v3/webHooks", json=BASE).json()["data"]
    response = rooms.api("POST", f"/v3/webHooks/{hook['webHookId']}/secret/rotate",
                         json={"overlapSeconds": overlap})
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == "overlapSeconds"


def _form(fields: dict[str, Any]) -> list[tuple[str, str]]:
    body = {**BASE, **fields}
    pairs = [("name", body["name"]), ("webHookUrl", body["webHookUrl"]),
             ("maxAllowedConnections", str(body["maxAllowedConnections"])),
             ("slaInSeconds", str(body.get("slaInSeconds", 3600)))]
    pairs += [("eventNames", name) for name in body["eventNames"]]
    for key, value in body.get("webHookHeaders", {}).items():
        pairs += [("headerKey", key), ("headerValue", value)]
    return pairs


@pytest.mark.parametrize(("fields", "field", "words"), CASES, ids=IDS)
def test_the_admin_form_shows_out_of_bounds_beside_the_field(
        rooms: Rooms, fields: dict[str, Any], field: str, words: str) -> None:
    response = rooms.client.post(
        "/ui/notifications/new", content=urlencode(_form(fields)),
        headers={"Content-Type": "application/x-www-form-urlencoded"})

    assert response.status_code == 400, response.text
    # Beside the form field the error's path starts with (a header's: the header rows).
    shown = re.search(rf'data-error-for="{field.split(".")[0]}">([^<]*)<', response.text)
    assert shown and words in shown.group(1), response.text
    assert rooms.api("GET", "/v3/webHooks").json()["data"] == []


@pytest.mark.parametrize(("fields", "field", "words"), CASES, ids=IDS)
def test_the_cli_refuses_out_of_bounds_naming_the_field(
        cli: Cli, rooms: Rooms, fields: dict[str, Any], field: str, words: str) -> None:
    body = {**BASE, **fields}
    options = ["--org", 1, "--url", body["webHookUrl"], "--event", "pointsIssued",
               "--max-connections", body["maxAllowedConnections"],
               "--sla", body.get("slaInSeconds", 3600)]
    for key, value in body.get("webHookHeaders", {}).items():
        options += ["--header", f"{key}:{value}"]

    created = cli("webhooks", "create", "--name", "bounded", *options)
    hook_id = created_id(cli("webhooks", "create", "--name", "in bounds", "--org", 1,
                             "--url", BASE["webHookUrl"], "--event", "pointsIssued"))
    updated = cli("webhooks", "update", hook_id, *options)

    for result in (created, updated):
        assert result.exit_code == 1, result.output
        assert f"{field}: " in result.stderr and words in result.stderr, result.stderr
    (only,) = rooms.api("GET", "/v3/webHooks").json()["data"]
    assert only["webHookId"] == hook_id and only["maxAllowedConnections"] == 10


def test_the_bounds_are_settings(stack_env: dict[str, str], cli: Cli, rooms: Rooms) -> None:
    stack_env.update(NOTIFIER_MAX_ALLOWED_CONNECTIONS="3", NOTIFIER_WEBHOOK_MAX_HEADERS="1",
                     NOTIFIER_WEBHOOK_MAX_HEADER_BYTES="10")
    common = ["--org", 1, "--url", BASE["webHookUrl"], "--event", "pointsIssued"]

    four = cli("webhooks", "create", "--name", "a", *common, "--max-connections", 4)
    two_headers = cli("webhooks", "create", "--name", "b", *common, "--max-connections", 3,
                      "--header", "X-A:1", "--header", "X-B:2")
    long_header = cli("webhooks", "create", "--name", "c", *common, "--max-connections", 3,
                      "--header", "X-Long:12345")
    fits = cli("webhooks", "create", "--name", "d", *common, "--max-connections", 3,
               "--header", "X-A:12345")

    assert "maxAllowedConnections: must be at most 3" in four.stderr, four.output
    assert "webHookHeaders: at most 1 headers" in two_headers.stderr, two_headers.output
    assert "webHookHeaders: at most 10 bytes" in long_header.stderr, long_header.output
    created_id(fits)
    assert [h["name"] for h in rooms.api("GET", "/v3/webHooks").json()["data"]] == ["d"]
