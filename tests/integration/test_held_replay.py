"""Held deliveries replayed by selection (``--status held``): sent to the webhook once active,
with their ids, and held again for a webhook still inactive."""

from __future__ import annotations

import pytest

from notifier import pipeline, webhooks
from notifier.models import DeliveryStatus
from notifier.pipeline import Services
from notifier.queues import Lease
from notifier.replays import selection
from tests.conftest import Receiver
from tests.integration import test_held
from tests.integration.test_held import ORG, deliver_all, event, receiving, statuses

pytestmark = pytest.mark.integration

services = test_held.services  # the fixture: Services on both databases, a real Redis, ORG


def test_a_replay_by_status_held_sends_what_an_inactive_webhook_held(
        services: Services, receiver: Receiver) -> None:
    hook_id = receiving(services, receiver, "replayed", active=False)
    leases: list[Lease] = []
    pipeline.recover(services, leases.append)
    context = pipeline.webhook_context(services, leases.append)
    for n in range(3):
        pipeline.accept(services, event(f"e-{n}"), leases.append)
    held = statuses(services.db, hook_id)
    picked = selection(now_ms=pipeline.now_ms(), statuses=["held"], webhook=hook_id)

    # Still inactive: replayed, each is claimed, found inactive, and held again; none sent.
    pipeline.replay_selection(services, picked, leases.append, requested_by="test")
    deliver_all(services, leases)
    assert statuses(services.db, hook_id) == held and receiver.at("/replayed") == []

    webhooks.activate(context, ORG, hook_id, now_ms=pipeline.now_ms())  # without deliverHeld
    replayed = pipeline.replay_selection(services, picked, leases.append, requested_by="test")
    deliver_all(services, leases)

    assert replayed.queued == 3
    sent = receiver.wait_for(3, "/replayed")
    assert {r.headers["webhook-id"] for r in sent} == set(held)
    assert set(statuses(services.db, hook_id).values()) == {DeliveryStatus.DELIVERED}
