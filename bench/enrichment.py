"""Enrichment cost: notifier fan-out 1 with every enrichment option OFF, and every option ON.

One stack serves two orgs with one webhook each: ``run.ORG``'s asks for nothing, ``ON_ORG``'s
for every option. Runs alternate between them (OFF, ON, OFF, ON, ...), so both see the same
workers, database and moment of the machine. Both publish the same kind of pointsIssued
events, whose till, store, customer (spread over ``CUSTOMERS``), cards, awarded references (one
loyaltyEventId per event) and points balances all exist in both orgs' reference data, loaded
before the workers start, so the ON webhook's enrichment finds and adds every part. Shapes
follow tests/integration/test_enrichment.py.
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
ON_ORG = run.ORG + 1
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


def prepare(events: int, url: str, connections: int) -> Callable[[Any, Any, Any], None]:
    """The ON org with its webhook to ``url`` (every option on, the org's points-balance gate
    on), and the reference data of both orgs."""

    def do(db: Any, catalog: Any, vault: Any) -> None:
        from notifier import reference, store
        from notifier.enrich import set_points_balance_allowed
        from notifier.models import Webhook

        store.create_org(db, ON_ORG, "bench-enriched", now_ms=0)
        run.create_webhook(db, catalog, vault, org_id=ON_ORG, name="enriched", url=url,
                           event_names=[run.EVENT], max_allowed_connections=connections)
        records = reference.parse_jsonl(reference_lines(events))
        for org in (run.ORG, ON_ORG):
            reference.load(db, org, records)
        set_points_balance_allowed(db, ON_ORG, True)
        with db.session() as session:
            session.execute(sa.update(Webhook).where(Webhook.org_id == ON_ORG).values(**ALL_ON))

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
                "SELECT count(*), count(enrichment), "
                "count(*) FILTER (WHERE enrichment IS NOT NULL AND enrichment_notes IS NULL) "
                "FROM deliveries WHERE status = 'delivered'").one()
            # (the deliveries of the last run only: the ON org's)
            notes = conn.exec_driver_sql(
                "SELECT enrichment_notes FROM deliveries WHERE enrichment_notes IS NOT NULL "
                "LIMIT 1").scalar()
            row = conn.exec_driver_sql(
                "SELECT e.payload, d.enrichment FROM deliveries d "
                "JOIN events e ON e.pk = d.event_pk WHERE d.enrichment IS NOT NULL "
                "ORDER BY d.id LIMIT 1").one_or_none()
    finally:
        engine.dispose()
    from notifier.enrich import overlay

    # What was sent: the event overlaid with what enrichment added.
    payload = None if row is None else overlay(*(json.loads(v) if isinstance(v, str) else v
                                                 for v in row))
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
