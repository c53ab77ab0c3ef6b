"""The event catalog: one draft-06 JSON schema per event name, loaded once from ``schemas/``.

``$ref``s resolve against the files in that folder only; nothing is ever fetched over the network.

jsonschema decides what is valid and names the problem. An event is first checked by its
schema compiled to Python (fastjsonschema, about 20 times faster: jsonschema's check was near
half of an ingest's time in the workers), which can only let it pass sooner: whatever the
compiled check refuses or fails on, and every event of a schema that could not be compiled,
jsonschema checks again and has the last word.
``tests/unit/test_schema_compiled.py`` shows the compiled check passes nothing jsonschema refuses,
over every event of the catalog and thousands of variations of them.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import fastjsonschema
from jsonschema import Draft6Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable
from referencing.jsonschema import DRAFT6

from notifier.errors import InvalidEvent

__all__ = ["SCHEMAS_DIR", "EventCatalog", "json_path", "load_catalog"]

log = logging.getLogger(__name__)

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
_NOT_EVENTS = {"commonEvent.json", "catalog.json"}


def json_path(parts: Iterable[Any]) -> str:
    """``['data', 'points', 0]`` -> ``$.data.points[0]``."""
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


class EventCatalog:
    """Every event schema of one folder, with a validator per event name built once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # Every file is loaded into the registry up front: a registry is immutable, and one that
        # had to retrieve a $ref would read the file again on every validation.
        files = {path.relative_to(folder).as_posix(): json.loads(path.read_text())
                 for path in sorted(folder.rglob("*.json")) if path.name != "catalog.json"}
        self._registry: Registry[Any] = Registry(  # type: ignore[call-arg]
            retrieve=self._retrieve).with_resources(
            (name, DRAFT6.create_resource(schema)) for name, schema in files.items()).crawl()
        self._check_refs(files)
        self._validators: dict[str, Draft6Validator] = {}
        # Compiled on first use (about 60 ms each: 5 s for the whole catalog, in every process).
        self._compiled: dict[str, Callable[[Any], Any] | None] = {}
        self._compiling = threading.Lock()
        for path in sorted(folder.glob("*.json")):
            if path.name in _NOT_EVENTS:
                continue
            schema = json.loads(path.read_text())
            self._validators[path.stem] = Draft6Validator(
                schema, registry=self._registry, format_checker=None)
        catalog_file = folder / "catalog.json"
        self.entries: Mapping[str, Mapping[str, str]] = (
            json.loads(catalog_file.read_text()) if catalog_file.exists() else {})

    def _check_refs(self, files: Mapping[str, Any]) -> None:
        """Fail at load, naming the file and the ``$ref``, rather than at the first event that
        reaches a ``$ref`` this folder cannot serve (remote, outside it, or missing)."""
        for name, schema in files.items():
            resolver = self._registry.resolver(base_uri=name)
            for ref in _refs(schema):
                try:
                    resolver.lookup(ref)
                except Unresolvable:
                    raise ValueError(f"{self.folder / name}: $ref {ref!r} is not a file of "
                                     f"{self.folder} (remote and outside $refs are refused)"
                                     ) from None

    def _retrieve(self, uri: str) -> Resource[Any]:
        # Only plain relative names ("commonEvent.json", "internal/customer.json") are served,
        # and only from this folder: a remote or escaping $ref is refused, never fetched.
        relative = uri.removeprefix("./")
        candidate = (self.folder / relative).resolve()
        if "://" in uri or not candidate.is_relative_to(self.folder.resolve()) \
                or not candidate.is_file():
            raise NoSuchResource(ref=uri)  # type: ignore[call-arg]
        return DRAFT6.create_resource(json.loads(candidate.read_text()))

    @property
    def names(self) -> list[str]:
        return sorted(self._validators)

    def schema(self, event_name: str) -> dict[str, Any]:
        return dict(self._validator(event_name).schema)

    def resolved(self, event_name: str) -> dict[str, Any]:
        """The event's schema with every ``$ref`` replaced by what it points at."""
        self._validator(event_name)  # unknown names fail as everywhere else
        return dict(self._inline(self.schema(event_name), self.folder / f"{event_name}.json", 0))

    def _inline(self, node: Any, base: Path, depth: int) -> Any:
        if depth > 20:
            raise ValueError(f"$ref nesting too deep in {base.name}")
        if isinstance(node, list):
            return [self._inline(item, base, depth) for item in node]
        if not isinstance(node, dict):
            return node
        if isinstance(node.get("$ref"), str):
            file_part, _, pointer = node["$ref"].partition("#")
            target = (base.parent / file_part).resolve() if file_part else base
            resource = self._retrieve(str(target.relative_to(self.folder.resolve())))
            found = resource.contents
            for step in [s for s in pointer.split("/") if s]:
                found = found[step.replace("~1", "/").replace("~0", "~")]
            return self._inline(found, target, depth + 1)
        return {key: self._inline(value, base, depth) for key, value in node.items()
                if key != "definitions"}

    def _validator(self, event_name: str) -> Draft6Validator:
        try:
            return self._validators[event_name]
        except KeyError:
            raise InvalidEvent("$.eventName", f"unknown event name {event_name!r}") from None

    def validate(self, event: Mapping[str, Any]) -> None:
        """Raise ``InvalidEvent`` naming the JSON path and the problem, or return quietly."""
        name = event.get("eventName")
        if not isinstance(name, str):
            raise InvalidEvent("$.eventName", "is required and must be a string")
        validator = self._validator(name)
        if self._passes_compiled(name, event):  # the common case, at a twentieth of the cost
            return
        error: ValidationError | None = best_match(validator.iter_errors(event))
        if error is not None:
            raise InvalidEvent(json_path(error.absolute_path), error.message,
                               rule=str(error.validator))

    def _passes_compiled(self, event_name: str, event: Mapping[str, Any]) -> bool:
        """Whether the event's compiled schema passes it; False when it refuses it, fails on
        it, or could not be compiled (jsonschema then decides)."""
        check = self._compiled[event_name] if event_name in self._compiled \
            else self._compile(event_name)
        if check is None:
            return False
        try:
            check(event)
        except Exception:  # refused (JsonSchemaValueException), or a value it does not handle
            return False
        return True

    def _compile(self, event_name: str) -> Callable[[Any], Any] | None:
        """The event's schema compiled, once (None, for good, if it cannot be: jsonschema then
        checks every such event alone, as it did before)."""
        with self._compiling:
            if event_name not in self._compiled:
                try:
                    # A copy: fastjsonschema rewrites the $refs of what it is given in place.
                    self._compiled[event_name] = fastjsonschema.compile(
                        copy.deepcopy(self._validator(event_name).schema),
                        handlers=_OnlyFrom(self),
                        # Only checks: no formats (as jsonschema, format_checker=None), and never
                        # a default written into the event.
                        use_formats=False, use_default=False)
                except Exception as exc:
                    log.warning("the schema of %s is not compiled, jsonschema checks its events "
                                "alone: %s: %s", event_name, type(exc).__name__, exc)
                    self._compiled[event_name] = None
            return self._compiled[event_name]


class _OnlyFrom(Mapping[str, Callable[[str], Any]]):
    """fastjsonschema's ``$ref`` handlers by URI scheme. It fetches a scheme it has no handler
    for over the network; this one has a handler for every scheme, ``EventCatalog._retrieve``,
    which serves the folder's own files and refuses anything else."""

    def __init__(self, catalog: EventCatalog) -> None:
        self._catalog = catalog

    def __getitem__(self, scheme: str) -> Callable[[str], Any]:
        return lambda uri: self._catalog._retrieve(uri).contents

    def __contains__(self, scheme: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:  # (not empty: "no handlers" to a check of its truth)
        return iter(("",))

    def __len__(self) -> int:
        return 1


def _refs(node: Any) -> Iterable[str]:
    """Every ``$ref`` in a schema, however deep."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


@functools.cache
def load_catalog(folder: Path = SCHEMAS_DIR) -> EventCatalog:
    """The catalog of ``folder``, read once per process."""
    return EventCatalog(folder)
