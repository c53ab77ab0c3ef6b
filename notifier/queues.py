"""Per-webhook queues and connection slots in Redis, each change one atomic Lua call.

Keys, under the configured prefix ``P``:

- ``P:q:<webhook>``   sorted set of waiting delivery ids, scored by time (FIFO-ish)
- ``P:queued``        set of webhooks whose queue is not empty (the sweeper pumps them)
- ``P:limit``         hash webhook -> maxAllowedConnections
- ``P:slots:<webhook>`` sorted set of lease tokens held, scored by expiry
- ``P:leases``        every lease ``webhook|token`` by expiry, with its deliveries in ``P:lease:items``
- ``P:retry``         parked retries ``webhook|delivery`` by due time
- ``P:epoch``         set once; its absence means Redis lost its state and the database rebuilds it

A lease is one connection slot: a delivery task holds it while it POSTs its batch over one
keep-alive connection (topped up, when the task starts, with whatever queued meanwhile), so a
webhook never sees more than its limit of concurrent requests. The database stays the source
of truth; everything here can be rebuilt from it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.exceptions

from notifier.errors import QueueUnavailable

__all__ = ["Lease", "Queues"]

T = TypeVar("T")

# Lua functions shared by the scripts below (each script is one atomic call).
_ENQUEUE_FN = """
local function enqueue(p, wh, limit, items, first)
  redis.call('HSET', p .. ':limit', wh, limit)
  for i = first, #items, 2 do
    redis.call('ZADD', p .. ':q:' .. wh, 'NX', items[i + 1], items[i])
  end
  redis.call('SADD', p .. ':queued', wh)
