"""The sender: classify, Retry-After, destination checks, and HttpSender on `responses`."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
import requests
import responses
import urllib3.exceptions

from notifier.errors import DeadlineExceeded, DestinationNotAllowed
from notifier.sender import (
    _WATCHDOG,
    HttpSender,
    OutboundRequest,
    Result,
    Verdict,
    check_destination,
    classify,
    retry_after_seconds,
)
from tests.conftest import wait_until

URL = "http://93.184.216.34/hook"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.mark.parametrize(("status", "verdict"), [
    (200, Verdict.DELIVERED),
    (204, Verdict.DELIVERED),
    (299, Verdict.DELIVERED),
    (300, Verdict.FAILED),
    (301, Verdict.FAILED),
    (400, Verdict.FAILED),
    (404, Verdict.FAILED),
    (408, Verdict.RETRY),
    (409, Verdict.RETRY),
    (410, Verdict.GONE),
    (425, Verdict.RETRY),
    (429, Verdict.RETRY),
    (500, Verdict.RETRY),
    (503, Verdict.RETRY),
])
def test_classify_status(status: int, verdict: Verdict) -> None:
    assert classify(Result(latency_ms=1, status_code=status)) is verdict


@pytest.mark.parametrize(("error", "verdict"), [
    (requests.ConnectionError("refused"), Verdict.RETRY),
    (requests.Timeout("slow"), Verdict.RETRY),
    (requests.exceptions.ReadTimeout("slow"), Verdict.RETRY),
    (urllib3.exceptions.ProtocolError("Connection aborted."), Verdict.RETRY),
    (urllib3.exceptions.ReadTimeoutError(None, URL, "read timed out"), Verdict.RETRY),
    (DestinationNotAllowed("10.0.0.1 is private"), Verdict.FAILED),
    (ValueError("unexpected"), Verdict.FAILED),
])
def test_classify_error(error: Exception, verdict: Verdict) -> None:
    assert classify(Result(latency_ms=1, error=error)) is verdict


def _with_retry_after(value: str) -> Result:
    return Result(latency_ms=1, status_code=503, headers={"Retry-After": value})


def test_retry_after_in_seconds() -> None:
    assert retry_after_seconds(_with_retry_after("120"), now=0.0) == 120.0
    assert retry_after_seconds(_with_retry_after(" 7 "), now=0.0) == 7.0


def test_retry_after_header_name_is_case_insensitive() -> None:
    result = Result(latency_ms=1, status_code=429, headers={"retry-after": "30"})

    assert retry_after_seconds(result, now=0.0) == 30.0


def test_retry_after_as_http_date() -> None:
    now = 1_750_000_000.0
    when = format_datetime(datetime.fromtimestamp(now + 90, UTC), usegmt=True)

    assert retry_after_seconds(_with_retry_after(when), now=now) == 90.0


def test_retry_after_date_in_the_past_is_zero() -> None:
    now = 1_750_000_000.0
    when = format_datetime(datetime.fromtimestamp(now - 90, UTC), usegmt=True)

    assert retry_after_seconds(_with_retry_after(when), now=now) == 0.0


@pytest.mark.parametrize("value", ["soon", "", "-5", "1.5", "Wed, 32 Oct 2015 07:28:00 GMT"])
def test_retry_after_garbage_is_ignored(value: str) -> None:
    assert retry_after_seconds(_with_retry_after(value), now=0.0) is None


def test_retry_after_superscript_digit_is_ignored() -> None:
    assert retry_after_seconds(_with_retry_after("\xb2"), now=0.0) is None


def test_no_retry_after() -> None:
    assert retry_after_seconds(Result(latency_ms=1, status_code=503), now=0.0) is None


@pytest.mark.parametrize("url", [
    "ftp://93.184.216.34/hook",
    "file:///etc/passwd",
    "http:///hook",
    "http://10.0.0.1/hook",
    "http://127.0.0.1:8080/hook",
    "https://169.254.169.254/latest/meta-data",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://0.0.0.0/hook",
])
def test_check_destination_refuses(url: str) -> None:
    with pytest.raises(DestinationNotAllowed):
        check_destination(url, ())


def test_check_destination_allows_a_public_address() -> None:
    check_destination("https://8.8.8.8/hook", ())


def test_check_destination_allows_a_listed_private_range() -> None:
    check_destination("http://127.0.0.1:8080/hook", LOOPBACK)

    with pytest.raises(DestinationNotAllowed):
        check_destination("http://10.0.0.1/hook", LOOPBACK)


def _sender(**overrides: object) -> HttpSender:
    options: dict[str, object] = {"timeout": (3.0, 7.0), "max_response_bytes": 1024}
    options.update(overrides)
    return HttpSender(**options)  # type: ignore[arg-type]


def test_sends_body_and_headers() -> None:
    sender = _sender()
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, URL, body=b"ok", status=200, headers={"X-Reply": "yes"})

        result = sender.send(OutboundRequest(URL, {"X-Custom": "1", "webhook-id": "msg_1"},
                                             b'{"a":1}'))

        sent = mock.calls[0].request
    assert sent.body == b'{"a":1}'
    assert sent.headers["X-Custom"] == "1"
    assert sent.headers["webhook-id"] == "msg_1"
    assert result.status_code == 200
    assert result.body_excerpt == b"ok"
    assert result.headers["X-Reply"] == "yes"
    assert result.error is None
    assert result.latency_ms >= 0  # measured, on every path


def test_a_webhook_header_replaces_the_default_of_that_name_whatever_its_case() -> None:
    sender = _sender()
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, URL, body=b"ok", status=200)

        sender.send(OutboundRequest(URL, {"user-agent": "crm-bridge/2"}, b"{}"))
        sender.send(OutboundRequest(URL, {}, b"{}"))

        mine, default = (call.request for call in mock.calls)
    assert [v for k, v in mine.headers.items() if k.lower() == "user-agent"] == ["crm-bridge/2"]
    assert default.headers["User-Agent"].startswith("python-requests/")
    assert default.headers["Content-Length"] == "2"


def test_does_not_follow_redirects() -> None:
    sender = _sender()
    elsewhere = "http://93.184.216.35/other"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add(responses.POST, URL, status=302, headers={"Location": elsewhere})
        mock.add(responses.POST, elsewhere, status=200)
        mock.add(responses.GET, elsewhere, status=200)

        result = sender.send(OutboundRequest(URL, {}, b"{}"))

        assert [call.request.url for call in mock.calls] == [URL]
    assert result.status_code == 302
    assert classify(result) is Verdict.FAILED


def test_caps_the_response_excerpt() -> None:
    sender = _sender(max_response_bytes=10)
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, URL, body=b"x" * 1000, status=500)

        result = sender.send(OutboundRequest(URL, {}, b"{}"))

    assert result.status_code == 500
    assert result.body_excerpt == b"x" * 10


def test_a_connection_error_is_returned_not_raised() -> None:
    sender = _sender()
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, URL, body=requests.ConnectionError("refused"))

        result = sender.send(OutboundRequest(URL, {}, b"{}"))

    assert result.status_code is None
    assert isinstance(result.error, requests.ConnectionError)
    assert classify(result) is Verdict.RETRY
    assert result.latency_ms >= 0


def test_uses_the_configured_timeouts_and_verifies_tls() -> None:
    sender = _sender(timeout=(3.0, 7.0))
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, URL, status=204)

        result = sender.send(OutboundRequest(URL, {}, b"{}"))

        sent = mock.calls[0].request
    assert sent.req_kwargs["timeout"] == (3.0, 7.0)
    assert sent.req_kwargs["verify"] is True
    assert (result.status_code, result.body_excerpt) == (204, b"")


def test_ignores_proxy_settings_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    sender = _sender()
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, URL, status=204)

        sender.send(OutboundRequest(URL, {}, b"{}"))

        sent = mock.calls[0].request
    assert sender.session.trust_env is False
    assert not sent.req_kwargs["proxies"]


def test_a_private_destination_is_an_error_result_and_sends_nothing() -> None:
    sender = _sender()
    url = "http://10.0.0.1/hook"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add(responses.POST, url, status=200)

        result = sender.send(OutboundRequest(url, {}, b"{}"))

        assert len(mock.calls) == 0
    assert isinstance(result.error, DestinationNotAllowed)
    assert classify(result) is Verdict.FAILED


def test_an_allowed_private_destination_is_sent() -> None:
    sender = _sender(allowed_networks=LOOPBACK)
    url = "http://127.0.0.1:8080/hook"
    with responses.RequestsMock() as mock:
        mock.add(responses.POST, url, status=200)

        result = sender.send(OutboundRequest(url, {}, b"{}"))

    assert result.status_code == 200


@pytest.mark.parametrize("url", ["http://93.184.216.34:99999/hook", "http://[::1/hook"])
def test_a_malformed_url_is_an_error_result(url: str) -> None:
    result = _sender().send(OutboundRequest(url, {}, b"{}"))

    assert isinstance(result.error, DestinationNotAllowed)


def test_an_answer_that_comes_after_the_deadline_is_a_deadline_error() -> None:
    # responses answers without a socket, so nothing is cut: the answer arrives, late.
    sender = _sender(deadline=0.05)

    def late(request: object) -> tuple[int, dict[str, str], bytes]:
        wait_until(lambda: _WATCHDOG._local.timer.fired, 10, "the request's deadline to pass")
        return 200, {}, b"ok"

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, URL, callback=late)

        result = sender.send(OutboundRequest(URL, {}, b"{}"))

    assert isinstance(result.error, DeadlineExceeded)
    assert "NOTIFIER_HTTP_DEADLINE" in str(result.error)
    assert result.status_code is None
    assert classify(result) is Verdict.RETRY
    assert 50 <= result.latency_ms < 60_000


def test_a_refused_address_names_the_setting_that_allows_it() -> None:
    with pytest.raises(DestinationNotAllowed,
                       match="allow its range in NOTIFIER_ALLOW_PRIVATE_NETWORKS to send there"):
        check_destination("http://10.0.0.1/hook", ())
