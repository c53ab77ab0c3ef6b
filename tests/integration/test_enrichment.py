"""Enrichment through the real path: publish -> broker -> worker processes -> HTTP receiver, with
the reference data in PostgreSQL. Each webhook receives exactly the additions it asked for."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, update

from notifier import publish, reference, store
from notifier.db import Database
from notifier.enrich import overlay, set_points_balance_allowed
from notifier.logs import delivery_detail
from notifier.models import Delivery, DeliveryStatus, Event, Webhook
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Receiver, Stack, create_webhook, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ORG = 51186
CUSTOMER = 387979652
TILL = 50671937
LOYALTY_EVENT = "627e870bd278ed95deb5a046b4e9a647"

REFERENCE = [
    {"kind": "tills", "id": TILL, "code": "T-0042", "name": "Front till", "storeId": 75},
    {"kind": "stores", "id": 75, "code": "S-75", "name": "High Street", "externalId": "HS75",
     "externalId1": "HS75-1"},
    {"kind": "customers", "id": CUSTOMER, "identifiers": {
        "InStore": {"externalId": "EXT-387979652", "mobile": "919300000020",
                    "email": "member@example.com"},
        "WeChat": {"accounts": [{"accountId": "wx-1", "identifiers": [
            {"identifierType": "openId", "identifierValue": "oWx-1"}]}]}}},
    {"kind": "cards", "cardNumber": "CARD-A", "customerId": CUSTOMER, "source": "InStore",
     "status": "ACTIVE"},
    {"kind": "cards", "cardNumber": "CARD-B", "customerId": CUSTOMER, "source": "InStore",
     "status": "ACTIVE"},
    {"kind": "cards", "cardNumber": "WX-CARD", "customerId": CUSTOMER, "source": "WeChat"},
    {"kind": "cards", "cardNumber": "OTHER", "customerId": CUSTOMER + 1, "source": "InStore"},
    {"kind": "pointsBalances", "customerId": CUSTOMER, "programs": [
        {"programId": 2649, "availablePoints": 120}, {"programId": 2650, "availablePoints": 30}]},
    {"kind": "awardedReferences", "loyaltyEventId": LOYALTY_EVENT, "blocks": [
        {"programId": 2649, "block": "regularPointsBreakup", "index": 0,
         "awardedReferenceId": "AR-REG-0"},
        {"programId": 2649, "block": "promotionalPointsIssued", "index": 0,
         "awardedReferenceId": "AR-PROMO-0"}]},
]

ALL = {"till_details_enrichment": True, "store_details_enrichment": True,
       "customer_identifiers_to_be_enriched": ["InStore", "WeChat"],
       "card_number_enrichment": True, "awarded_reference_enrichment": True,
       "available_points_balance_enrichment": True}
# Path -> the webhook's enrichment columns.
WEBHOOKS: dict[str, dict[str, Any]] = {
    "/plain": {},
    "/till": {"till_details_enrichment": True},
    "/store": {"store_details_enrichment": True},
    "/instore": {"customer_identifiers_to_be_enriched": ["InStore"]},
    "/wechat-cards": {"customer_identifiers_to_be_enriched": ["WeChat"],
                      "card_number_enrichment": True},
    "/awarded": {"awarded_reference_enrichment": True},
    "/balance": {"available_points_balance_enrichment": True},
    "/all": ALL,
}


def points_issued_data() -> dict[str, Any]:
    return {
        "customerIdentifiers": {"customerId": CUSTOMER},
        "entityInformation": {"entityType": "USER", "entityId": CUSTOMER},
        "triggeringActivity": {"name": "ManualCurrencyAllocation",
                               "identifiers": [{"key": "BillId", "value": "2152322568"}],
                               "enteredBy": {"id": TILL}},
        "loyaltyProgramId": 2649, "programCurrentPoints": 120, "totalPointsIssued": 105,
        "regularPointsIssued": 100,
        "regularPointsBreakup": [{"points": 100, "expiryAt": "2025-06-29"}],
        "promotionalPointsIssued": [{"promotionName": "Welcome", "promotionPoints": 5}],
        "promisedPointsIssued": [],
        "loyaltyEventId": LOYALTY_EVENT,
    }


def expected_for(path: str, original: dict[str, Any]) -> dict[str, Any]:
    """The original payload with exactly the additions ``path``'s webhook asked for."""
    flags = WEBHOOKS[path]
    payload = copy.deepcopy(original)
    data = payload["data"]
    entered_by = data["triggeringActivity"]["enteredBy"]
    identifiers = data["customerIdentifiers"]
    if flags.get("till_details_enrichment"):
        entered_by["till"] = {"id": TILL, "code": "T-0042", "name": "Front till"}
    if flags.get("store_details_enrichment"):
        entered_by["store"] = {"id": 75, "code": "S-75", "name": "High Street",
                               "externalId": "HS75", "externalId1": "HS75-1"}
    sources = flags.get("customer_identifiers_to_be_enriched", [])
    if "InStore" in sources:
        identifiers["instore"] = {"externalId": "EXT-387979652", "mobile": "919300000020",
                                  "email": "member@example.com"}
        if flags.get("card_number_enrichment"):
            identifiers["instore"]["cardNumbers"] = ["CARD-A", "CARD-B"]
    if "WeChat" in sources:
        identifiers["wechat"] = {"accounts": [{"accountId": "wx-1", "identifiers": [
            {"identifierType": "openId", "identifierValue": "oWx-1"}]}]}
        if flags.get("card_number_enrichment"):
            identifiers["wechat"]["cardNumbers"] = ["WX-CARD"]
    if flags.get("awarded_reference_enrichment"):
        data["regularPointsBreakup"][0]["awardedReferenceId"] = "AR-REG-0"
        data["promotionalPointsIssued"][0]["awardedReferenceId"] = "AR-PROMO-0"
    if flags.get("available_points_balance_enrichment"):
        data["AvailablePointsBalance"] = 150
    return payload


