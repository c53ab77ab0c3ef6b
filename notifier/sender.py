"""The HTTP sender: one method, ``send``, plus the rules that classify what came back.

``Sender`` is the seam: tests swap in a fake that records requests. ``HttpSender`` is the real
one: one keep-alive ``requests.Session`` per process, TLS verified, no redirects followed, the
response read capped, and every request ended at a whole-request deadline.

Where it may send is decided at the socket, not beside it: a URL is read once, with the HTTP
client's own parser (``read_url``), and every new connection resolves its host once, checks
every address (``check_address``) and connects to the address it checked (``_GuardedConnection``),
so neither a second parser nor a second DNS answer can take a request elsewhere.

The whole-request deadline bounds a request from its DNS lookup to the last byte read: a
watchdog thread cuts the socket (``_Watchdog``), a lookup, which has no socket to cut, is
waited for in a thread of a small pool only until the deadline (``_Lookups``), and each connect
waits no longer than the deadline leaves (``_Guard.connect``).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import heapq
import http.cookiejar
import ipaddress
import math
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
import requests.adapters
import urllib3.exceptions
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager
from urllib3.util import parse_url

from notifier.errors import DeadlineExceeded, DestinationNotAllowed

__all__ = [
    "GONE_STATUS",
    "RETRYABLE",
    "RETRYABLE_STATUSES",
    "Cutter",
    "Destination",
    "HttpSender",
    "OutboundRequest",
    "Resolver",
    "Result",
    "Sender",
    "Verdict",
    "check_address",
    "check_destination",
    "classify",
    "read_url",
    "retry_after_seconds",
]

# Errors on the wire that may pass on a later try.
RETRYABLE: tuple[type[Exception], ...] = (
    requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError, DeadlineExceeded)
# Statuses that mean "not now" rather than "never": timeouts, conflicts, too early, too many.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})
GONE_STATUS = 410

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# ``socket.getaddrinfo``'s shape: (host, port, family, type) -> [(family, type, proto, name,
# sockaddr)]. The seam through which tests answer DNS as they like (rebinding included).
Resolver = Callable[..., Sequence[tuple[Any, ...]]]
# Address blocks that ``is_global`` (Python 3.11's) lets through but that no webhook may reach.
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REFUSED = (*(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "198.18.0.0/15", "224.0.0.0/4", "255.255.255.255/32",
    "::ffff:0:0/96",    # IPv4-mapped
    "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
    "64:ff9b:1::/48",   # local-use NAT64 (RFC 8215): a site's own translator, to its own IPv4
    "fec0::/10",        # site-local (deprecated, still routed inside some sites)
    "ff00::/8")), _IPV4_COMPATIBLE)
# A host name as DNS spells it (letters, digits, '-', '_' in labels), nothing a parser could
# decode into something else (percent escapes, IDNA, dots of other scripts).
_HOST_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
                        r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?")
# WHATWG reads a host whose last label is a number as an IPv4 address: so do we.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")


class Verdict(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"
    # The endpoint says it is gone for good (410): its webhook is deactivated at once, as
    # Standard Webhooks advises, and the delivery held with what else it would have sent.
    GONE = "gone"


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
    """2xx delivered; 408/409/425/429, 5xx and wire errors retried; 410 gone; anything else
    failed."""
    if result.error is not None:
        return Verdict.RETRY if isinstance(result.error, RETRYABLE) else Verdict.FAILED
    code = result.status_code or 0
    if 200 <= code < 300:
        return Verdict.DELIVERED
    if code >= 500 or code in RETRYABLE_STATUSES:
        return Verdict.RETRY
    if code == GONE_STATUS:
        return Verdict.GONE
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


# ---------------------------------------------------------------- where a webhook may send


@dataclass(frozen=True)
class Destination:
    """A webhook URL as the HTTP client reads it: ``address`` is set when the host is a literal."""

    scheme: str
    host: str
    port: int
    address: Address | None


def read_url(url: str) -> Destination:
    """Read ``url`` as urllib3 will, refusing anything another parser could read otherwise.

    Refused: anything but ASCII without white space or control characters, backslashes,
    userinfo, percent escapes or other non-DNS characters in the host, a host or port that
    ``urlsplit`` reads differently, and IPv4 literals in any form but canonical dotted quads
    (``inet_aton`` takes ``2130706433``, ``0x7f000001``, ``0177.0.0.1`` and ``127.1`` too).
    """
    def refuse(problem: str) -> DestinationNotAllowed:
        return DestinationNotAllowed(f"{url!r}: {problem}")

    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise refuse("must be printable ASCII without white space (IDNA-encode the host)")
    if "\\" in url:
        raise refuse("must not contain a backslash")
    try:
        parts = parse_url(url)
        other = urlsplit(url)
        other_port = other.port
    except (ValueError, urllib3.exceptions.LocationParseError) as exc:
        raise refuse(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.host:
        raise refuse("only http and https URLs with a host are allowed")
    if parts.auth is not None or other.username is not None or "@" in (other.netloc or ""):
        raise refuse("must not carry a user name or password (use webHookHeaders)")
    host = parts.host.lower()
    port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    if host.strip("[]") != (other.hostname or "") or parts.port != other_port:
        raise refuse("its host or port reads differently to different URL parsers")
    if not 0 < port < 65536:
        raise refuse("the port must be between 1 and 65535")
    if host.startswith("["):
        if "%" in host:
            raise refuse("an IPv6 address must not carry a zone id")
        try:
            address: Address | None = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise refuse("not a valid IPv6 address") from None
        return Destination(parts.scheme, host[1:-1], port, address)
    if not _HOST_NAME.fullmatch(host):
        raise refuse("the host must be a DNS name or an IP address")
    if _NUMERIC_LABEL.fullmatch(host.rstrip(".").rsplit(".", 1)[-1]):
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise refuse("an IPv4 address must be written as four decimal numbers "
                         "(such as 192.0.2.10)") from None
        return Destination(parts.scheme, host, port, address)
    return Destination(parts.scheme, host, port, None)


# Reading a URL costs 20 us, 5% of a keep-alive POST's CPU here; a worker sends to the same
# few URLs again and again, and the reading depends on the text alone.
_read_sent_url = functools.lru_cache(maxsize=4096)(read_url)


def check_address(address: Address, allowed: Sequence[Network]) -> None:
    """Refuse an address that is not public, unless a network of ``allowed`` holds it.

    Beyond ``is_global``: 0/8, 100.64/10, 198.18/15, multicast and broadcast, IPv4-compatible,
    IPv4-mapped and IPv4-translated IPv6, local-use NAT64, site-local, and NAT64 or 6to4
    addresses wrapping an IPv4 address refused itself.
    """
    if any(address in network for network in allowed):
        return
    inner = _wrapped_ipv4(address)
    if inner is not None and any(inner in network for network in allowed):
        return
    if not address.is_global or any(address in network for network in _REFUSED):
        raise DestinationNotAllowed(
            f"{address} is a private address (or reserved: not public); allow its range in "
            "NOTIFIER_ALLOW_PRIVATE_NETWORKS to send there")
    if inner is not None:
        check_address(inner, allowed)


def _wrapped_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def check_destination(url: str, allowed: Sequence[Network], *, resolve: bool = True,
                      resolver: Resolver | None = None) -> Destination:
    """Refuse a URL that is not read one way only, or that reaches a non-public address outside
    ``allowed``; returns how it reads.

    With ``resolve=False`` (when a webhook is saved) a name is not resolved, so saving never
    waits on DNS: the sender resolves it, once, for each connection it opens, and checks the
    addresses then. ``localhost`` names are refused at once.
    """
    destination = read_url(url)
    if destination.address is not None:
        check_address(destination.address, allowed)
        return destination
    name = destination.host.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        check_address(ipaddress.IPv4Address("127.0.0.1"), allowed)
    if resolve:
        for address in _resolve(resolver or _getaddrinfo, destination.host, destination.port):
            check_address(address, allowed)
    return destination


def _getaddrinfo(host: str, port: int, family: int = 0,
                 type: int = socket.SOCK_STREAM) -> Sequence[tuple[Any, ...]]:
    # Looked up on each call, not bound at import, so that a process may install its own.
    return socket.getaddrinfo(host, port, family, type)


def _resolve(resolver: Resolver, host: str, port: int,
             timer: _Timer | None = None) -> list[Address]:
    """The addresses ``host`` resolves to, looked up (if ``timer``) only until its deadline."""
    try:
        if timer is None:
            infos = resolver(host, port, 0, socket.SOCK_STREAM)
        else:
            infos = _LOOKUPS.resolve(resolver, host, port, timer)
    except (OSError, UnicodeError) as exc:
        raise DestinationNotAllowed(f"{host!r} does not resolve: {exc}") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise DestinationNotAllowed(f"{host!r} does not resolve to any address")
    return addresses


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- the connection is the check


@dataclass(frozen=True)
class _Guard:
    """What every new connection of one sender obeys: the networks it may reach, and its DNS."""

    allowed: tuple[Network, ...]
    resolver: Resolver

    def connect(self, conn: HTTPConnection) -> socket.socket:
        """Resolve the connection's host once, check every address, connect to a checked one."""
        host, port = conn._dns_host.rstrip("."), conn.port or 80
        timer = _WATCHDOG.timer()
        if timer is not None and timer.seconds is None:
            timer = None  # armed for its cutter alone: no deadline to bound the waits by
        # An address written in the URL asks no DNS server (getaddrinfo reads it at once): it
        # is resolved in this thread, sparing it the lookup threads' hand-off (~0.1 ms).
        try:
            addresses = _resolve(self.resolver, host, port, None if _is_address(host) else timer)
        except _LookupsBusy as exc:
            raise urllib3.exceptions.NewConnectionError(
                conn, f"{host!r} was not looked up: {exc}") from None
        for address in addresses:
            try:
                check_address(address, self.allowed)
            except DestinationNotAllowed as exc:
                raise DestinationNotAllowed(f"{host!r} resolves to {exc}") from None
        connect_timeout = conn.timeout if isinstance(conn.timeout, int | float) else None
        failure: Exception | None = None
        for address in addresses:
            # A connect has no socket the watchdog cuts yet: each waits no longer than the
            # deadline leaves, so that a name with many addresses that never accept holds the
            # request until its deadline, not for each address's connect timeout in turn.
            timeout, bounded_by = connect_timeout, None
            if timer is not None:
                left = timer.when - time.monotonic()
                if left <= 0:
                    raise _late_connect(host, timer) from failure
                if timeout is None or left < timeout:
                    timeout, bounded_by = left, timer
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for option in conn.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(timeout)
                if conn.source_address:
                    sock.bind(conn.source_address)
                sock.connect((str(address), port))
                # The peer is what was reached: check it too, whatever the resolver said.
                peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
                if peer != address:
                    raise DestinationNotAllowed(f"connected to {peer}, not {address}")
                check_address(peer, self.allowed)
            except DestinationNotAllowed:
                sock.close()
                raise
            except TimeoutError as exc:
                sock.close()
                if bounded_by is not None:
                    raise _late_connect(host, bounded_by) from exc
                failure = urllib3.exceptions.ConnectTimeoutError(
                    conn, f"Connection to {host} ({address}) timed out (connect timeout="
                    f"{timeout})")
                failure.__cause__ = exc
            except OSError as exc:
                sock.close()
                failure = urllib3.exceptions.NewConnectionError(
                    conn, f"Failed to establish a new connection to {address}: {exc}")
                failure.__cause__ = exc
            else:
                return sock
        raise failure or OSError(f"no address of {host!r} to connect to")


