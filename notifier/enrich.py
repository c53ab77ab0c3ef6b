"""Payload enrichment, as each webhook asks for it (till, store, identifiers, cards, points).

One plain step of the delivery chain: ``enrich(event, options, lookups)`` returns the payload a
webhook receives and notes on what it asked for that the reference data could not supply. Only
what the webhook asked for is added; the event itself is never changed.

Where each option reads its keys from the event, and writes its answer:

- till: ``data.triggeringActivity.enteredBy.till.id``, else ``enteredBy.id`` (InTouch puts the
  till id there) -> ``enteredBy.till = {id, code, name}``.
- store: ``enteredBy.store.id``, else the till's store -> ``enteredBy.store = {id, code, name,
  externalId, externalId1, externalId2}``.
- customer identifiers (per source): ``data.customerIdentifiers.customerId`` -> the source's
  block (``instore``, ``wechat``, ``web_engage``), merged over what the event carries.
- card numbers (needs a source): that customer's cards linked through each chosen source ->
  ``cardNumbers`` in the source's block (``[]`` when there are none).
- awarded reference id: each points block of pointsIssued / pointsRedeemed (keyed as
  notifier.reference explains) -> the block's ``awardedReferenceId``.
- available points balance (pointsIssued and pointsRedeemed only): the customer's available
  points summed over programs -> ``data.AvailablePointsBalance``.

Missing reference data is not an error: that part is left out and noted. A database that does
not answer raises ``StoreUnavailable`` (transient), so nothing is sent half-enriched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import update

from notifier.db import Database
from notifier.errors import InvalidInput, NotFound
from notifier.models import Org
from notifier.reference import (
    ABSENT,
    BLOCKS,
    SOURCES,
    KindReader,
    Lookups,
    Store,
    Till,
    source_name,
)

__all__ = ["OPTION_COLUMNS", "OPTION_FIELDS", "POINTS_BALANCE_OPTION", "SOURCES_OPTION", "Enriched",
           "Options", "Reader", "additions", "check_options", "enrich", "overlay", "prefetch",
           "set_points_balance_allowed"]

# The InTouch v3 webHooks fields that ask for enrichment, each with the webhooks column that
# keeps it: the one mapping that the save path, the delivery path and the views read.
OPTION_COLUMNS: Mapping[str, str] = {
    "tillDetailsEnrichmentEnabled": "till_details_enrichment",
    "storeDetailsEnrichmentEnabled": "store_details_enrichment",
    "customerIdentifiersToBeEnriched": "customer_identifiers_to_be_enriched",
    "cardNumberEnrichmentEnabled": "card_number_enrichment",
    "awardedReferenceEnrichmentEnabled": "awarded_reference_enrichment",
    "availablePointsBalanceEnrichmentEnabled": "available_points_balance_enrichment",
}
OPTION_FIELDS = tuple(OPTION_COLUMNS)
# The one option that is a list (of sources), not a switch; and the one an org's gate bounds.
SOURCES_OPTION = "customerIdentifiersToBeEnriched"
POINTS_BALANCE_OPTION = "availablePointsBalanceEnrichmentEnabled"
# Source -> its block under data.customerIdentifiers (internal/customer.json).
_BLOCK_OF_SOURCE = {"InStore": "instore", "WeChat": "wechat", "WebEngage": "web_engage"}
_BALANCE_EVENTS = frozenset({"pointsIssued", "pointsRedeemed"})
_MISSING = object()  # a key the original does not have


class Reader(Protocol):
    """Where enrichment reads reference data: ``notifier.reference.Lookups``, or a fake."""

    def till(self, org_id: int, till_id: int) -> Till | None: ...

    def store(self, org_id: int, store_id: int) -> Store | None: ...

    def identifiers(self, org_id: int, customer_id: int) -> Mapping[str, Mapping[str, Any]]: ...

    def cards(self, org_id: int, customer_id: int) -> Mapping[str, tuple[str, ...]]: ...

    def awarded_references(self, org_id: int,
                           loyalty_event_id: str) -> Mapping[tuple[int, str, int], str]: ...

    def points_balance(self, org_id: int, customer_id: int) -> float | None: ...


@dataclass(frozen=True)
class Options:
    """What one webhook asks to have added, read from its InTouch-named flags."""

    till: bool = False
    store: bool = False
    sources: tuple[str, ...] = ()
    cards: bool = False
    awarded_reference: bool = False
    points_balance: bool = False

    @classmethod
    def of(cls, flags: Mapping[str, Any]) -> Options:
        return cls(
            till=bool(flags.get("tillDetailsEnrichmentEnabled")),
            store=bool(flags.get("storeDetailsEnrichmentEnabled")),
            sources=tuple(source_name(s, "customerIdentifiersToBeEnriched")
                          for s in flags.get("customerIdentifiersToBeEnriched") or ()),
            cards=bool(flags.get("cardNumberEnrichmentEnabled")),
            awarded_reference=bool(flags.get("awardedReferenceEnrichmentEnabled")),
            points_balance=bool(flags.get("availablePointsBalanceEnrichmentEnabled")))

    @property
    def any(self) -> bool:
        return (self.till or self.store or bool(self.sources) or self.awarded_reference
                or self.points_balance)


def check_options(flags: Mapping[str, Any], *, points_balance_allowed: bool) -> None:
    """Check a webhook's enrichment flags (InTouch field names) before they are saved.

    ``flags`` is the webhook's resulting state (after an update, the stored values overlaid
    with the request's); ``points_balance_allowed`` is the org's operator-set
    ``availablePointsBalanceEnrichmentEnabled``. Raises ``InvalidInput`` naming the field:
    an unknown source, a flag that is not a boolean, card numbers without a source, or the
    points balance in an org that is not allowed it.
    """
    for name in OPTION_FIELDS:
        value = flags.get(name)
        if name == "customerIdentifiersToBeEnriched":
            if value is not None and (not isinstance(value, list | tuple)
                                      or not all(isinstance(s, str) for s in value)):
                raise InvalidInput(name, f"must be a list of sources ({', '.join(SOURCES)})")
            for source in value or ():
                source_name(source, name)
        elif value is not None and not isinstance(value, bool):
            raise InvalidInput(name, "must be true or false")
    if flags.get("cardNumberEnrichmentEnabled") and not flags.get("customerIdentifiersToBeEnriched"):
        raise InvalidInput("cardNumberEnrichmentEnabled",
                           "needs a source in customerIdentifiersToBeEnriched first")
    if flags.get("availablePointsBalanceEnrichmentEnabled") and not points_balance_allowed:
        raise InvalidInput("availablePointsBalanceEnrichmentEnabled",
                           "is not enabled for this org; ask the operator to enable it")


def set_points_balance_allowed(db: Database, org_id: int, allowed: bool) -> None:
    """The operator's ``availablePointsBalanceEnrichmentEnabled`` for an org (InTouch: a support
    ticket). Turning it off stops the balance at once, even for webhooks that ask for it."""
    with db.session() as session:
        result = session.execute(update(Org).where(Org.id == org_id)
                                 .values(available_points_balance_enrichment_enabled=allowed))
        if not getattr(result, "rowcount", 0):
            raise NotFound(f"org {org_id} does not exist")


@dataclass(frozen=True)
class Enriched:
    """The payload to send, whether enrichment ran, and what could not be added."""

    payload: dict[str, Any]
    enriched: bool = False
    notes: tuple[str, ...] = ()


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dict(parent: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = parent.get(key)
    return value if isinstance(value, dict) else None


def _copy(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, scalars), several times faster than deepcopy."""
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def additions(original: Mapping[str, Any], enriched: Mapping[str, Any]) -> dict[str, Any]:
    """What enrichment added to ``original``: the keys of ``enriched`` whose values differ,
    followed into objects (a list that differs is kept whole). Enrichment only adds and
    replaces, so ``overlay(original, additions(original, enriched)) == enriched``."""
    added: dict[str, Any] = {}
    for key, value in enriched.items():
        before = original.get(key, _MISSING)
        if before == value:
            continue
        if isinstance(before, Mapping) and isinstance(value, Mapping):
            added[key] = additions(before, value)
        else:
            added[key] = value
    return added


