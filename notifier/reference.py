"""Reference data per org (tills, stores, customers, cards, points) that enrichment reads.

The loyalty platform keeps these rows current through the API and ``notifier reference import``;
notifier never invents them. Each *kind* has one record shape, the same in a JSON line, a
``PUT /v3/reference/{kind}/{key}`` body and (flattened) a CSV row:

==================  ===============  ========================================================
kind                key              record
==================  ===============  ========================================================
tills               id               ``{id, code, name, storeId}``
stores              id               ``{id, code, name, externalId, externalId1, externalId2}``
customers           id               ``{id, identifiers: {InStore: {externalId, mobile,
                                     email}, WeChat: {accounts: [...]}, WebEngage: {...}}}``
cards               cardNumber       ``{cardNumber, customerId, source, status}``
pointsBalances      customerId       ``{customerId, programs: [{programId, availablePoints}]}``
awardedReferences   loyaltyEventId   ``{loyaltyEventId, blocks: [{programId, block, index,
                                     awardedReferenceId}]}``
==================  ===============  ========================================================

A record replaces everything stored under its key (a customer's identifiers, a customer's
balances, a loyalty event's references): a put is idempotent and never leaves stale parts.

**Awarded reference ids** are keyed by org, ``loyaltyEventId``, program id, block and index:
the block is the name of the points array in the event (``regularPointsBreakup``,
``promotionalPointsIssued``, ``promisedPointsIssued`` of pointsIssued;
``redemptionFromEarningPrograms`` of pointsRedeemed) and the index the item's position in it.
The program is the event's ``loyaltyProgramId`` for pointsIssued blocks and the item's own
``programId`` for redemption blocks. Points blocks carry no id of their own in InTouch
payloads, so their position within the event is the only stable handle the platform and
notifier share.

Lookups for enrichment (``Lookups``) read one kind in one query and remember the answer for a
few seconds, so the deliveries of one event to several webhooks share them.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, any_, bindparam, delete, exists, func, select
from sqlalchemy.orm import Session

from notifier.db import Database, store_error
from notifier.errors import InvalidInput, InvalidRows, NotFound
from notifier.models import (
    Org,
    RefAwardedReference,
    RefCard,
    RefCustomer,
    RefCustomerIdentifiers,
    RefPointsBalance,
    RefStore,
    RefTill,
)

__all__ = [
    "BLOCKS",
    "CSV_COLUMNS",
    "KINDS",
    "SOURCES",
    "Lookups",
    "Record",
    "Store",
    "Till",
    "check_record",
    "delete_record",
    "get_record",
    "load",
    "parse_csv",
    "parse_jsonl",
    "put_record",
    "source_name",
]

KINDS = ("tills", "stores", "customers", "cards", "pointsBalances", "awardedReferences")
SOURCES = ("InStore", "WeChat", "WebEngage")
# The points arrays of an event whose items get an awarded reference id, by event name.
BLOCKS = {
    "pointsIssued": ("regularPointsBreakup", "promotionalPointsIssued", "promisedPointsIssued"),
    "pointsRedeemed": ("redemptionFromEarningPrograms",),
}
_ALL_BLOCKS = frozenset(b for blocks in BLOCKS.values() for b in blocks)
_KEY_FIELD = {"tills": "id", "stores": "id", "customers": "id", "cards": "cardNumber",
              "pointsBalances": "customerId", "awardedReferences": "loyaltyEventId"}
# CSV columns per kind. A customers row is the InStore profile (other sources need JSON lines);
# pointsBalances and awardedReferences rows are one program / one block each, and the rows of
# one customer / one loyalty event make up its record together.
CSV_COLUMNS = {
    "tills": ("id", "code", "name", "storeId"),
    "stores": ("id", "code", "name", "externalId", "externalId1", "externalId2"),
    "customers": ("id", "externalId", "mobile", "email"),
    "cards": ("cardNumber", "customerId", "source", "status"),
    "pointsBalances": ("customerId", "programId", "availablePoints"),
    "awardedReferences": ("loyaltyEventId", "programId", "block", "index", "awardedReferenceId"),
}
_INSTORE_FIELDS = ("externalId", "mobile", "email")
_TEXT_MAX = 200
_CHUNK = 2000
_MAX_REPORTED = 1000  # bad lines listed before a parse gives up reading the rest


@dataclass(frozen=True)
class Record:
    """One checked record of one kind; ``line`` is where it came from (0 for an API call)."""

    kind: str
    key: int | str
    fields: Mapping[str, Any]
    line: int = 0


# ---------------------------------------------------------------- checking


def _kind(kind: Any) -> str:
    if kind not in KINDS:
        raise InvalidInput("kind", f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    return str(kind)


def _int(record: Mapping[str, Any], name: str, *, required: bool = True) -> int | None:
    value = record.get(name)
    if value is None:
        if required:
            raise InvalidInput(name, "is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(name, "must be an integer")
    if not -(2**63) <= value < 2**63:
        raise InvalidInput(name, "is out of range")
    return value


def _text(record: Mapping[str, Any], name: str, *, required: bool = False,
          limit: int = _TEXT_MAX) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise InvalidInput(name, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidInput(name, "must be a string")
    if required and not value:
        raise InvalidInput(name, "must not be empty")
    if len(value) > limit:
        raise InvalidInput(name, f"must be at most {limit} characters")
    if "\x00" in value:
        raise InvalidInput(name, "must not contain NUL")
    return value


def _number(record: Mapping[str, Any], name: str) -> float:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(name, "must be a finite number")
    return float(value)


def _only(record: Mapping[str, Any], allowed: Iterable[str], where: str = "") -> None:
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        raise InvalidInput(where + unknown[0], "is not a field of this record")


def source_name(value: Any, field: str = "source") -> str:
    """The canonical name of a customer identifier source (``Instore`` -> ``InStore``)."""
    for source in SOURCES:
        if isinstance(value, str) and value.lower() == source.lower():
            return source
    raise InvalidInput(field, f"unknown source {value!r}; use one of {', '.join(SOURCES)}")


def _accounts_block(block: Any, where: str) -> dict[str, Any]:
    # WeChat / WebEngage profiles, shaped as internal/customer.json's sourceAccounts.
    if not isinstance(block, Mapping):
        raise InvalidInput(where, "must be an object")
    _only(block, ("accounts",), where + ".")
    accounts = block.get("accounts", [])
    if not isinstance(accounts, list):
        raise InvalidInput(where + ".accounts", "must be a list")
    for i, account in enumerate(accounts):
        at = f"{where}.accounts[{i}]"
        if not isinstance(account, Mapping):
            raise InvalidInput(at, "must be an object")
        _only(account, ("accountId", "identifiers"), at + ".")
        _text(account, "accountId")
        identifiers = account.get("identifiers", [])
        if not isinstance(identifiers, list):
            raise InvalidInput(at + ".identifiers", "must be a list")
        for j, item in enumerate(identifiers):
            if not isinstance(item, Mapping):
                raise InvalidInput(f"{at}.identifiers[{j}]", "must be an object")
            _only(item, ("identifierType", "identifierValue"), f"{at}.identifiers[{j}].")
            _text(item, "identifierType")
            _text(item, "identifierValue")
    return {"accounts": [dict(a) for a in accounts]}


def _check_fields(kind: str, record: Mapping[str, Any]) -> tuple[int | str, dict[str, Any]]:
    if kind == "tills":
        _only(record, ("id", "code", "name", "storeId"))
        fields: dict[str, Any] = {"id": _int(record, "id"), "code": _text(record, "code"),
                                  "name": _text(record, "name"),
                                  "storeId": _int(record, "storeId", required=False)}
    elif kind == "stores":
        names = ("code", "name", "externalId", "externalId1", "externalId2")
        _only(record, ("id", *names))
        fields = {"id": _int(record, "id"), **{n: _text(record, n) for n in names}}
    elif kind == "customers":
        _only(record, ("id", "identifiers"))
        given = record.get("identifiers") or {}
        if not isinstance(given, Mapping):
            raise InvalidInput("identifiers", "must be an object of source -> profile")
        identifiers: dict[str, Any] = {}
        for name, block in given.items():
            source = source_name(name, "identifiers")
            where = f"identifiers.{source}"
            if source in identifiers:
                raise InvalidInput(where, "is given twice")
            if source == "InStore":
                if not isinstance(block, Mapping):
                    raise InvalidInput(where, "must be an object")
                _only(block, _INSTORE_FIELDS, where + ".")
                identifiers[source] = {n: _text(block, n) for n in _INSTORE_FIELDS
                                       if block.get(n) is not None}
            else:
                identifiers[source] = _accounts_block(block, where)
        fields = {"id": _int(record, "id"), "identifiers": identifiers}
    elif kind == "cards":
        _only(record, ("cardNumber", "customerId", "source", "status"))
        fields = {"cardNumber": _text(record, "cardNumber", required=True, limit=100),
                  "customerId": _int(record, "customerId"),
                  "source": source_name(record.get("source")),
                  "status": _text(record, "status", limit=32)}
    elif kind == "pointsBalances":
        _only(record, ("customerId", "programs"))
        programs = record.get("programs", [])
        if not isinstance(programs, list):
            raise InvalidInput("programs", "must be a list")
        checked, seen = [], set()
        for i, item in enumerate(programs):
            if not isinstance(item, Mapping):
                raise InvalidInput(f"programs[{i}]", "must be an object")
            _only(item, ("programId", "availablePoints"), f"programs[{i}].")
            program = _int(item, "programId")
            if program in seen:
                raise InvalidInput(f"programs[{i}].programId", f"program {program} is given twice")
            seen.add(program)
            checked.append({"programId": program,
                            "availablePoints": _number(item, "availablePoints")})
        fields = {"customerId": _int(record, "customerId"), "programs": checked}
    else:  # awardedReferences
        _only(record, ("loyaltyEventId", "blocks"))
        blocks = record.get("blocks", [])
        if not isinstance(blocks, list):
            raise InvalidInput("blocks", "must be a list")
        checked, seen_blocks = [], set()
        for i, item in enumerate(blocks):
            at = f"blocks[{i}]"
            if not isinstance(item, Mapping):
                raise InvalidInput(at, "must be an object")
            _only(item, ("programId", "block", "index", "awardedReferenceId"), at + ".")
            if item.get("block") not in _ALL_BLOCKS:
                raise InvalidInput(at + ".block", f"must be one of {', '.join(sorted(_ALL_BLOCKS))}")
            index = _int(item, "index")
            if index is None or index < 0:
                raise InvalidInput(at + ".index", "must not be negative")
            entry = {"programId": _int(item, "programId"), "block": item["block"], "index": index,
                     "awardedReferenceId": _text(item, "awardedReferenceId", required=True,
                                                 limit=100)}
            block_key = (entry["programId"], entry["block"], index)
            if block_key in seen_blocks:
                raise InvalidInput(at, "the same program, block and index are given twice")
            seen_blocks.add(block_key)
            checked.append(entry)
        fields = {"loyaltyEventId": _text(record, "loyaltyEventId", required=True, limit=100),
                  "blocks": checked}
    key = fields[_KEY_FIELD[kind]]
    return key, fields


def check_record(kind: str, record: Mapping[str, Any], *, key: str | None = None,
                 line: int = 0) -> Record:
    """Check one record of ``kind``; ``key`` (from a URL path) must agree with the record's.

    Raises ``InvalidInput`` naming the field.
    """
    kind = _kind(kind)
    if not isinstance(record, Mapping):
        raise InvalidInput(kind, "a record must be a JSON object")
    record = dict(record)
    key_field = _KEY_FIELD[kind]
    if key is not None:
        path_key = _path_key(kind, key)
        if record.get(key_field) is None:
            record[key_field] = path_key
        elif record[key_field] != path_key:
            raise InvalidInput(key_field, f"{record[key_field]!r} does not match the path's {key}")
    record_key, fields = _check_fields(kind, record)
    return Record(kind, record_key, fields, line)


def _path_key(kind: str, key: str) -> int | str:
    if _KEY_FIELD[kind] == "cardNumber" or _KEY_FIELD[kind] == "loyaltyEventId":
        return key
    try:
        return int(key)
    except ValueError:
        raise InvalidInput(_KEY_FIELD[kind], f"{key!r} is not an integer") from None


# ---------------------------------------------------------------- files


def _collect(items: Iterable[tuple[int, Callable[[], Record]]]) -> list[Record]:
    """Run every line's check; raise ``InvalidRows`` listing every bad line, or return all."""
    records: list[Record] = []
    bad: list[tuple[int, str]] = []
    for line, check in items:
        try:
            records.append(check())
        except InvalidInput as exc:
            bad.append((line, str(exc)))
            if len(bad) >= _MAX_REPORTED:
                break
    if bad:
        raise InvalidRows(bad)
    return records


