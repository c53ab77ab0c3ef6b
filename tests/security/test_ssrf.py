"""A tenant's webhook reaches nothing that is not public, through the real path: a real worker,
real receivers on loopback, and a stub DNS in the worker (``stub_dns_celery``).

Only 127.0.0.2 is allowed (``NOTIFIER_ALLOW_PRIVATE_NETWORKS=127.0.0.2/32``): its receiver
stands for a public server, and the receiver on 127.0.0.1, at the same port, for the operator's
internal service, which must stay silent whatever a URL or a DNS answer says.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from notifier.models import Attempt
from tests.conftest import Receiver, Reply, Stack, wait_until
from tests.security.conftest import attempts_of_hook, make_hook, send

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

STUB_DNS_WORKER = ("tests.security.stub_dns_celery",)

# Each a way to the silent receiver on 127.0.0.1 ({port} is its port).
HOSTILE_URLS = {
    "backslash": "http://127.0.0.1:{port}\\@8.8.8.8/../internal",
    "userinfo": "http://8.8.8.8@127.0.0.1:{port}/internal",
    "decimal": "http://2130706433:{port}/internal",
    "hex": "http://0x7f000001:{port}/internal",
    "octal": "http://0177.0.0.1:{port}/internal",
    "short": "http://127.1:{port}/internal",
    "mapped": "http://[::ffff:127.0.0.1]:{port}/internal",
    "zero": "http://0.0.0.0:{port}/internal",  # Linux connects 0.0.0.0 to the loopback
    "unspecified-v6": "http://[::]:{port}/internal",
    "localhost": "http://localhost:{port}/internal",
    "private-name": "http://private.test:{port}/internal",
    "zero-name": "http://zero.test:{port}/internal",
    "mapped-name": "http://mapped.test:{port}/internal",
}
# Only forms that land on this host if let through: the other refused blocks (100.64/10,
# 198.18/15, multicast, IPv4-compatible, NAT64, 6to4 ...) would route off the machine, so
# they are checked without a socket, in tests/unit/test_destination.py.


@pytest.fixture
def stack_env(stack_env: dict[str, str]) -> dict[str, str]:
    stack_env["NOTIFIER_ALLOW_PRIVATE_NETWORKS"] = "127.0.0.2/32"
    return stack_env


@pytest.fixture
def allowed(receiver: Receiver) -> Iterator[Receiver]:
    """The receiver on 127.0.0.2, at the port of the silent one on 127.0.0.1."""
    server = Receiver("127.0.0.2", receiver.server.server_port)
    yield server
    server.close()


def _refused(attempts: list[Attempt]) -> bool:
    return bool(attempts) and attempts[-1].error_class == "DestinationNotAllowed"


def test_no_url_form_and_no_dns_answer_reaches_a_private_address(
        stack: Stack, receiver: Receiver, allowed: Receiver, database: object,
        hosts_file: object) -> None:
    asked = hosts_file({"private.test": ["127.0.0.1"],  # type: ignore[operator]
                        "zero.test": ["0.0.0.0"], "mapped.test": ["::ffff:127.0.0.1"],
                        "rebind.test": ["127.0.0.2", "127.0.0.1"]})
    port = receiver.server.server_port
    hostile = {name: make_hook(stack, database, allowed.url("/"), name=name,  # type: ignore[arg-type]
                               raw_url=url.format(port=port))
               for name, url in HOSTILE_URLS.items()}
    control = make_hook(stack, database, allowed.url("/control"), name="control")  # type: ignore[arg-type]
    rebind = make_hook(stack, database, f"http://rebind.test:{port}/rebind",  # type: ignore[arg-type]
                       name="rebind")
    # The first connection's answer is allowed; the receiver closes it, so the next
    # delivery needs a new connection, and the stub DNS answers 127.0.0.1 then.
    allowed.script("/rebind", Reply(200, {"Connection": "close"}))
    stack.worker(program=STUB_DNS_WORKER)

    send(stack, customer=1)
    allowed.wait_for(1, "/control", timeout=30)
    allowed.wait_for(1, "/rebind", timeout=30)
    for name, webhook_id in hostile.items():
        attempts = wait_until(lambda w=webhook_id: attempts_of_hook(database, w),  # type: ignore[arg-type]
                              30, f"the {name} webhook's attempt")
        assert _refused(attempts), (name, [(a.error_class, a.error_message) for a in attempts])
        assert attempts[0].outcome == "failed", name
    send(stack, customer=2)
    attempts = wait_until(lambda: (lambda a: a if len(a) >= 2 else None)(  # type: ignore[arg-type]
        attempts_of_hook(database, rebind)), 30, "the rebound webhook's second attempt")

    assert [a.outcome for a in attempts] == ["delivered", "failed"]
    assert attempts[1].error_class == "DestinationNotAllowed"
    assert "127.0.0.1" in (attempts[1].error_message or "")
    # One resolution a connection, and the connection went where that answer said.
    rebind_answers = [a for a in asked()["asked"] if a[0] == "rebind.test"]
    assert rebind_answers == [["rebind.test", "127.0.0.2"], ["rebind.test", "127.0.0.1"]]
    # Both events' every delivery recorded: the silent receiver had every chance to be hit.
    wait_until(lambda: len(attempts_of_hook(database, control)) == 2,  # type: ignore[arg-type]
               30, "the control webhook's second attempt")
    assert receiver.requests == []
