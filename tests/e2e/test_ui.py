"""The admin UI in a real browser (Debian's Chromium via Playwright) over the whole stack:
uvicorn, a Celery worker and beat, PostgreSQL, Redis and a real receiver.

Each screen is saved to ``tests/e2e/screens/<name>.png`` (git-ignored; CI keeps it as an
artifact) so a person can look at what the browser showed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, Receiver, Stack, wait_until

CHROMIUM = "/usr/bin/chromium"


def _missing(what: str) -> None:
    # Under CI a missing browser is a failure (.ci/run installs it), never a quiet skip.
    if IN_CI:
        pytest.fail(f"{what}; .ci/run should have installed it", pytrace=False)
    pytest.skip(what, allow_module_level=True)


if not Path(CHROMIUM).exists():
    _missing("Chromium not installed: apt-get install chromium")
try:
    from playwright import sync_api
except ImportError:
    _missing("playwright not installed: pip install -e '.[test]'")

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

SCREENS = Path(__file__).parent / "screens"
# Debian's Chromium, headless, with nothing that phones home or needs a GPU or a sandbox
# (containers have no user namespaces for it).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ORG = 42


@pytest.fixture
def page() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1360, "height": 900})
        context.set_default_timeout(15_000)
        tab = context.new_page()
        # Delete asks first; the test says yes.
        tab.on("dialog", lambda dialog: dialog.accept())
        yield tab
        context.close()
        browser.close()


def shot(page: Any, name: str) -> None:
    SCREENS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENS / f"{name}.png"), full_page=True)


def test_a_notification_made_in_the_browser_delivers_a_published_event(
        stack: Stack, receiver: Receiver, page: Any) -> None:
    key = stack.org(ORG, "Acme Loyalty")
    base = stack.web()
    stack.worker()
    stack.beat()
    expect = sync_api.expect

    # Sign in: a wrong key is refused next to its field, the right one lands on the list.
    page.goto(f"{base}/ui")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(page, "01-sign-in")
    page.fill("input[name=orgId]", str(ORG))
    page.fill("input[name=apiKey]", "nk_wrong")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("not a live key")
    page.fill("input[name=apiKey]", key)
    page.click("button[type=submit]")
    expect(page.get_by_role("heading", name="Event notifications", exact=True)).to_be_visible()
    expect(page.locator(".empty")).to_contain_text("No event notifications yet")
    shot(page, "02-notifications-empty")

    # New notification, with every part of the InTouch screen.
    page.click("text=+ New notification")
    page.fill("input[name=name]", "crm_points")
    page.fill("input[name=webHookUrl]", receiver.url("/crm"))
    page.locator("input[name=headerKey]").nth(0).fill("Authorization")
    page.locator("input[name=headerValue]").nth(0).fill("Basic c2VjcmV0OnZhbHVl")
    page.click("#add-header")
    page.locator("input[name=headerKey]").nth(1).fill("X-Tenant")
    page.locator("input[name=headerValue]").nth(1).fill("acme-eu")
    page.check("input[name=storeDetailsEnrichmentEnabled]")
    expect(page.locator("#card-number")).to_be_disabled()
    page.check("#customer-identifier")
    expect(page.locator("#card-number")).to_be_disabled()  # still: no source yet
    page.select_option("#customer-source", "InStore")
    expect(page.locator("#card-number")).to_be_enabled()
    page.check("#card-number")
    page.click("summary:has-text('Advanced settings')")
    page.fill("input[name=maxAllowedConnections]", "0")
    page.fill("input[name=slaInSeconds]", "300")

    page.click("#select-events")
    items = page.locator(".event-item")
    page.fill("#event-search", "tier upgraded")
    expect(items.filter(visible=True)).to_have_count(1)
    page.check("input[name=eventNames][value=tierUpgraded]")
    page.fill("#event-search", "points issued")
    visible = items.filter(visible=True)
    expect(visible.filter(has_text="pointsIssued").first).to_be_visible()
    assert visible.count() < items.count() / 4
    page.check("input[name=eventNames][value=pointsIssued]")
    page.click("[data-schema=pointsIssued]")
    schema = page.locator(".event-item:has([data-schema=pointsIssued]) .schema")
    expect(schema).to_contain_text('"pointsIssued"')
    expect(schema).to_contain_text("customerIdentifiers")
    expect(page.locator("#selected-events .chip")).to_have_text(["pointsIssued", "tierUpgraded"])
    shot(page, "03-new-notification")

    # maxAllowedConnections 0: the error sits next to the field, and nothing typed is lost.
    page.click("text=Create notification")
    error = page.locator("label:has(input[name=maxAllowedConnections]) .error")
    expect(error).to_have_text("must be greater than zero")
    expect(page.locator("input[name=name]")).to_have_value("crm_points")
    expect(page.locator("input[name=headerValue]").nth(1)).to_have_value("acme-eu")
    expect(page.locator("#card-number")).to_be_checked()
    expect(page.locator("#selected-events .chip")).to_have_count(2)
    shot(page, "04-validation-error")
    page.fill("input[name=maxAllowedConnections]", "2")
    page.click("text=Create notification")
    expect(page.locator(".secret-card")).to_contain_text("whsec_")
    expect(page.locator(".details")).to_contain_text("Authorization: ****bHVl")
    expect(page.locator(".details")).to_contain_text("InStore identifiers")
    shot(page, "05-notification-created")
    webhook_url = page.locator("a:has-text('Edit')").first.get_attribute("href").removesuffix(
        "/edit")

    # Publish from the UI; the delivery reaches the receiver and shows in the webhook's log.
    page.click("nav >> text=Publish an event")
    page.select_option("#publish-event", "tierUpgraded")
    expect(page.locator("#publish-data")).to_have_value(re.compile("customerIdentifiers"))
    page.fill("#publish-data", json.dumps(
        {"customerIdentifiers": {"customerId": 77}, "upgradedTierNumber": 2}, indent=2))
    page.click("text=Publish event")
    expect(page.locator(".flash-ok")).to_contain_text("1 delivery queued")
    shot(page, "06-publish")
    event_id = page.locator(".flash-ok .mono").inner_text()

    (request,) = receiver.wait_for(1, "/crm", timeout=60)
    assert json.loads(request.body)["eventId"] == event_id
    assert request.headers["authorization"] == "Basic c2VjcmV0OnZhbHVl"
    assert request.headers["x-tenant"] == "acme-eu"

    page.goto(f"{base}{webhook_url}")

    def delivered() -> bool:
        page.reload()
        return page.locator(f"tbody.delivery[data-status=delivered][data-event-id='{event_id}']"
                            ).count() == 1

    wait_until(delivered, 30, "the delivery to show as delivered in the log", interval=0.5)
    expect(page.locator("[data-metric=delivered]")).to_have_text("1")
    page.click("tbody.delivery [data-toggle-next]")
    expect(page.locator(".attempts-row .table-inner")).to_contain_text("200")
    page.select_option("select[name=status]", "delivered")
    page.click("text=Filter")
    expect(page.locator("tbody.delivery")).to_have_count(1)
    page.select_option("select[name=status]", "failed")
    page.click("text=Filter")
    expect(page.locator("tbody.delivery")).to_have_count(0)
    page.goto(f"{base}{webhook_url}?days=1")
    page.click("tbody.delivery [data-toggle-next]")
    shot(page, "07-webhook")

    # Replay sends the same delivery again, with the same webhook-id.
    page.click("tbody.delivery >> text=Replay")
    expect(page.locator(".flash-ok")).to_contain_text("queued again")
    again = receiver.wait_for(2, "/crm", timeout=60)
    assert again[1].headers["webhook-id"] == again[0].headers["webhook-id"]
    page.select_option(".test-send select", "pointsIssued")
    page.click("text=Send test event")
    expect(page.locator(".flash-ok")).to_contain_text("Test pointsIssued event")
    assert json.loads(receiver.wait_for(3, "/crm", timeout=60)[2].body)["eventName"] == \
        "pointsIssued"

    # Event feed: original and enriched payloads of the event.
    page.click("nav >> text=Event feed")
    item = page.locator(f".feed-item[data-event-id='{event_id}']")
    item.locator("summary").click()
    expect(item.locator("[data-original]")).to_contain_text('"upgradedTierNumber": 2')
    item.locator("[data-view=enriched]").click()
    expect(item.locator("[data-enriched]")).to_contain_text(event_id)
    expect(item.locator("[data-original]")).to_be_hidden()
    shot(page, "08-event-feed")

    # Edit keeps the stored header values unless retyped; deactivate and delete are soft.
    page.goto(f"{base}{webhook_url}/edit")
    expect(page.locator(".header-row:has([value=Authorization]) [name=headerValue]")).to_have_attribute(
        "placeholder", "unchanged (****bHVl)")
    shot(page, "09-edit")
    page.fill("input[name=slaInSeconds]", "600")
    page.click("text=Save changes")
    expect(page.locator(".flash-ok")).to_contain_text("Changes saved")
    expect(page.locator(".details")).to_contain_text("600 s")
    page.click("nav >> text=Event notifications")
    expect(page.locator("tbody tr")).to_have_count(1)
    shot(page, "10-notifications")
    page.click("button:has-text('Deactivate')")
    expect(page.locator("h1 .pill")).to_have_text("Inactive")
    # Inactive, it holds its events; activating offers (ticked) to deliver what it held.
    page.click("nav >> text=Publish an event")
    page.select_option("#publish-event", "tierUpgraded")
    expect(page.locator("#publish-data")).to_have_value(re.compile("customerIdentifiers"))
    page.fill("#publish-data", json.dumps(
        {"customerIdentifiers": {"customerId": 78}, "upgradedTierNumber": 3}))
    page.click("text=Publish event")
    expect(page.locator(".flash-ok")).to_contain_text("0 deliveries queued")
    held_id = page.locator(".flash-ok .mono").inner_text()
    page.goto(f"{base}{webhook_url}")
    expect(page.locator("[data-metric=held]")).to_have_text("1")
    expect(page.locator(f"tbody.delivery[data-status=held][data-event-id='{held_id}']")
           ).to_have_count(1)
    expect(page.locator("#activate-form input[name=deliverHeld]")).to_be_checked()
    shot(page, "11-held")
    page.click("button:has-text('Activate')")
    expect(page.locator(".flash-ok")).to_contain_text("1 held event(s) queued")
    assert json.loads(receiver.wait_for(4, "/crm", timeout=60)[3].body)["eventId"] == held_id
    page.click("button:has-text('Delete')")
    expect(page.locator(".flash-ok")).to_contain_text("Notification deleted")
    expect(page.locator(".empty")).to_be_visible()
    page.click("a.toggle")
    expect(page.locator("tbody tr")).to_contain_text("Inactive")

    # Sign out ends the session.
    page.click("text=Sign out")
    page.goto(f"{base}/ui/notifications")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
