"""The notification form, both ways: browser form fields <-> an InTouch ``webHooks`` body.

Pure functions over plain data, so the mapping is testable without a browser. The form's field
names are the InTouch names wherever one exists, so an ``InvalidInput.field`` from
``notifier.webhooks`` lands next to the input it is about.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from notifier.enrich import OPTION_FIELDS, SOURCES_OPTION
from notifier.errors import InvalidInput, path_text

__all__ = ["ENRICHMENT_FLAGS", "NotificationForm", "body_of", "errors_of", "form_from_view",
           "read_form"]

# Checkbox name -> label, in the order of the InTouch screen.
ENRICHMENT_FLAGS = {
    "tillDetailsEnrichmentEnabled": "Till",
    "storeDetailsEnrichmentEnabled": "Store",
}
# Every enrichment switch (all the options but the list of sources), the labelled ones first.
_SWITCHES = (*ENRICHMENT_FLAGS, *(name for name in OPTION_FIELDS
                                  if name != SOURCES_OPTION and name not in ENRICHMENT_FLAGS))


@dataclass
class HeaderRow:
    key: str
    value: str = ""
    masked: str = ""  # the stored value, masked; set on edit, where a blank value keeps it


@dataclass
class NotificationForm:
    """What the form shows: stored values on edit, or what was typed when saving failed."""

    name: str = ""
    webHookUrl: str = ""
    headers: list[HeaderRow] = field(default_factory=list)
    flags: dict[str, bool] = field(default_factory=dict)
    source: str = ""
    maxAllowedConnections: str = "10"
    slaInSeconds: str = "3600"
    eventNames: list[str] = field(default_factory=list)

    @property
    def customer_identifier(self) -> bool:
        return bool(self.source)

    @property
    def enriched(self) -> bool:
        return any(self.flags.values()) or bool(self.source)


def form_from_view(view: Mapping[str, Any]) -> NotificationForm:
    """The edit form of a stored webhook (header values stay masked)."""
    sources = view.get(SOURCES_OPTION) or []
    return NotificationForm(
        name=view["name"], webHookUrl=view["webHookUrl"],
        headers=[HeaderRow(k, "", v) for k, v in sorted(view.get("webHookHeaders", {}).items())],
        flags={name: bool(view.get(name)) for name in _SWITCHES},
        source=sources[0] if sources else "",
        maxAllowedConnections=str(view["maxAllowedConnections"]),
        slaInSeconds=str(view["slaInSeconds"]),
        eventNames=list(view.get("eventNames", [])))


def _whole_number(raw: str, name: str) -> int | None:
    if not raw.strip():
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise InvalidInput(name, "must be a whole number") from None


def read_form(pairs: Sequence[tuple[str, str]],
              masks: Mapping[str, str] | None = None) -> NotificationForm:
    """The form as typed; ``masks`` are the stored headers' masked values (on edit)."""
    single: dict[str, str] = {}
    for key, value in pairs:
        single.setdefault(key, value)
    keys = [v for k, v in pairs if k == "headerKey"]
    values = [v for k, v in pairs if k == "headerValue"]
    stored = masks or {}
    rows = [HeaderRow(k.strip(), v, stored.get(k.strip(), ""))
            for k, v in zip(keys, values, strict=False) if k.strip() or v]
    return NotificationForm(
        name=single.get("name", ""), webHookUrl=single.get("webHookUrl", ""), headers=rows,
        flags={name: name in single for name in _SWITCHES},
        source=single.get("customerSource", "") if single.get("customerIdentifier") else "",
        maxAllowedConnections=single.get("maxAllowedConnections", ""),
        slaInSeconds=single.get("slaInSeconds", ""),
        eventNames=[v for k, v in pairs if k == "eventNames"])


def body_of(form: NotificationForm) -> dict[str, Any]:
    """The InTouch body the form stands for.

    A header row of a stored header left blank is sent as the stored value's mask, which
    ``notifier.webhooks`` reads as "keep the stored value", as it does from the API: the form
    only ever shows stored values masked. Raises ``InvalidInput`` for what the form itself can
    tell is wrong (a number that is not one, a value without a key).
    """
    headers: dict[str, str] = {}
    for row in form.headers:
        if not row.key:
            raise InvalidInput("webHookHeaders", "a header row has a value but no key")
        headers[row.key] = row.value or row.masked
    body: dict[str, Any] = {
        "name": form.name, "webHookUrl": form.webHookUrl, "webHookHeaders": headers,
        SOURCES_OPTION: [form.source] if form.source else [],
        "eventNames": form.eventNames,
        **form.flags,
    }
    # A blank number is left out: required on create (the domain says so), unchanged on edit.
    for name in ("maxAllowedConnections", "slaInSeconds"):
        number = _whole_number(getattr(form, name), name)
        if number is not None:
            body[name] = number
    return body


def errors_of(exc: InvalidInput) -> dict[str, str]:
    """The message shown beside the form field an error is about: its path's first part names
    the field (``("webHookHeaders", "X-Key")`` -> the header rows), the rest says where in it."""
    field_name, *within = exc.path
    where = path_text(within)
    return {str(field_name): f"{where}: {exc.problem}" if where else exc.problem}
