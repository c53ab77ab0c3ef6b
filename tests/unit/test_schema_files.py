"""Checks on the event JSON schemas under schemas/ (no services, no network)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from jsonschema import Draft6Validator
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT6

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
NON_EVENT_FILES = {"commonEvent.json", "catalog.json"}
GROUPS = {
    "Customer and User Group",
    "Transaction",
    "Loyalty",
    "Loyalty Promotions and Cart Promotions",
    "Tier",
    "Partner Program",
    "Incentives",
    "Cards",
    "Request Updates",
    "Advanced Request Workflows",
    "Communication",
}


def _retrieve(uri: str) -> Resource[Any]:
    """Resolve a relative ref (e.g. ``internal/customer.json``) to a file in SCHEMAS_DIR."""
    parts = urlsplit(uri)
    if parts.scheme or parts.netloc:
        raise NoSuchResource(ref=uri)  # type: ignore[call-arg]
    path = (SCHEMAS_DIR / parts.path).resolve()
    if not path.is_relative_to(SCHEMAS_DIR) or not path.is_file():
        raise NoSuchResource(ref=uri)  # type: ignore[call-arg]
    return DRAFT6.create_resource(json.loads(path.read_text(encoding="utf-8")))


REGISTRY: Registry[Any] = Registry(retrieve=_retrieve)  # type: ignore[call-arg]


def _event_names() -> list[str]:
    return sorted(p.stem for p in SCHEMAS_DIR.glob("*.json") if p.name not in NON_EVENT_FILES)


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCHEMAS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return data


def _validator(name: str) -> Draft6Validator:
    return Draft6Validator(_load(name), registry=REGISTRY)


def _minimal_event(name: str) -> dict[str, Any]:
    return {
        "eventName": name,
        "eventId": "4647d7b7-61c0-480f-8dfe-40ff87f8a445",
        "orgId": 51186,
        "createdAt": 1750224535590,
        "data": {"customerIdentifiers": {"customerId": 1}},
    }


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


EVENT_NAMES = _event_names()
ALL_SCHEMA_FILES = sorted(
    str(p.relative_to(SCHEMAS_DIR)) for p in SCHEMAS_DIR.rglob("*.json") if p.name != "catalog.json"
)

# The enriched pointsIssued sample from the reference notes (section 2.2).
POINTS_ISSUED_SAMPLE: dict[str, Any] = {
    "eventName": "pointsIssued",
    "eventId": "4647d7b7-61c0-480f-8dfe-40ff87f8a445",
    "eventLogId": 39125117,
    "orgId": 51186,
    "refId": "51186_627e870bd278ed95deb5a046b4e9a647",
    "apiRequestId": "627e870bd278ed95deb5a046b4e9a647",
    "createdAt": 1750224535590,
    "data": {
        "customerIdentifiers": {
            "customerId": 387979652,
            "instore": {"mobile": "919300000020", "cardNumbers": []},
        },
        "entityInformation": {"entityType": "USER", "entityId": 387979652},
        "triggeringActivity": {
            "name": "ManualCurrencyAllocation",
            "identifiers": [
                {"key": "BillId", "value": "2152322568"},
                {"key": "billNumber", "value": "1750151307"},
            ],
            "enteredBy": {
                "id": 50671937,
                "entityInformation": {"entityType": "USER", "entityId": 387979652},
            },
            "additionalAttributes": [],
        },
        "loyaltyProgramDetails": {
            "id": 2649,
            "name": "...DefaultProgram",
            "isDefault": True,
            "pointsToCurrencyRatio": 5,
            "tiers": [
                {"tierNumber": 1, "tierName": "CLASSIC"},
                {"tierNumber": 2, "tierName": "SILVER"},
            ],
        },
        "loyaltyProgramId": 2649,
        "programCurrentPoints": 120,
        "programLifetimePoints": 120,
        "totalPointsIssued": 100,
        "regularPointsIssued": 100,
        "regularPointsBreakup": [{"points": 100, "expiryAt": "2025-06-29"}],
        "promotionalPointsIssued": [],
        "promisedPointsIssued": [],
        "loyaltyEventId": "627e870bd278ed95deb5a046b4e9a647",
    },
}


def test_event_count() -> None:
    assert len(EVENT_NAMES) >= 75


def test_catalog_matches_event_files() -> None:
    catalog = json.loads((SCHEMAS_DIR / "catalog.json").read_text(encoding="utf-8"))
    assert set(catalog) == set(EVENT_NAMES)
    assert list(catalog) == sorted(catalog)
    for name, entry in catalog.items():
        assert entry["group"] in GROUPS, name
        assert isinstance(entry["description"], str) and entry["description"], name


@pytest.mark.parametrize("relpath", ALL_SCHEMA_FILES)
def test_schema_is_valid_draft6(relpath: str) -> None:
    schema = json.loads((SCHEMAS_DIR / relpath).read_text(encoding="utf-8"))
    assert schema["$schema"] == "http://json-schema.org/draft-06/schema#"
    assert "$id" not in schema
    Draft6Validator.check_schema(schema)


@pytest.mark.parametrize("relpath", ALL_SCHEMA_FILES)
def test_every_ref_resolves_locally(relpath: str) -> None:
    schema = json.loads((SCHEMAS_DIR / relpath).read_text(encoding="utf-8"))
    resolver = REGISTRY.resolver(base_uri=relpath)
    for ref in _refs(schema):
        assert "://" not in ref
        resolver.lookup(ref)


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_event_schema_shape(name: str) -> None:
    schema = _load(name)
    assert schema["allOf"] == [{"$ref": "commonEvent.json"}]
    assert schema["name"] == name
    assert schema["description"].startswith("Schema for ")
    assert schema["type"] == "object"
    assert schema["properties"]["eventName"] == {"type": "string", "const": name}
    assert schema["properties"]["data"]["type"] == "object"


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_minimal_event_is_valid(name: str) -> None:
    errors = [e.message for e in _validator(name).iter_errors(_minimal_event(name))]
    assert errors == []


def test_points_expired_without_customer_identifiers_fails() -> None:
    event = _minimal_event("pointsExpired")
    event["data"] = {"loyaltyProgramId": 2649, "pointsExpired": 10}
    messages = [e.message for e in _validator("pointsExpired").iter_errors(event)]
    assert any("customerIdentifiers" in m for m in messages), messages


def test_wrong_event_name_fails() -> None:
    event = _minimal_event("pointsExpired")
    event["eventName"] = "pointsIssued"
    assert not _validator("pointsExpired").is_valid(event)


def test_missing_event_id_fails() -> None:
    event = _minimal_event("pointsIssued")
    del event["eventId"]
    messages = [e.message for e in _validator("pointsIssued").iter_errors(event)]
    assert any("eventId" in m for m in messages), messages


def test_reference_points_issued_sample_is_valid() -> None:
    errors = [e.message for e in _validator("pointsIssued").iter_errors(POINTS_ISSUED_SAMPLE)]
    assert errors == []


def test_points_enrichment_fields_are_typed() -> None:
    event = copy.deepcopy(POINTS_ISSUED_SAMPLE)
    event["data"]["AvailablePointsBalance"] = 540.5
    event["data"]["behavioralEventAttributes"] = {"eventName": "appOpen"}
    event["data"]["regularPointsBreakup"][0]["awardedReferenceId"] = "ref-1"
    validator = _validator("pointsIssued")
    assert validator.is_valid(event)
    event["data"]["AvailablePointsBalance"] = "lots"
    assert not validator.is_valid(event)


def test_nested_customer_ref_is_enforced() -> None:
    event = _minimal_event("tierUpgraded")
    event["data"]["customerIdentifiers"] = {"customerId": "not-an-int"}
    assert not _validator("tierUpgraded").is_valid(event)


def test_delivery_failure_status_enum() -> None:
    validator = _validator("communicationMessageUndelivered")
    event = _minimal_event("communicationMessageUndelivered")
    event["data"]["deliveryFailureStatus"] = "HARD_BOUNCED"
    assert validator.is_valid(event)
    event["data"]["deliveryFailureStatus"] = "BOUNCED_SOMEHOW"
    assert not validator.is_valid(event)
