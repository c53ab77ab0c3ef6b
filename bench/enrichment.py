"""Enrichment cost: notifier fan-out 1 with every enrichment option OFF, then every option ON.

Both runs publish the same kind of pointsIssued events, whose till, store, customer (spread over
``CUSTOMERS``), cards, awarded references (one loyaltyEventId per event) and points balances all
exist in the reference data loaded before the worker starts, so the ON webhook's enrichment finds
and adds every part. Shapes follow tests/integration/test_enrichment.py.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa

from bench import run

CUSTOMERS = 1000
TILLS = 50
STORES = 10
CUSTOMER_BASE = 387_000_000
TILL_BASE = 50_670_000
STORE_BASE = 700
PROGRAM = 7  # run.event_data()'s loyaltyProgramId
SOURCES = ["InStore", "WeChat", "WebEngage"]
ALL_ON = {"till_details_enrichment": True, "store_details_enrichment": True,
          "customer_identifiers_to_be_enriched": SOURCES,
          "card_number_enrichment": True, "awarded_reference_enrichment": True,
          "available_points_balance_enrichment": True}


def _loyalty_event(i: int) -> str:
    return f"bench-le-{i:08d}"


def reference_lines(events: int) -> Iterator[str]:
    """JSON lines of reference data for ``events`` events (loyaltyEventIds 0..events-1)."""
    for s in range(STORES):
        store = STORE_BASE + s
        yield json.dumps({"kind": "stores", "id": store, "code": f"S-{store}", "name": f"Store {s}",
                          "externalId": f"EXT-S{store}", "externalId1": f"EXT-S{store}-1"})
    for t in range(TILLS):
        yield json.dumps({"kind": "tills", "id": TILL_BASE + t, "code": f"T-{t:04d}",
                          "name": f"Till {t}", "storeId": STORE_BASE + t % STORES})
    for c in range(CUSTOMERS):
        customer = CUSTOMER_BASE + c
        yield json.dumps({"kind": "customers", "id": customer, "identifiers": {
            "InStore": {"externalId": f"EXT-{customer}", "mobile": f"9193{customer:08d}"[:12],
                        "email": f"member{c}@example.com"},
            "WeChat": {"accounts": [{"accountId": f"wx-{c}", "identifiers": [
                {"identifierType": "openId", "identifierValue": f"oWx-{c}"}]}]},
            "WebEngage": {"accounts": [{"accountId": f"we-{c}", "identifiers": [
                {"identifierType": "userId", "identifierValue": f"we-user-{c}"}]}]}}})
        for card, source in ((f"CARD-{c}-A", "InStore"), (f"CARD-{c}-B", "InStore"),
                             (f"WX-{c}", "WeChat"), (f"WE-{c}", "WebEngage")):
            yield json.dumps({"kind": "cards", "cardNumber": card, "customerId": customer,
                              "source": source, "status": "ACTIVE"})
        yield json.dumps({"kind": "pointsBalances", "customerId": customer, "programs": [
            {"programId": PROGRAM, "availablePoints": 100 + c}, {"programId": 8, "availablePoints": 30}]})
    for i in range(events):
        yield json.dumps({"kind": "awardedReferences", "loyaltyEventId": _loyalty_event(i), "blocks": [
            {"programId": PROGRAM, "block": "regularPointsBreakup", "index": 0,
             "awardedReferenceId": f"AR-REG-{i}"},
            {"programId": PROGRAM, "block": "promotionalPointsIssued", "index": 0,
             "awardedReferenceId": f"AR-PROMO-{i}"}]})


def prepare(events: int, on: bool) -> Callable[[Any], None]:
    """Load the reference data (both runs, so they differ only in the webhook's options); for ON
    turn on the org's points-balance gate and every option of the webhook."""

    def do(db: Any) -> None:
        from notifier import reference
        from notifier.enrich import set_points_balance_allowed
        from notifier.models import Webhook

        reference.load(db, run.ORG, reference.parse_jsonl(reference_lines(events)))
        if on:
            set_points_balance_allowed(db, run.ORG, True)
            with db.session() as session:
                session.execute(sa.update(Webhook).where(Webhook.org_id == run.ORG).values(**ALL_ON))

    return do


def data_factory() -> Callable[[], dict[str, Any]]:
    """Each call: the next event's data (a fresh loyaltyEventId; customer and till cycled)."""
    base = run.event_data()
    for item in base["regularPointsBreakup"]:
        item.pop("awardedReferenceId", None)  # enrichment adds it
    counter = itertools.count()

    def make() -> dict[str, Any]:
        i = next(counter)
        customer = CUSTOMER_BASE + i % CUSTOMERS
        data = copy.deepcopy(base)
        data["customerIdentifiers"]["customerId"] = customer
        data.update({
            "entityInformation": {"entityType": "USER", "entityId": customer},
            "triggeringActivity": {"name": "ManualCurrencyAllocation",
                                   "identifiers": [{"key": "BillId", "value": str(2152322568 + i)}],
                                   "enteredBy": {"id": TILL_BASE + i % TILLS}},
            "promotionalPointsIssued": [{"promotionName": "Welcome", "promotionPoints": 5}],
            "promisedPointsIssued": [],
            "loyaltyEventId": _loyalty_event(i),
        })
        return data

    return make


def check() -> tuple[bool, str]:
    """After the ON run: every delivery enriched without notes, and one payload has each addition."""
    engine = sa.create_engine(run.PG_URL)
    try:
        with engine.connect() as conn:
            total, enriched, clean = conn.exec_driver_sql(
                "SELECT count(*), count(enriched_payload), "
                "count(*) FILTER (WHERE enriched_payload IS NOT NULL AND enrichment_notes IS NULL) "
                "FROM deliveries WHERE status = 'delivered'").one()
            notes = conn.exec_driver_sql(
                "SELECT enrichment_notes FROM deliveries WHERE enrichment_notes IS NOT NULL "
                "LIMIT 1").scalar()
            payload = conn.exec_driver_sql(
                "SELECT enriched_payload FROM deliveries WHERE enriched_payload IS NOT NULL "
                "ORDER BY id LIMIT 1").scalar()
    finally:
        engine.dispose()
    if isinstance(payload, str):
        payload = json.loads(payload)
    if not payload:
        return False, f"enrichment check: FAILED, no enriched payload among {total} deliveries"
    data = payload["data"]
    ids = data["customerIdentifiers"]
    entered_by = data["triggeringActivity"]["enteredBy"]
    found = {
        "AvailablePointsBalance": data.get("AvailablePointsBalance"),
        "instore.cardNumbers": ids.get("instore", {}).get("cardNumbers"),
        "instore.externalId": ids.get("instore", {}).get("externalId"),
        "wechat.cardNumbers": ids.get("wechat", {}).get("cardNumbers"),
        "web_engage.accounts": len(ids.get("web_engage", {}).get("accounts", [])) or None,
        "enteredBy.till.code": entered_by.get("till", {}).get("code"),
        "enteredBy.store.code": entered_by.get("store", {}).get("code"),
        "regularPointsBreakup[0].awardedReferenceId":
            data["regularPointsBreakup"][0].get("awardedReferenceId"),
        "promotionalPointsIssued[0].awardedReferenceId":
            data["promotionalPointsIssued"][0].get("awardedReferenceId"),
    }
    missing = [k for k, v in found.items() if not v]
    ok = not missing and total == enriched == clean
    shown = ", ".join(f"{k}={v}" for k, v in found.items())
    return ok, (f"enrichment check: {'OK' if ok else 'FAILED'}: {enriched}/{total} delivered payloads "
                f"enriched, {clean} without notes{f' (e.g. {notes!r})' if notes else ''}"
                f"{f'; missing {missing}' if missing else ''}; customer "
                f"{ids.get('customerId')}: {shown}")