def parse_jsonl(lines: Iterable[str], *, kind: str | None = None) -> list[Record]:
    """Records from JSON lines: each an object with its ``kind`` (or every line of ``kind``).

    Blank lines are skipped. Raises ``InvalidRows`` with every bad line's number and problem.
    """
    if kind is not None:
        _kind(kind)

    def check(text: str) -> Record:
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput("json", f"not valid JSON ({exc.msg} at column {exc.colno})") \
                from None
        if not isinstance(record, dict):
            raise InvalidInput("json", "a line must be a JSON object")
        line_kind = record.pop("kind", kind)
        if kind is not None and line_kind != kind:
            raise InvalidInput("kind", f"{line_kind!r} in a file of {kind}")
        return check_record(line_kind, record)

    def numbered() -> Iterator[tuple[int, Callable[[], Record]]]:
        for number, text in enumerate(lines, start=1):
            if text.strip():
                yield number, functools.partial(_numbered_check, check, text, number)

    return _collect(numbered())


def _numbered_check(check: Callable[[str], Record], text: str, line: int) -> Record:
    record = check(text)
    return Record(record.kind, record.key, record.fields, line)


def _csv_value(kind: str, column: str, text: str) -> Any:
    if text == "":
        return None
    if column in ("id", "storeId", "customerId", "programId", "index"):
        try:
            return int(text)
        except ValueError:
            raise InvalidInput(column, f"{text!r} is not an integer") from None
    if column == "availablePoints":
        try:
            return float(text)
        except ValueError:
            raise InvalidInput(column, f"{text!r} is not a number") from None
    return text


