"""The HTTP sender: one method, ``send``, plus the rules that classify what came back.

``Sender`` is the seam: tests swap in a fake that records requests. ``HttpSender`` is the real
one: one keep-alive ``requests.Session`` per process, connect and read timeouts, TLS verified,
no redirects followed, the response read capped, and destinations checked against private
address ranges before any byte is sent.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Protocol
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

from notifier.errors import DestinationNotAllowed

__all__ = [
    "RETRYABLE",
    "RETRYABLE_STATUSES",
    "HttpSender",
    "OutboundRequest",
    "Result",
    "Sender",
    "Verdict",
    "check_destination",
    "classify",
    "retry_after_seconds",
]

# Errors on the wire that may pass on a later try.
RETRYABLE: tuple[type[Exception], ...] = (
    requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError)
# Statuses that mean "not now" rather than "never": timeouts, conflicts, too early, too many.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Verdict(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"


@dataclass(frozen=True)
class OutboundRequest:
    url: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Result:
    """What one POST gave: a status, or the error that stopped it; never raised."""

    latency_ms: int
    status_code: int | None = None
    body_excerpt: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    error: BaseException | None = None


class Sender(Protocol):
    def send(self, request: OutboundRequest) -> Result: ...


def classify(result: Result) -> Verdict:
    """2xx delivered; 408/409/425/429, 5xx and wire errors retried; anything else failed."""
    if result.error is not None:
        return Verdict.RETRY if isinstance(result.error, RETRYABLE) else Verdict.FAILED
    code = result.status_code or 0
    if 200 <= code < 300:
        return Verdict.DELIVERED
    if code >= 500 or code in RETRYABLE_STATUSES:
        return Verdict.RETRY
    # 3xx too: redirects are not followed, so the webhook's URL is wrong.
    return Verdict.FAILED


def retry_after_seconds(result: Result, now: float) -> float | None:
    """The ``Retry-After`` of a response, in seconds from ``now``, if it has a usable one."""
    value = next((v for k, v in result.headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdecimal():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def check_destination(url: str, allowed: Sequence[Network], *, resolve: bool = True) -> None:
    """Refuse a URL that is not http(s) or resolves to a non-public address outside ``allowed``.

    With ``resolve=False`` (when a webhook is saved) only literal addresses and ``localhost``
    are checked, so saving a webhook never waits on DNS; the sender checks again, resolving,
    before every first POST to a host.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DestinationNotAllowed(f"{url!r}: not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DestinationNotAllowed(f"{url!r}: only http and https URLs with a host are allowed")
    if not resolve:
        host = parts.hostname.lower()
        if host == "localhost" or host.endswith(".localhost"):
            host = "127.0.0.1"
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            return  # a name: resolved and checked when sent to
    else:
        try:
            infos = socket.getaddrinfo(parts.hostname, port or 443, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as exc:
            raise DestinationNotAllowed(f"{parts.hostname!r} does not resolve: {exc}") from exc
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        if address.is_global or any(address in network for network in allowed):
            continue
        raise DestinationNotAllowed(
            f"{parts.hostname!r} resolves to {address}, a private address; allow its range "
            "in NOTIFIER_ALLOW_PRIVATE_NETWORKS to send there")


class HttpSender:
    """POSTs with one pooled session; every request bounded in time and in what it reads."""

    def __init__(
        self,
        *,
        timeout: tuple[float, float],
        max_response_bytes: int,
        allowed_networks: Sequence[Network] = (),
        pool_size: int = 16,
    ) -> None:
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.allowed_networks = tuple(allowed_networks)
        self.session = requests.Session()
        # Reading proxy settings from the environment on every call is 18% of a POST's CPU here.
        self.session.trust_env = False
        adapter = requests.adapters.HTTPAdapter(
            pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._checked: dict[str, float] = {}

    def _check(self, url: str) -> None:
        # A destination stays checked for a minute: resolving on every POST would cost more
        # than the POST on a keep-alive connection.
        try:
            host = urlsplit(url).netloc
        except ValueError as exc:
            raise DestinationNotAllowed(f"{url!r}: not a valid URL ({exc})") from exc
        now = time.monotonic()
        if self._checked.get(host, 0.0) > now:
            return
        check_destination(url, self.allowed_networks)
        self._checked[host] = now + 60.0

    def send(self, request: OutboundRequest) -> Result:
        started = time.perf_counter()
        try:
            self._check(request.url)
            response = self.session.post(
                request.url, data=request.body, headers=dict(request.headers),
                timeout=self.timeout, allow_redirects=False, stream=True, verify=True)
            try:
                excerpt = response.raw.read(self.max_response_bytes, decode_content=True)
            finally:
                response.close()
        except (requests.RequestException, urllib3.exceptions.HTTPError, DestinationNotAllowed,
                OSError) as exc:
            return Result(latency_ms=_elapsed_ms(started), error=exc)
        return Result(latency_ms=_elapsed_ms(started), status_code=response.status_code,
                      body_excerpt=excerpt or b"", headers=dict(response.headers))

    def close(self) -> None:
        self.session.close()


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)
