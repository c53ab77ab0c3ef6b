"""The README's first command: ``notifier up`` with no settings runs the whole service on the
embedded default (SQLite file, embedded Redis), and the CLI drives it end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests
from standardwebhooks.webhooks import Webhook as StandardWebhook

from tests.conftest import Receiver, wait_until

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_notifier_up_delivers_on_the_embedded_default(tmp_path: Path, receiver: Receiver) -> None:
    command = shutil.which("notifier")
    assert command, "the notifier command is not installed (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
    # The only setting: the receiver listens on loopback, which webhooks may not target by default.
    env["NOTIFIER_ALLOW_PRIVATE_NETWORKS"] = "127.0.0.0/8"
    log = tmp_path / "up.log"
    port, api_port = free_port(), free_port()

    def cli(*args: str) -> str:
        done = subprocess.run([command, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    with log.open("wb") as out:
        up = subprocess.Popen([command, "up", "--concurrency", "1", "--flower-port", str(port),
                               "--port", str(api_port)],
                              cwd=tmp_path, env=env,
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_until(lambda: " ready." in log.read_text() or up.poll() is not None, 90,
                   "the worker of notifier up")
        assert up.poll() is None, log.read_text()
        cli("orgs", "create", "100", "demo")
        created = json.loads(cli("webhooks", "create", "--org", "100", "--name", "demo",
                                 "--url", receiver.url("/demo"), "--event", "tierUpgraded",
                                 "--header", "Authorization: Basic ZGVtbw=="))
        event_id = cli("publish", "tierUpgraded", "--org", "100",
                       "--data", '{"customerIdentifiers": {"customerId": 42}}').strip()

        (request,) = receiver.wait_for(1, "/demo", timeout=60)
        StandardWebhook(created["secret"]).verify(request.body, request.headers)
        assert json.loads(request.body)["eventId"] == event_id
        assert request.headers["authorization"] == "Basic ZGVtbw=="
        assert (tmp_path / "notifier-data" / "notifier.db").exists()

        def flower_lists_the_workers() -> bool:
            try:
                page = requests.get(f"http://127.0.0.1:{port}/workers", timeout=5)
            except requests.ConnectionError:
                return False
            return page.status_code == 200 and "celery@" in page.text and "slow@" in page.text

        # The prefork worker, and the threads worker of the slow lane.
        wait_until(flower_lists_the_workers, 60, "Flower to list the workers")
        def flower_tasks(search: str) -> list[dict[str, Any]]:
            # The JSON behind Flower's task list page (its /api needs credentials).
            table = requests.get(f"http://127.0.0.1:{port}/tasks/datatable", timeout=5, params={
                "draw": 1, "start": 0, "length": 100, "search[value]": search,
                "order[0][column]": 0, "columns[0][data]": "name", "order[0][dir]": "asc"})
            return list(table.json()["data"])

        # Flower turns the workers' task events on as it starts: beat's sweep shows it has.
        wait_until(lambda: flower_tasks("notifier.sweep"), 30, "Flower to show a sweep")
        # Ingest runs events in batches; Flower still shows each one's task.
        second = cli("publish", "tierUpgraded", "--org", "100",
                     "--data", '{"customerIdentifiers": {"customerId": 43}}').strip()
        receiver.wait_for(2, "/demo", timeout=60)

        def flower_shows_its_ingest_succeeded() -> bool:
            return any(task["name"] == "notifier.ingest" and task["state"] == "SUCCESS"
                       and second in task["args"] for task in flower_tasks(second))

        wait_until(flower_shows_its_ingest_succeeded, 30, "Flower to show the ingest task")

        def health() -> dict[str, Any]:
            data: dict[str, Any] = requests.get(f"http://127.0.0.1:{api_port}/health",
                                                timeout=10).json()["data"]
            return data

        # A worker busy as the survey asks answers after its 0.3 s and is not counted: a later
        # check, a second on, asks again.
        answer = wait_until(lambda: (found := health())["workers"] == 2 and found, 30,
                            "/health to count both workers")
        assert answer == {"database": "ok", "redis": "ok", "broker": "ok", "workers": 2,
                          "unconsumed": {}, "status": "ok"}
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, log.read_text()
    assert not (tmp_path / "notifier-data" / "redis.sock").exists()
