"""An admin page's save waits for the database in a worker thread, never on the server's event
loop: while one save waits for a row lock, the same uvicorn process answers other requests.
A real uvicorn process, PostgreSQL and a real row lock."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from tests.conftest import Stack, sign_in_form, wait_until
from tests.webhooks.conftest import form_pairs

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_a_save_waiting_for_the_database_does_not_stop_the_server(stack: Stack) -> None:
    key = stack.org(7, "event loop")
    base = stack.web()
    auth = {"Authorization": f"Bearer {key}"}
    created = requests.post(f"{base}/v3/webHooks", headers=auth, timeout=10, json={
        "name": "locked", "webHookUrl": "http://127.0.0.1:9/hook", "eventNames": ["tierUpgraded"],
        "maxAllowedConnections": 2})
    assert created.status_code == 201, created.text
    hook_id = created.json()["data"]["webHookId"]
    browser = requests.Session()
    page = browser.get(f"{base}/ui/login", timeout=10).text
    assert browser.post(f"{base}/ui/login", data=sign_in_form(page, 7, key),
                        timeout=10).url.endswith("/ui/notifications")
    form = form_pairs(browser.get(f"{base}/ui/notifications/{hook_id}/edit", timeout=10).text)
    form = [(k, "140" if k == "slaInSeconds" else v) for k, v in form]

    engine = sa.create_engine(stack.settings.database_url)
    answers: dict[str, Any] = {}
    try:
        with engine.connect() as locker:
            locker.exec_driver_sql("BEGIN")
            locker.exec_driver_sql("SELECT 1 FROM webhooks WHERE id = %s FOR UPDATE", (hook_id,))
            saving = threading.Thread(target=lambda: answers.update(save=browser.post(
                f"{base}/ui/notifications/{hook_id}/edit", data=form, timeout=60)))
            saving.start()

            def save_waits_for_the_lock() -> bool:
                with engine.connect() as probe:
                    return bool(probe.exec_driver_sql(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE 'UPDATE webhooks%%'").scalar())

            wait_until(save_waits_for_the_lock, 30, "the save to wait for the row lock")
            try:
                other = requests.get(f"{base}/health", timeout=5)
            except requests.Timeout:
                other = None
            locker.exec_driver_sql("ROLLBACK")
        saving.join(60)
    finally:
        engine.dispose()

    assert other is not None, "the server answered nothing while one save waited"
    assert other.status_code == 200, other.text
    assert answers["save"].status_code == 200 and answers["save"].url.endswith(hook_id)
