"""The workers' broker client: kombu's Redis transport made a new ``redis.Redis`` for every
command it sent outside a worker's event loop (each message published, each one's unacknowledged
bookkeeping and acknowledgement), and redis-py builds each new client's table of response
callbacks anew: about 80 us of CPU each. The workers' app (``tasks.app``) keeps one a channel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

# In a process of its own: importing the workers' app changes kombu's Redis channels for the
# whole process, as it does in a worker.
WORKER_SIDE = """
import json, sys
import redis
from kombu import Connection
from tasks.app import app

made = []
real_init = redis.Redis.__init__

def counted(self, *args, **kwargs):
    made.append(1)
    real_init(self, *args, **kwargs)

with Connection(sys.argv[1]) as connection:
    queue = connection.SimpleQueue("notifier-test-one-client")
    queue.put({"n": -1})
    queue.get(timeout=5).ack()  # connected
    redis.Redis.__init__ = counted
    for n in range(20):
        queue.put({"n": n})
    got = []
    for _ in range(20):
        message = queue.get(timeout=5)
        got.append(message.payload["n"])
        message.ack()
    redis.Redis.__init__ = real_init
    try:
        queue.get(block=False)
        left = 1
    except queue.Empty:
        left = 0
    queue.close()
app.conf.broker_url = sys.argv[1]
print(json.dumps({"made": len(made), "got": got, "left": left,
                  "uri": app.connection_for_write().as_uri()}))
"""


def test_a_worker_s_broker_channel_sends_and_acknowledges_over_one_redis_client(
    broker_url: str
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "-c", WORKER_SIDE, broker_url], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["made"] == 0  # kombu's own made 80: four for each message put, got and acked
    assert sorted(seen["got"]) == list(range(20)) and seen["left"] == 0
    # The broker's URL keeps its scheme: Flower tells the broker's kind by it (its Broker page).
    assert seen["uri"].split("://")[0] == broker_url.split("://")[0]