def _late_connect(host: str, timer: _Timer) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"the connect to {host!r} took longer than the request's whole-request deadline "
        f"({timer.seconds:g}s, NOTIFIER_HTTP_DEADLINE)")


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _GuardedMixin:
    """A urllib3 connection whose socket comes from its ``_Guard`` and is watched by the
    deadline of the request it serves, new or pooled."""

    def __init__(self, *args: Any, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard

    def _new_conn(self) -> socket.socket:
        sock = self._guard.connect(self)  # type: ignore[arg-type]
        # Watched from here, so that the deadline bounds a TLS handshake too; through a
        # duplicate, because wrapping the socket in TLS detaches this object from it.
        _WATCHDOG.watch(sock.dup(), owned=True)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        connection: Any = self
        if connection.sock is None:  # plain HTTP connects lazily; connect now, to watch it
            connection.connect()
        _WATCHDOG.watch(connection.sock)
        super().request(*args, **kwargs)  # type: ignore[misc]
        if _QUICKACK is not None:
            # A receiver that writes an answer's head and body apart with Nagle's algorithm on
            # (Python's http.server, the JDK's HttpServer) sends the body only once the head is
            # acknowledged, and Linux delays that acknowledgement on a kept-alive connection:
            # 40 ms a request, a batch of 20 then took 0.9 s instead of 0.05 s. Asked now, the
            # acknowledgement of what arrives next goes at once. Only a speed-up: a socket that
            # refuses it (cut meanwhile by the deadline, say) fails where the answer is read.
            with contextlib.suppress(OSError):
                connection.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


class _GuardedHTTPConnection(_GuardedMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedMixin, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedPoolManager(PoolManager):
    def __init__(self, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}
        self._guard = guard

    def _new_pool(self, scheme: str, host: str, port: int,
                  request_context: dict[str, Any] | None = None) -> HTTPConnectionPool:
        pool = super()._new_pool(scheme, host, port, request_context)
        pool.conn_kw["guard"] = self._guard
        return pool


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, guard: _Guard, **kwargs: Any) -> None:
        self._guard = guard  # before super().__init__, which makes the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        self.poolmanager = _GuardedPoolManager(
            self._guard, num_pools=connections, maxsize=maxsize, block=block, **pool_kwargs)