end
"""

_DISPATCH_FN = """
local function dispatch(p, wh, batch, now, lease)
  local q, slots = p .. ':q:' .. wh, p .. ':slots:' .. wh
  local limit = tonumber(redis.call('HGET', p .. ':limit', wh) or '1')
  -- Expired leases do not count: their holder is presumed dead, and the sweeper re-queues
  -- whatever they carried.
  local free = limit - redis.call('ZCOUNT', slots, now, '+inf')
  local out = {}
  while free > 0 do
    local waiting = redis.call('ZCARD', q)
    if waiting == 0 then break end
    -- Spread the backlog over the free slots so that every allowed connection is used.
    local popped = redis.call('ZPOPMIN', q, math.min(batch, math.ceil(waiting / free)))
    local ids = {}
    for i = 1, #popped, 2 do ids[#ids + 1] = popped[i] end
    local token = tostring(redis.call('INCR', p .. ':seq'))
    local expiry = now + lease
    local joined = table.concat(ids, ',')
    redis.call('ZADD', slots, expiry, token)
    redis.call('ZADD', p .. ':leases', expiry, wh .. '|' .. token)
    redis.call('HSET', p .. ':lease:items', wh .. '|' .. token, joined)
    out[#out + 1] = token
    out[#out + 1] = joined
    free = free - 1
  end
  if redis.call('ZCARD', q) == 0 then redis.call('SREM', p .. ':queued', wh) end
  return out
end
"""

_DISPATCH = _DISPATCH_FN + """
return dispatch(ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
"""

_ENQUEUE = _ENQUEUE_FN + """
enqueue(ARGV[1], ARGV[2], ARGV[3], ARGV, 4)
return 1
"""

# Enqueue, then dispatch: what ingest does for every webhook an event reaches, in one call.
_OFFER = _ENQUEUE_FN + _DISPATCH_FN + """
enqueue(ARGV[1], ARGV[2], ARGV[3], ARGV, 7)
return dispatch(ARGV[1], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]))
"""

_TAKE = """
local p, wh, token = ARGV[1], ARGV[2], ARGV[3]
local batch, now = tonumber(ARGV[4]), tonumber(ARGV[5])
local member = wh .. '|' .. token
local expiry = redis.call('ZSCORE', p .. ':slots:' .. wh, token)
-- A lease that was given back or expired carries nothing: its slot is no longer ours, and the
-- sweeper has re-queued what it held.
if not expiry or tonumber(expiry) < now then return false end
local q = p .. ':q:' .. wh
local items = redis.call('HGET', p .. ':lease:items', member) or ''
local count = 0
for _ in string.gmatch(items, '[^,]+') do count = count + 1 end
if count < batch and redis.call('ZCARD', q) > 0 then
  local popped = redis.call('ZPOPMIN', q, batch - count)
  for i = 1, #popped, 2 do
    items = (items == '') and popped[i] or (items .. ',' .. popped[i])
  end
  redis.call('HSET', p .. ':lease:items', member, items)
  if redis.call('ZCARD', q) == 0 then redis.call('SREM', p .. ':queued', wh) end
end
return items
"""

_RELEASE = """
local p, wh, token = ARGV[1], ARGV[2], ARGV[3]
redis.call('ZREM', p .. ':leases', wh .. '|' .. token)
redis.call('HDEL', p .. ':lease:items', wh .. '|' .. token)
return redis.call('ZREM', p .. ':slots:' .. wh, token)
"""

_PROMOTE = """
local p, now, most = ARGV[1], ARGV[2], tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', p .. ':retry', '-inf', now, 'WITHSCORES', 'LIMIT', 0, most)
local touched, out = {}, {}
for i = 1, #due, 2 do
  local member, score = due[i], due[i + 1]
  local sep = string.find(member, '|', 1, true)
  local wh = string.sub(member, 1, sep - 1)
  redis.call('ZADD', p .. ':q:' .. wh, 'NX', score, string.sub(member, sep + 1))
  redis.call('ZREM', p .. ':retry', member)
  if not touched[wh] then
    touched[wh] = true
    out[#out + 1] = wh
    redis.call('SADD', p .. ':queued', wh)
  end
end
return out
"""

_EXPIRE = """
local p, now = ARGV[1], ARGV[2]
local expired = redis.call('ZRANGEBYSCORE', p .. ':leases', '-inf', '(' .. now)
local touched, out = {}, {}
for _, member in ipairs(expired) do
  local sep = string.find(member, '|', 1, true)
  local wh = string.sub(member, 1, sep - 1)
  redis.call('ZREM', p .. ':leases', member)
  redis.call('ZREM', p .. ':slots:' .. wh, string.sub(member, sep + 1))
  local items = redis.call('HGET', p .. ':lease:items', member)
  redis.call('HDEL', p .. ':lease:items', member)
  if items then
    for id in string.gmatch(items, '[^,]+') do
      redis.call('ZADD', p .. ':q:' .. wh, 'NX', now, id)
    end
  end
  if not touched[wh] then
    touched[wh] = true
    out[#out + 1] = wh
    redis.call('SADD', p .. ':queued', wh)
  end
end
return out
"""


@dataclass(frozen=True)
class Lease:
    """One connection slot of a webhook, and the deliveries it was given to carry."""

    webhook_id: str
    token: str
    delivery_ids: tuple[str, ...]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Queues:
    """The Redis side of delivery: queues, slots, parked retries. Safe to share per process."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self._pid = -1
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    @property
    def client(self) -> redis.Redis:
        if self._client is None or self._pid != os.getpid():
            self._client = redis.Redis.from_url(
                self.url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30)
            self._scripts = {
                name: self._client.register_script(source)
                for name, source in (("dispatch", _DISPATCH), ("take", _TAKE), ("release", _RELEASE),
                                     ("enqueue", _ENQUEUE), ("offer", _OFFER),
                                     ("promote", _PROMOTE), ("expire", _EXPIRE))
            }
            self._pid = os.getpid()
        return self._client

    def _run(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except redis.exceptions.RedisError as exc:
            raise QueueUnavailable(f"redis: {exc}") from exc

    def _script(self, name: str, *args: Any) -> Any:
        self.client  # noqa: B018 - makes this process's client and scripts
        return self._run(lambda: self._scripts[name](args=[self.prefix, *args]))

    def enqueue(self, webhook_id: str, limit: int, items: Iterable[tuple[str, int]]) -> None:
        """Add deliveries ``(id, score)`` to a webhook's queue; ids already there stay put."""
        flat: list[Any] = []
        for delivery_id, score in items:
            flat += [delivery_id, score]
        if flat:
            self._script("enqueue", webhook_id, limit, *flat)

    def offer(self, webhook_id: str, limit: int, items: Iterable[tuple[str, int]], *, batch: int,
              lease_ms: int, now_ms: int) -> list[Lease]:
        """``enqueue`` then ``dispatch``, in one call."""
        flat: list[Any] = []
        for delivery_id, score in items:
            flat += [delivery_id, score]
        return self._leases(webhook_id, self._script(
            "offer", webhook_id, limit, batch, now_ms, lease_ms, *flat))

    def set_limit(self, webhook_id: str, limit: int) -> None:
        self._run(lambda: self.client.hset(f"{self.prefix}:limit", webhook_id, limit))

    def dispatch(self, webhook_id: str, *, batch: int, lease_ms: int, now_ms: int) -> list[Lease]:
        """Take every free slot of a webhook that has work waiting; one lease per slot."""
        return self._leases(webhook_id,
                            self._script("dispatch", webhook_id, batch, now_ms, lease_ms))

    @staticmethod
    def _leases(webhook_id: str, flat: list[Any]) -> list[Lease]:
        return [Lease(webhook_id, _text(flat[i]), tuple(_text(flat[i + 1]).split(",")))
                for i in range(0, len(flat), 2)]

    def take(self, lease: Lease, *, batch: int, now_ms: int) -> Lease | None:
        """The lease as its task starts: topped up to ``batch`` with what queued meanwhile.

        A task waits in the broker after its lease is dispatched; deliveries queued for the
        webhook in that time ride along instead of each waiting for a task of its own. None
        when the lease is no longer held (given back, expired, or Redis lost it).
        """
        items = self._script("take", lease.webhook_id, lease.token, batch, now_ms)
        if items is None:
            return None
        return Lease(lease.webhook_id, lease.token, tuple(i for i in _text(items).split(",") if i))

    def release(self, lease: Lease) -> bool:
        """Give a slot back; False when it had already expired (the sweeper took it back)."""
        return bool(self._script("release", lease.webhook_id, lease.token))

    def park(self, webhooks_and_ids: Sequence[tuple[str, str, int]]) -> None:
        """Park ``(webhook, delivery, due_ms)`` until due; the sweeper brings them back."""
        if webhooks_and_ids:
            mapping = {f"{wh}|{delivery}": due for wh, delivery, due in webhooks_and_ids}
            self._run(lambda: self.client.zadd(f"{self.prefix}:retry", mapping))

    def promote_due(self, now_ms: int, most: int = 10_000) -> list[str]:
        """Move due parked retries into their queues; returns the webhooks touched."""
        return [_text(w) for w in self._script("promote", now_ms, most)]

    def expire_leases(self, now_ms: int) -> list[str]:
        """Take back slots whose holder outlived its lease and re-queue what they carried."""
        return [_text(w) for w in self._script("expire", now_ms)]

    def queued_webhooks(self) -> list[str]:
        return sorted(_text(w) for w in self._run(
            lambda: self.client.smembers(f"{self.prefix}:queued")))

    def claim_epoch(self) -> bool:
        """True the first time after Redis lost (or never had) notifier's state."""
        return bool(self._run(lambda: self.client.set(f"{self.prefix}:epoch", "1", nx=True)))

    def forget_epoch(self) -> None:
        """Undo ``claim_epoch`` when the rebuild that followed it failed, so it runs again."""
        self._run(lambda: self.client.delete(f"{self.prefix}:epoch"))

    def waiting(self, webhook_id: str) -> int:
        return int(self._run(lambda: self.client.zcard(f"{self.prefix}:q:{webhook_id}")))

    def held(self, webhook_id: str, now_ms: int) -> int:
        return int(self._run(lambda: self.client.zcount(
            f"{self.prefix}:slots:{webhook_id}", now_ms, "+inf")))

    def ping(self) -> bool:
        return bool(self._run(lambda: self.client.ping()))