def _csv_record(kind: str, row: Mapping[str, str]) -> dict[str, Any]:
    values = {c: _csv_value(kind, c, row.get(c) or "") for c in CSV_COLUMNS[kind]}
    if kind == "customers":
        profile = {n: values[n] for n in _INSTORE_FIELDS if values[n] is not None}
        return {"id": values["id"], "identifiers": {"InStore": profile} if profile else {}}
    if kind == "pointsBalances":
        return {"customerId": values["customerId"],
                "programs": [{"programId": values["programId"],
                              "availablePoints": values["availablePoints"]}]}
    if kind == "awardedReferences":
        return {"loyaltyEventId": values["loyaltyEventId"],
                "blocks": [{n: values[n] for n in ("programId", "block", "index",
                                                   "awardedReferenceId")}]}
    return {c: v for c, v in values.items() if v is not None}


def parse_csv(lines: Iterable[str], kind: str) -> list[Record]:
    """Records of ``kind`` from CSV with a header row naming ``CSV_COLUMNS[kind]``.

    Line numbers count the header as line 1. The rows of one customer (pointsBalances) or one
    loyalty event (awardedReferences) are merged into its one record. Raises ``InvalidRows``.
    """
    kind = _kind(kind)
    reader = csv.DictReader(iter(lines))
    header = reader.fieldnames or []
    missing = [c for c in CSV_COLUMNS[kind] if c not in header]
    extra = [c for c in header if c not in CSV_COLUMNS[kind]]
    if missing or extra:
        problem = (f"missing column(s) {', '.join(missing)}" if missing
                   else f"unknown column(s) {', '.join(extra)}")
        raise InvalidRows([(1, f"header: {problem}; {kind} has {', '.join(CSV_COLUMNS[kind])}")])

    def numbered() -> Iterator[tuple[int, Callable[[], Record]]]:
        for row in reader:
            number = reader.line_num
            if None in row:
                yield number, _fails("row", "has more fields than the header")
                continue
            yield number, functools.partial(_csv_check, kind, row, number)

    records = _collect(numbered())
    if kind not in ("pointsBalances", "awardedReferences"):
        return records
    return _merge_rows(kind, records)