@pytest.fixture
def database(stack: Stack) -> Iterator[Database]:
    opened = Database(stack.settings.database_url)
    store.create_org(opened, ORG, "test org", now_ms=0)
    set_points_balance_allowed(opened, ORG, True)
    yield opened
    opened.dispose()


def hook(stack: Stack, database: Database, receiver: Receiver, path: str,
         columns: dict[str, Any], events: tuple[str, ...] = ("pointsIssued",)) -> str:
    webhook_id, _ = create_webhook(
        database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
        org_id=ORG, name=path.strip("/"), url=receiver.url(path), event_names=list(events),
        now_ms=0)
    if columns:
        with database.session() as session:
            session.execute(update(Webhook).where(Webhook.id == webhook_id).values(**columns))
    return webhook_id


def delivered(database: Database, count: int) -> Any:
    def check() -> list[Delivery] | None:
        with database.session() as session:
            rows = list(session.scalars(select(Delivery).where(
                Delivery.status == DeliveryStatus.DELIVERED)))
        return rows if len(rows) >= count else None
    return check


def test_one_event_to_several_webhooks_each_gets_exactly_its_own_additions(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    reference.load(database, ORG, reference.parse_jsonl(json.dumps(r) for r in REFERENCE))
    ids = {path: hook(stack, database, receiver, path, columns)
           for path, columns in WEBHOOKS.items()}
    stack.worker("w1")
    stack.beat()

    event_id = publish("pointsIssued", points_issued_data(), org_id=ORG,
                       broker_url=stack.settings.broker_url)

    receiver.wait_for(len(WEBHOOKS), timeout=60)
    with database.session() as session:
        original = session.scalar(select(Event.payload).where(Event.event_id == event_id))
    catalog = load_catalog()
    for path in WEBHOOKS:
        (request,) = receiver.at(path)
        body = json.loads(request.body)
        assert body == expected_for(path, original), path
        catalog.validate(body)  # the enriched payload still fits the event's schema
    assert json.loads(receiver.at("/plain")[0].body) == original

    rows = wait_until(delivered(database, len(WEBHOOKS)), 30, "every delivery recorded")
    by_hook = {row.webhook_id: row for row in rows}
    assert by_hook[ids["/plain"]].enrichment is None  # sent as published
    for path in WEBHOOKS:
        row = by_hook[ids[path]]
        assert row.enrichment_notes is None, (path, row.enrichment_notes)
        detail = delivery_detail(database, ORG, row.id)
        assert detail["originalPayload"] == original
        assert detail["deliveredPayload"] == json.loads(receiver.at(path)[0].body)


def test_the_seeds_instore_example(stack: Stack, receiver: Receiver,
                                   database: Database) -> None:
    # "if you select Instore and the Instore profile of the customer contains an external ID,
    # mobile and email, the event response payload will include the identifiers external ID,
    # mobile and email."
    reference.put_record(database, ORG, "customers", str(CUSTOMER), {"identifiers": {
        "InStore": {"externalId": "EXT-1", "mobile": "919300000020",
                    "email": "member@example.com"}}})
    hook(stack, database, receiver, "/instore",
         {"customer_identifiers_to_be_enriched": ["InStore"]})
    stack.worker("w1")

    publish("pointsIssued", {"customerIdentifiers": {"customerId": CUSTOMER}}, org_id=ORG,
            broker_url=stack.settings.broker_url)

    (request,) = receiver.wait_for(1, "/instore", timeout=60)
    instore = json.loads(request.body)["data"]["customerIdentifiers"]["instore"]
    assert instore == {"externalId": "EXT-1", "mobile": "919300000020",
                       "email": "member@example.com"}


def test_missing_reference_data_is_left_out_and_noted_on_the_delivery(
        stack: Stack, receiver: Receiver, database: Database) -> None:
    # The till is unknown and the customer has a WeChat profile but no InStore one.
    reference.put_record(database, ORG, "customers", str(CUSTOMER), {"identifiers": {
        "WeChat": {"accounts": [{"accountId": "wx-1"}]}}})
    hook(stack, database, receiver, "/partial",
         {"till_details_enrichment": True,
          "customer_identifiers_to_be_enriched": ["InStore", "WeChat"]})
    stack.worker("w1")

    event_id = publish("pointsIssued", points_issued_data(), org_id=ORG,
                       broker_url=stack.settings.broker_url)

    (request,) = receiver.wait_for(1, "/partial", timeout=60)
    body = json.loads(request.body)
    assert "till" not in body["data"]["triggeringActivity"]["enteredBy"]
    assert body["data"]["customerIdentifiers"] == {"customerId": CUSTOMER,
                                                   "wechat": {"accounts": [{"accountId": "wx-1"}]}}
    (row,) = wait_until(delivered(database, 1), 30, "the delivery recorded")
    assert row.enrichment_notes == (f"till {TILL} unknown; "
                                    f"customer {CUSTOMER} has no InStore profile")
    with database.session() as session:
        original = session.scalar(select(Event.payload).where(Event.event_id == event_id))
    assert original["data"] == points_issued_data()  # the event itself is never changed
    # The delivery keeps only what enrichment added; over the event it is what was sent.
    assert row.enrichment == {"data": {"customerIdentifiers": {
        "wechat": {"accounts": [{"accountId": "wx-1"}]}}}}
    assert overlay(original, row.enrichment) == body
