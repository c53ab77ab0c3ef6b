"""Checks on the event JSON schemas under schemas/, through the catalog the product loads
(``notifier.schemas.EventCatalog``: the same ``$ref`` resolution, no services, no network)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft6Validator

from notifier import alerts
from notifier.errors import InvalidEvent
from notifier.schemas import SCHEMAS_DIR, EventCatalog, load_catalog

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
    "Operations",
}
CATALOG = load_catalog()
DRAFT6 = "http://json-schema.org/draft-06/schema#"


def _event_names() -> list[str]:
    return sorted(p.stem for p in SCHEMAS_DIR.glob("*.json") if p.name not in NON_EVENT_FILES)


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCHEMAS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return data


# The least data of each of notifier's own alert events (notifier.alerts).
ALERT_DATA: dict[str, dict[str, Any]] = {
    "slaBreached": {"webHookId": "wh_1", "orgId": 51186, "count": 200,
                    "firstDeliveryIds": ["msg_1", "msg_2"], "minuteStart": 1750224480000},
    "webhookDisabled": {"webHookId": "wh_1", "orgId": 51186, "reason": "failing for 5 days"},
    "webhookRecovered": {"webHookId": "wh_1", "orgId": 51186},
    "deliveryExhausted": {"webHookId": "wh_1", "orgId": 51186, "deliveryId": "msg_1"},
}


def _minimal_event(name: str) -> dict[str, Any]:
    return {
        "eventName": name,
        "eventId": "4647d7b7-61c0-480f-8dfe-40ff87f8a445",
        "orgId": 51186,
        "createdAt": 1750224535590,
        "data": ALERT_DATA.get(name, {"customerIdentifiers": {"customerId": 1}}),
    }


def _problem(event: dict[str, Any]) -> str | None:
    """What the catalog says is wrong with the event (its path and message), or None."""
    try:
        CATALOG.validate(event)
    except InvalidEvent as exc:
        return str(exc)
    return None


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


def test_every_file_is_a_draft6_schema_without_an_id() -> None:
    wrong = []
    for relpath in ALL_SCHEMA_FILES:
        schema = json.loads((SCHEMAS_DIR / relpath).read_text(encoding="utf-8"))
        if schema.get("$schema") != DRAFT6 or "$id" in schema:
            wrong.append(relpath)
        Draft6Validator.check_schema(schema)
    assert wrong == []


def test_the_catalog_knows_every_event_file_with_its_refs_inlined() -> None:
    assert CATALOG.names == EVENT_NAMES
    assert [name for name in EVENT_NAMES if "$ref" in json.dumps(CATALOG.resolved(name))] == []


def test_every_event_schema_has_the_common_shape() -> None:
    for name in EVENT_NAMES:
        schema = _load(name)
        assert schema["allOf"] == [{"$ref": "commonEvent.json"}], name
        assert schema["name"] == name
        assert schema["description"].startswith("Schema for "), name
        assert schema["type"] == "object", name
        assert schema["properties"]["eventName"] == {"type": "string", "const": name}
        assert schema["properties"]["data"]["type"] == "object", name


def test_a_minimal_event_of_every_name_is_valid() -> None:
    assert {name: _problem(_minimal_event(name)) for name in EVENT_NAMES} == dict.fromkeys(
        EVENT_NAMES)


def _folder(tmp_path: Path, ref: str) -> Path:
    """A schemas folder with one event whose data is ``$ref``'d, and beside it (outside the
    folder) a file that would accept anything."""
    folder = tmp_path / "schemas"
    folder.mkdir()
    (tmp_path / "outside.json").write_text(json.dumps({"$schema": DRAFT6}))
    (folder / "probe.json").write_text(json.dumps({
        "$schema": DRAFT6, "type": "object", "properties": {"data": {"$ref": ref}}}))
    return folder


@pytest.mark.parametrize("ref", ["../outside.json", "{outside}", "file://{outside}",
                                 "https://example.com/x.json", "nowhere.json"])
def test_a_ref_to_anything_but_a_file_of_the_folder_is_refused_at_load(
        tmp_path: Path, ref: str) -> None:
    folder = _folder(tmp_path, ref.format(outside=tmp_path / "outside.json"))
    # A remote ref whose path happens to name a file of the folder is still refused: the
    # scheme, not the file system, decides.
    remote_twin = folder / "https:" / "example.com" / "x.json"
    remote_twin.parent.mkdir(parents=True)
    remote_twin.write_text(json.dumps({"$schema": DRAFT6}))

    with pytest.raises(ValueError, match=r"probe\.json: \$ref .* is not a file of"):
        EventCatalog(folder)


def test_a_ref_to_another_file_of_the_folder_resolves(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "internal/data.json")
    (folder / "internal").mkdir()
    (folder / "internal" / "data.json").write_text(json.dumps({"$schema": DRAFT6,
                                                               "type": "object"}))
    catalog = EventCatalog(folder)
    catalog.validate({"eventName": "probe", "data": {}})
    with pytest.raises(InvalidEvent, match=r"^\$\.data: 1 is not of type 'object'"):
        catalog.validate({"eventName": "probe", "data": 1})


def test_points_expired_without_customer_identifiers_fails() -> None:
    event = _minimal_event("pointsExpired")
    event["data"] = {"loyaltyProgramId": 2649, "pointsExpired": 10}
    assert "customerIdentifiers" in (_problem(event) or "")


def test_a_schema_refuses_an_event_of_another_name() -> None:
    event = _minimal_event("pointsExpired")
    event["eventName"] = "pointsIssued"
    # The catalog picks the schema by the name; each schema still pins its own name.
    assert not CATALOG._validator("pointsExpired").is_valid(event)


def test_missing_event_id_fails() -> None:
    event = _minimal_event("pointsIssued")
    del event["eventId"]
    assert "eventId" in (_problem(event) or "")


def test_reference_points_issued_sample_is_valid() -> None:
    assert _problem(POINTS_ISSUED_SAMPLE) is None


def test_points_enrichment_fields_are_typed() -> None:
    event = copy.deepcopy(POINTS_ISSUED_SAMPLE)
    event["data"]["AvailablePointsBalance"] = 540.5
    event["data"]["behavioralEventAttributes"] = {"eventName": "appOpen"}
    event["data"]["regularPointsBreakup"][0]["awardedReferenceId"] = "ref-1"
    assert _problem(event) is None
    event["data"]["AvailablePointsBalance"] = "lots"
    assert (_problem(event) or "").startswith("$.data.AvailablePointsBalance:")


def test_nested_customer_ref_is_enforced() -> None:
    event = _minimal_event("tierUpgraded")
    event["data"]["customerIdentifiers"] = {"customerId": "not-an-int"}
    assert (_problem(event) or "").startswith("$.data.customerIdentifiers.customerId:")


def test_delivery_failure_status_enum() -> None:
    event = _minimal_event("communicationMessageUndelivered")
    event["data"]["deliveryFailureStatus"] = "HARD_BOUNCED"
    assert _problem(event) is None
    event["data"]["deliveryFailureStatus"] = "BOUNCED_SOMEHOW"
    assert (_problem(event) or "").startswith("$.data.deliveryFailureStatus:")


def test_the_alert_events_are_in_the_catalog_as_operations() -> None:
    catalog = json.loads((SCHEMAS_DIR / "catalog.json").read_text(encoding="utf-8"))
    assert set(ALERT_DATA) == set(alerts.KINDS)
    assert {name for name, entry in catalog.items() if entry["group"] == "Operations"} == set(
        alerts.KINDS)


@pytest.mark.parametrize(("name", "field", "value", "path"), [
    ("webhookDisabled", "reason", None, "$.data"),
    ("deliveryExhausted", "deliveryId", None, "$.data"),
    ("slaBreached", "count", 0, "$.data.count"),
    ("slaBreached", "firstDeliveryIds", [f"msg_{n}" for n in range(11)],
     "$.data.firstDeliveryIds"),
    ("webhookRecovered", "webHookId", None, "$.data"),
])
def test_an_alert_event_without_what_it_must_say_fails(
        name: str, field: str, value: Any, path: str) -> None:
    event = _minimal_event(name)
    event["data"] = {**event["data"], field: value}
    if value is None:
        del event["data"][field]
    assert (_problem(event) or "").startswith(f"{path}:")