# ---------------------------------------------------------------- the whole-request deadline


class _Timer:
    __slots__ = ("cut", "cutter", "done", "fired", "owned", "seconds", "sock", "when")

    def __init__(self, seconds: float | None, cutter: Cutter | None) -> None:
        self.seconds = seconds
        self.when = math.inf if seconds is None else time.monotonic() + seconds
        self.sock: socket.socket | None = None
        self.owned = False  # whether ``sock`` is the timer's own duplicate, to close
        self.done = False
        self.fired = False  # its deadline passed
        self.cutter = cutter
        self.cut = False  # its cutter cut it

    def forget_sock(self) -> None:
        if self.owned and self.sock is not None:
            self.sock.close()
        self.sock, self.owned = None, False


class _Watchdog:
    """One daemon thread a process that cuts (shuts down) the socket of a request whose deadline
    has passed: a per-read timeout cannot bound a receiver that trickles a byte a second.

    Arming costs a lock and a heap push; disarmed timers stay in the heap until their time
    and are dropped then, in batches, so the thread wakes at most every ``_BATCH`` seconds.
    """

    _BATCH = 0.05

    def __init__(self) -> None:
        self._reset()
        # A forked child has the heap but not the thread: it starts its own when first used.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._wake = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Timer]] = []
        self._count = 0
        self._thread: threading.Thread | None = None
        self._local = threading.local()

    def arm(self, seconds: float | None) -> _Timer:
        """A timer for the calling thread's request: it cuts the request ``seconds`` from now
        (never, with None), or when the thread's cutter cuts (``Cutter``)."""
        timer = _Timer(seconds, self.cutter())
        with self._wake:
            if timer.cutter is not None:
                timer.cutter.timers.add(timer)
                # Cut already (between the sender's look at its cutter and here): its socket
                # is cut as soon as it has one, before anything is sent on it.
                timer.cut = timer.cutter.cut
            if seconds is not None:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="notifier-deadlines",
                                                    daemon=True)
                    self._thread.start()
                self._count += 1
                heapq.heappush(self._heap, (timer.when, self._count, timer))
                if self._heap[0][2] is timer:
                    self._wake.notify()
        self._local.timer = timer
        return timer

    def timer(self) -> _Timer | None:
        """The armed timer of the calling thread's request, if it has one."""
        timer: _Timer | None = getattr(self._local, "timer", None)
        return timer

    def cutter(self) -> Cutter | None:
        """The cutter the calling thread joined, if it joined one."""
        cutter: Cutter | None = getattr(self._local, "cutter", None)
        return cutter

    def join(self, cutter: Cutter | None) -> None:
        self._local.cutter = cutter

    def cut(self, cutter: Cutter) -> None:
        """Cut the open requests of ``cutter``'s threads (their sockets shut down) and, from
        now on, any they start."""
        with self._wake:
            cutter.cut = True
            for timer in cutter.timers:
                timer.cut = True
                if timer.sock is not None:
                    _cut(timer.sock)

    def watch(self, sock: socket.socket | None, *, owned: bool = False) -> None:
        """The socket the calling thread's armed request uses now (cut at once if late);
        ``owned``: a duplicate, closed when the timer lets go of it."""
        timer: _Timer | None = getattr(self._local, "timer", None)
        if timer is None or sock is None:
            if owned and sock is not None:
                sock.close()
            return
        with self._wake:
            timer.forget_sock()
            timer.sock, timer.owned = sock, owned
            if timer.fired or timer.cut:
                _cut(sock)

    def disarm(self, timer: _Timer) -> None:
        self._local.timer = None
        with self._wake:
            timer.done = True
            timer.forget_sock()
            if timer.cutter is not None:
                timer.cutter.timers.discard(timer)

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now + self._BATCH:
                    when, _, timer = self._heap[0]
                    if not timer.done and when > now:
                        break  # never cut early; disarmed ones go a little early, in a batch
                    heapq.heappop(self._heap)
                    if not timer.done:
                        timer.fired = True
                        if timer.sock is not None:
                            _cut(timer.sock)
                self._wake.wait(self._heap[0][0] - now if self._heap else None)


