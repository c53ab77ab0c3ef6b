"""The compiled check before jsonschema (``EventCatalog._passes_compiled``) passes nothing that
jsonschema refuses, over every event of the catalog and thousands of variations of each; it
passes what jsonschema passes, so that the fast path is the one valid events take; and it never
fetches a ``$ref`` from anywhere but the folder."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import fastjsonschema
import pytest
from referencing.exceptions import NoSuchResource

from notifier.errors import InvalidEvent
from notifier.logs import _example, _flat, example_event
from notifier.schemas import SCHEMAS_DIR, EventCatalog, _OnlyFrom, load_catalog

CATALOG = load_catalog()

# What a variation puts in place of a value: every JSON type, numbers whole and not, small and
# large; besides these, values on either side of the value's bounds (``_edges``).
VALUES: list[Any] = [None, True, False, 0, -1, 7, 2.5, 1.0, 3.0, -0.5, -0.0, 10 ** 20, 2 ** 63,
                     1e308, float("nan"), float("inf"), "", "example", "x" * 300, "\U0001f600",
                     [], ["example"], [1, 2], [{}], {}, {"x": 1}]


def _schema_at(schema: Any, part: Any) -> Any:
    """The part of ``schema`` (resolved, ``allOf`` folded) that governs a property or an item."""
    if isinstance(part, int):
        return _flat(schema.get("items", {}))
    named = schema.get("properties", {})
    other = schema.get("additionalProperties", {})
    return _flat(named[part] if part in named else other if isinstance(other, dict) else {})


def _edges(governs: dict[str, Any], value: Any) -> list[Any]:
    """Values on either side of the bounds ``governs`` sets."""
    edges: list[Any] = []
    for char in ("x", "\U0001f600"):  # (one code point, two UTF-16 units)
        if "minLength" in governs:
            edges += [char * governs["minLength"], char * max(0, governs["minLength"] - 1)]
        if "maxLength" in governs:
            edges += [char * governs["maxLength"], char * (governs["maxLength"] + 1)]
    for bound in ("minimum", "maximum"):
        if bound in governs:
            at = governs[bound]
            edges += [at - 1, at, at + 1, at - 0.5, at + 0.5, float(at)]
    if "maxItems" in governs and isinstance(value, list) and value:
        edges += [value[:1] * governs["maxItems"], value[:1] * (governs["maxItems"] + 1)]
    return edges


_LEFT_OUT = object()  # (a variation that leaves the property out)


def _fingerprint(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True)


def _variations(event: dict[str, Any], schema: dict[str, Any],
                seen: set[tuple[Any, ...]]) -> Iterator[dict[str, Any]]:
    """The event with each value replaced by each of ``VALUES`` and the values on either side of
    its bounds, each property left out, and a property no schema names added to each object;
    each only where the part of the schema it meets (and the value) was not met before
    (``seen``): the events share most of their parts (``internal/*.json``). Every value of every
    event is replaced by null and by a value of another type whatever was seen."""

    def varied(path: tuple[Any, ...], value: Any = _LEFT_OUT) -> dict[str, Any]:
        copied = copy.deepcopy(event)
        node = copied
        for part in path[:-1]:
            node = node[part]
        if value is _LEFT_OUT:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return copied

    def new(*key: Any) -> bool:
        if key in seen:
            return False
        seen.add(key)
        return True

    def walk(value: Any, governs: Any, path: tuple[Any, ...]) -> Iterator[dict[str, Any]]:
        here = _fingerprint(governs)
        if path:
            # Whatever was seen, every part of every event is checked at all: null, and a value
            # of another type (a part its compiled code left unchecked would pass them).
            for candidate in (None, 7 if isinstance(value, str) else "example"):
                yield varied(path, candidate)
            for candidate in [*VALUES, *_edges(governs, value)]:
                if new(here, "is", _fingerprint(candidate)):
                    yield varied(path, candidate)
        if isinstance(value, dict):
            if new(here, "added"):
                yield varied((*path, "unexpectedProperty"), "example")
            for key, item in value.items():
                if new(here, "without", key):
                    yield varied((*path, key))
                yield from walk(item, _schema_at(governs, key), (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from walk(item, _schema_at(governs, index), (*path, index))

    yield from walk(event, _flat(schema), ())


def _starts(name: str) -> list[dict[str, Any]]:
    """The event's minimal example, and its fullest one when jsonschema takes it."""
    full = _example(CATALOG.resolved(name), every=True)
    full.update(eventName=name, eventId="e-1", orgId=51186, createdAt=1750224535590)
    starts = [example_event(CATALOG, name)]
    if CATALOG._validator(name).is_valid(full):
        starts.append(full)
    return starts


# The parts of the schemas (and values) already varied, by any event's test.
_SEEN: set[tuple[Any, ...]] = set()


@pytest.mark.parametrize("name", CATALOG.names)
def test_the_compiled_check_passes_nothing_jsonschema_refuses(name: str) -> None:
    reference = CATALOG._validator(name)
    passed = refused = 0
    for start in _starts(name):
        assert CATALOG._passes_compiled(name, start), "a valid event missed the fast path"
        for varied in _variations(start, CATALOG.resolved(name), _SEEN):
            if not CATALOG._passes_compiled(name, varied):
                refused += 1
                continue  # jsonschema decides these: validate() asks it
            passed += 1
            assert reference.is_valid(varied), (
                f"{name}: the compiled check passed what jsonschema refuses: "
                f"{next(iter(reference.iter_errors(varied))).message} in {varied}")
    # Every event's own const eventName, at least, is new: both kinds are tried each time.
    assert passed and refused


def test_the_fullest_events_reach_deep_into_the_schemas() -> None:
    """Most events start from their fullest form too, not only their required properties."""
    full = [name for name in CATALOG.names if len(_starts(name)) == 2]
    assert len(full) >= 0.9 * len(CATALOG.names)


def test_jsonschema_has_the_last_word_on_what_the_compiled_check_refuses() -> None:
    catalog = EventCatalog(SCHEMAS_DIR)
    event = example_event(catalog, "pointsIssued")

    def refuses(_: Any) -> None:
        raise ValueError("the compiled check refuses everything")

    catalog._compiled["pointsIssued"] = refuses
    catalog.validate(event)  # valid by jsonschema: it passes
    with pytest.raises(InvalidEvent) as caught:
        catalog.validate({**event, "orgId": "not a number"})
    assert caught.value.field == "$.orgId"


def test_a_schema_that_cannot_be_compiled_leaves_its_events_to_jsonschema(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    catalog = EventCatalog(SCHEMAS_DIR)
    compiles: list[str] = []

    def fails(*_: Any, **__: Any) -> None:
        compiles.append("tried")
        raise NoSuchResource(ref="internal/internal/customer.json")  # type: ignore[call-arg]

    monkeypatch.setattr(fastjsonschema, "compile", fails)
    event = example_event(catalog, "pointsIssued")  # (validated: the first compile, failed)
    catalog.validate(event)
    catalog.validate(event)
    with pytest.raises(InvalidEvent) as caught:
        catalog.validate({**event, "orgId": "not a number"})

    assert caught.value.field == "$.orgId"
    assert compiles == ["tried"]  # once, not at every event
    assert "the schema of pointsIssued is not compiled" in caplog.text


def test_a_ref_is_served_from_the_folder_and_nothing_else_is_fetched() -> None:
    handlers = _OnlyFrom(EventCatalog(SCHEMAS_DIR))

    assert handlers[""]("commonEvent.json")["type"] == "object"
    for scheme, uri in (("https", "https://example.com/x.json"), ("file", "file:///etc/passwd"),
                        ("", "../setup.cfg")):
        # Every scheme has a handler: fastjsonschema would fetch one it has none for.
        assert scheme in handlers
        with pytest.raises(NoSuchResource):
            handlers[scheme](uri)
