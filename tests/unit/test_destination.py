"""Where a webhook may send: one URL reading (the HTTP client's) at save time, and the address
rules the sender applies to every address it connects to."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from notifier import webhooks
from notifier.errors import DestinationNotAllowed, InvalidInput
from notifier.sender import Destination, check_address, check_destination, read_url

LOOPBACK_2 = (ipaddress.ip_network("127.0.0.2/32"),)

EVERY_NETWORK = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))

# Each a way to reach somewhere else than the URL seems to say, or a literal address in a form
# that two parsers (or inet_aton and a reader) see differently: refused whatever is allowed.
AMBIGUOUS = [
    "http://127.0.0.1:8080\\@8.8.8.8/../internal",   # urlsplit: 8.8.8.8; urllib3: 127.0.0.1
    "http://8.8.8.8\\@127.0.0.1/",
    "http://user@8.8.8.8/hook",                    # userinfo
    "http://user:pw@example.com/hook",
    "http://example.com@127.0.0.1/hook",
    "http://2130706433/hook",                      # decimal 127.0.0.1
    "http://0x7f000001/hook",                      # hex
    "http://0177.0.0.1/hook",                      # octal
    "http://127.1/hook",                           # short form
    "http://127.0.1/hook",
    "http://0x7f.1/hook",
    "http://08.08.08.08/hook",                     # leading zeros
    "http://8.8.8.8./hook",                        # trailing dot on a literal
    "http://[fe80::1%25eth0]/hook",                # zone id
    "http://exa mple.com/hook",                    # white space
    "http://example.com/ho ok",
    "http://example.com/ho\tok",
    "http://example.com/\r\nX-Injected: 1",
    "http://example.com%2f@127.0.0.1/",
    "http://ex%61mple.com/hook",                   # percent-encoded host
    "http://exämple.com/hook",                      # not ASCII
    "http://example.com:99999/hook",
    "http://example.com:0/hook",
    "ftp://example.com/hook",
    "file:///etc/passwd",
    "http:///hook",
    "http://[::1/hook",
    "//example.com/hook",
]
# Addresses that are not public, in canonical forms: refused unless an allowed range holds them.
NOT_PUBLIC = [
    "http://127.0.0.1/hook",                       # canonical, but loopback
    "http://10.0.0.1/hook",
    "http://0.0.0.0/hook",
    "http://100.64.0.1/hook",                      # carrier-grade NAT
    "http://198.18.0.1/hook",                      # benchmarking
    "http://224.0.0.1/hook",                       # multicast
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",              # IPv4-mapped
    "http://[::ffff:8.8.8.8]/hook",
    "http://[::127.0.0.1]/hook",                   # IPv4-compatible
    "http://[64:ff9b::7f00:1]/hook",               # NAT64 of 127.0.0.1
    "http://[2002:7f00:1::]/hook",                 # 6to4 of 127.0.0.1
    "http://[2002::1]/hook",                       # 6to4 of 0.0.0.0
    "http://[64:ff9b:1::7f00:1]/hook",             # local-use NAT64
    "http://[::ffff:0:7f00:1]/hook",               # IPv4-translated 127.0.0.1
    "http://[fec0::1]/hook",                       # site-local
    "http://[::]/hook",
    "http://[ff02::1]/hook",
    "http://localhost/hook",
    "http://api.localhost/hook",
    "http://localhost./hook",
]
REFUSED_AT_SAVE = AMBIGUOUS + NOT_PUBLIC


@pytest.mark.parametrize("url", REFUSED_AT_SAVE)
def test_refused_at_save_time_naming_the_field(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        webhooks._check_url(url, ())

    assert caught.value.field == "webHookUrl"


@pytest.mark.parametrize("url", AMBIGUOUS)
def test_ambiguous_urls_are_refused_whatever_is_allowed(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        webhooks._check_url(url, EVERY_NETWORK)

    assert caught.value.field == "webHookUrl"


@pytest.mark.parametrize("url", REFUSED_AT_SAVE)
def test_refused_by_the_sender_without_dns(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns)

    with pytest.raises(DestinationNotAllowed):
        check_destination(url, (), resolve=False)


def _no_dns(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError(f"DNS asked at save time: {args}")


@pytest.mark.parametrize("url", [
    "https://example.com/hook",
    "https://hooks.example.com:8443/a/b?c=d&e=%20f#frag",
    "http://EXAMPLE.com/Hook",
    "https://my_host.example.com/hook",
    "https://8.8.8.8/hook",
    "https://[2606:4700:4700::1111]/hook",
    "https://[64:ff9b::808:808]/hook",            # NAT64 of a public address
])
def test_public_looking_urls_are_accepted_without_dns(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns)

    assert webhooks._check_url(url, ()) == url


def test_an_allowed_private_range_is_accepted() -> None:
    check_destination("http://127.0.0.2:8080/hook", LOOPBACK_2, resolve=False)

    with pytest.raises(DestinationNotAllowed):
        check_destination("http://127.0.0.1:8080/hook", LOOPBACK_2, resolve=False)


def test_an_allowed_range_covers_the_ipv4_inside_a_mapped_address() -> None:
    check_address(ipaddress.ip_address("::ffff:127.0.0.2"), LOOPBACK_2)

    with pytest.raises(DestinationNotAllowed):
        check_address(ipaddress.ip_address("::ffff:127.0.0.1"), LOOPBACK_2)


@pytest.mark.parametrize("address", [
    "0.1.2.3", "100.64.0.1", "198.19.255.255", "224.0.0.1", "239.1.1.1", "255.255.255.255",
    "::ffff:8.8.8.8", "::8.8.8.8", "64:ff9b::a00:1", "2002:a00:1::", "ff0e::1", "fc00::1",
    # What Python 3.11's is_global lets through: local-use NAT64 (RFC 8215, a site's own
    # translator, to any IPv4 behind it), IPv4-translated (SIIT), deprecated site-local.
    "64:ff9b:1::a00:1", "64:ff9b:1:ffff::808:808", "::ffff:0:a00:1", "::ffff:0:808:808",
    "fec0::1", "feff::1",
])
def test_refused_addresses(address: str) -> None:
    with pytest.raises(DestinationNotAllowed):
        check_address(ipaddress.ip_address(address), ())


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808",
                                     "2002:808:808::"])
def test_public_addresses(address: str) -> None:
    check_address(ipaddress.ip_address(address), ())


def _answers(*addresses: str, name: str = "hook.test") -> Any:
    """A resolver that knows ``name`` only, and answers ``addresses`` for it."""
    def resolve(host: str, port: int, *_: Any) -> list[tuple[Any, ...]]:
        if host != name:
            raise socket.gaierror(socket.EAI_NONAME, f"unknown name {host!r}")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]
    return resolve


def test_resolving_refuses_a_name_with_any_refused_address() -> None:
    check_destination("https://hook.test/x", (), resolver=_answers("8.8.8.8"))

    with pytest.raises(DestinationNotAllowed, match=r"10\.0\.0\.1"):
        check_destination("https://hook.test/x", (), resolver=_answers("8.8.8.8", "10.0.0.1"))


def test_resolving_asks_for_the_urls_host_and_refuses_a_name_that_does_not_resolve() -> None:
    check_destination("https://hook.test/x", (), resolver=_answers("8.8.8.8", name="hook.test"))

    with pytest.raises(DestinationNotAllowed, match=r"'other\.test' does not resolve"):
        check_destination("https://other.test/x", (), resolver=_answers("8.8.8.8"))
    with pytest.raises(DestinationNotAllowed, match="does not resolve to any address"):
        check_destination("https://hook.test/x", (), resolver=_answers())


@pytest.mark.parametrize("url", AMBIGUOUS)
def test_the_sender_names_the_url_it_refuses(url: str) -> None:
    with pytest.raises(DestinationNotAllowed) as caught:
        check_destination(url, EVERY_NETWORK, resolve=False)

    assert str(caught.value).startswith(f"{url!r}: ")


@pytest.mark.parametrize("url", ["http://exämple.com/hook", "http://example.com/a\x7fb",
                                 "http://example.com/a\x00b"])
def test_a_url_not_printable_ascii_is_refused_as_such(url: str) -> None:
    with pytest.raises(DestinationNotAllowed, match="must be printable ASCII"):
        check_destination(url, EVERY_NETWORK, resolve=False)


@pytest.mark.parametrize(("url", "problem"), [
    ("http://exa mple.com/hook",
     "must be printable ASCII without white space (IDNA-encode the host)"),
    ("http://127.0.0.1:8080\\@8.8.8.8/", "must not contain a backslash"),
    ("http://[::1/hook", "not a valid URL (Failed to parse: http://[::1/hook)"),
    ("ftp://example.com/hook", "only http and https URLs with a host are allowed"),
    ("http://user@8.8.8.8/hook", "must not carry a user name or password (use webHookHeaders)"),
    ("http://@example.com/", "must not carry a user name or password (use webHookHeaders)"),
    ("http://[fe80::1%25eth0]/hook", "its host or port reads differently to different URL parsers"),
    ("http://example.com:0/hook", "the port must be between 1 and 65535"),
    ("http://[fe80::1%eth0]/hook", "an IPv6 address must not carry a zone id"),
    ("http://ex%61mple.com/hook", "the host must be a DNS name or an IP address"),
    ("http://0x7f000001/hook",
     "an IPv4 address must be written as four decimal numbers (such as 192.0.2.10)"),
])
def test_read_url_names_the_url_and_why_it_is_refused(url: str, problem: str) -> None:
    with pytest.raises(DestinationNotAllowed) as caught:
        read_url(url)

    assert str(caught.value) == f"{url!r}: {problem}"


@pytest.mark.parametrize(("url", "destination"), [
    ("https://Example.com/hook", Destination("https", "example.com", 443, None)),
    ("http://example.com/hook", Destination("http", "example.com", 80, None)),
    ("http://example.com:1/hook", Destination("http", "example.com", 1, None)),
    ("http://example.com:65535/hook", Destination("http", "example.com", 65535, None)),
    ("http://8.8.8.8:81/", Destination("http", "8.8.8.8", 81, ipaddress.ip_address("8.8.8.8"))),
    ("https://[2606:4700::1111]/hook",
     Destination("https", "2606:4700::1111", 443, ipaddress.ip_address("2606:4700::1111"))),
    ("http://[::ffff:1.2.3.4]:8/x",
     Destination("http", "::ffff:1.2.3.4", 8, ipaddress.ip_address("::ffff:1.2.3.4"))),
])
def test_read_url_reads_scheme_host_port_and_literal_address(
        url: str, destination: Destination) -> None:
    assert read_url(url) == destination
