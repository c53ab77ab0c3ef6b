"""``python -m tests.security.stub_dns_celery worker ...``: celery's command, in a process whose
DNS answers names under ``.test`` from a file, so that tests can model rebinding with loopback
addresses only.

``NOTIFIER_TEST_HOSTS`` names a JSON file ``{"name.test": ["addr", ...], "asked": []}``: each
lookup of a name takes its next answer (the last one repeats) and appends ``[name, answer]``
to ``asked``, under a file lock, so every process of a prefork worker shares one sequence.
An answer ``slow:SECONDS:ADDRESS`` is ADDRESS given after SECONDS (a resolver that hangs).
Other names resolve as usual. A test seam only: production never imports this module.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

_real_getaddrinfo = socket.getaddrinfo


def _stub_getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0,
                      proto: int = 0, flags: int = 0) -> Any:
    if not (isinstance(host, str) and host.rstrip(".").endswith(".test")):
        return _real_getaddrinfo(host, port, family, type, proto, flags)
    name = host.rstrip(".")
    with open(os.environ["NOTIFIER_TEST_HOSTS"], "r+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        table = json.load(file)
        answers = table.get(name) or []
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, f"{name}: no such test name")
        address = answers.pop(0) if len(answers) > 1 else answers[0]
        table["asked"].append([name, address])
        file.seek(0)
        file.truncate()
        json.dump(table, file)
    if address.startswith("slow:"):
        _, seconds, address = address.split(":", 2)
        time.sleep(float(seconds))
    return _real_getaddrinfo(address, port, family, type, proto, flags | socket.AI_NUMERICHOST)


def main() -> None:
    socket.getaddrinfo = _stub_getaddrinfo
    from celery.__main__ import main as celery

    sys.argv = ["celery", "-A", "tasks", *sys.argv[1:]]
    celery()


if __name__ == "__main__":
    main()
