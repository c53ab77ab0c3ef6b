"""notifier's settings: each defined once (type, parser, default, help, as a field of ``Settings``),
read from ``NOTIFIER_*`` variables.

``load_settings()`` reads the environment and checks every value at start-up; a bad value raises
``SettingsError`` naming the variable and the problem. Nothing is read at import time.

With no variables at all the service runs on the embedded default: a SQLite file and an
embedded Redis server (started by ``notifier up``) on a Unix socket, both under ``data_dir``.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["PREFIX", "SETTINGS", "Setting", "Settings", "SettingsError", "describe", "load_setting",
           "load_settings"]

PREFIX = "NOTIFIER_"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Seconds between a delivery task's longest run and its soft time limit, and again between the
# soft and the hard one: a few round trips' time to record, give back or hand on its leases.
TASK_TIME_MARGIN = 0.5


class SettingsError(ValueError):
    """A setting has a value notifier cannot use; the message names the variable."""


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a finite number greater than zero")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number, zero or more")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or more")
    return value


def _switch(raw: str) -> bool:
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be on or off (1/0, true/false, yes/no)")


def _connect_seconds(raw: str) -> int:
    value = int(raw)
    if value < 2:
        # libpq (and psycopg after it) turns anything below 2 s into 2 s: say so, not pretend.
        raise ValueError("must be a whole number of seconds, 2 or more")
    return value


def _fraction(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or not 0 <= value < 1:
        raise ValueError("must be at least 0 and below 1")
    return value


def _schedule(raw: str) -> tuple[float, ...]:
    steps = tuple(_positive_float(part) for part in raw.split(",") if part.strip())
    if not steps:
        raise ValueError("needs at least one delay in seconds")
    return steps


def _log_format(raw: str) -> str:
    word = raw.strip().lower()
    if word not in ("text", "json"):
        raise ValueError("must be text or json")
    return word


def _networks(raw: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(part.strip()) for part in raw.split(",") if part.strip())


def _path(raw: str) -> Path:
    return Path(raw).expanduser().resolve()


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _webhook_id_or_none(raw: str) -> str | None:
    raw = raw.strip()
    if len(raw) > 24:
        raise ValueError("must be a webHookId (at most 24 characters), or empty for none")
    return raw or None


def _basic_auth(raw: str) -> tuple[str, ...]:
    pairs = tuple(part.strip() for part in raw.split(",") if part.strip())
    for pair in pairs:
        user, _, password = pair.partition(":")
        if not user or not password:
            raise ValueError("each entry must be user:password, both non-empty") from None
    return pairs


def _fernet_keys(raw: str) -> tuple[str, ...]:
    keys = tuple(part.strip() for part in raw.split(",") if part.strip())
    for key in keys:
        try:
            if len(base64.urlsafe_b64decode(key.encode())) != 32:
                raise ValueError
        except ValueError:
            raise ValueError(
                "each key must be 32 url-safe base64 bytes (make one with: python -c "
                "'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
            ) from None
    return keys


def _embedded_socket(values: Mapping[str, Any]) -> Path:
    return Path(values["data_dir"]) / "redis.sock"


@dataclass(frozen=True)
class Setting:
    """One setting: its attribute name, how to parse it, its default and what it is for."""

    name: str
    parse: Callable[[str], Any]
    default: str | Callable[[Mapping[str, Any]], Any]
    help: str
    # A secret's value is never repeated in an error message (they end up in logs).
    secret: bool = False

    @property
    def env(self) -> str:
        return PREFIX + self.name.upper()




def _setting(parse: Callable[[str], Any], default: str | Callable[[Mapping[str, Any]], Any],
             help: str, *, secret: bool = False) -> Any:
    """A field of ``Settings`` with its definition (see ``Setting``): each setting is written
    once, where its type is."""
    return field(metadata={"parse": parse, "default": default, "help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every setting, parsed and checked. Build with ``load_settings()``.

    Each field is one setting's whole definition: its type, how ``NOTIFIER_<NAME>`` is parsed,
    its default (text, or derived from the settings before it) and its help.
    """

    data_dir: Path = _setting(  # noqa: RUF009 - a dataclasses.field, as each below
        _path, "notifier-data",
        "Folder for the embedded default: the SQLite file and the embedded Redis socket.")
    database_url: str = _setting(
        _text, lambda v: f"sqlite:///{Path(v['data_dir']) / 'notifier.db'}",
        "SQLAlchemy URL of the database, the source of truth (postgresql+psycopg://...).")
    database_timeout: int = _setting(
        _connect_seconds, "3",
        "Seconds to wait for the database to accept a new connection (2 or more), and for "
        "a free connection of a process's pool; then the call fails as unavailable (the API "
        "answers 503, a task retries) instead of hanging on a database that does not answer.")
    broker_url: str = _setting(
        _text, lambda v: f"redis+socket://{_embedded_socket(v)}",
        "Celery broker URL (redis://... or amqp://...). Default: the embedded Redis.")
    redis_url: str = _setting(
        _text, lambda v: f"unix://{_embedded_socket(v)}",
        "Redis for queues, slots and retry times. Default: the embedded Redis.")
    redis_prefix: str = _setting(
        _text, "notifier",
        "Prefix of every Redis key notifier writes, so one Redis can serve several installs.")
    http_connect_timeout: float = _setting(
        _positive_float, "5",
        "Seconds to wait for a webhook's TCP/TLS connection, to each of its addresses in turn, "
        "never past NOTIFIER_HTTP_DEADLINE.")
    http_read_timeout: float = _setting(
        _positive_float, "30",
        "Seconds to wait for each read of a webhook's response.")
    http_deadline: float = _setting(
        _positive_float, "30",
        "Seconds a whole request to a webhook may take, DNS lookup, connects, TLS handshake, "
        "headers and body together, however slowly the receiver trickles them or its name's "
        "DNS server answers; then it is cut and retried.")
    max_response_bytes: int = _setting(
        _positive_int, "65536",
        "Most bytes of a webhook's response that are read; the rest is dropped.")
    retry_schedule: tuple[float, ...] = _setting(
        _schedule, "5,30,120,600,1800,3600,10800,21600,43200",
        "Seconds before each retry, comma separated; the last one repeats until the horizon.")
    retry_jitter: float = _setting(
        _fraction, "0.2",
        "Random spread of each retry delay, as a fraction of it (0.2: +/-20%).")
    retry_horizon: float = _setting(
        _positive_float, str(3 * 24 * 3600),
        "Seconds after ingestion past which a delivery is not retried again: it is dead.")
    retry_after_max: float = _setting(
        _positive_float, str(24 * 3600),
        "Largest Retry-After (seconds) a webhook may ask for; longer asks are cut to this.")
    disable_failing_after: float = _setting(
        _non_negative_float, str(5 * 24 * 3600),
        "Seconds a webhook may fail every attempt (no success since its first failure) "
        "before notifier deactivates it, at its next failed attempt; 0: never.")
    operator_alerts_webhook: str | None = _setting(
        _webhook_id_or_none, "",
        "The webHookId of the operator's operations webhook: it receives notifier's own "
        "alert events (slaBreached, webhookDisabled, webhookRecovered, deliveryExhausted) "
        "about every org's webhooks, besides each org's own operations webhook; those it is "
        "subscribed to. Empty: none.")
    breaker_failures: int = _setting(
        _non_negative_int, "5",
        "Failed attempts in a row after which a webhook's circuit breaker opens: its queue "
        "pauses (nothing is sent to it, its retries wait without being tried) until one "
        "probe delivery, after NOTIFIER_BREAKER_COOLDOWN, succeeds; 0: no breaker.")
    breaker_cooldown: float = _setting(
        _positive_float, "10",
        "Seconds an open circuit breaker waits before its probe; doubled after each failed "
        "probe, up to NOTIFIER_BREAKER_COOLDOWN_MAX.")
    breaker_cooldown_max: float = _setting(
        _positive_float, "600",
        "Most seconds an open circuit breaker waits between probes.")
    allow_private_networks: tuple[Network, ...] = _setting(
        _networks, "",
        "CIDRs a webhook may target besides public addresses, comma separated "
        "(e.g. 127.0.0.0/8 for local tests).")
    webhook_max_headers: int = _setting(
        _positive_int, "50",
        "Most headers one webhook may set (webHookHeaders).")
    webhook_max_header_bytes: int = _setting(
        _positive_int, "8192",
        "Most bytes of one webhook's header names and values, all together.")
    max_allowed_connections: int = _setting(
        _positive_int, "100",
        "Highest maxAllowedConnections a webhook may ask for: each connection can hold a "
        "worker process or thread for a whole request.")
    slot_lease_seconds: float = _setting(
        _positive_float, "120",
        "How long a delivery task may hold one of a webhook's connection slots; "
        "a killed worker's slot comes back after this.")
    batch_size: int = _setting(
        _positive_int, "20",
        "Most deliveries of one webhook that one lease carries over one connection slot; "
        "the leases of several webhooks that share a task start with at most this many times "
        "NOTIFIER_SEND_CONCURRENCY (what the task sends side by side).")
    send_concurrency: int = _setting(
        _positive_int, "4",
        "Most requests one delivery task has open at once: the leases it carries, one webhook's "
        "connection slot each, are sent side by side, each lease's deliveries one after "
        "another over its own connection, so no webhook gets more than its "
        "maxAllowedConnections; 1: one lease after another.")
    batch_time_budget: float = _setting(
        _positive_float, "5",
        "Seconds after which a task takes no further delivery of its batch.")
    batch_linger_ms: int = _setting(
        _non_negative_int, "20",
        "Milliseconds a short batch of a webhook that is already being sent to waits before "
        "it starts, gathering what queues meanwhile (0: start at once).")
    ingest_batch_size: int = _setting(
        _positive_int, "50",
        "Most ingest messages one ingest task takes together, stored in one transaction "
        "(their webhooks queued in one Redis call, or a few) up to "
        "NOTIFIER_MAX_EVENTS_PER_MESSAGE events; messages that arrive while a worker's ingest "
        "task runs gather for its next.")
    ingest_retry_horizon: float = _setting(
        _positive_float, str(6 * 3600),
        "Seconds an event's ingest is retried after transient failures (the database or "
        "Redis away, a deadlock) before it is kept as a dead letter, with the reason, "
        "to replay with 'notifier dead-letters replay'.")
    slow_webhook_ms: int = _setting(
        _positive_int, "1000",
        "A webhook whose slowest recent response took this long (milliseconds) is sent to "
        "by the slow lane (the threads worker), so it cannot hold up the others.")
    fast_lane_leases: int = _setting(
        _positive_int, "1",
        "Most tasks of one webhook in the fast lane at once (each its lease, and up to "
        "NOTIFIER_SEND_CONCURRENCY - 1 more of its slots, taken with it or as its task starts, "
        "sent side by side); its "
        "other leases go by the slow lane however fast it answers, so that a webhook that "
        "turns slow holds at most this many prefork processes. Keep it below the prefork "
        "workers' concurrency.")
    sweep_interval: float = _setting(
        _positive_float, "1",
        "Seconds between beat sweeps: due retries, expired leases, lost work.")
    sla_check_interval: float = _setting(
        _positive_float, "5",
        "Seconds between beat checks for deliveries past their webhook's SLA: a delivery "
        "still undelivered is stamped within this long of its breach.")
    sla_check_batch_size: int = _setting(
        _positive_int, "5000",
        "Deliveries beat's SLA check stamps in one transaction; a check goes on with more "
        "batches while they come back full, for at most half the interval, and leaves the "
        "rest to the next check.")
    log_format: str = _setting(
        _log_format, "text",
        "How the workers write their logs: text, or json (one JSON object a line; each "
        "delivery attempt a line of its own with its event, delivery and webhook ids, "
        "status, latency and outcome, never a payload or a header value).")
    task_events: bool = _setting(
        _switch, "on",
        "Workers send task events (received, started, succeeded), which Flower shows. They "
        "cost about 9% of a busy worker's delivery rate (python -m bench, fan-out 1); off "
        "when nothing watches them.")
    retention_days: int = _setting(
        _non_negative_int, "30",
        "Days an event's payload, its deliveries' enrichment and its attempts' responses and "
        "error messages are kept (InTouch keeps its logs 30); then beat empties them, "
        "keeping every row with its ids, statuses and timestamps. An event with a delivery "
        "not finished yet is kept whole. 0: keep everything for ever.")
    retention_batch_size: int = _setting(
        _positive_int, "200",
        "Most events one retention run empties (with their deliveries and attempts), in one "
        "short transaction; the rest go in the next runs, so a backlog never makes a long "
        "one beside live traffic (small and often: 200 every 2 s moved live p99 by half as "
        "much as 1 000 every 10 s, python -m bench --retention).")
    retention_interval: float = _setting(
        _positive_float, "2",
        "Seconds between beat's retention runs.")
    visibility_timeout: float = _setting(
        _positive_float, "900",
        "Seconds before the Redis broker hands an unacknowledged task to another worker.")
    max_event_bytes: int = _setting(
        _positive_int, str(256 * 1024),
        "Largest event, as JSON bytes: a bigger one is refused (413 over HTTP; stored as "
        "rejected, never delivered, when published through the broker).")
    max_body_bytes: int = _setting(
        _positive_int, str(10 * 1024 * 1024),
        "Largest HTTP request body the API reads (also when sent chunked); a bigger one is "
        "answered 413 before it is read whole.")
    max_events_per_request: int = _setting(
        _positive_int, "1000",
        "Most events one POST /v3/events may carry; a longer list is answered 413.")
    max_events_per_message: int = _setting(
        _positive_int, "1000",
        "Most events one broker message may carry (notifier.publish_many, or a list given "
        "to the notifier.ingest task): the producer client refuses a longer list, and each "
        "event of a longer message is stored rejected (its names only), never delivered. "
        "Also the most events one ingest transaction stores, past one message's.")
    secret_keys: tuple[str, ...] = _setting(
        _fernet_keys, "",
        "Fernet keys sealing webhook header values and signing secrets at rest, comma "
        "separated; the first seals, all open (rotation). Default: data_dir/secret.key.", secret=True)
    ui_session_idle_seconds: float = _setting(
        _positive_float, str(8 * 3600),
        "Seconds an admin-page session may go unused before it ends (sign in again).")
    ui_session_max_seconds: float = _setting(
        _positive_float, str(24 * 3600),
        "Seconds an admin-page session lasts at most from its sign-in, however busy it is.")
    flower_address: str = _setting(
        _text, "127.0.0.1",
        "Address Flower (the Celery monitor) listens on, in the Procfile and `notifier up`; "
        "it shows every task's arguments, so keep it off the public network.")
    flower_basic_auth: tuple[str, ...] = _setting(
        _basic_auth, "",
        "user:password that Flower asks for (HTTP basic auth), comma separated for several; "
        "empty: Flower asks for none (then only bind it to 127.0.0.1).", secret=True)

    @property
    def uses_embedded_redis(self) -> bool:
        return self.redis_url == f"unix://{self.data_dir / 'redis.sock'}"

    @property
    def http_timeout(self) -> tuple[float, float]:
        """The (connect, read) pair every outbound request uses."""
        return (self.http_connect_timeout, self.http_read_timeout)

    @property
    def longest_task_seconds(self) -> float:
        """Worst case of one delivery task: its time budget plus one last whole request."""
        return self.batch_time_budget + self.http_deadline

    @property
    def task_soft_time_limit(self) -> float:
        """Celery's soft time limit of a delivery task: the longest task and a moment for its
        own round trips (claim, record, give back). Past it the task stops where it is and
        hands its leases on, as after any other interruption."""
        return self.longest_task_seconds + TASK_TIME_MARGIN

    @property
    def task_time_limit(self) -> float:
        """Celery's hard time limit of a delivery task: the soft limit and a moment to hand
        on. Past it the process is killed; its leases expire after the slot lease."""
        return self.task_soft_time_limit + TASK_TIME_MARGIN


