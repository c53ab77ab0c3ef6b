"""EventCatalog.validate and json_path: errors name a JSON path (files: test_schema_files)."""

from __future__ import annotations

from typing import Any

import pytest

from notifier.errors import InvalidEvent
from notifier.schemas import json_path, load_catalog


def _event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "eventName": "pointsIssued", "eventId": "e-1", "orgId": 51186,
        "createdAt": 1750224535590, "data": {"customerIdentifiers": {"customerId": 1}}}
    event.update(overrides)
    return event


@pytest.mark.parametrize(("parts", "path"), [
    ([], "$"),
    (["data"], "$.data"),
    (["data", "points", 0], "$.data.points[0]"),
    (["data", 2, 3, "name"], "$.data[2][3].name"),
])
def test_json_path(parts: list[Any], path: str) -> None:
    assert json_path(parts) == path


def test_a_valid_event_passes() -> None:
    load_catalog().validate(_event())


def test_a_wrong_type_names_its_path() -> None:
    event = _event(data={"customerIdentifiers": {"customerId": "nope"}})

    with pytest.raises(InvalidEvent) as caught:
        load_catalog().validate(event)

    assert caught.value.field == "$.data.customerIdentifiers.customerId"


@pytest.mark.parametrize("name", ["noSuchEvent", None, 7])
def test_an_unknown_or_missing_event_name_names_event_name(name: object) -> None:
    with pytest.raises(InvalidEvent) as caught:
        load_catalog().validate(_event(eventName=name))

    assert caught.value.field == "$.eventName"
