"""The checks of a webhook's headers and numbers, as pure logic: what is stored, and each refusal
naming its field and its problem (tests/webhooks shows the same through the API, the admin pages
and the CLI)."""

from __future__ import annotations

from typing import Any

import pytest

from notifier.errors import InvalidInput
from notifier.webhooks import Bounds, _check_headers, _check_int, _check_url, _origin

BOUNDS = Bounds()
SECRET = "Bearer s3cr3t-5678"  # masked as ****5678


def _refusal(headers: Any, stored: dict[str, str] | None = None, bounds: Bounds = BOUNDS,
             moved: bool = False) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        _check_headers(headers, stored or {}, bounds, moved=moved)
    return caught.value


def test_headers_are_stored_as_sent() -> None:
    headers = {"Authorization": "Bearer a b\tc", "X-Tenant": "", "Content-Type":
               "Application/JSON; charset=utf-8", "X-Latin": "caf\xe9"}

    assert _check_headers(headers, {}, BOUNDS) == headers
    assert _check_headers(None, {"Authorization": SECRET}, BOUNDS) == {}


@pytest.mark.parametrize(("headers", "field", "problem"), [
    (["Authorization"], "webHookHeaders", "must be an object of header names to values"),
    ({"Bad Name": "v"}, "webHookHeaders.Bad Name", "is not a valid header name"),
    ({"": "v"}, "webHookHeaders.", "is not a valid header name"),
    ({7: "v"}, "webHookHeaders.7", "is not a valid header name"),
    ({"X-Key": "a", "x-key": "b"}, "webHookHeaders.x-key",
     "is the same header as X-Key (names ignore case); send it once"),
    ({"X-Key": 7}, "webHookHeaders.X-Key", "must be a string"),
    ({"X-Key": "a\rb"}, "webHookHeaders.X-Key", "must not contain CR, LF or NUL"),
    ({"X-Key": "a\nb"}, "webHookHeaders.X-Key", "must not contain CR, LF or NUL"),
    ({"X-Key": "a\0b"}, "webHookHeaders.X-Key", "must not contain CR, LF or NUL"),
    ({"X-Key": "a\x7fb"}, "webHookHeaders.X-Key",
     "must hold only visible characters, spaces and tabs (Latin-1): HTTP cannot carry others"),
    ({"X-Key": "\u20ac"}, "webHookHeaders.X-Key",
     "must hold only visible characters, spaces and tabs (Latin-1): HTTP cannot carry others"),
    ({"Host": "a"}, "webHookHeaders.Host", "is set by notifier and cannot be configured"),
    ({"Content-Length": "1"}, "webHookHeaders.Content-Length",
     "is set by notifier and cannot be configured"),
    ({"Transfer-Encoding": "chunked"}, "webHookHeaders.Transfer-Encoding",
     "is set by notifier and cannot be configured"),
    ({"Connection": "close"}, "webHookHeaders.Connection",
     "is set by notifier and cannot be configured"),
    ({"Webhook-Signature": "v1,x"}, "webHookHeaders.Webhook-Signature",
     "is set by notifier and cannot be configured"),
    ({"Content-Type": "text/plain; x=application/json"}, "webHookHeaders.Content-Type",
     "must be application/json: payloads are JSON"),
])
def test_a_refused_header_names_itself_and_the_problem(
        headers: Any, field: str, problem: str) -> None:
    refusal = _refusal(headers)

    assert (refusal.field, refusal.problem) == (field, problem)


def test_the_count_and_the_bytes_of_headers_are_bounded() -> None:
    bounds = Bounds(max_headers=2, max_header_bytes=10)
    assert _check_headers({"A": "1", "B": "1234567"}, {}, bounds) == {"A": "1", "B": "1234567"}

    three = _refusal({"A": "1", "B": "2", "C": "3"}, bounds=bounds)
    assert (three.field, three.problem) == (
        "webHookHeaders", "at most 2 headers (NOTIFIER_WEBHOOK_MAX_HEADERS); 3 were sent")
    # Bytes, not characters: é is two.
    eleven = _refusal({"A": "1", "B": "123456\xe9"}, bounds=bounds)
    assert (eleven.field, eleven.problem) == (
        "webHookHeaders", "at most 10 bytes of names and values in all "
        "(NOTIFIER_WEBHOOK_MAX_HEADER_BYTES); 11 were sent")


def test_a_mask_sent_back_keeps_the_stored_value_whatever_the_case_of_its_name() -> None:
    kept = _check_headers({"authorization": "****5678", "X-New": "new"},
                          {"Authorization": SECRET}, BOUNDS)

    assert kept == {"authorization": SECRET, "X-New": "new"}


@pytest.mark.parametrize(("stored", "problem"), [
    ({}, "'****5678' is a masked value but this header has no stored value to keep; "
         "send the real value"),
    ({"Authorization": "Bearer other-1234"},
     "'****5678' is not the mask of the stored value (****1234); send it unchanged to keep the "
     "value, or the real new value"),
])
def test_a_mask_of_no_stored_value_is_refused(stored: dict[str, str], problem: str) -> None:
    refusal = _refusal({"Authorization": "****5678"}, stored)

    assert (refusal.field, refusal.problem) == ("webHookHeaders.Authorization", problem)


def test_a_mask_is_refused_for_a_url_moved_to_another_host() -> None:
    refusal = _refusal({"Authorization": "****5678"}, {"Authorization": SECRET}, moved=True)

    assert (refusal.field, refusal.problem) == (
        "webHookHeaders.Authorization", "'****5678' is a masked value, kept only for the host it "
        "was given for; webHookUrl moves to another host: send the real value")


def test_the_origin_of_a_url_is_its_scheme_host_and_port() -> None:
    assert _origin("HTTPS://Hooks.Example.com:8443/a?b") == ("https", "hooks.example.com", 8443)
    assert _origin("http://example.com/") == ("http", "example.com", None)


@pytest.mark.parametrize(("value", "problem"), [
    (True, "must be an integer"), ("3", "must be an integer"), (2.0, "must be an integer"),
    (0, "too small"), (6, "must be at most 5"),
])
def test_an_integer_out_of_its_range_is_refused(value: Any, problem: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        _check_int(value, "slaInSeconds", 1, 5, "too small")

    assert (caught.value.field, caught.value.problem) == ("slaInSeconds", problem)


def test_an_integer_within_its_range_is_kept() -> None:
    assert [_check_int(n, "slaInSeconds", 1, 5, "too small") for n in (1, 5)] == [1, 5]


@pytest.mark.parametrize(("url", "problem"), [
    (None, "is required"),
    ("  ", "is required"),
    ("http://example.com:99999/", "is not a valid URL (Port out of range 0-65535)"),
    ("ftp://example.com/", "must be an http or https URL with a host"),
    ("http:///hook", "must be an http or https URL with a host"),
    ("http://example.com/a b", "must not contain white space"),
])
def test_a_refused_url_names_the_problem(url: Any, problem: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        _check_url(url, ())

    assert (caught.value.field, caught.value.problem) == ("webHookUrl", problem)


def test_a_url_is_stored_without_surrounding_space() -> None:
    assert _check_url("  https://example.com/hook\n", ()) == "https://example.com/hook"


def test_a_url_the_sender_would_refuse_is_refused_with_the_senders_reason() -> None:
    with pytest.raises(InvalidInput) as caught:
        _check_url("http://10.0.0.1/hook", ())

    assert caught.value.field == "webHookUrl"
    assert caught.value.problem.startswith("10.0.0.1 is a private address")
