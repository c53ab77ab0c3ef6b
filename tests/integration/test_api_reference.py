"""``/v3/reference`` over HTTP (in-process), on both databases: one record and JSON lines."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_api import Api, api  # noqa: F401 - the shared API fixture

pytestmark = pytest.mark.integration

TILL = {"id": 11, "code": "T11", "name": "Front till", "storeId": 5}


def test_a_record_is_put_read_and_deleted_per_org(api: Api) -> None:  # noqa: F811
    put = api.call("PUT", "/v3/reference/tills/11", json=TILL)
    got = api.call("GET", "/v3/reference/tills/11")
    other_org = api.call("GET", "/v3/reference/tills/11", org_id=2)
    deleted = api.call("DELETE", "/v3/reference/tills/11")
    gone = api.call("GET", "/v3/reference/tills/11")

    assert put.status_code == 200 and put.json()["data"]["code"] == "T11"
    assert got.json()["data"] == put.json()["data"]
    assert other_org.status_code == 404
    assert deleted.status_code == 200 and gone.status_code == 404


def test_a_bad_record_names_its_field(api: Api) -> None:  # noqa: F811
    response = api.call("PUT", "/v3/reference/tills/11", json={**TILL, "colour": "red"})
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "colour"
    assert api.call("PUT", "/v3/reference/planets/1", json={}).status_code == 400


def test_json_lines_load_all_or_nothing_and_report_every_bad_line(api: Api) -> None:  # noqa: F811
    good = "\n".join(json.dumps({"kind": "tills", **TILL, "id": n}) for n in (1, 2))
    bad = good + "\n{not json\n" + json.dumps({"kind": "tills", "id": "x"})

    refused = api.call("POST", "/v3/reference", content=bad,
                       headers_extra={"Content-Type": "application/x-ndjson"})
    assert refused.status_code == 400
    assert [e["field"] for e in refused.json()["errors"]] == ["line 3", "line 4"]
    assert api.call("GET", "/v3/reference/tills/1").status_code == 404  # nothing applied

    loaded = api.call("POST", "/v3/reference", content=good,
                      headers_extra={"Content-Type": "application/x-ndjson"})
    assert loaded.status_code == 200 and loaded.json()["data"] == {"tills": 2}
    assert api.call("GET", "/v3/reference/tills/2").json()["data"]["id"] == 2