def _cut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown would tear down
    # its SSL object under the thread that is reading with it. A blocked read then returns.
    with contextlib.suppress(OSError):  # closed meanwhile: nothing left to cut
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()


class Cutter:
    """Cuts the requests of the threads that joined it (``joined``), as a passed deadline cuts
    one: those open at once (their sockets shut down), and any they start later before it is
    sent. For a task that sends from several threads and, stopped from outside (its time
    limit), must leave no request of its own open behind it.

    A request that a cut ends gives ``requests.Timeout(reason)``. What no socket holds (a DNS
    lookup, a connect) goes on until the request's deadline, and is cut as soon as it has a
    socket.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.cut = False
        self.timers: set[_Timer] = set()  # those armed, of the threads that joined it

    @contextlib.contextmanager
    def joined(self) -> Iterator[None]:
        """While the block runs, the calling thread's requests are the cutter's to cut."""
        _WATCHDOG.join(self)
        try:
            yield
        finally:
            _WATCHDOG.join(None)

    def cut_all(self) -> None:
        """Cut the requests of the threads that joined, now and from now on."""
        _WATCHDOG.cut(self)

    def error(self) -> requests.Timeout:
        return requests.Timeout(self.reason)


class _LookupsBusy(Exception):
    """Every lookup thread of the process is taken: a new lookup is refused, not queued."""


class _Lookup:
    __slots__ = ("answer", "done", "error", "host", "port", "resolver")

    def __init__(self, resolver: Resolver, host: str, port: int) -> None:
        self.resolver, self.host, self.port = resolver, host, port
        self.done = threading.Event()
        self.answer: Sequence[tuple[Any, ...]] = ()
        self.error: BaseException | None = None


class _Lookups:
    """A few daemon threads a process that run DNS lookups, so that a request waits for one only
    until its deadline.

    ``getaddrinfo`` cannot be interrupted, and a name's own DNS server (a tenant's) may hold it
    for the system resolver's whole timeout (glibc: 5 s a try, per attempt and name server),
    whatever the request's deadline. A lookup given up on finishes in its thread and its answer
    is dropped. At most ``limit`` lookups run at once, each in a thread of its own (started
    when first needed, then kept): past that a lookup fails at once, never queued behind
    lookups that hang, and abandoned lookups never pile up.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._reset()
        # A forked child has the counts but not the threads: it starts its own.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Lookup] = queue.SimpleQueue()
        self._running = 0  # lookups handed to a thread and not finished, abandoned or not
        self._threads = 0

    @property
    def running(self) -> int:
        """Lookups under way, abandoned by their requests or not."""
        with self._lock:
            return self._running

    def resolve(self, resolver: Resolver, host: str, port: int,
                timer: _Timer) -> Sequence[tuple[Any, ...]]:
        """``resolver``'s answer for ``host``, waited for until ``timer``'s deadline."""
        # A lookup that outlasts the deadline leaves its answer unknown, so there is nothing to
        # refuse: a timeout, retried like any other, with nothing sent; the next attempt's
        # lookup decides (a refused answer then fails the delivery for good). Waiting on for an
        # answer to refuse would give a tenant's DNS server back the hold on the worker that
        # this bound takes away.
        left = timer.when - time.monotonic()
        if left <= 0:
            raise _late_lookup(host, timer)
        lookup = _Lookup(resolver, host, port)
        with self._lock:
            if self._running >= self.limit:
                raise _LookupsBusy(
                    f"all {self.limit} DNS lookups this process may run at once are under way "
                    "(names whose DNS server is slow to answer, left behind by their requests' "
                    "deadlines)")
            self._running += 1
            if self._threads < self._running:  # so that every lookup finds a thread at once
                self._threads += 1
                threading.Thread(target=self._serve, name="notifier-dns", daemon=True).start()
        self._jobs.put(lookup)
        if not lookup.done.wait(left):
            raise _late_lookup(host, timer)
        if lookup.error is not None:
            raise lookup.error
        return lookup.answer

    def _serve(self) -> None:
        while True:
            lookup = self._jobs.get()
            try:
                lookup.answer = lookup.resolver(lookup.host, lookup.port, 0, socket.SOCK_STREAM)
            except BaseException as exc:  # handed to the waiter, if one is left
                lookup.error = exc
            finally:
                with self._lock:
                    self._running -= 1
                lookup.done.set()


