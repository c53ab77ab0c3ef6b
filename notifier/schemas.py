"""The event catalog: one draft-06 JSON schema per event name, loaded once from ``schemas/``.

``$ref``s resolve against the files in that folder only; nothing is ever fetched over the network.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from jsonschema import Draft6Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable
from referencing.jsonschema import DRAFT6

from notifier.errors import InvalidEvent

__all__ = ["SCHEMAS_DIR", "EventCatalog", "json_path", "load_catalog"]

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
        if validator.is_valid(event):  # the common case, without collecting every error
            return
        error: ValidationError | None = best_match(validator.iter_errors(event))
        if error is not None:
            raise InvalidEvent(json_path(error.absolute_path), error.message,
                               rule=str(error.validator))


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
