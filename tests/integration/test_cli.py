"""The operator's command line (``notifier webhooks|deliveries|events|publish``), run in-process
on the test PostgreSQL and Redis: what each prints, with ``--json`` and without, and its exit
codes (0 found or done, 1 not found or refused, 2 usage). The stack test publishes from stdin
and follows the events through a real worker to a real receiver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from notifier import reference
from notifier.db import Database
from notifier.enrich import overlay
from tests.conftest import Cli, Receiver, Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

CUSTOMER = 42


def _hook(cli: Cli, org: int, name: str, url: str, *events: str) -> str:
    created = cli("webhooks", "create", "--org", org, "--name", name, "--url", url,
                  *(arg for event in events or ("pointsIssued",) for arg in ("--event", event)))
    assert created.exit_code == 0, created.output
    return str(json.loads(created.stdout)["webHookId"])


def _points(event_id: str, org: int | None = None) -> dict[str, object]:
    event: dict[str, object] = {"eventName": "pointsIssued", "eventId": event_id,
                                "data": {"customerIdentifiers": {"customerId": CUSTOMER}}}
    return event if org is None else {**event, "orgId": org}


def test_publish_from_stdin_delivers_and_each_line_is_shown(
        stack: Stack, receiver: Receiver, cli: Cli) -> None:
    stack.org(1)
    database = Database(stack.settings.database_url)
    reference.put_record(database, 1, "customers", str(CUSTOMER), {"identifiers": {
        "InStore": {"externalId": "EXT-1", "mobile": "919300000020"}}})
    database.dispose()
    hook_id = _hook(cli, 1, "points", receiver.url("/points"))
    enriched = cli("webhooks", "update", hook_id, "--org", 1, "--body", "-",
                   input=json.dumps({"customerIdentifiersToBeEnriched": ["InStore"]}))
    assert enriched.exit_code == 0, enriched.output
    stack.worker()
    lines = [json.dumps(_points("e-1")), "{not json", json.dumps({"eventName": "pointsIssued",
             "eventId": "e-bad", "data": {"customerIdentifiers": {"customerId": "x"}}}),
             "", json.dumps(_points("e-2"))]

    published = cli("publish", "-", "--org", 1, "--json", input="\n".join(lines) + "\n")

    assert published.exit_code == 1, published.output  # one rejected, one unreadable
    outcomes = [json.loads(line) for line in published.stdout.splitlines()]
    assert [(o["line"], o["eventId"], o["status"]) for o in outcomes] == [
        (1, "e-1", "dispatched"), (2, None, "unread"), (3, "e-bad", "rejected"),
        (5, "e-2", "dispatched")]
    assert outcomes[1]["error"].startswith("not JSON")
    assert outcomes[2]["errorPath"] == "$.data.customerIdentifiers.customerId"
    sent = receiver.wait_for(2, "/points", unique=True)
    assert {json.loads(r.body)["eventId"] for r in sent} == {"e-1", "e-2"}

    def delivered() -> dict[str, object] | None:
        shown = cli("events", "show", "e-1", "--json")
        assert shown.exit_code == 0, shown.output
        event = json.loads(shown.stdout)
        return event if event["deliveries"][0]["status"] == "delivered" else None

    event = wait_until(delivered, 30, "e-1's delivery recorded")
    assert (event["orgId"], event["status"], event["error"]) == (1, "dispatched", None)
    ((delivery_id, webhook_id),) = [(d["deliveryId"], d["webHookId"])
                                    for d in event["deliveries"]]
    assert webhook_id == hook_id

    detail = cli("deliveries", "show", delivery_id, "--json")
    assert detail.exit_code == 0, detail.output
    shown = json.loads(detail.stdout)
    (request,) = [r for r in sent if r.headers["webhook-id"] == delivery_id]
    assert shown["deliveredPayload"] == json.loads(request.body)  # as the receiver got it
    assert shown["deliveredPayload"]["data"]["customerIdentifiers"]["instore"]["externalId"] \
        == "EXT-1"
    assert shown["originalPayload"]["data"] == _points("e-1")["data"]  # as published
    assert shown["deliveredPayload"] == overlay(shown["originalPayload"], {"data": {
        "customerIdentifiers": {"instore": {"externalId": "EXT-1",
                                            "mobile": "919300000020"}}}})
    ((attempt),) = shown["attempts"]
    assert (attempt["statusCode"], attempt["outcome"], attempt["responseExcerpt"]) == \
        (200, "delivered", "ok")
    text = cli("deliveries", "show", delivery_id)
    assert text.exit_code == 0
    assert f"webhook  {hook_id}" in text.stdout and "attempt 1" in text.stdout
    assert "status 200" in text.stdout and '"externalId": "EXT-1"' in text.stdout

    rejected = cli("events", "show", "e-bad")
    assert rejected.exit_code == 0, rejected.output
    assert "rejected at $.data.customerIdentifiers.customerId: " in rejected.stdout
    assert "no deliveries" in rejected.stdout


def test_publish_one_indented_event_from_a_file(stack: Stack, cli: Cli, tmp_path: Path) -> None:
    stack.org(1)
    path = tmp_path / "event.json"
    path.write_text(json.dumps(_points("one", org=1), indent=2), encoding="utf-8")

    published = cli("publish", path)

    assert published.exit_code == 0, published.output
    assert published.stdout == "line 1: one dispatched\n"
    again = cli("publish", path)
    assert again.stdout == "line 1: one dispatched (stored before)\n"


def test_publish_by_name_still_works_and_names_its_options(cli: Cli) -> None:
    published = cli("publish", "pointsIssued", "--org", 1, "--data", '{"a": 1}', "--json")
    assert published.exit_code == 0, published.output
    assert set(json.loads(published.stdout)) == {"eventId"}

    no_org = cli("publish", "pointsIssued")
    bad_data = cli("publish", "pointsIssued", "--org", 1, "--data", "{")
    missing_file = cli("publish", "nowhere/events.jsonl")
    file_and_data = cli("publish", "-", "--data", "{}", input="{}")
    for result, words in ((no_org, "--org"), (bad_data, "--data"), (missing_file, "SOURCE"),
                          (file_and_data, "--data")):
        assert result.exit_code == 2, result.output
        assert words in result.stderr, result.stderr


def test_publish_refuses_a_line_of_another_org(cli: Cli) -> None:
    published = cli("publish", "-", "--org", 1, "--json",
                    input=json.dumps(_points("theirs", org=2)) + "\n")
    assert published.exit_code == 1, published.output
    (outcome,) = [json.loads(line) for line in published.stdout.splitlines()]
    assert (outcome["errorPath"], outcome["error"], outcome["eventId"]) == \
        ("orgId", "does not match --org", None)


def test_webhooks_list_filters_and_enable_disable_are_activate_deactivate(
        stack: Stack, cli: Cli) -> None:
    stack.org(1)
    stack.org(2)
    first = _hook(cli, 1, "first", "http://127.0.0.1:9/a")
    second = _hook(cli, 1, "second", "http://127.0.0.1:9/b", "pointsIssued", "tierUpgraded")
    other = _hook(cli, 2, "other", "http://127.0.0.1:9/c")

    disabled = cli("webhooks", "disable", second, "--org", 1)
    assert disabled.exit_code == 0, disabled.output
    assert disabled.stdout == (f"{second}  org 1  inactive  second  http://127.0.0.1:9/b  "
                               "pointsIssued,tierUpgraded\n")  # as `list` shows it

    def listed(*options: object) -> list[tuple[int, str, bool]]:
        result = cli("webhooks", "list", "--json", *options)
        assert result.exit_code == 0, result.output
        return [(v["orgId"], v["webHookId"], v["active"]) for v in json.loads(result.stdout)]

    assert listed() == [(1, first, True), (1, second, False), (2, other, True)]
    assert listed("--org", 1, "--active") == [(1, first, True)]
    assert listed("--inactive") == [(1, second, False)]
    assert listed("--org", 3) == []
    text = cli("webhooks", "list", "--org", 1)
    assert text.stdout.splitlines()[1] == (f"{second}  org 1  inactive  second  "
                                           "http://127.0.0.1:9/b  pointsIssued,tierUpgraded")

    enabled = cli("webhooks", "enable", second, "--org", 1, "--json")
    assert enabled.exit_code == 0 and len(enabled.stdout.splitlines()) == 1, enabled.output
    assert json.loads(enabled.stdout)["active"] is True
    shown = cli("webhooks", "show", second, "--org", 1, "--json")
    assert shown.exit_code == 0 and len(shown.stdout.splitlines()) == 1
    assert json.loads(shown.stdout)["active"] is True
    assert cli("webhooks", "enable", second, "--org", 2).exit_code == 1  # another org's
    assert cli("webhooks", "disable", "nosuch", "--org", 1, "--json").exit_code == 1
    assert cli("webhooks", "enable", "--json").exit_code == 2  # no webhook named
    assert cli("webhooks", "list", "--org", "x").exit_code == 2


def test_a_webhook_named_by_its_id_alone_and_deleted(stack: Stack, cli: Cli) -> None:
    stack.org(1)
    stack.org(2)
    hook = _hook(cli, 2, "crm", "http://127.0.0.1:9/a")

    # The operator names the webhook; its org is found from it.
    assert json.loads(cli("webhooks", "show", hook, "--json").stdout)["name"] == "crm"
    assert json.loads(cli("webhooks", "disable", hook, "--json").stdout)["active"] is False
    assert json.loads(cli("webhooks", "enable", hook, "--json").stdout)["active"] is True
    assert json.loads(cli("webhooks", "update", hook, "--sla", "60").stdout)["slaInSeconds"] == 60
    assert cli("webhooks", "show", "nosuch").exit_code == 1

    declined = cli("webhooks", "delete", hook, input="n\n")
    assert declined.exit_code == 1 and "Delete webhook" in declined.stdout
    assert cli("webhooks", "delete", hook, "--org", 1, "--yes").exit_code == 1  # not org 1's
    deleted = cli("webhooks", "delete", hook, "--yes")
    assert deleted.exit_code == 0, deleted.output
    assert json.loads(deleted.stdout)["active"] is False
    listed = json.loads(cli("webhooks", "list", "--json").stdout)
    assert [(v["webHookId"], v["active"]) for v in listed] == [(hook, False)]


def test_not_found_is_1_and_an_event_id_of_several_orgs_asks_for_org(
        stack: Stack, cli: Cli) -> None:
    stack.org(1)
    stack.org(2)
    for org in (1, 2):
        published = cli("publish", "-", input=json.dumps(_points("shared", org=org)))
        assert published.exit_code == 0, published.output

    both = cli("events", "show", "shared")
    assert both.exit_code == 2 and "several orgs (1, 2); give --org" in both.stderr
    one = cli("events", "show", "shared", "--org", 2, "--json")
    assert one.exit_code == 0 and json.loads(one.stdout)["orgId"] == 2
    for args in (("events", "show", "nosuch"), ("events", "show", "shared", "--org", 3),
                 ("deliveries", "show", "msg_nosuch"), ("deliveries", "show", "msg_x", "--json"),
                 ("webhooks", "show", "nosuch", "--org", 1)):
        result = cli(*args)
        assert result.exit_code == 1, (args, result.output)
        assert "does not exist" in result.stderr or "is invalid" in result.stderr
