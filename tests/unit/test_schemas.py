"""EventCatalog.validate and json_path: errors name a JSON path (files: test_schema_files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from notifier.errors import InvalidEvent
from notifier.schemas import EventCatalog, json_path, load_catalog


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


@pytest.mark.parametrize(("name", "problem"), [
    ("noSuchEvent", "unknown event name 'noSuchEvent'"),
    (None, "is required and must be a string"),
    (7, "is required and must be a string"),
])
def test_an_unknown_or_missing_event_name_names_event_name(name: object, problem: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        load_catalog().validate(_event(eventName=name))

    assert caught.value.field == "$.eventName"
    assert str(caught.value) == f"$.eventName: {problem}"


def test_an_invalid_event_names_the_rule_and_the_problem() -> None:
    with pytest.raises(InvalidEvent) as caught:
        load_catalog().validate(_event(data={"customerIdentifiers": {"customerId": "nope"}}))

    assert caught.value.rule == "type"
    assert "'nope' is not of type" in str(caught.value)


# ------------------------------------------------------------ a catalog of a folder of our own

COMMON = {"type": "object", "required": ["eventName"],
          "definitions": {"id/key": {"type": "integer", "minimum": 1}, "ver~sion": {"const": 2}}}


def _folder(tmp_path: Path, schemas: dict[str, Any]) -> Path:
    folder = tmp_path / "schemas"
    for name, schema in schemas.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(schema))
    return folder


def _ref_to(ref: str) -> dict[str, Any]:
    return {"allOf": [{"$ref": ref}], "properties": {"eventName": {"const": "hook"}}}


def test_names_are_the_event_files_of_the_folder(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {
        "commonEvent.json": COMMON, "catalog.json": {"z": {"group": "G", "description": "D"}},
        "z.json": _ref_to("commonEvent.json"), "a.json": _ref_to("./commonEvent.json"),
        "internal/part.json": {"type": "string"}})

    catalog = EventCatalog(folder)

    # The files after catalog.json and commonEvent.json (in name order) count too.
    assert catalog.names == ["a", "z"]
    assert catalog.entries == {"z": {"group": "G", "description": "D"}}
    assert catalog.schema("z") == _ref_to("commonEvent.json")
    assert EventCatalog(_folder(tmp_path / "bare", {"a.json": {}})).entries == {}


@pytest.mark.parametrize("ref", [
    "https://schemas.example.com/commonEvent.json",   # remote: never fetched
    "../outside.json",                                # a file, but outside the folder
    "missing.json",
])
def test_a_ref_the_folder_cannot_serve_fails_at_load_naming_file_and_ref(
        tmp_path: Path, ref: str) -> None:
    (tmp_path / "outside.json").write_text(json.dumps({"type": "object"}))
    folder = _folder(tmp_path, {"commonEvent.json": COMMON, "hook.json": _ref_to(ref)})

    with pytest.raises(ValueError, match="remote and outside") as caught:
        EventCatalog(folder)

    assert "hook.json" in str(caught.value) and repr(ref) in str(caught.value)


def test_resolved_inlines_every_ref_pointer_included_and_drops_definitions(
        tmp_path: Path) -> None:
    folder = _folder(tmp_path, {
        "commonEvent.json": COMMON,
        "internal/ids.json": {"definitions": {"id": {"$ref": "../commonEvent.json#/definitions/id~1key"}},
                              "type": "object", "properties": {
                                  "customerId": {"$ref": "#/definitions/id"},
                                  "version": {"$ref": "../commonEvent.json#/definitions/ver~0sion"}}},
        "hook.json": {"allOf": [{"$ref": "commonEvent.json"}],
                      "properties": {"data": {"$ref": "internal/ids.json"}}}})

    assert EventCatalog(folder).resolved("hook") == {
        "allOf": [{"type": "object", "required": ["eventName"]}],
        "properties": {"data": {"type": "object", "properties": {
            "customerId": {"type": "integer", "minimum": 1}, "version": {"const": 2}}}}}


def _chain(tmp_path: Path, hops: int) -> EventCatalog:
    """``hook.json`` reaching a string through ``hops`` files, each a ``$ref`` to the next."""
    files = {f"c{n}.json": {"$ref": f"c{n + 1}.json"} for n in range(1, hops)}
    return EventCatalog(_folder(tmp_path, {**files, "hook.json": {"$ref": "c1.json"},
                                           f"c{hops}.json": {"type": "string"}}))


def test_resolved_follows_twenty_refs_deep_and_no_deeper(tmp_path: Path) -> None:
    assert _chain(tmp_path / "20", 20).resolved("hook") == {"type": "string"}

    with pytest.raises(ValueError, match="nesting too deep"):
        _chain(tmp_path / "21", 21).resolved("hook")


def test_resolved_stops_at_a_ref_cycle(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"hook.json": {"$ref": "loop.json"}, "loop.json": {"$ref": "hook.json"}})

    with pytest.raises(ValueError, match="nesting too deep"):
        EventCatalog(folder).resolved("hook")


def test_resolved_of_an_unknown_name_names_event_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidEvent) as caught:
        EventCatalog(_folder(tmp_path, {"hook.json": {}})).resolved("nope")

    assert caught.value.field == "$.eventName"