def _csv_check(kind: str, row: Mapping[str, str], line: int) -> Record:
    return check_record(kind, _csv_record(kind, row), line=line)


def _fails(field: str, problem: str) -> Callable[[], Record]:
    def fail() -> Record:
        raise InvalidInput(field, problem)
    return fail


def _merge_rows(kind: str, records: list[Record]) -> list[Record]:
    part = "programs" if kind == "pointsBalances" else "blocks"
    merged: dict[Any, Record] = {}
    bad: list[tuple[int, str]] = []
    for record in records:
        first = merged.get(record.key)
        if first is None:
            merged[record.key] = record
            continue
        combined = {**first.fields, part: [*first.fields[part], *record.fields[part]]}
        try:
            check_record(kind, combined)  # the same program / block twice
        except InvalidInput as exc:
            bad.append((record.line, str(exc)))
            continue
        merged[record.key] = Record(kind, record.key, combined, first.line)
    if bad:
        raise InvalidRows(bad)
    return list(merged.values())


# ---------------------------------------------------------------- writing


def _rows(org_id: int, record: Record) -> list[tuple[type[Any], dict[str, Any]]]:
    f = record.fields
    if record.kind == "tills":
        return [(RefTill, {"org_id": org_id, "id": f["id"], "code": f["code"],
                           "name": f["name"], "store_id": f["storeId"]})]
    if record.kind == "stores":
        return [(RefStore, {"org_id": org_id, "id": f["id"], "code": f["code"], "name": f["name"],
                            "external_id": f["externalId"], "external_id1": f["externalId1"],
                            "external_id2": f["externalId2"]})]
    if record.kind == "customers":
        return [(RefCustomer, {"org_id": org_id, "id": f["id"]})] + [
            (RefCustomerIdentifiers, {"org_id": org_id, "customer_id": f["id"], "source": source,
                                      "identifiers": block})
            for source, block in f["identifiers"].items()]
    if record.kind == "cards":
        return [(RefCard, {"org_id": org_id, "card_number": f["cardNumber"],
                           "customer_id": f["customerId"], "source": f["source"],
                           "status": f["status"]})]
    if record.kind == "pointsBalances":
        return [(RefPointsBalance, {"org_id": org_id, "customer_id": f["customerId"],
                                    "program_id": p["programId"],
                                    "available_points": p["availablePoints"]})
                for p in f["programs"]]
    return [(RefAwardedReference, {"org_id": org_id, "loyalty_event_id": f["loyaltyEventId"],
                                   "program_id": b["programId"], "block": b["block"],
                                   "block_index": b["index"],
                                   "awarded_reference_id": b["awardedReferenceId"]})
            for b in f["blocks"]]


