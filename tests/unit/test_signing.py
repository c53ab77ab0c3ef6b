"""Signatures checked against the public ``standardwebhooks`` library, not against ourselves."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from notifier.signing import SECRET_PREFIX, new_secret, sign, signature_headers

BODY = b'{"eventName":"pointsIssued","orgId":51186,"data":{"name":"Zo\xc3\xab"}}'


def test_headers_verify_with_the_library() -> None:
    secret = new_secret()
    headers = signature_headers([secret], "msg_1", int(time.time()), BODY)

    assert Webhook(secret).verify(BODY, headers) == {
        "eventName": "pointsIssued", "orgId": 51186, "data": {"name": "Zoë"}}
    assert headers["webhook-id"] == "msg_1"


def test_a_tampered_body_fails_verification() -> None:
    secret = new_secret()
    headers = signature_headers([secret], "msg_1", int(time.time()), BODY)

    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"51186", b"51187"), headers)


def test_another_secret_fails_verification() -> None:
    headers = signature_headers([new_secret()], "msg_1", int(time.time()), BODY)

    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_rotation_sends_one_signature_per_live_secret() -> None:
    old, new = new_secret(), new_secret()
    headers = signature_headers([old, new], "msg_1", int(time.time()), BODY)

    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(BODY, headers)


def test_matches_the_library_signature_for_a_fixed_vector() -> None:
    secret = SECRET_PREFIX + base64.b64encode(bytes(range(32))).decode()
    msg_id, timestamp = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", 1_700_000_000

    expected = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), BODY.decode())

    assert sign(secret, msg_id, timestamp, BODY) == expected


def test_matches_the_standard_webhooks_specification_vector() -> None:
    # The test vector published with the Standard Webhooks specification.
    signature = sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
                     1614265330, b'{"test": 2432232314}')

    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_new_secrets_are_32_random_bytes() -> None:
    first, second = new_secret(), new_secret()

    assert first.startswith(SECRET_PREFIX)
    assert len(base64.b64decode(first.removeprefix(SECRET_PREFIX))) == 32
    assert first != second
