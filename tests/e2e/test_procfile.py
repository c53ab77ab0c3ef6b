"""The whole Procfile under ``honcho start``, against PostgreSQL and Redis, as a deployment runs
it: events posted through the API arrive at a real receiver, Flower shows the tasks by their
ids, the fast worker leaves the slow lane to the ``slow`` process, and a replay by selection
(``celery -A tasks replay``) brings back deliveries that failed.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from notifier import consumers, publish
from notifier.client import DELIVER_QUEUE, DELIVER_TASK, INGEST_TASK, QUEUE
from tests.conftest import REPO, Receiver, Stack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

ORG = 81
FLOWER_AUTH = ("ops", "flower-test-password")
PROCFILE = REPO / "Procfile"
# honcho gives each process type of the Procfile, in order, PORT = base + 100 * its index.
TYPES = [line.split(":", 1)[0] for line in PROCFILE.read_text().splitlines()
         if re.match(r"^\w+:", line)]


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _base_port() -> int:
    for _ in range(200):
        base = random.randrange(20_000, 40_000, 10)
        if all(_free(base + 100 * index) for index in range(len(TYPES))):
            return base
    pytest.fail("no free ports for the Procfile's processes")


class Honcho:
    """``honcho start`` of the repository's Procfile; ``stop()`` ends every process it started.

    honcho starts each process in a session of its own (so that stopping one stops its
    children: the prefork pool); on SIGTERM it stops them all. Their process groups are read
    from honcho's output ("started with pid N") and killed too if any outlives honcho."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.base = _base_port()
        self.log_path = folder / "honcho.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "honcho", "start", "--procfile", str(PROCFILE),
                 "--app-root", str(folder), "--port", str(self.base), "--no-colour"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=folder)

    def url(self, process_type: str) -> str:
        return f"http://127.0.0.1:{self.base + 100 * TYPES.index(process_type)}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        groups = [int(pid) for pid in re.findall(r"started with pid (\d+)", self.log())]
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                continue  # stopped with honcho, as it should be