# Per kind: the tables a record's rows live in, and the column its key is stored in there.
_TABLES: dict[str, tuple[tuple[type[Any], str], ...]] = {
    "tills": ((RefTill, "id"),),
    "stores": ((RefStore, "id"),),
    "customers": ((RefCustomer, "id"), (RefCustomerIdentifiers, "customer_id")),
    "cards": ((RefCard, "card_number"),),
    "pointsBalances": ((RefPointsBalance, "customer_id"),),
    "awardedReferences": ((RefAwardedReference, "loyalty_event_id"),),
}


def _remove(session: Session, org_id: int, kind: str, keys: Sequence[Any]) -> int:
    removed = 0
    for model, column in _TABLES[kind]:
        result = session.execute(
            delete(model).where(model.org_id == org_id, getattr(model, column).in_(keys))
            .execution_options(synchronize_session=False))
        removed += int(getattr(result, "rowcount", 0) or 0)
    return removed


def _replace(session: Session, org_id: int, records: Sequence[Record]) -> None:
    """Replace what is stored under each record's key (records all of one kind, keys unique)."""
    _remove(session, org_id, records[0].kind, [r.key for r in records])
    by_table: dict[type[Any], list[dict[str, Any]]] = {}
    for record in records:
        for model, row in _rows(org_id, record):
            by_table.setdefault(model, []).append(row)
    for model, _column in _TABLES[records[0].kind]:
        if by_table.get(model):
            session.execute(model.__table__.insert(), by_table[model])


def _require_org(session: Session, org_id: int) -> None:
    if session.get(Org, org_id) is None:
        raise NotFound(f"org {org_id} does not exist")


