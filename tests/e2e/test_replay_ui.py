"""Replay… on a webhook's page in a real browser, over the whole stack: what died while the
receiver was down is counted, confirmed, replayed, and its progress read."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from notifier.client import publish
from notifier.db import Database
from notifier.models import Delivery, DeliveryStatus
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Receiver, Stack, create_webhook, wait_until
from tests.e2e import test_ui
from tests.e2e.test_ui import shot

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
page = test_ui.page  # the browser fixture, shared rather than copied

ORG = 43


def dead(database: Database) -> set[str]:
    with database.session() as session:
        return set(session.scalars(select(Delivery.id).where(
            Delivery.status == DeliveryStatus.DEAD)))


def test_replay_from_the_webhook_page_counts_confirms_and_shows_progress(
        stack: Stack, receiver: Receiver, page: Any) -> None:
    stack.env["NOTIFIER_RETRY_HORIZON"] = "1"  # dead at the first failure past a second
    key = stack.org(ORG, "Acme Loyalty")
    database = Database(stack.settings.database_url)
    webhook_id, _ = create_webhook(
        database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
        org_id=ORG, name="crm", url=receiver.url("/crm"), event_names=["pointsIssued"],
        now_ms=0)
    receiver.script("/crm", *[500] * 1000)
    base = stack.web()
    stack.worker()
    stack.beat()
    expect = sync_api.expect
    for n in range(3):
        publish("pointsIssued", {"customerIdentifiers": {"customerId": n}}, org_id=ORG,
                broker_url=stack.settings.broker_url)
    wait_until(lambda: len(dead(database)) == 3, 60, "3 deliveries dead")
    down = dead(database)
    with receiver.lock:
        receiver.scripts["/crm"].clear()

    page.goto(f"{base}/ui/login")
    page.fill("input[name=orgId]", str(ORG))
    page.fill("input[name=apiKey]", key)
    page.click("button[type=submit]")
    page.goto(f"{base}/ui/notifications/{webhook_id}")
    page.click("text=Replay…")
    expect(page.get_by_role("heading", name="Replay…")).to_be_visible()

    # A bad time is refused next to its field.
    page.check("input[name=status][value=dead]")
    page.fill("input[name=since]", "yesterday")
    page.click("button[value=count]")
    expect(page.locator("[data-error-for=since]")).to_contain_text("neither ISO 8601")
    expect(page.locator("input[name=status][value=dead]")).to_be_checked()

    # The count first, with a sample; nothing is sent before the confirmation.
    page.fill("input[name=since]", "1h")
    page.click("button[value=count]")
    expect(page.locator("#replay-count h2")).to_have_text("3 deliveries match")
    expect(page.locator("[data-count=replayable]")).to_have_text("3")
    shot(page, "replay-count")
    assert dead(database) == down

    page.click("button[value=confirm]")
    expect(page.locator(".flash-ok")).to_contain_text("3 deliveries queued again")
    expect(page.locator("[data-metric=queued]")).to_have_text("3")

    def progressed() -> bool:
        page.reload()
        return page.locator("[data-metric=delivered]").inner_text() == "3"

    wait_until(progressed, 60, "the replay's progress to show 3 delivered")
    expect(page.locator("[data-metric=to-go]")).to_have_text("0")
    shot(page, "replay-progress")
    assert {r.headers["webhook-id"] for r in receiver.at("/crm") if r.status == 200} == down
    database.dispose()
