"""Fixtures for saving webhooks from every room: the API and the admin pages of one app, the
admin form read as a browser submits it, and the ``notifier`` command run in-process, all
against the test PostgreSQL and Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
from click.testing import Result
from fastapi.testclient import TestClient

from config import load_settings
from notifier.pipeline import Services
from notifier.queues import Lease
from tests.conftest import sign_in_form


class _FormReader(HTMLParser):
    """The pairs a browser submits for the form with id ``form_id``: named inputs with their
    values (checkboxes only when checked), enabled selects' selected options; never what sits
    in a ``<template>``."""

    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id, self.inside, self.template = form_id, False, 0
        self.select: str | None = None
        self.pairs: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.inside = a.get("id") == self.form_id
        if tag == "template":
            self.template += 1
        if not self.inside or self.template or "disabled" in a:
            return
        if tag == "input" and a.get("name"):
            if a.get("type") in ("checkbox", "radio"):
                if "checked" in a:
                    self.pairs.append((a["name"], a.get("value") or "on"))
            else:
                self.pairs.append((a["name"], a.get("value", "")))
        elif tag == "select" and a.get("name"):
            self.select = a["name"]
        elif tag == "option" and self.select and "selected" in a:
            self.pairs.append((self.select, a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False
        elif tag == "template":
            self.template -= 1
        elif tag == "select":
            self.select = None


def form_pairs(html: str, form_id: str = "notification-form") -> list[tuple[str, str]]:
    reader = _FormReader(form_id)
    reader.feed(html)
    return reader.pairs


def created_id(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["webHookId"])


class Rooms:
    """The API and the admin pages of one app (in-process, on the stack's PostgreSQL and
    Redis), signed in as org 1 by API key and by UI session. The leases it would send to the
    broker are recorded in ``leases``."""

    def __init__(self, client: TestClient, key: str, services: Services,
                 leases: list[Lease]) -> None:
        self.client, self.auth = client, {"Authorization": f"Bearer {key}"}
        self.services, self.leases = services, leases

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.client.request(method, path, headers=self.auth, **kwargs)


@pytest.fixture
def rooms(stack_env: dict[str, str]) -> Iterator[Rooms]:
    from notifier import store, tenants
    from notifier.api import create_app
    from notifier.pipeline import build_services

    settings = load_settings({k: v for k, v in stack_env.items() if k.startswith("NOTIFIER_")})
    services = build_services(settings)
    leases: list[Lease] = []
    try:
        store.create_org(services.db, 1, "org 1", now_ms=0)
        key = tenants.create_key(services.db, 1, now_ms=0)
        with TestClient(create_app(settings, services=services, send_lease=leases.append)) as client:
            form = client.get("/ui/login")
            signed_in = client.post("/ui/login", data=sign_in_form(form.text, 1, key))
            assert signed_in.url.path == "/ui/notifications", signed_in.text
            yield Rooms(client, key, services, leases)
    finally:
        services.db.dispose()
