"""A producer that imports ``notifier`` to call ``notifier.publish`` (or ``publish_many``) loads
none of the server:
no web framework, database layer, migrations or monitor (Celery and kombu are the client's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

SERVER_MODULES = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "flower",
                  "tornado", "jinja2", "prometheus_client", "jsonschema")

# Publishes through kombu's in-memory transport: the whole send path, no broker needed.
PRODUCER = """
import json, sys
import notifier
event_id = notifier.publish("pointsIssued", {"customerIdentifiers": {"customerId": 1}},
                            org_id=1, broker_url="memory://")
notifier.publish_many([{"eventName": "pointsIssued", "data": {}}] * 2, org_id=1,
                      broker_url="memory://")
print(json.dumps({"event_id": event_id, "modules": sorted(sys.modules)}))
"""


def test_importing_notifier_and_publishing_loads_no_server_module() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "-c", PRODUCER], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["event_id"]
    loaded = {name.partition(".")[0] for name in answer["modules"]}
    assert "celery" in loaded and "kombu" in loaded  # the client's own
    assert loaded.isdisjoint(SERVER_MODULES), sorted(loaded & set(SERVER_MODULES))
    # Nor notifier's server side: only the client and what it needs.
    ours = {name for name in answer["modules"] if name.partition(".")[0] in ("notifier", "tasks")}
    assert ours <= {"notifier", "notifier.client", "notifier.errors", "notifier.queues",
                    "notifier.routes"}, ours


def test_a_receiver_importing_the_signing_code_loads_no_celery_nor_broker_client() -> None:
    """``notifier.publish`` is loaded on first use: a receiver verifying signatures with
    ``notifier.signing`` needs none of the producer's side."""
    code = ("import json, sys, notifier, notifier.signing, notifier.errors\n"
            "print(json.dumps(sorted(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    loaded = {name.partition(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}
    assert loaded.isdisjoint({"celery", "kombu", "redis", *SERVER_MODULES}), sorted(
        loaded & {"celery", "kombu", "redis", *SERVER_MODULES})