# Every setting's definition, in the order of the fields that define them (a derived default
# reads the settings before it).
SETTINGS: tuple[Setting, ...] = tuple(Setting(f.name, **f.metadata) for f in fields(Settings))


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check every setting from ``environ`` (default: ``os.environ``)."""
    env = os.environ if environ is None else environ
    known = {setting.env for setting in SETTINGS}
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known
                     and not k.startswith(PREFIX + "TEST_"))
    if unknown:
        raise SettingsError(f"{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        values[setting.name] = _value(setting, env, values)
    settings = Settings(**values)
    _check_together(settings)
    return settings


def load_setting(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One setting that has a default of its own, read and checked as ``load_settings`` does,
    for a process that needs no other (a producer: ``notifier.publish_many``)."""
    (setting,) = (s for s in SETTINGS if s.name == name)
    if callable(setting.default):
        raise ValueError(f"{setting.env} is derived from other settings: use load_settings()")
    return _value(setting, os.environ if environ is None else environ, {})


def _value(setting: Setting, env: Mapping[str, str], values: Mapping[str, Any]) -> Any:
    raw = env.get(setting.env)
    if raw is None:
        if callable(setting.default):
            return setting.default(values)
        raw = setting.default
    try:
        return setting.parse(raw)
    except ValueError as exc:
        shown = "(hidden)" if setting.secret else repr(raw)
        raise SettingsError(f"{setting.env}={shown}: {exc}") from exc


