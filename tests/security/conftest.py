"""Plumbing of the hostile-tenant tests: a stack whose worker resolves ``.test`` names from a
file (``stub_dns_celery``), webhooks whose URL is set as a row saved before today's rules would
hold it, attempts read back from the database, and the real API under uvicorn with an org and its
API key (to sign in with, or to call the API with a webhook on the receiver)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from sqlalchemy import select

from notifier import publish, store
from notifier.db import Database
from notifier.models import Attempt, Delivery, Webhook
from notifier.schemas import load_catalog
from notifier.vault import vault_for
from tests.conftest import Receiver, Stack, create_webhook, sign_in_form
from tests.integration.test_api import api  # noqa: F401 - the in-process API, for save-time tests

ORG = 4242
OTHER_ORG = 4343
SESSION_ORG = 71


@pytest.fixture
def hosts_file(stack_env: dict[str, str], tmp_path: Path) -> Callable[[dict[str, list[str]]], Any]:
    """Write the stub DNS's answers (name -> answers in turn); returns a reader of the file."""
    path = tmp_path / "hosts.json"
    stack_env["NOTIFIER_TEST_HOSTS"] = str(path)

    def write(answers: dict[str, list[str]]) -> Any:
        path.write_text(json.dumps({**answers, "asked": []}))
        return lambda: json.loads(path.read_text())

    return write


@pytest.fixture
def database(stack: Stack) -> Iterator[Database]:
    opened = Database(stack.settings.database_url)
    store.create_org(opened, ORG, "tenant", now_ms=0)
    store.create_org(opened, OTHER_ORG, "another tenant", now_ms=0)
    yield opened
    opened.dispose()


def make_hook(stack: Stack, database: Database, url: str, *, org_id: int = ORG,
              name: str = "hook", raw_url: str | None = None, **options: Any) -> str:
    """A webhook of ``org_id`` to ``url``; with ``raw_url``, its row is then given that URL as
    it is, as a row saved before the save-time check refused it would hold it."""
    webhook_id, _ = create_webhook(
        database, load_catalog(), vault_for(stack.settings.secret_keys, stack.settings.data_dir),
        org_id=org_id, name=name, url=url, event_names=["pointsIssued"], now_ms=0, **options)
    if raw_url is not None:
        with database.session() as session:
            session.execute(sa.update(Webhook).where(Webhook.id == webhook_id)
                            .values(url=raw_url))
    return webhook_id


def send(stack: Stack, org_id: int = ORG, customer: int = 1) -> str:
    return publish("pointsIssued", {"customerIdentifiers": {"customerId": customer},
                                    "totalPointsIssued": 10},
                   org_id=org_id, broker_url=stack.settings.broker_url)


def attempts_of_hook(database: Database, webhook_id: str) -> list[Attempt]:
    with database.session() as session:
        return list(session.scalars(
            select(Attempt).join(Delivery, Delivery.id == Attempt.delivery_id)
            .where(Delivery.webhook_id == webhook_id).order_by(Attempt.id)))


@dataclass
class Web:
    """The API of a running stack, and the org (with its live key) the tests sign in as."""

    base: str
    org: int
    key: str

    def sign_in(self, key: str | None = None) -> requests.Session:
        """A browser's sign-in: the form is fetched (its CSRF token taken along) and posted;
        the session returned holds the UI's cookie."""
        browser = requests.Session()
        form = browser.get(f"{self.base}/ui/login", timeout=10)
        answer = browser.post(f"{self.base}/ui/login", timeout=10, allow_redirects=False,
                              data=sign_in_form(form.text, self.org, key or self.key))
        assert answer.status_code == 303, answer.text
        assert answer.headers["location"] == "/ui/notifications"
        return browser


@pytest.fixture
def web(stack: Stack) -> Web:
    key = stack.org(SESSION_ORG, "Session Test Org")
    return Web(stack.web(), SESSION_ORG, key)


@dataclass(frozen=True)
class LiveApi:
    """The API of a running stack: its base URL, an org's auth header and a webhook of it."""

    base: str
    auth: dict[str, str]
    org_id: int
    hook_path: str

    def post_event(self, event: object, timeout: float = 30) -> requests.Response:
        return requests.post(f"{self.base}/v3/events", headers=self.auth, json=event,
                             timeout=timeout)


@pytest.fixture
def live_api(stack: Stack, receiver: Receiver) -> LiveApi:
    """uvicorn on a loopback port, org 7 with a key, and a webhook of org 7 on the receiver
    subscribed to ``pointsIssued`` (no worker: tests that need one start it)."""
    auth = {"Authorization": f"Bearer {stack.org(7, 'abuse')}"}
    base = stack.web()
    created = requests.post(f"{base}/v3/webHooks", headers=auth, timeout=30, json={
        "name": "abuse", "webHookUrl": receiver.url("/abuse"), "eventNames": ["pointsIssued"],
        "maxAllowedConnections": 2})
    assert created.status_code == 201, created.text
    return LiveApi(base, auth, 7, "/abuse")