def load(db: Database, org_id: int, records: Sequence[Record], *,
         progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Store ``records`` for ``org_id`` in one transaction: all of them, or none on any error.

    A later record with the same kind and key replaces an earlier one. ``progress(n)`` is
    called after every ``n`` records written. Returns how many records of each kind.
    """
    latest: dict[tuple[str, Any], Record] = {}
    for record in records:
        latest.pop((record.kind, record.key), None)  # keep file order of the last one
        latest[(record.kind, record.key)] = record
    by_kind: dict[str, list[Record]] = {}
    for record in latest.values():
        by_kind.setdefault(record.kind, []).append(record)
    skipped = len(records) - len(latest)
    with db.session() as session:
        _require_org(session, org_id)
        for kind in KINDS:
            items = by_kind.get(kind, [])
            for start in range(0, len(items), _CHUNK):
                chunk = items[start:start + _CHUNK]
                _replace(session, org_id, chunk)
                if progress is not None:
                    progress(len(chunk))
        if progress is not None and skipped:
            progress(skipped)
    return {kind: len(items) for kind, items in by_kind.items()}


def put_record(db: Database, org_id: int, kind: str, key: str,
               body: Mapping[str, Any]) -> dict[str, Any]:
    """``PUT /v3/reference/{kind}/{key}``: store the record, replacing any under that key.

    Returns the record as stored. Raises ``InvalidInput`` (naming the field) or ``NotFound``
    (no such org).
    """
    record = check_record(kind, body, key=key)
    with db.session() as session:
        _require_org(session, org_id)
        _replace(session, org_id, [record])
    return dict(record.fields)


def delete_record(db: Database, org_id: int, kind: str, key: str) -> None:
    """``DELETE /v3/reference/{kind}/{key}``; ``NotFound`` if nothing is stored under it."""
    kind = _kind(kind)
    path_key = _path_key(kind, key)
    with db.session() as session:
        if not _remove(session, org_id, kind, [path_key]):
            raise NotFound(f"no {kind} {key} in org {org_id}")


def get_record(db: Database, org_id: int, kind: str, key: str) -> dict[str, Any]:
    """``GET /v3/reference/{kind}/{key}``: the record as stored; ``NotFound`` if none."""
    kind = _kind(kind)
    path_key = _path_key(kind, key)
    with db.session() as session:
        rows: dict[type[Any], list[Any]] = {
            model: list(session.scalars(select(model).where(
                model.org_id == org_id, getattr(model, column) == path_key)))
            for model, column in _TABLES[kind]}
    main = rows[_TABLES[kind][0][0]]
    if not main:
        raise NotFound(f"no {kind} {key} in org {org_id}")
    if kind == "tills":
        t = main[0]
        return {"id": t.id, "code": t.code, "name": t.name, "storeId": t.store_id}
    if kind == "stores":
        s = main[0]
        return {"id": s.id, "code": s.code, "name": s.name, "externalId": s.external_id,
                "externalId1": s.external_id1, "externalId2": s.external_id2}
    if kind == "customers":
        return {"id": path_key, "identifiers": {
            i.source: i.identifiers for i in rows[RefCustomerIdentifiers]}}
    if kind == "cards":
        c = main[0]
        return {"cardNumber": c.card_number, "customerId": c.customer_id, "source": c.source,
                "status": c.status}
    if kind == "pointsBalances":
        return {"customerId": path_key, "programs": [
            {"programId": b.program_id, "availablePoints": b.available_points}
            for b in sorted(main, key=lambda b: b.program_id)]}
    return {"loyaltyEventId": path_key, "blocks": [
        {"programId": a.program_id, "block": a.block, "index": a.block_index,
         "awardedReferenceId": a.awarded_reference_id}
        for a in sorted(main, key=lambda a: (a.program_id, a.block, a.block_index))]}


# ---------------------------------------------------------------- lookups for enrichment


@dataclass(frozen=True)
class Till:
    id: int
    code: str | None
    name: str | None
    store_id: int | None


@dataclass(frozen=True)
class Store:
    id: int
    code: str | None
    name: str | None
    external_id: str | None
    external_id1: str | None
    external_id2: str | None


# What each kind of lookup gives when the reference data has nothing under a key.
ABSENT: dict[str, Any] = {"till": None, "store": None, "identifiers": {}, "cards": {},
                           "awarded": {}, "balance": None}


@functools.cache
def _statements(postgresql: bool) -> dict[str, Any]:
    """One statement per kind, built once: the org and the keys are parameters (on PostgreSQL
    ``= ANY(array)``, one text for any number of keys; elsewhere an expanding ``IN``)."""
    org: Any = bindparam("org")

    def among(column: Any) -> Any:
        if postgresql:
            return column == any_(bindparam("keys"))
        return column.in_(bindparam("keys", expanding=True))

    tills, stores = RefTill.__table__.c, RefStore.__table__.c
    ids, cards = RefCustomerIdentifiers.__table__.c, RefCard.__table__.c
    awarded, balances = RefAwardedReference.__table__.c, RefPointsBalance.__table__.c
    orgs = Org.__table__.c
    return {
        "till": select(tills.id, tills.code, tills.name, tills.store_id)
        .where(tills.org_id == org, among(tills.id)),
        "store": select(stores.id, stores.code, stores.name, stores.external_id,
                        stores.external_id1, stores.external_id2)
        .where(stores.org_id == org, among(stores.id)),
        "identifiers": select(ids.customer_id, ids.source, ids.identifiers)
        .where(ids.org_id == org, among(ids.customer_id)),
        "cards": select(cards.customer_id, cards.card_number, cards.source)
        .where(cards.org_id == org, among(cards.customer_id))
        .order_by(cards.card_number),
        "awarded": select(awarded.loyalty_event_id, awarded.program_id, awarded.block,
                          awarded.block_index, awarded.awarded_reference_id)
        .where(awarded.org_id == org, among(awarded.loyalty_event_id)),
        # A balance is read only while the operator's gate of the org it belongs to is open:
        # the event's org, which for a parent's listenToChildEvents webhook is the child, not
        # the webhook's org (whose gate store.targets checks).
        "balance": select(balances.customer_id, func.sum(balances.available_points))
        .where(balances.org_id == org, among(balances.customer_id),
               exists().where(orgs.id == org,
                              orgs.available_points_balance_enrichment_enabled.is_(True)))
        .group_by(balances.customer_id),
    }


@functools.cache
def _postgresql_sql() -> dict[str, str]:
    """The statements as PostgreSQL text, compiled once, for the driver's own cursor: through
    SQLAlchemy's execution each cost about seven times the query itself."""
    from sqlalchemy.dialects.postgresql import psycopg

    dialect = psycopg.dialect()  # type: ignore[no-untyped-call]
    return {kind: str(statement.compile(dialect=dialect))
            for kind, statement in _statements(True).items()}


def _grouped(rows: Iterable[Any]) -> dict[Any, list[Any]]:
    """``key -> [the rest of each row]``, by each row's first column."""
    found: dict[Any, list[Any]] = {}
    for key, *rest in rows:
        found.setdefault(key, []).append(rest)
    return found


def _cards_by_source(rows: Iterable[Any]) -> dict[Any, Any]:
    found: dict[Any, dict[str, list[str]]] = {}
    for customer, number, source in rows:
        found.setdefault(customer, {}).setdefault(source, []).append(number)
    return {customer: {source: tuple(numbers) for source, numbers in by_source.items()}
            for customer, by_source in found.items()}


# Each kind's rows (from its statement) -> its answer per key.
_ANSWERS: dict[str, Callable[[Iterable[Any]], dict[Any, Any]]] = {
    "till": lambda rows: {r[0]: Till(*r) for r in rows},
    "store": lambda rows: {r[0]: Store(*r) for r in rows},
    "identifiers": lambda rows: {key: {source: ids for source, ids in rest}
                                 for key, rest in _grouped(rows).items()},
    "cards": _cards_by_source,
    "awarded": lambda rows: {key: {(p, b, i): ref for p, b, i, ref in rest}
                             for key, rest in _grouped(rows).items()},
    "balance": lambda rows: {key: float(total) for key, total in rows},
}


def _reader(connection: Connection) -> Callable[[str, dict[str, Any]], Iterable[Any]]:
    """``read(kind, params)`` on ``connection``: PostgreSQL's through the driver's cursor."""
    if connection.dialect.name != "postgresql":
        statements = _statements(False)
        return lambda kind, params: connection.execute(statements[kind], params)
    sql, dbapi = _postgresql_sql(), connection.dialect.loaded_dbapi
    cursor = connection.connection.cursor()

    def read(kind: str, params: dict[str, Any]) -> Iterable[Any]:
        try:
            cursor.execute(sql[kind], params)
            return cursor.fetchall()
        except dbapi.Error as exc:  # the driver's own, not wrapped by SQLAlchemy here
            raise store_error(exc) from exc

    return read


class KindReader:
    """The enrichment reader's six questions, each one kind of ``answer(kind, org, key)``."""

    def answer(self, kind: str, org_id: int, key: Any) -> Any:
        raise NotImplementedError

    def till(self, org_id: int, till_id: int) -> Till | None:
        result: Till | None = self.answer("till", org_id, till_id)
        return result

    def store(self, org_id: int, store_id: int) -> Store | None:
        result: Store | None = self.answer("store", org_id, store_id)
        return result

    def identifiers(self, org_id: int, customer_id: int) -> Mapping[str, Mapping[str, Any]]:
        """The customer's profile per source (every source, in one query)."""
        result: Mapping[str, Mapping[str, Any]] = self.answer("identifiers", org_id, customer_id)
        return result

    def cards(self, org_id: int, customer_id: int) -> Mapping[str, tuple[str, ...]]:
        """The customer's card numbers per source they are linked through (sorted)."""
        result: Mapping[str, tuple[str, ...]] = self.answer("cards", org_id, customer_id)
        return result

    def awarded_references(self, org_id: int,
                           loyalty_event_id: str) -> Mapping[tuple[int, str, int], str]:
        """``(programId, block, index) -> awardedReferenceId`` for one loyalty event."""
        result: Mapping[tuple[int, str, int], str] = self.answer("awarded", org_id,
                                                                loyalty_event_id)
        return result

    def points_balance(self, org_id: int, customer_id: int) -> float | None:
        """The customer's available points summed over every program; None if none is known."""
        result: float | None = self.answer("balance", org_id, customer_id)
        return result


class Lookups(KindReader):
    """Reads reference data for enrichment, remembered for ``ttl`` seconds.

    One query reads one kind for many keys (``fetch``): a delivery task reads what all the
    events of its batch need in one query per kind, and several webhooks' deliveries of one
    event, sent by this process within moments of each other, share it. The cost of
    remembering is that an update to the reference data may take up to ``ttl`` seconds to
    show in payloads. Failures are never remembered: a ``StoreUnavailable`` propagates and the
    delivery retries.
    """

    def __init__(self, db: Database, *, ttl: float = 2.0, max_entries: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self.queries = 0  # how many went to the database, for tests and benchmarks
        self._cache: OrderedDict[tuple[str, int, Any], tuple[float, Any]] = OrderedDict()
        # The slow lane's threads share one; queries run outside the lock.
        self._lock = threading.Lock()

    def peek(self, kind: str, org_id: int, key: Any) -> tuple[bool, Any]:
        """``(True, value)`` if remembered and fresh, else ``(False, None)``; never reads."""
        with self._lock:
            hit = self._cache.get((kind, org_id, key))
            if hit is None or hit[0] <= self.clock():
                return False, None
            self._cache.move_to_end((kind, org_id, key))
            return True, hit[1]

    def fetch(self, wanted: Mapping[str, Iterable[tuple[int, Any]]]) -> dict[tuple[str, int, Any], Any]:
        """Read and remember ``kind -> [(org, key), ...]``: one query per kind and org, on one
        connection. Returns what was read, by ``(kind, org, key)``."""
        now = self.clock()
        found: dict[tuple[str, int, Any], Any] = {}
        queries = 0
        with self.db.autocommit() as connection:
            read = _reader(connection)
            for kind, pairs in wanted.items():
                by_org: dict[int, set[Any]] = {}
                for org_id, key in pairs:
                    by_org.setdefault(org_id, set()).add(key)
                for org_id, keys in by_org.items():
                    rows = _ANSWERS[kind](read(kind, {"org": org_id, "keys": sorted(keys)}))
                    queries += 1
                    found.update({(kind, org_id, key): rows.get(key, ABSENT[kind])
                                  for key in keys})
        with self._lock:
            self.queries += queries
            for cache_key, value in found.items():
                self._cache[cache_key] = (now + self.ttl, value)
                self._cache.move_to_end(cache_key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return found

    def answer(self, kind: str, org_id: int, key: Any) -> Any:
        hit, value = self.peek(kind, org_id, key)
        if hit:
            return value
        return self.fetch({kind: [(org_id, key)]})[(kind, org_id, key)]