def _check_together(settings: Settings) -> None:
    # slot lease > hard time limit > soft limit > longest task > deadline: the task is killed
    # before its lease can expire, so no second send of a delivery starts while one is open.
    # (The limits are derived from the longest task, which exceeds the deadline by the budget.)
    if settings.slot_lease_seconds <= settings.task_time_limit:
        raise SettingsError(
            f"NOTIFIER_SLOT_LEASE_SECONDS={settings.slot_lease_seconds:g}: must exceed a delivery "
            f"task's hard time limit ({settings.task_time_limit:g}s = NOTIFIER_BATCH_TIME_BUDGET "
            f"+ NOTIFIER_HTTP_DEADLINE + {2 * TASK_TIME_MARGIN:g}s to hand on), or a slow "
            "request would outlive its slot and let one connection too many in")
    if settings.visibility_timeout <= settings.slot_lease_seconds:
        raise SettingsError(
            f"NOTIFIER_VISIBILITY_TIMEOUT={settings.visibility_timeout:g}: must exceed "
            f"NOTIFIER_SLOT_LEASE_SECONDS ({settings.slot_lease_seconds:g}), or Redis would hand "
            "a running task to a second worker")
    if not settings.flower_basic_auth and not _is_loopback(settings.flower_address):
        raise SettingsError(
            f"NOTIFIER_FLOWER_ADDRESS={settings.flower_address}: Flower shows every task and "
            "can stop workers; off 127.0.0.1 it needs NOTIFIER_FLOWER_BASIC_AUTH=user:password")
    if settings.uses_embedded_redis and len(str(settings.data_dir / "redis.sock")) > 100:
        raise SettingsError(
            f"NOTIFIER_DATA_DIR={settings.data_dir}: too long a path for the embedded Redis "
            "socket (Unix sockets allow about 100 characters); choose a shorter folder")


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def describe() -> str:
    """Every setting with its variable, default and help, for ``notifier settings``."""
    lines = []
    for setting in SETTINGS:
        default = "(derived)" if callable(setting.default) else repr(setting.default)
        lines.append(f"{setting.env}  default {default}\n    {setting.help}")
    return "\n".join(lines)

