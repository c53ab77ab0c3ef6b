"""logs.example_event: a minimal event built from each resolved schema, valid against it."""

from __future__ import annotations

from typing import Any

import pytest

from notifier.errors import InvalidEvent
from notifier.logs import _example, example_event
from notifier.schemas import load_catalog

CATALOG = load_catalog()


@pytest.mark.parametrize("name", CATALOG.names)
def test_every_catalog_event_gets_a_valid_example(name: str) -> None:
    example = example_event(CATALOG, name)

    CATALOG.validate(example)  # example_event checks too; this says what the test is about
    assert example["eventName"] == name
    assert set(example) >= {"eventId", "orgId", "createdAt", "data"}


def test_the_catalog_is_not_empty() -> None:
    assert len(CATALOG.names) >= 75


def test_required_fields_come_from_every_allof_part() -> None:
    example = example_event(CATALOG, "pointsIssued")

    assert example == {"eventName": "pointsIssued", "eventId": "example", "orgId": 1,
                       "createdAt": 1, "data": {"customerIdentifiers": {"customerId": 1}}}


@pytest.mark.parametrize(("schema", "value"), [
    ({"type": "string"}, "example"),
    ({"type": "string", "minLength": 10}, "examplexxx"),
    ({"type": "string", "maxLength": 3}, "exa"),
    ({"type": "integer", "minimum": 5}, 5),
    ({"type": "number"}, 1.0),
    ({"type": "boolean"}, False),
    ({"type": ["null", "string"]}, "example"),
    ({"type": "array", "items": {"type": "integer"}}, []),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, [1, 1]),
    ({"type": "string", "enum": ["b", "a"]}, "b"),
    ({"type": "string", "const": "x"}, "x"),
    ({"type": "integer", "default": 7}, 7),
    ({"type": "object", "required": ["a"], "properties": {"a": {"type": "object",
                                                                "required": ["b"]}}},
     {"a": {"b": None}}),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, 1),
    ({"allOf": [{"required": ["a"], "properties": {"a": {"type": "string"}}},
                {"properties": {"a": {"const": "z"}}}]}, {"a": "z"}),
])
def test_values_by_keyword(schema: dict[str, Any], value: Any) -> None:
    assert _example(schema) == value


def test_an_unknown_name_is_refused() -> None:
    with pytest.raises(InvalidEvent):
        example_event(CATALOG, "noSuchEvent")
