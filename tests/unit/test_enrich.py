"""Enrichment as pure logic over a fake reader: what each option adds and nothing else; and how
the delivery step records it (no services)."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from config import load_settings
from notifier import pipeline
from notifier.enrich import Options, additions, check_options, enrich, overlay
from notifier.errors import InvalidInput, StoreUnavailable
from notifier.models import DeliveryStatus
from notifier.reference import Store, Till
from notifier.schemas import load_catalog
from notifier.sender import OutboundRequest, Result
from notifier.store import Claimed, Target

ORG = 51186
CUSTOMER = 387979652
TILL = 50671937
# Every option, with two customer-identifier sources.
EVERY_OPTION = {"tillDetailsEnrichmentEnabled": True, "storeDetailsEnrichmentEnabled": True,
                "customerIdentifiersToBeEnriched": ["InStore", "WeChat"],
                "cardNumberEnrichmentEnabled": True, "awardedReferenceEnrichmentEnabled": True,
                "availablePointsBalanceEnrichmentEnabled": True}


@dataclass
class FakeReader:
    """Reference data in dicts; counts the reads of each kind."""

    tills: dict[int, Till] = field(default_factory=dict)
    stores: dict[int, Store] = field(default_factory=dict)
    profiles: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    card_numbers: dict[int, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    references: dict[str, dict[tuple[int, str, int], str]] = field(default_factory=dict)
    balances: dict[int, float] = field(default_factory=dict)
    reads: list[str] = field(default_factory=list)

    def till(self, org_id: int, till_id: int) -> Till | None:
        self.reads.append("till")
        return self.tills.get(till_id) if org_id == ORG else None

    def store(self, org_id: int, store_id: int) -> Store | None:
        self.reads.append("store")
        return self.stores.get(store_id) if org_id == ORG else None

    def identifiers(self, org_id: int, customer_id: int) -> Mapping[str, Mapping[str, Any]]:
        self.reads.append("identifiers")
        return self.profiles.get(customer_id, {}) if org_id == ORG else {}

    def cards(self, org_id: int, customer_id: int) -> Mapping[str, tuple[str, ...]]:
        self.reads.append("cards")
        return self.card_numbers.get(customer_id, {}) if org_id == ORG else {}

    def awarded_references(self, org_id: int,
                           loyalty_event_id: str) -> Mapping[tuple[int, str, int], str]:
        self.reads.append("awarded")
        return self.references.get(loyalty_event_id, {}) if org_id == ORG else {}

    def points_balance(self, org_id: int, customer_id: int) -> float | None:
        self.reads.append("balance")
        return self.balances.get(customer_id) if org_id == ORG else None


def full_reader() -> FakeReader:
    return FakeReader(
        tills={TILL: Till(TILL, "T01", "Front till", 75), 7: Till(7, "T07", "Back till", 76)},
        stores={75: Store(75, "S75", "High Street", "HS-75", "HS-75-1", None),
                77: Store(77, "S77", "Airport", "AP", "AP-1", "AP-2"),
                76: Store(76, "S76", "Mall", None, None, None)},
        profiles={CUSTOMER: {
            "InStore": {"externalId": "ext-1", "mobile": "919300000020",
                        "email": "a@example.com"},
            "WeChat": {"accounts": [{"accountId": "wx-1", "identifiers": [
                {"identifierType": "openId", "identifierValue": "o-1"}]}]}}},
        card_numbers={CUSTOMER: {"InStore": ("C1", "C2"), "WeChat": ("W1",)}},
        references={"le-1": {(2649, "regularPointsBreakup", 0): "AR-0",
                             (2649, "promotionalPointsIssued", 0): "AR-P0",
                             (7, "redemptionFromEarningPrograms", 0): "AR-R0"}},
        balances={CUSTOMER: 150.0})


def points_issued(**data: Any) -> dict[str, Any]:
    """The enriched sample of the reference notes (section 2.2), abridged, as published."""
    return {
        "eventName": "pointsIssued", "eventId": "4647d7b7-61c0-480f-8dfe-40ff87f8a445",
        "orgId": ORG, "createdAt": 1750224535590,
        "data": {
            "customerIdentifiers": {"customerId": CUSTOMER},
            "triggeringActivity": {"name": "ManualCurrencyAllocation",
                                   "enteredBy": {"id": TILL}},
            "loyaltyProgramId": 2649, "totalPointsIssued": 100,
            "regularPointsBreakup": [{"points": 100, "expiryAt": "2025-06-29"}],
            "promotionalPointsIssued": [{"promotionName": "x", "promotionPoints": 5}],
            "loyaltyEventId": "le-1", **data}}


def points_redeemed() -> dict[str, Any]:
    return {"eventName": "pointsRedeemed", "eventId": "r-1", "orgId": ORG, "createdAt": 1,
            "data": {"customerIdentifiers": {"customerId": CUSTOMER}, "loyaltyEventId": "le-1",
                     "totalPointsRedeemed": 10,
                     "redemptionFromEarningPrograms": [{"programId": 7, "pointsRedeemed": 10}]}}


def test_no_options_sends_the_event_as_published_and_reads_nothing() -> None:
    reader = full_reader()
    event = points_issued()

    result = enrich(event, {}, reader)

    assert result.payload == event and not result.enriched and result.notes == ()
    assert reader.reads == []


def test_till_adds_id_code_and_name_only() -> None:
    event = points_issued()

    result = enrich(event, {"tillDetailsEnrichmentEnabled": True}, full_reader())

    expected = copy.deepcopy(event)
    expected["data"]["triggeringActivity"]["enteredBy"]["till"] = {
        "id": TILL, "code": "T01", "name": "Front till"}
    assert result.payload == expected and result.notes == ()


def test_store_comes_from_the_till_and_leaves_the_till_out() -> None:
    result = enrich(points_issued(), {"storeDetailsEnrichmentEnabled": True}, full_reader())

    entered_by = result.payload["data"]["triggeringActivity"]["enteredBy"]
    assert entered_by == {"id": TILL, "store": {"id": 75, "code": "S75", "name": "High Street",
                                                "externalId": "HS-75",
                                                "externalId1": "HS-75-1"}}


def test_a_store_named_in_the_event_wins_over_the_tills() -> None:
    event = points_issued()
    event["data"]["triggeringActivity"]["enteredBy"]["store"] = {"id": 76}

    result = enrich(event, {"storeDetailsEnrichmentEnabled": True}, full_reader())

    store = result.payload["data"]["triggeringActivity"]["enteredBy"]["store"]
    assert store == {"id": 76, "code": "S76", "name": "Mall"}


def test_instore_identifiers_are_external_id_mobile_and_email() -> None:
    # The seed: "if you select Instore and the Instore profile of the customer contains an
    # external ID, mobile and email, the event response payload will include [all three]".
    result = enrich(points_issued(), {"customerIdentifiersToBeEnriched": ["Instore"]},
                    full_reader())

    assert result.payload["data"]["customerIdentifiers"] == {
        "customerId": CUSTOMER,
        "instore": {"externalId": "ext-1", "mobile": "919300000020", "email": "a@example.com"}}


def test_cards_are_those_linked_through_each_chosen_source() -> None:
    flags = {"customerIdentifiersToBeEnriched": ["WeChat"], "cardNumberEnrichmentEnabled": True}

    result = enrich(points_issued(), flags, full_reader())

    identifiers = result.payload["data"]["customerIdentifiers"]
    assert set(identifiers) == {"customerId", "wechat"}
    assert identifiers["wechat"]["cardNumbers"] == ["W1"]
    assert identifiers["wechat"]["accounts"][0]["accountId"] == "wx-1"


def test_identifiers_merge_over_what_the_event_carries() -> None:
    event = points_issued()
    event["data"]["customerIdentifiers"]["instore"] = {"mobile": "old", "id": 5678}

    result = enrich(event, {"customerIdentifiersToBeEnriched": ["InStore"],
                            "cardNumberEnrichmentEnabled": True}, full_reader())

    assert result.payload["data"]["customerIdentifiers"]["instore"] == {
        "id": 5678, "externalId": "ext-1", "mobile": "919300000020", "email": "a@example.com",
        "cardNumbers": ["C1", "C2"]}
    assert event["data"]["customerIdentifiers"]["instore"] == {"mobile": "old", "id": 5678}


def test_awarded_reference_ids_go_on_each_points_block() -> None:
    result = enrich(points_issued(), {"awardedReferenceEnrichmentEnabled": True}, full_reader())

    data = result.payload["data"]
    assert data["regularPointsBreakup"][0]["awardedReferenceId"] == "AR-0"
    assert data["promotionalPointsIssued"][0]["awardedReferenceId"] == "AR-P0"
    assert result.notes == ()


def test_redemption_blocks_are_keyed_by_their_own_program() -> None:
    result = enrich(points_redeemed(), {"awardedReferenceEnrichmentEnabled": True},
                    full_reader())

    block = result.payload["data"]["redemptionFromEarningPrograms"][0]
    assert block == {"programId": 7, "pointsRedeemed": 10, "awardedReferenceId": "AR-R0"}


def test_available_points_balance_only_on_points_issued_and_redeemed() -> None:
    flags = {"availablePointsBalanceEnrichmentEnabled": True}
    other = {"eventName": "tierUpgraded", "eventId": "t", "orgId": ORG, "createdAt": 1,
             "data": {"customerIdentifiers": {"customerId": CUSTOMER}}}

    issued = enrich(points_issued(), flags, full_reader())
    redeemed = enrich(points_redeemed(), flags, full_reader())
    upgraded = enrich(other, flags, full_reader())

    assert issued.payload["data"]["AvailablePointsBalance"] == 150
    assert isinstance(issued.payload["data"]["AvailablePointsBalance"], int)
    assert redeemed.payload["data"]["AvailablePointsBalance"] == 150
    assert upgraded.payload == other


def test_missing_reference_data_is_left_out_and_noted() -> None:
    flags = {"tillDetailsEnrichmentEnabled": True, "storeDetailsEnrichmentEnabled": True,
             "customerIdentifiersToBeEnriched": ["InStore", "WebEngage"],
             "awardedReferenceEnrichmentEnabled": True,
             "availablePointsBalanceEnrichmentEnabled": True}
    event = points_issued()

    result = enrich(event, flags, FakeReader())

    assert result.payload == event
    assert result.enriched
    assert result.notes == (
        f"till {TILL} unknown",
        f"no store for till {TILL}",
        f"customer {CUSTOMER} has no InStore profile",
        f"customer {CUSTOMER} has no WebEngage profile",
        "no awardedReferenceId for regularPointsBreakup[0] (loyaltyEventId le-1, program 2649)",
        "no awardedReferenceId for promotionalPointsIssued[0] "
        "(loyaltyEventId le-1, program 2649)",
        f"no points balance known for customer {CUSTOMER}",
    )


def test_every_option_reads_each_kind_once() -> None:
    reader = full_reader()
    flags = {"tillDetailsEnrichmentEnabled": True, "storeDetailsEnrichmentEnabled": True,
             "customerIdentifiersToBeEnriched": ["InStore", "WeChat", "WebEngage"],
             "cardNumberEnrichmentEnabled": True, "awardedReferenceEnrichmentEnabled": True,
             "availablePointsBalanceEnrichmentEnabled": True}

    enrich(points_issued(), flags, reader)

    assert sorted(reader.reads) == sorted(
        ["till", "store", "identifiers", "cards", "awarded", "balance"])


def test_the_fully_enriched_sample_still_validates_against_its_schema() -> None:
    catalog = load_catalog()

    for event in (points_issued(), points_redeemed()):
        payload = enrich(event, EVERY_OPTION, full_reader()).payload
        catalog.validate(payload)  # raises InvalidEvent naming the path
        assert payload != event


def test_options_read_intouch_source_spellings() -> None:
    options = Options.of({"customerIdentifiersToBeEnriched": ["Instore", "webengage"]})
    assert options.sources == ("InStore", "WebEngage")


SOURCES_PROBLEM = "must be a list of sources (InStore, WeChat, WebEngage)"


@pytest.mark.parametrize(("flags", "allowed", "field", "problem"), [
    ({"cardNumberEnrichmentEnabled": True}, True, "cardNumberEnrichmentEnabled",
     "needs a source in customerIdentifiersToBeEnriched first"),
    ({"availablePointsBalanceEnrichmentEnabled": True}, False,
     "availablePointsBalanceEnrichmentEnabled",
     "is not enabled for this org; ask the operator to enable it"),
    ({"customerIdentifiersToBeEnriched": ["Facebook"]}, True, "customerIdentifiersToBeEnriched",
     None),
    ({"customerIdentifiersToBeEnriched": "InStore"}, True, "customerIdentifiersToBeEnriched",
     SOURCES_PROBLEM),
    ({"customerIdentifiersToBeEnriched": ["InStore", 5]}, True,
     "customerIdentifiersToBeEnriched", SOURCES_PROBLEM),
    ({"tillDetailsEnrichmentEnabled": "yes"}, True, "tillDetailsEnrichmentEnabled",
     "must be true or false"),
])
def test_check_options_names_the_field(flags: dict[str, Any], allowed: bool,
                                       field: str, problem: str | None) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_options(flags, points_balance_allowed=allowed)
    assert caught.value.field.startswith(field)
    if problem is not None:
        assert caught.value.problem == problem


def test_options_name_the_field_of_an_unknown_source() -> None:
    with pytest.raises(InvalidInput) as caught:
        Options.of({"customerIdentifiersToBeEnriched": ["Facebook"]})

    assert caught.value.field.startswith("customerIdentifiersToBeEnriched")


def test_another_orgs_reference_data_is_never_added() -> None:
    event = points_issued()
    event["orgId"] = ORG + 1

    result = enrich(event, EVERY_OPTION, full_reader())

    data = result.payload["data"]
    assert data["triggeringActivity"] == event["data"]["triggeringActivity"]
    assert "AvailablePointsBalance" not in data
    assert all("awardedReferenceId" not in block for block in data["regularPointsBreakup"])
    # The blocks asked for are there, with no card and no profile of ORG's customer.
    assert data["customerIdentifiers"] == {"customerId": CUSTOMER,
                                           "instore": {"cardNumbers": []},
                                           "wechat": {"cardNumbers": []}}
    assert f"till {TILL} unknown" in result.notes


@pytest.mark.parametrize("event", [
    {"eventName": "pointsIssued", "eventId": "e", "createdAt": 1, "data": {}},
    {"eventName": "pointsIssued", "eventId": "e", "orgId": ORG, "createdAt": 1},
    {"eventName": "pointsIssued", "eventId": "e", "orgId": ORG, "createdAt": 1, "data": []},
    {"eventName": "pointsIssued", "eventId": "e", "orgId": True, "createdAt": 1, "data": {}},
])
def test_an_event_without_org_or_data_is_sent_as_published_with_a_note(
        event: dict[str, Any]) -> None:
    result = enrich(event, EVERY_OPTION, full_reader())

    assert (result.payload, result.enriched, result.notes) == (
        event, True, ("the event has no orgId or data to enrich",))


@pytest.mark.parametrize("identifiers", [{"mobile": "1"}, ["1"]])
def test_what_an_event_lacks_to_be_enriched_by_is_noted(identifiers: Any) -> None:
    event = {"eventName": "pointsIssued", "eventId": "e", "orgId": ORG, "createdAt": 1,
             "data": {"customerIdentifiers": identifiers, "regularPointsBreakup": [{}],
                      "loyaltyEventId": 5}}
    reader = full_reader()

    result = enrich(event, EVERY_OPTION, reader)

    assert result.payload == event
    assert result.notes == (
        "no triggeringActivity.enteredBy to find the till and store by",
        "no customerIdentifiers.customerId to find the customer by",
        "no loyaltyEventId to find awarded reference ids by",
        "no points balance known for customer None")
    assert reader.reads == []  # nothing to look up by


@pytest.mark.parametrize("till_id", ["50671937", True, None])
def test_a_till_id_that_is_not_an_integer_is_not_looked_up(till_id: Any) -> None:
    reader = full_reader()
    event = points_issued()
    event["data"]["triggeringActivity"]["enteredBy"] = {"id": till_id}

    result = enrich(event, {"tillDetailsEnrichmentEnabled": True,
                            "storeDetailsEnrichmentEnabled": True}, reader)

    assert result.payload == event
    assert result.notes == ("no till id in triggeringActivity.enteredBy", "no store for till None")
    assert reader.reads == []


def test_the_till_named_in_entered_by_till_wins_and_its_store_carries_every_id() -> None:
    event = points_issued()
    event["data"]["triggeringActivity"]["enteredBy"] = {"id": TILL, "till": {"id": 7},
                                                        "store": {"id": 77}}

    result = enrich(event, {"tillDetailsEnrichmentEnabled": True,
                            "storeDetailsEnrichmentEnabled": True}, full_reader())

    assert result.payload["data"]["triggeringActivity"]["enteredBy"] == {
        "id": TILL, "till": {"id": 7, "code": "T07", "name": "Back till"},
        "store": {"id": 77, "code": "S77", "name": "Airport", "externalId": "AP",
                  "externalId1": "AP-1", "externalId2": "AP-2"}}
    assert result.notes == ()


def test_an_unknown_store_named_in_the_event_is_noted_and_the_till_not_read() -> None:
    reader = full_reader()
    event = points_issued()
    event["data"]["triggeringActivity"]["enteredBy"]["store"] = {"id": 99}

    result = enrich(event, {"storeDetailsEnrichmentEnabled": True}, reader)

    assert result.payload == event
    assert result.notes == ("store 99 unknown",)
    assert reader.reads == ["store"]


def test_cards_are_read_only_when_asked_for() -> None:
    reader = full_reader()

    enrich(points_issued(), {"customerIdentifiersToBeEnriched": ["InStore"]}, reader)

    assert reader.reads == ["identifiers"]


def test_awarded_ids_skip_what_is_not_a_block_and_go_on_past_it() -> None:
    event = points_issued(regularPointsBreakup=[7, {"points": 1}, {"points": 2}],
                          promotionalPointsIssued="none")
    reader = full_reader()
    reader.references["le-1"][(2649, "regularPointsBreakup", 2)] = "AR-2"

    result = enrich(event, {"awardedReferenceEnrichmentEnabled": True}, reader)

    assert result.payload["data"]["regularPointsBreakup"] == [
        7, {"points": 1}, {"points": 2, "awardedReferenceId": "AR-2"}]
    assert result.notes == ("no awardedReferenceId for regularPointsBreakup[1] "
                            "(loyaltyEventId le-1, program 2649)",)


def test_awarded_ids_of_an_issue_use_the_events_program_whatever_a_block_says() -> None:
    event = points_issued(regularPointsBreakup=[{"points": 1, "programId": 7}])

    result = enrich(event, {"awardedReferenceEnrichmentEnabled": True}, full_reader())

    assert result.payload["data"]["regularPointsBreakup"][0]["awardedReferenceId"] == "AR-0"


def test_a_redemption_without_any_program_gets_no_awarded_id() -> None:
    event = points_redeemed()
    event["data"]["redemptionFromEarningPrograms"] = [{"pointsRedeemed": 10}]
    reader = full_reader()
    reader.references["le-1"][(None, "redemptionFromEarningPrograms", 0)] = "AR-NONE"  # type: ignore[index]

    result = enrich(event, {"awardedReferenceEnrichmentEnabled": True}, reader)

    assert "awardedReferenceId" not in result.payload["data"]["redemptionFromEarningPrograms"][0]
    assert result.notes == ("no awardedReferenceId for redemptionFromEarningPrograms[0] "
                            "(loyaltyEventId le-1, program None)",)


def test_a_fractional_points_balance_is_sent_as_it_is() -> None:
    reader = full_reader()
    reader.balances[CUSTOMER] = 150.5

    result = enrich(points_issued(), {"availablePointsBalanceEnrichmentEnabled": True}, reader)

    assert result.payload["data"]["AvailablePointsBalance"] == 150.5


def test_what_was_added_over_a_null_counts_as_added() -> None:
    assert additions({"a": None, "b": 1}, {"a": None, "b": 1, "c": None}) == {"c": None}


def test_check_options_accepts_cards_with_a_source_and_an_allowed_balance() -> None:
    check_options({"customerIdentifiersToBeEnriched": ["InStore"],
                   "cardNumberEnrichmentEnabled": True,
                   "availablePointsBalanceEnrichmentEnabled": True},
                  points_balance_allowed=True)


def test_card_numbers_in_any_source_block_are_typed() -> None:
    payload = enrich(points_issued(), {"customerIdentifiersToBeEnriched": ["WeChat"],
                                       "cardNumberEnrichmentEnabled": True},
                     full_reader()).payload
    load_catalog().validate(payload)
    payload["data"]["customerIdentifiers"]["wechat"]["cardNumbers"] = [1]
    with pytest.raises(InvalidInput):
        load_catalog().validate(payload)


# ---------------------------------------------------------------- in the delivery step


class RecordingSender:
    def __init__(self) -> None:
        self.requests: list[OutboundRequest] = []

    def send(self, request: OutboundRequest) -> Result:
        self.requests.append(request)
        return Result(latency_ms=1, status_code=200)


class Unreachable(FakeReader):
    def identifiers(self, org_id: int, customer_id: int) -> Mapping[str, Mapping[str, Any]]:
        raise StoreUnavailable("database error: connection refused")


def attempt(reader: FakeReader, flags: dict[str, Any],
            sender: RecordingSender | None = None) -> tuple[Any, RecordingSender]:
    sender = sender or RecordingSender()
    services = pipeline.Services(settings=load_settings({}), db=None,  # type: ignore[arg-type]
                                 queues=None, catalog=None,  # type: ignore[arg-type]
                                 sender=sender, vault=None,  # type: ignore[arg-type]
                                 rng=random.Random(0))
    services.lookups = reader  # type: ignore[assignment]
    target = Target(id="hook1", url="https://93.184.216.34/hook", headers={}, secrets=(),
                    active=True, sla_in_seconds=3600, max_allowed_connections=1, options=flags)
    claimed = Claimed(id="msg_1", event=points_issued(), attempt_count=0, ingested_at_ms=0,
                      lease_until_ms=1)
    finished, posted = pipeline._attempt(services, target, claimed)
    assert posted
    return finished, sender


def test_the_sent_payload_and_notes_go_to_the_delivery_record() -> None:
    flags = {"customerIdentifiersToBeEnriched": ["InStore"], "tillDetailsEnrichmentEnabled": True}
    reader = replace(full_reader(), tills={})

    finished, sender = attempt(reader, flags)

    (request,) = sender.requests
    assert finished.outcome == DeliveryStatus.DELIVERED
    assert finished.enrichment is not None
    assert overlay(points_issued(), finished.enrichment) == json.loads(request.body)
    assert finished.enrichment["data"]["customerIdentifiers"]["instore"]["externalId"] == "ext-1"
    assert "loyaltyEventId" not in finished.enrichment["data"]  # only what was added
    assert finished.enrichment_notes == f"till {TILL} unknown"


def test_an_unreachable_reference_store_is_transient_and_nothing_is_sent() -> None:
    sender = RecordingSender()
    with pytest.raises(StoreUnavailable):
        attempt(Unreachable(), {"customerIdentifiersToBeEnriched": ["InStore"]}, sender)
    # Sent without what the webhook asked for, it could not be taken back.
    assert sender.requests == []


def test_a_webhook_without_options_records_no_enriched_payload() -> None:
    finished, sender = attempt(full_reader(), {})

    assert json.loads(sender.requests[0].body) == points_issued()
    assert finished.enrichment is None and finished.enrichment_notes is None


def test_what_enrichment_added_rebuilds_the_payload_as_sent() -> None:
    event = points_issued()
    sent = enrich(event, EVERY_OPTION, full_reader()).payload

    added = additions(event, sent)

    assert overlay(event, added) == sent
    assert set(added) == {"data"} and "orgId" not in added  # nothing unchanged is kept
    assert len(json.dumps(added)) < len(json.dumps(sent))
    assert overlay(event, sent) == sent  # a whole enriched payload (rows before 0004) too


def test_the_loyalty_event_id_may_stand_beside_data_and_a_non_block_stops_nothing() -> None:
    event = points_issued(regularPointsBreakup="none")
    event["loyaltyEventId"] = event["data"].pop("loyaltyEventId")

    result = enrich(event, {"awardedReferenceEnrichmentEnabled": True}, full_reader())

    assert result.payload["data"]["promotionalPointsIssued"][0]["awardedReferenceId"] == "AR-P0"
    assert result.notes == ()