def overlay(original: Mapping[str, Any], added: Mapping[str, Any]) -> dict[str, Any]:
    """``original`` with ``added`` laid over it, object by object: the payload as sent."""
    result = dict(original)
    for key, value in added.items():
        before = result.get(key)
        if isinstance(before, Mapping) and isinstance(value, Mapping):
            result[key] = overlay(before, value)
        else:
            result[key] = value
    return result


def _compact(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def enrich(event: Mapping[str, Any], flags: Mapping[str, Any], lookups: Reader) -> Enriched:
    """The payload a webhook with enrichment ``flags`` receives for ``event``.

    ``flags`` are the webhook's InTouch-named options (``store.Target.options``). Reference
    data is read for the event's org through ``lookups``.
    """
    options = Options.of(flags)
    if not options.any:
        return Enriched(dict(event))
    payload: dict[str, Any] = _copy(dict(event))
    notes: list[str] = []
    org_id = _int(payload.get("orgId"))
    data = _dict(payload, "data")
    if org_id is None or data is None:
        return Enriched(payload, True, ("the event has no orgId or data to enrich",))
    if options.till or options.store:
        _enrich_entered_by(data, options, org_id, lookups, notes)
    if options.sources:
        _enrich_identifiers(data, options, org_id, lookups, notes)
    name = payload.get("eventName")
    if options.awarded_reference and name in BLOCKS:
        loyalty_event_id = data.get("loyaltyEventId") or payload.get("loyaltyEventId")
        _enrich_awarded(data, str(name), loyalty_event_id, org_id, lookups, notes)
    if options.points_balance and name in _BALANCE_EVENTS:
        customer_id = _customer_id(data)
        balance = None if customer_id is None else lookups.points_balance(org_id, customer_id)
        if balance is None:
            notes.append(f"no points balance known for customer {customer_id}")
        else:
            data["AvailablePointsBalance"] = int(balance) if balance.is_integer() else balance
    return Enriched(payload, True, tuple(notes))


def _enrich_entered_by(data: dict[str, Any], options: Options, org_id: int, lookups: Reader,
                       notes: list[str]) -> None:
    activity = _dict(data, "triggeringActivity")
    entered_by = None if activity is None else _dict(activity, "enteredBy")
    if entered_by is None:
        notes.append("no triggeringActivity.enteredBy to find the till and store by")
        return
    given_till = _dict(entered_by, "till") or {}
    till_id = _int(given_till.get("id"))
    if till_id is None:
        till_id = _int(entered_by.get("id"))
    given_store = _dict(entered_by, "store") or {}
    store_id = _int(given_store.get("id"))
    till = None
    if till_id is not None and (options.till or (options.store and store_id is None)):
        till = lookups.till(org_id, till_id)
    if options.till:
        if till is None:
            notes.append(f"till {till_id} unknown" if till_id is not None
                         else "no till id in triggeringActivity.enteredBy")
        else:
            entered_by["till"] = {**given_till, **_compact(
                {"id": till.id, "code": till.code, "name": till.name})}
    if options.store:
        if store_id is None and till is not None:
            store_id = till.store_id
        store = None if store_id is None else lookups.store(org_id, store_id)
        if store is None:
            notes.append(f"store {store_id} unknown" if store_id is not None
                         else f"no store for till {till_id}")
        else:
            entered_by["store"] = {**given_store, **_compact({
                "id": store.id, "code": store.code, "name": store.name,
                "externalId": store.external_id, "externalId1": store.external_id1,
                "externalId2": store.external_id2})}


def _customer_id(data: Mapping[str, Any]) -> int | None:
    identifiers = data.get("customerIdentifiers")
    return _int(identifiers.get("customerId")) if isinstance(identifiers, Mapping) else None


def _enrich_identifiers(data: dict[str, Any], options: Options, org_id: int, lookups: Reader,
                        notes: list[str]) -> None:
    customer_id = _customer_id(data)
    identifiers = _dict(data, "customerIdentifiers")
    if customer_id is None or identifiers is None:
        notes.append("no customerIdentifiers.customerId to find the customer by")
        return
    profiles = lookups.identifiers(org_id, customer_id)
    cards = lookups.cards(org_id, customer_id) if options.cards else {}
    for source in options.sources:
        block_name = _BLOCK_OF_SOURCE[source]
        block = dict(_dict(identifiers, block_name) or {})
        profile = profiles.get(source)
        if profile is None:
            notes.append(f"customer {customer_id} has no {source} profile")
        else:
            block.update(_copy(dict(profile)))
        if options.cards:
            block["cardNumbers"] = list(cards.get(source, ()))
        if profile is not None or options.cards:
            identifiers[block_name] = block


def _enrich_awarded(data: dict[str, Any], event_name: str, loyalty_event_id: Any, org_id: int,
                    lookups: Reader, notes: list[str]) -> None:
    if not isinstance(loyalty_event_id, str) or not loyalty_event_id:
        notes.append("no loyaltyEventId to find awarded reference ids by")
        return
    references = lookups.awarded_references(org_id, loyalty_event_id)
    event_program = _int(data.get("loyaltyProgramId"))
    for block in BLOCKS[event_name]:
        items = data.get(block)
        if not isinstance(items, list):
            continue
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            program = event_program
            if event_name == "pointsRedeemed" and _int(item.get("programId")) is not None:
                program = _int(item.get("programId"))
            reference = None if program is None else references.get((program, block, index))
            if reference is None:
                notes.append(f"no awardedReferenceId for {block}[{index}] "
                             f"(loyaltyEventId {loyalty_event_id}, program {program})")
            else:
                item["awardedReferenceId"] = reference


class _Wanted(KindReader):
    """A reader that answers only from what ``lookups`` remembers, and notes what it lacks."""

    def __init__(self, lookups: Lookups) -> None:
        self.lookups = lookups
        self.missing: dict[str, set[tuple[int, Any]]] = defaultdict(set)

    def answer(self, kind: str, org_id: int, key: Any) -> Any:
        hit, value = self.lookups.peek(kind, org_id, key)
        if hit:
            return value
        self.missing[kind].add((org_id, key))
        return ABSENT[kind]


def prefetch(work: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]],
             lookups: Lookups) -> None:
    """Read what enriching every ``(event, flags)`` of ``work`` will need, one query per kind,
    whichever webhooks (flags) the events are for.

    A dry run of ``enrich`` over the events notes the keys ``lookups`` does not remember; they
    are read together. A second round finds what only the first answers could name (the store
    of a till). ``enrich`` then runs on what is remembered.
    """
    work = [(event, flags) for event, flags in work if Options.of(flags).any]
    for _ in range(2 if work else 0):
        wanted = _Wanted(lookups)
        for event, flags in work:
            enrich(event, flags, wanted)
        if not wanted.missing:
            return
        lookups.fetch(wanted.missing)
