"""Reference data on both databases: records, bulk loads (all or nothing), the CLI, lookups."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from notifier import reference, store
from notifier.cli import main
from notifier.db import Database, upgrade
from notifier.enrich import check_options, enrich, prefetch, set_points_balance_allowed
from notifier.errors import InvalidInput, InvalidRows, NotFound, StoreRefused
from notifier.models import Org, RefCustomerIdentifiers, RefPointsBalance, RefTill

pytestmark = pytest.mark.integration

ORG = 7

RECORDS: dict[str, tuple[str, dict[str, Any]]] = {
    "tills": ("11", {"id": 11, "code": "T11", "name": "Till 11", "storeId": 5}),
    "stores": ("5", {"id": 5, "code": "S5", "name": "Store 5", "externalId": "E5",
                     "externalId1": "E5-1", "externalId2": None}),
    "customers": ("42", {"id": 42, "identifiers": {
        "InStore": {"externalId": "x42", "mobile": "9190000042", "email": "c42@example.com"},
        "WebEngage": {"accounts": [{"accountId": "we-42", "identifiers": []}]}}}),
    "cards": ("CARD-1", {"cardNumber": "CARD-1", "customerId": 42, "source": "InStore",
                         "status": "ACTIVE"}),
    "pointsBalances": ("42", {"customerId": 42, "programs": [
        {"programId": 1, "availablePoints": 10.0}, {"programId": 2, "availablePoints": 2.5}]}),
    "awardedReferences": ("le-1", {"loyaltyEventId": "le-1", "blocks": [
        {"programId": 1, "block": "regularPointsBreakup", "index": 0,
         "awardedReferenceId": "AR-1"}]}),
}


@pytest.fixture
def org(db: Database) -> Database:
    store.create_org(db, ORG, "org", now_ms=0)
    return db


def count(db: Database, model: type[Any]) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


@pytest.mark.parametrize("kind", reference.KINDS)
def test_a_record_of_each_kind_is_put_read_and_deleted(org: Database, kind: str) -> None:
    key, record = RECORDS[kind]

    stored = reference.put_record(org, ORG, kind, key, record)

    assert stored == record
    assert reference.get_record(org, ORG, kind, key) == record
    with pytest.raises(NotFound):
        reference.get_record(org, ORG + 1, kind, key)  # another org's data is not there
    reference.delete_record(org, ORG, kind, key)
    with pytest.raises(NotFound):
        reference.get_record(org, ORG, kind, key)
    with pytest.raises(NotFound):
        reference.delete_record(org, ORG, kind, key)


def test_a_put_replaces_the_whole_record(org: Database) -> None:
    reference.put_record(org, ORG, "customers", *RECORDS["customers"])
    reference.put_record(org, ORG, "pointsBalances", *RECORDS["pointsBalances"])

    reference.put_record(org, ORG, "customers", "42",
                         {"identifiers": {"Instore": {"mobile": "new"}}})
    reference.put_record(org, ORG, "pointsBalances", "42",
                         {"programs": [{"programId": 3, "availablePoints": 1}]})

    assert reference.get_record(org, ORG, "customers", "42") == {
        "id": 42, "identifiers": {"InStore": {"mobile": "new"}}}
    assert count(org, RefCustomerIdentifiers) == 1
    assert reference.get_record(org, ORG, "pointsBalances", "42")["programs"] == [
        {"programId": 3, "availablePoints": 1.0}]


@pytest.mark.parametrize(("kind", "key", "body", "field"), [
    ("tills", "11", {"id": 12}, "id"),
    ("tills", "eleven", {}, "id"),
    ("tills", "11", {"code": 5}, "code"),
    ("stores", "5", {"colour": "red"}, "colour"),
    ("cards", "C", {"customerId": 1, "source": "Facebook"}, "source"),
    ("customers", "1", {"identifiers": {"InStore": {"phone": "1"}}}, "identifiers.InStore.phone"),
    ("pointsBalances", "1", {"programs": [{"programId": 1, "availablePoints": "x"}]},
     "availablePoints"),
    ("awardedReferences", "le", {"blocks": [{"programId": 1, "block": "bonus", "index": 0,
                                             "awardedReferenceId": "a"}]}, "blocks[0].block"),
    ("vouchers", "1", {}, "kind"),
])
def test_a_bad_record_names_the_field(org: Database, kind: str, key: str, body: dict[str, Any],
                                      field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        reference.put_record(org, ORG, kind, key, body)
    assert caught.value.field == field


def test_records_need_an_existing_org(db: Database) -> None:
    with pytest.raises(NotFound):
        reference.put_record(db, ORG, "tills", *RECORDS["tills"])


def test_a_bulk_load_stores_every_kind_and_the_last_record_of_a_key_wins(org: Database) -> None:
    lines = [json.dumps({"kind": kind, **record}) for kind, (_, record) in RECORDS.items()]
    lines.append(json.dumps({"kind": "tills", "id": 11, "code": "T11b"}))

    records = reference.parse_jsonl(["", *lines])
    counts = reference.load(org, ORG, records)

    assert counts == dict.fromkeys(reference.KINDS, 1)
    assert reference.get_record(org, ORG, "tills", "11")["code"] == "T11b"
    assert reference.get_record(org, ORG, "customers", "42") == RECORDS["customers"][1]


def test_a_bad_line_is_reported_by_number_with_every_other(org: Database) -> None:
    lines = ['{"kind": "tills", "id": 1}', '{"kind": "tills", "id": "two"}', "",
             "{not json", '{"kind": "tills", "id": 4}']

    with pytest.raises(InvalidRows) as caught:
        reference.parse_jsonl(lines)

    assert [line for line, _ in caught.value.rows] == [2, 4]
    assert "id: must be an integer" in caught.value.rows[0][1]
    assert "not valid JSON" in caught.value.rows[1][1]


def test_a_load_that_fails_midway_leaves_nothing(org: Database,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "_CHUNK", 2)
    records = reference.parse_jsonl(
        [json.dumps({"kind": "tills", "id": n}) for n in range(5)])
    written: list[int] = []

    def progress(n: int) -> None:
        written.append(n)
        if len(written) == 2:  # two chunks are in the transaction by now
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        reference.load(org, ORG, records, progress=progress)

    assert written == [2, 2]
    assert count(org, RefTill) == 0


def test_csv_rows_of_one_customer_make_one_balance_record(org: Database) -> None:
    lines = ["customerId,programId,availablePoints", "42,1,10", "43,1,3", "42,2,2.5"]

    records = reference.parse_csv(lines, "pointsBalances")
    reference.load(org, ORG, records)

    assert reference.get_record(org, ORG, "pointsBalances", "42") == RECORDS["pointsBalances"][1]
    assert count(org, RefPointsBalance) == 3


def test_csv_errors_count_the_header_as_line_one(org: Database) -> None:
    with pytest.raises(InvalidRows) as caught:
        reference.parse_csv(["id,code,name,storeId", "1,a,b,", "x,a,b,", "3,a,b,4,extra"],
                            "tills")
    assert [line for line, _ in caught.value.rows] == [3, 4]
    with pytest.raises(InvalidRows) as header:
        reference.parse_csv(["id,code"], "tills")
    assert header.value.rows[0][0] == 1 and "storeId" in header.value.rows[0][1]


# ---------------------------------------------------------------- the command


def cli(database_url: str, tmp_path: Path, *args: str) -> Any:
    env = {"NOTIFIER_DATABASE_URL": database_url, "NOTIFIER_DATA_DIR": str(tmp_path)}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_the_command_imports_jsonl_and_csv(org: Database, database_url: str,
                                           tmp_path: Path) -> None:
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"kind": k, **r}) for k, (_, r) in RECORDS.items()))
    tills = tmp_path / "tills.csv"
    tills.write_text("id,code,name,storeId\n20,T20,Till 20,5\n21,T21,Till 21,\n")

    first = cli(database_url, tmp_path, "reference", "import", str(jsonl), "--org", str(ORG))
    second = cli(database_url, tmp_path, "reference", "import", str(tills), "--org", str(ORG),
                 "--kind", "tills")

    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["imported"] == dict.fromkeys(reference.KINDS, 1)
    assert second.exit_code == 0, second.output
    assert reference.get_record(org, ORG, "tills", "21") == {
        "id": 21, "code": "T21", "name": "Till 21", "storeId": None}
    assert count(org, RefTill) == 3


def test_the_command_reports_a_malformed_row_by_line_and_applies_nothing(
        org: Database, database_url: str, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    good = [json.dumps({"kind": "tills", "id": n, "code": f"T{n}"}) for n in range(1, 6)]
    rows.write_text("\n".join([*good[:3], '{"kind": "tills", "id": 4, "code": }', *good[3:]]))

    result = cli(database_url, tmp_path, "reference", "import", str(rows), "--org", str(ORG))

    assert result.exit_code != 0
    assert f"{rows}:4: json: not valid JSON" in result.stderr
    assert "nothing was imported" in result.stderr
    assert count(org, RefTill) == 0


def test_a_csv_needs_a_kind(org: Database, database_url: str, tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("id\n1\n")
    result = cli(database_url, tmp_path, "reference", "import", str(rows), "--org", str(ORG))
    assert result.exit_code != 0 and "--kind" in result.output


def test_the_operator_sets_the_points_balance_gate(org: Database, database_url: str,
                                                   tmp_path: Path) -> None:
    def allowed() -> bool:
        with org.session() as session:
            return bool(session.scalar(select(Org.available_points_balance_enrichment_enabled)
                                       .where(Org.id == ORG)))

    flags = {"availablePointsBalanceEnrichmentEnabled": True}
    with pytest.raises(InvalidInput, match="availablePointsBalanceEnrichmentEnabled"):
        check_options(flags, points_balance_allowed=allowed())

    on = cli(database_url, tmp_path, "orgs", "set", str(ORG),
             "--available-points-balance-enrichment")
    assert on.exit_code == 0, on.output
    check_options(flags, points_balance_allowed=allowed())

    off = cli(database_url, tmp_path, "orgs", "set", str(ORG),
              "--no-available-points-balance-enrichment")
    missing = cli(database_url, tmp_path, "orgs", "set", "999",
                  "--available-points-balance-enrichment")
    assert off.exit_code == 0 and not allowed()
    assert missing.exit_code != 0 and "999" in missing.output


# ---------------------------------------------------------------- lookups


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lookups_read_each_kind_once_and_share_it_for_a_moment(org: Database) -> None:
    set_points_balance_allowed(org, ORG, True)  # balances are read only behind the org's gate
    for kind, (key, record) in RECORDS.items():
        reference.put_record(org, ORG, kind, key, record)
    clock = Clock()
    lookups = reference.Lookups(org, ttl=2.0, clock=clock)

    for _ in range(3):  # three webhooks' deliveries of one event
        assert lookups.till(ORG, 11) == reference.Till(11, "T11", "Till 11", 5)
        assert lookups.store(ORG, 5) == reference.Store(5, "S5", "Store 5", "E5", "E5-1", None)
        assert set(lookups.identifiers(ORG, 42)) == {"InStore", "WebEngage"}
        assert lookups.cards(ORG, 42) == {"InStore": ("CARD-1",)}
        assert lookups.awarded_references(ORG, "le-1") == {
            (1, "regularPointsBreakup", 0): "AR-1"}
        assert lookups.points_balance(ORG, 42) == 12.5
    assert lookups.queries == 6

    reference.put_record(org, ORG, "tills", "11", {"code": "NEW"})
    assert lookups.till(ORG, 11).code == "T11"  # type: ignore[union-attr]  # still remembered
    clock.now += 2.5
    assert lookups.till(ORG, 11).code == "NEW"  # type: ignore[union-attr]
    assert lookups.points_balance(ORG, 43) is None and lookups.till(ORG, 99) is None


def test_a_batch_of_events_is_read_in_one_query_per_kind(org: Database) -> None:
    set_points_balance_allowed(org, ORG, True)
    customers = range(100, 105)
    records = [
        {"kind": "stores", "id": 5, "code": "S5", "name": "Store 5"},
        *({"kind": "tills", "id": 10 + c, "code": f"T{c}", "name": f"Till {c}", "storeId": 5}
          for c in customers),
        *({"kind": "customers", "id": c, "identifiers": {"InStore": {"externalId": f"E{c}"}}}
          for c in customers),
        *({"kind": "cards", "cardNumber": f"CARD-{c}", "customerId": c, "source": "InStore"}
          for c in customers),
        *({"kind": "pointsBalances", "customerId": c, "programs": [
            {"programId": 1, "availablePoints": c}]} for c in customers),
        *({"kind": "awardedReferences", "loyaltyEventId": f"le-{c}", "blocks": [
            {"programId": 1, "block": "regularPointsBreakup", "index": 0,
             "awardedReferenceId": f"AR-{c}"}]} for c in customers)]
    reference.load(org, ORG, reference.parse_jsonl(json.dumps(r) for r in records))
    flags = {"tillDetailsEnrichmentEnabled": True, "storeDetailsEnrichmentEnabled": True,
             "customerIdentifiersToBeEnriched": ["InStore"], "cardNumberEnrichmentEnabled": True,
             "awardedReferenceEnrichmentEnabled": True,
             "availablePointsBalanceEnrichmentEnabled": True}
    events = [{"eventName": "pointsIssued", "orgId": ORG, "data": {
        "customerIdentifiers": {"customerId": c}, "loyaltyEventId": f"le-{c}",
        "loyaltyProgramId": 1, "regularPointsBreakup": [{"points": 1}],
        "triggeringActivity": {"enteredBy": {"id": 10 + c}}}} for c in customers]
    lookups = reference.Lookups(org)

    prefetch([(event, flags) for event in events], lookups)
    # Five kinds read together; the store, named by the tills, in a second round.
    assert lookups.queries == 6
    enriched = [enrich(event, flags, lookups) for event in events]
    assert lookups.queries == 6  # every answer was remembered
    assert [e.notes for e in enriched] == [()] * 5
    data = enriched[4].payload["data"]
    assert data["customerIdentifiers"]["instore"] == {"externalId": "E104",
                                                      "cardNumbers": ["CARD-104"]}
    assert data["triggeringActivity"]["enteredBy"]["store"]["code"] == "S5"
    assert data["regularPointsBreakup"][0]["awardedReferenceId"] == "AR-104"
    assert data["AvailablePointsBalance"] == 104


def test_a_failing_database_is_not_remembered(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'late.db'}"
    broken = Database(url)  # no tables yet: every read fails
    lookups = reference.Lookups(broken)
    try:
        # (A missing table is refused for good, not transient: retrying cannot create it.)
        with pytest.raises(StoreRefused):
            lookups.till(ORG, 1)
        assert lookups.queries == 0
        # The database comes right (migrated, the till loaded) within the memory's lifetime: the
        # next read asks it, rather than answering the failure (or an absence) from memory.
        upgrade(url)
        store.create_org(broken, ORG, "org", now_ms=0)
        reference.put_record(broken, ORG, "tills", "1", {"code": "T1", "name": "Till 1"})
        assert lookups.till(ORG, 1) == reference.Till(1, "T1", "Till 1", None)
        assert lookups.queries == 1
    finally:
        broken.dispose()
