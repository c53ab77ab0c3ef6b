"""Payload enrichment, as each webhook asks for it (till, store, identifiers, cards, points).

A pass-through for now: the enrichment issue fills it in. It is one plain step of the delivery
chain, so it can run in its own task or fused with the others by measurement.
"""

from __future__ import annotations

from typing import Any

from notifier.store import Target

__all__ = ["enrich"]


def enrich(event: dict[str, Any], target: Target) -> dict[str, Any]:
    """The payload ``target`` receives for ``event``."""
    del target  # every webhook gets the event as published until enrichment lands
    return event