@pytest.fixture
def honcho(stack: Stack, tmp_path: Path) -> Iterator[Honcho]:
    path = os.pathsep.join(filter(None, (str(REPO), stack.env.get("PYTHONPATH"))))
    env = {**stack.env, "PYTHONPATH": path,
           "NOTIFIER_FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH)}
    running = Honcho(env, tmp_path)
    yield running
    running.stop()


def _up(honcho: Honcho) -> dict[str, Any]:
    """/health once every process answers: the database, Redis, the broker and both workers,
    and Flower hears both workers' events (it shows only the task events sent once it listens:
    answering HTTP, it may not listen yet)."""
    assert honcho.alive(), honcho.log()
    try:
        answer = requests.get(f"{honcho.url('web')}/health", timeout=10)
        # (status: the workers Flower knows from their events, and whether each is alive)
        flower = requests.get(f"{honcho.url('flower')}/api/workers", params={"status": "true"},
                              auth=FLOWER_AUTH, timeout=10)
    except requests.ConnectionError:
        return {}
    data: dict[str, Any] = answer.json()["data"]
    heard = flower.ok and sum(map(bool, flower.json().values())) >= 2
    return data if answer.status_code == 200 and data["workers"] >= 2 and heard else {}


def _flower_tasks(honcho: Honcho) -> dict[str, dict[str, Any]]:
    answer = requests.get(f"{honcho.url('flower')}/api/tasks", auth=FLOWER_AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    tasks: dict[str, dict[str, Any]] = answer.json()
    return tasks


def _fast_worker_queues(stack: Stack) -> frozenset[str]:
    with consumers.connect(stack.settings.broker_url, 2.0) as connection:
        found = consumers.survey(connection, 1.0, lengths=False)
    return found.workers.get(f"celery@{socket.gethostname()}", frozenset())


def test_the_procfile_under_honcho_delivers_and_flower_shows_the_tasks(
        stack: Stack, honcho: Honcho, receiver: Receiver) -> None:
    auth = {"Authorization": f"Bearer {stack.org(ORG, 'procfile')}"}
    health = wait_until(lambda: _up(honcho), 120, "every Procfile process to answer")
    assert health["status"] == "ok" and health["unconsumed"] == {}, health
    created = requests.post(f"{honcho.url('web')}/v3/webHooks", headers=auth, timeout=10, json={
        "name": "procfile", "webHookUrl": receiver.url("/procfile"),
        "eventNames": ["pointsIssued"], "maxAllowedConnections": 2})
    assert created.status_code == 201, created.text

    posted = requests.post(f"{honcho.url('web')}/v3/events", headers=auth, timeout=10, json=[
        {"eventName": "pointsIssued", "data": {"customerIdentifiers": {"customerId": n}}}
        for n in range(5)])
    assert posted.status_code == 202, posted.text
    # And one from a producer, through the broker, with a value Flower must not show.
    published = publish("pointsIssued", {"customerIdentifiers": {"customerId": 5},
                                         "note": "private-customer-note"},
                        org_id=ORG, broker_url=stack.settings.broker_url)

    arrived = receiver.wait_for(6, "/procfile", timeout=90)
    assert sorted(json.loads(got.body)["eventId"] for got in arrived) == sorted(
        [event["eventId"] for event in posted.json()["data"]] + [published])

    # Flower saw the tasks from the workers' events, with no switch added to the Procfile.
    def seen() -> dict[str, dict[str, Any]]:
        tasks = _flower_tasks(honcho)
        names = {task["name"] for task in tasks.values() if task["state"] == "SUCCESS"}
        return tasks if {INGEST_TASK, DELIVER_TASK} <= names else {}

    tasks = wait_until(seen, 60, "Flower to show the ingest and delivery tasks")
    (ingest,) = [task for task in tasks.values() if task["name"] == INGEST_TASK]
    assert published in ingest["args"] and "private-customer-note" not in ingest["args"]
    assert ingest["received"] and ingest["succeeded"]

    # The slow process runs: the fast worker's prefork processes are kept from the slow lane
    # (taken at most for a moment, if the slow worker answered after the worker's first look).
    wait_until(lambda: _fast_worker_queues(stack) == {QUEUE, DELIVER_QUEUE}, 30,
               "the fast worker to consume only ingest and the fast lane")


def test_a_replay_by_selection_brings_back_what_failed_under_the_procfile(
        stack: Stack, honcho: Honcho, receiver: Receiver) -> None:
    auth = {"Authorization": f"Bearer {stack.org(ORG, 'procfile')}"}
    wait_until(lambda: _up(honcho), 120, "every Procfile process to answer")
    created = requests.post(f"{honcho.url('web')}/v3/webHooks", headers=auth, timeout=10, json={
        "name": "refusing", "webHookUrl": receiver.url("/refusing"),
        "eventNames": ["pointsIssued"], "maxAllowedConnections": 2})
    assert created.status_code == 201, created.text
    webhook_id = created.json()["data"]["webHookId"]
    # The receiver refuses them for good (a 400 is not retried): they end failed.
    receiver.script("/refusing", *[400] * 3)
    posted = requests.post(f"{honcho.url('web')}/v3/events", headers=auth, timeout=10, json=[
        {"eventName": "pointsIssued", "data": {"customerIdentifiers": {"customerId": n}}}
        for n in range(3)])
    assert posted.status_code == 202, posted.text

    def failed() -> dict[str, Any]:
        # Counted as an operator would before replaying: a dry run through the API.
        answer = requests.post(f"{honcho.url('web')}/v3/webHooks/{webhook_id}/replay",
                               headers=auth, timeout=10,
                               json={"status": ["failed"], "dryRun": True})
        assert answer.status_code == 200, answer.text
        data: dict[str, Any] = answer.json()["data"]
        return data if data["matched"] == 3 else {}

    wait_until(failed, 90, "the three deliveries failed")
    refused = {r.headers["webhook-id"] for r in receiver.at("/refusing")}
    assert len(refused) == 3

    # The receiver is fixed; the operator replays what failed, from the celery command line.
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "replay", "--webhook", webhook_id,
         "--status", "failed", "--since", "1h", "--yes"],
        env={**stack.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=120, check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)

    got = receiver.wait_for(6, "/refusing", timeout=90)
    delivered = {r.headers["webhook-id"] for r in got if r.status == 200}
    assert delivered == refused  # the same webhook-ids, each delivered