def _late_lookup(host: str, timer: _Timer) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"the DNS lookup of {host!r} took longer than the request's whole-request deadline "
        f"({timer.seconds:g}s, NOTIFIER_HTTP_DEADLINE)")


# A slow lane's threads (16 in the Procfile) each abandon at most one lookup a deadline, and a
# hung lookup ends after the resolver's timeout (~30 s with glibc's defaults): 64 leaves room.
_LOOKUPS = _Lookups(limit=64)


# ---------------------------------------------------------------- the sender


class _KeepNoCookie(http.cookiejar.DefaultCookiePolicy):
    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


_KEEP_NO_COOKIE = _KeepNoCookie()


class HttpSender:
    """POSTs with one pooled session; every request bounded in time and in what it reads."""

    def __init__(
        self,
        *,
        timeout: tuple[float, float],
        max_response_bytes: int,
        deadline: float | None = None,
        allowed_networks: Sequence[Network] = (),
        pool_size: int = 16,
        resolver: Resolver | None = None,
    ) -> None:
        self.timeout = timeout
        self.deadline = deadline
        self.max_response_bytes = max_response_bytes
        self.allowed_networks = tuple(allowed_networks)
        self.session = requests.Session()
        # Reading proxy settings from the environment on every call is 18% of a POST's CPU here.
        self.session.trust_env = False
        # One session for every webhook: a cookie one answered with would go to the next
        # request to its host, another webhook's, another tenant's maybe.
        self.session.cookies.set_policy(_KEEP_NO_COOKIE)
        # Certificates are verified, against the host name (SNI too), never the address the
        # connection checked and reached. A test may point this at its own CA bundle.
        self.session.verify = True
        adapter = _GuardedAdapter(_Guard(self.allowed_networks, resolver or _getaddrinfo),
                                  pool_connections=pool_size, pool_maxsize=pool_size,
                                  max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._adapter = adapter

    def send(self, request: OutboundRequest) -> Result:
        started = time.perf_counter()
        cutter = _WATCHDOG.cutter()
        if cutter is not None and cutter.cut:  # its task stopped: nothing more goes out
            return Result(latency_ms=0, error=cutter.error())
        timer = (_WATCHDOG.arm(self.deadline)
                 if self.deadline is not None or cutter is not None else None)
        try:
            # A stored URL is read again: it may predate today's rules. A literal address is
            # refused before anything else; a name's addresses are checked by the connection
            # itself, when it is made.
            destination = _read_sent_url(request.url)
            if destination.address is not None:
                check_address(destination.address, self.allowed_networks)
            response = self._post(request)
            try:
                # urllib3 (>= 2.6) decompresses at most what is asked: a gzip bomb stops here.
                excerpt = response.raw.read(self.max_response_bytes, decode_content=True)
            finally:
                response.close()
        except (requests.RequestException, urllib3.exceptions.HTTPError, DestinationNotAllowed,
                DeadlineExceeded, OSError) as exc:
            # A refusal stays a refusal (never retried), even one found after the deadline
            # fired (the peer of a connect that outlasted it); a lookup that outlasted the
            # deadline is a DeadlineExceeded of its own, which names the lookup.
            late = (None if isinstance(exc, DestinationNotAllowed | DeadlineExceeded)
                    else self._late(timer))
            if late is not None:
                late.__cause__ = exc
            return Result(latency_ms=_elapsed_ms(started), error=late or exc)
        finally:
            if timer is not None:
                _WATCHDOG.disarm(timer)
        late = self._late(timer)
        if late is not None:
            return Result(latency_ms=_elapsed_ms(started), error=late)
        return Result(latency_ms=_elapsed_ms(started), status_code=response.status_code,
                      body_excerpt=excerpt or b"", headers=dict(response.headers))

    def _post(self, request: OutboundRequest) -> requests.Response:
        """The POST, handed to the session's adapter itself. What ``Session.request`` adds on
        the way (settings merged from the session and the environment, its cookies, hooks,
        redirects) is nothing a webhook's POST uses, and cost 30% of a POST's CPU here:
        requests checks each setting against protocols, slow to check on Python 3.11. Nor does
        a redirect get read whole, past the cap, to note where it led (``Session.send`` did).
        The session's own headers (its User-Agent) still go, under the request's."""
        headers = CaseInsensitiveDict(self.session.headers)
        headers.update(request.headers)
        prepared = requests.PreparedRequest()
        prepared.prepare_method("POST")
        prepared.prepare_url(request.url, None)
        prepared.prepare_headers(headers)
        prepared.prepare_body(request.body, None)
        verify = self.session.verify  # True; a test may point it at its own CA bundle
        return self._adapter.send(prepared, stream=True, timeout=self.timeout,
                                  verify=True if verify is None else verify, cert=None,
                                  proxies={})

    def _late(self, timer: _Timer | None) -> Exception | None:
        """Why the request was cut, if it was: its deadline passed, or its cutter cut it."""
        if timer is None or not (timer.fired or timer.cut):
            return None
        if not timer.fired:
            assert timer.cutter is not None
            return timer.cutter.error()
        return DeadlineExceeded(
            f"the request took longer than its whole-request deadline ({self.deadline:g}s, "
            "NOTIFIER_HTTP_DEADLINE)")

    def close(self) -> None:
        self.session.close()


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)
