"""Flower as deployed (the Procfile's line, which ``notifier up`` builds alike) listens on
127.0.0.1 only and asks for the configured credentials; the ingest messages it shows carry
the event's ids, never its payload."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from config import load_settings
from notifier.client import INGEST_TASK as QUEUE_TASK
from notifier.client import QUEUE, publish
from tests.conftest import BROKER_DB, Stack, _with_db, wait_until

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening_on(port: int) -> set[str]:
    """Addresses with a socket listening on ``port``, as the kernel lists them."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
                found.add(socket.inet_ntop(socket.AF_INET if width == 4 else socket.AF_INET6, raw))
    return found


def test_the_procfiles_flower_listens_on_loopback_and_asks_for_credentials(
        stack_env: dict[str, str], tmp_path: Path) -> None:
    (line,) = [entry.split(":", 1)[1] for entry in (ROOT / "Procfile").read_text().splitlines()
               if entry.startswith("flower:")]
    port = _free_port()
    env = {**stack_env, "PORT": str(port), "NOTIFIER_FLOWER_BASIC_AUTH": "ops:s3cret-pass"}
    with (tmp_path / "flower.log").open("wb") as log:
        process = subprocess.Popen(["sh", "-c", "exec " + line.strip()], env=env, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: _listening_on(port) or process.poll() is not None, 60,
                   "Flower to listen")
        assert process.poll() is None, (tmp_path / "flower.log").read_text()
        assert _listening_on(port) == {"127.0.0.1"}
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/api/workers", timeout=10).status_code == 401
        assert requests.get(f"{base}/api/workers", timeout=10,
                            auth=("ops", "wrong")).status_code == 401
        assert requests.get(f"{base}/api/workers", timeout=10,
                            auth=("ops", "s3cret-pass")).status_code == 200
        # The password is not in the process list (it goes by Flower's environment variable).
        command = Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ")
        assert b"s3cret-pass" not in command
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


def test_notifier_up_builds_the_same_flower_command(stack_env: dict[str, str]) -> None:
    from notifier.cli import flower_command

    settings = load_settings({k: v for k, v in stack_env.items() if k.startswith("NOTIFIER_")})
    command, env = flower_command(settings, 5999)
    assert "--address=127.0.0.1" in command and "FLOWER_BASIC_AUTH" not in env
    shown = shlex.join(command)
    secured = load_settings({**{k: v for k, v in stack_env.items() if k.startswith("NOTIFIER_")},
                             "NOTIFIER_FLOWER_ADDRESS": "0.0.0.0",
                             "NOTIFIER_FLOWER_BASIC_AUTH": "ops:pw"})
    command, env = flower_command(secured, 5999)
    assert "--address=0.0.0.0" in command and env["FLOWER_BASIC_AUTH"] == "ops:pw"
    assert "ops:pw" not in shown + shlex.join(command)


def test_a_published_events_message_shows_its_ids_never_its_payload(
        broker_url: str, redis_base: tuple[str, str]) -> None:
    event_id = publish("pointsIssued", {"customerIdentifiers": {"email": "jane@example.com"},
                                        "points": 5}, org_id=7, broker_url=broker_url)
    client = redis.Redis.from_url(_with_db(redis_base[0], BROKER_DB))
    try:
        (raw,) = client.lrange(QUEUE, 0, -1)
    finally:
        client.close()
    headers = json.loads(raw)["headers"]
    shown = headers["argsrepr"] + headers["kwargsrepr"]
    assert "jane@example.com" not in shown and "customerIdentifiers" not in shown
    assert json.loads(headers["argsrepr"]) == [
        {"orgId": 7, "eventName": "pointsIssued", "eventId": event_id}]


def test_an_ingest_message_sent_by_task_name_is_shown_by_its_ids_never_its_payload(
        stack: Stack) -> None:
    """``celery -A tasks call notifier.ingest`` (a way in the README gives) and any producer
    that is not ``notifier.publish`` send Celery's default ``argsrepr``: the payload itself.
    What the worker tells Flower (its task events) must still be the ids alone."""
    from celery import Celery

    stack.worker()
    app = Celery(broker=stack.settings.broker_url, set_as_current=False)
    events: list[dict[str, Any]] = []
    receiver = app.events.Receiver(app.connection(), handlers={"*": events.append})
    listening = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
    listening.start()
    try:
        # A worker's heartbeat seen: the event queue is bound, nothing sent from now is missed.
        wait_until(lambda: any(e["type"] == "worker-heartbeat" for e in events), 30,
                   "a worker heartbeat")
        sent = app.send_task(QUEUE_TASK, queue=QUEUE, args=[{
            "eventName": "pointsIssued", "orgId": 7, "eventId": "by-name-1",
            "data": {"firstName": "Jane-Private",
                     "customerIdentifiers": {"email": "jane@example.com"}}}])
        (received,) = wait_until(
            lambda: [e for e in events if e["type"] == "task-received"
                     and e.get("uuid") == sent.id] or None, 30, "the ingest task's event")
    finally:
        receiver.should_stop = True
        listening.join(timeout=10)
        app.close()
    shown = received["args"] + received["kwargs"]
    assert "Jane-Private" not in shown and "customerIdentifiers" not in shown, shown
    assert json.loads(received["args"]) == [
        {"orgId": 7, "eventName": "pointsIssued", "eventId": "by-name-1"}]
