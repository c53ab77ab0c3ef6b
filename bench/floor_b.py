"""Floor B's Celery app: one task, one ``requests.Session`` POST; notifier's Celery settings.

``python -m celery -A bench.floor_b worker`` with ``BENCH_BROKER_URL`` and ``BENCH_TARGET_URL``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import requests
from celery import Celery

app = Celery("bench-floor-b", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/12"),
             set_as_current=False)
# The same as tasks/celeryconfig.py.
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 900},
    task_serializer="json", result_serializer="json", accept_content=["json"],
    task_ignore_result=True, task_acks_late=True, task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1, task_default_queue="bench-floor-b",
)

_session: dict[int, requests.Session] = {}


def session() -> requests.Session:
    pid = os.getpid()
    if pid not in _session:
        _session.clear()
        s = requests.Session()
        s.trust_env = False
        _session[pid] = s
    return _session[pid]


@app.task(name="bench.post")
def post(payload: dict[str, Any]) -> None:
    response = session().post(os.environ["BENCH_TARGET_URL"], data=json.dumps(payload).encode(),
                              headers={"Content-Type": "application/json"}, timeout=(5, 30))
    response.raise_for_status()
