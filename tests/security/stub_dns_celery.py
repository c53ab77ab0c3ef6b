"""``python -m tests.security.stub_dns_celery worker ...``: celery's command, in a process whose
DNS answers names under ``.test`` from a file, so that tests can model rebinding with loopback
addresses only.

``NOTIFIER_TEST_HOSTS`` names a JSON file ``{"name.test": ["addr", ...], "asked": []}``: each
lookup of a name takes its next answer (the last one repeats) and appends ``[name, answer]``
to ``asked``, under a file lock, so every process of a prefork worker shares one sequence.
An answer ``slow:SECONDS:ADDRESS`` is ADDRESS given after SECONDS (a resolver that hangs).
Other names resolve as usual.

A key ``"hold": {"name.test": [SECONDS, ...]}`` holds each request to that name, in the task's
own thread, before it is sent, for the name's next SECONDS (the last one repeats), taken in turn
the same way: a step that no deadline of the sender bounds (the sender's own waits all end at
the request's deadline), such as a stalled database or a long computation, for tests of what
stops a task held past it. A test seam only: production never imports this module.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from notifier.sender import HttpSender, OutboundRequest, Result

_real_getaddrinfo = socket.getaddrinfo


def _take(name: str, table_key: str | None = None) -> Any:
    """The next of ``name``'s DNS answers (or, with ``table_key``, of its answers in that table
    of the file), the last one repeating, taken under the file's lock; None if it has none."""
    with open(os.environ["NOTIFIER_TEST_HOSTS"], "r+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        table = json.load(file)
        answers = (table if table_key is None else table.get(table_key, {})).get(name) or []
        if not answers:
            return None
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if table_key is None:
            table["asked"].append([name, answer])
        file.seek(0)
        file.truncate()
        json.dump(table, file)
    return answer


def _stub_getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0,
                      proto: int = 0, flags: int = 0) -> Any:
    if not (isinstance(host, str) and host.rstrip(".").endswith(".test")):
        return _real_getaddrinfo(host, port, family, type, proto, flags)
    name = host.rstrip(".")
    address = _take(name)
    if address is None:
        raise socket.gaierror(socket.EAI_NONAME, f"{name}: no such test name")
    if address.startswith("slow:"):
        _, seconds, address = address.split(":", 2)
        time.sleep(float(seconds))
    return _real_getaddrinfo(address, port, family, type, proto, flags | socket.AI_NUMERICHOST)


def _holding(send: Callable[[HttpSender, OutboundRequest], Result],
             ) -> Callable[[HttpSender, OutboundRequest], Result]:
    def held_send(sender: HttpSender, request: OutboundRequest) -> Result:
        host = urlsplit(request.url).hostname or ""
        if host.endswith(".test"):
            time.sleep(_take(host, "hold") or 0)
        return send(sender, request)
    return held_send


def main() -> None:
    socket.getaddrinfo = _stub_getaddrinfo
    HttpSender.send = _holding(HttpSender.send)  # type: ignore[method-assign,assignment]
    from celery.__main__ import main as celery

    sys.argv = ["celery", "-A", "tasks", *sys.argv[1:]]
    celery()


if __name__ == "__main__":
    main()
