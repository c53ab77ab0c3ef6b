"""Per-webhook queues and connection slots in Redis, each change one atomic Lua call.

Keys, under the configured prefix ``P``:

- ``P:q:<webhook>``   sorted set of waiting delivery ids, scored by time (FIFO-ish)
- ``P:r:<webhook>``   the same for its replayed deliveries, scored by ingestion: drawn from only
                      while ``P:q`` is empty, and never into the last free slot of a webhook of
                      several, so that a replay (100 000 old deliveries) rides the webhook's
                      slots behind its live traffic instead of ahead of it
- ``P:queued``        set of webhooks whose queue is not empty (the sweeper pumps them)
- ``P:limit``         hash webhook -> maxAllowedConnections
- ``P:slots:<webhook>`` sorted set of lease tokens held, scored by expiry; after Redis lost its
                      state, also ``claim-<claim token>``: the slot of a claim the database
                      holds live, rebuilt from it (``hold_claims``)
- ``P:leases``        every lease ``webhook|token`` by expiry, with its deliveries in ``P:lease:items``
- ``P:unstarted``     hash webhook -> token of its one short lease whose task has not started
                      (for at most 10 s: then it is presumed lost and another may be dispatched)
- ``P:boarding``      hash webhook -> ``<token>|<riders>``: its fast-lane lease whose task has not
                      started (for at most 10 s, as above), and how many leases ride with it;
                      what queues meanwhile waits to board it as it starts (see take)
- ``P:latency``       hash webhook -> its recent slowest response (ms), which picks its lane
- ``P:failing``       hash webhook -> the time of its first failed attempt since its last success
- ``P:breaker:runs`` hash webhook -> its consecutive failed attempts (its circuit breaker)
- ``P:breaker:open`` hash webhook -> ``<next probe ms>|<cool-down ms>|<probe lease token>`` while
                      its breaker is open: its queue is paused, nothing is claimable but one
                      probe delivery once the cool-down is over (see ``Breaker``)
- ``P:retry``         parked retries ``webhook|delivery`` by due time
- ``P:recheck``       deliveries under another task's claim ``webhook|delivery``, by when it
                      would run out: looked at again then, in case its holder died
- ``P:epoch``         set once the state is whole; its absence means Redis lost its state (or
                      never had it): no slot is granted until the database has rebuilt it
- ``P:rebuilding``    held (with an expiry) by the one process rebuilding the state
- ``P:metrics``       hash of counters the workers add to (``notifier.metrics``)

A lease is one connection slot: a delivery task holds it while it POSTs its batch over one
keep-alive connection (topped up, when the task starts, with whatever queued meanwhile), so a
webhook never sees more than its limit of concurrent requests. Leases are full batches while
the queue holds enough; a webhook has at most one short lease waiting to start, which gathers
what queues meanwhile, so a steady trickle rides in few tasks instead of one task per delivery.
A webhook that answers slowly gets its leases marked ``slow``: they go to the slow lane (a
threads worker) and cannot take the prefork processes every other webhook needs. So do a
webhook's leases beyond its first ``fast_leases`` live ones, so that a webhook that turns slow
all at once holds at most that many prefork processes, never all of them; except that up to
``riders`` more, dispatched with a fast-lane one, ride in its task and its process (``rides``):
a fast webhook's burst is sent side by side in the fast lane, not one lease a task by the slow
lane's one process. What queues for a webhook while its fast-lane lease waits to start waits for
it too, as much as could still ride with it, and boards it as it starts (``boarding``): a burst
that begins with a lone event rides as well, and so does a busy webhook's share of its slots. A
lease that shares its task with other webhooks' moves out instead, to a task of its own with
what waited for it (``Queues.take_many``).

The database stays the source of truth; everything here can be rebuilt from it.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis
import redis.exceptions

from notifier.errors import QueueUnavailable, StateLost

__all__ = ["BREAKER_STATES", "Breaker", "Lease", "QueueState", "Queues", "Released", "Report",
           "Taken"]

T = TypeVar("T")

# Lua functions shared by the scripts below (each script is one atomic call).
_ENQUEUE_FN = """
local function enqueue(p, wh, kind, limit, items, first, last)
  redis.call('HSET', p .. ':limit', wh, limit)
  for i = first, last or #items, 2 do
    redis.call('ZADD', p .. ':' .. kind .. ':' .. wh, 'NX', items[i + 1], items[i])
  end
  redis.call('SADD', p .. ':queued', wh)
end
"""

# A webhook's circuit breaker: nil when closed; else when its next probe may go, its cool-down,
# and the token of the probe's lease ('' while none is out).
_BREAKER_FN = """
local function breaker(p, wh)
  local open = redis.call('HGET', p .. ':breaker:open', wh)
  if not open then return nil end
  local at, cool, probe = string.match(open, '^(%d+)|(%d+)|(.*)$')
  return tonumber(at), tonumber(cool), probe
end
local function set_open(p, wh, at, cool, probe)
  redis.call('HSET', p .. ':breaker:open', wh, at .. '|' .. cool .. '|' .. probe)
end
"""

# A lease made (its slot held until `expiry`, carrying the deliveries `joined`), or forgotten
# (1 if its slot was still held); and whether a lease was dispatched less than 10 s ago (a
# token begins with its dispatch time): one whose task has not started by then is presumed lost.
# A new lease's token, and its deliveries: up to `n` popped from the head of a queue, or those a
# lease carries (`items`, comma separated).
_LEASE_FN = """
local function new_token(p, now, suffix)
  -- The time in it keeps a token unique when Redis is flushed and ':seq' starts again: a
  -- task still out with a lease from before must never give back a newer lease's slot.
  return now .. '-' .. redis.call('INCR', p .. ':seq') .. suffix
end
local function pop(key, n)
  local popped, ids = redis.call('ZPOPMIN', key, n), {}
  for i = 1, #popped, 2 do ids[#ids + 1] = popped[i] end
  return ids
end
local function split(items)
  local ids = {}
  for id in string.gmatch(items, '[^,]+') do ids[#ids + 1] = id end
  return ids
end
local function hold_lease(p, wh, token, expiry, joined)
  redis.call('ZADD', p .. ':slots:' .. wh, expiry, token)
  redis.call('ZADD', p .. ':leases', expiry, wh .. '|' .. token)
  redis.call('HSET', p .. ':lease:items', wh .. '|' .. token, joined)
end
local function drop_lease(p, wh, token)
  redis.call('ZREM', p .. ':leases', wh .. '|' .. token)
  redis.call('HDEL', p .. ':lease:items', wh .. '|' .. token)
  return redis.call('ZREM', p .. ':slots:' .. wh, token)
end
local function recent(token, now)
  return now - tonumber(string.match(token, '^%d+')) < 10000
end
"""

_DISPATCH_FN = _BREAKER_FN + _LEASE_FN + """
-- How many of a webhook's live leases carry live deliveries (a replay lease's token holds an 'R').
local function live_leases(slots, now)
  local n = 0
  for _, held in ipairs(redis.call('ZRANGEBYSCORE', slots, now, '+inf')) do
    if not string.find(held, 'R', 1, true) then n = n + 1 end
  end
  return n
end

local function dispatch(p, wh, batch, now, lease, slow_ms, linger, fast, riders)
  -- A Redis that lost its state grants nothing (false) until it is rebuilt: the requests of the
  -- database's live claims may still be open, and only the rebuild counts them.
  if redis.call('EXISTS', p .. ':epoch') == 0 then return false end
  local q, r, slots = p .. ':q:' .. wh, p .. ':r:' .. wh, p .. ':slots:' .. wh
  local limit = tonumber(redis.call('HGET', p .. ':limit', wh) or '1')
  -- Expired leases do not count: their holder is presumed dead, and the sweeper re-queues
  -- whatever they carried.
  local live = redis.call('ZCOUNT', slots, now, '+inf')
  local free = limit - live
  -- An open breaker pauses the queue: nothing goes but one probe of one delivery, once the
  -- cool-down is over and while no other probe is out (a probe whose lease expired is lost).
  local probe_at, cooldown, probing = breaker(p, wh)
  if probe_at then
    local out_since = probing ~= '' and redis.call('ZSCORE', slots, probing)
    if now < probe_at or (out_since and tonumber(out_since) >= now) then
      free = 0
    else
      free, batch = math.min(free, 1), 1
    end
  end
  -- A webhook never measured (new, or Redis lost its state) is presumed slow until it answers.
  local latency = redis.call('HGET', p .. ':latency', wh)
  local slow = (not latency or tonumber(latency) >= slow_ms) and 1 or 0
  -- Past its first `fast` live leases in the fast lane (their tokens end in 'f') a webhook's
  -- leases go by the slow lane however fast it answered: if it turns slow at once, it holds
  -- at most `fast` of the prefork processes, never all of them. But up to `riders` more leases
  -- dispatched with a fast one here ride in its task (lane 2), sent side by side with it in the
  -- one prefork process it holds: a fast webhook's burst stays in the fast lane.
  local fast_live = 0
  if slow == 0 then
    for _, held in ipairs(redis.call('ZRANGEBYSCORE', slots, now, '+inf')) do
      if string.sub(held, -1) == 'f' then fast_live = fast_live + 1 end
    end
  end
  -- Leases that could still board its fast-lane lease waiting to start (see take): a lease that
  -- would go by the slow lane waits for it instead, while it leaves that many slots free or no
  -- more than their batches waits. So a burst after a lone event, or the slots a busy webhook's
  -- slow-lane leases give back, go side by side in that lease's process too.
  local room = 0
  if slow == 0 and not probe_at then
    local boarding = redis.call('HGET', p .. ':boarding', wh)
    if boarding then
      local token, rode = string.match(boarding, '^([^|]+)|(%d+)$')
      local expiry = redis.call('ZSCORE', slots, token)
      if expiry and tonumber(expiry) >= now and recent(token, now) then
        room = riders - tonumber(rode)
      end
    end
  end
  -- Replays leave a webhook of several slots one for live deliveries, which would otherwise
  -- wait behind a replay's full batches (a probe is one slot in all: it may be a replay).
  local reserve = (limit > 1 and not probe_at) and 1 or 0
  local out = {}
  local led, rode = false, 0  -- a fast lease dispatched in this call; leases riding with it
  local leader  -- the last such lease of live deliveries (it may board more)
  while free > 0 do
    -- Live deliveries first; replays only while none waits (one more ZCARD, then only).
    local from, waiting = q, redis.call('ZCARD', q)
    if waiting == 0 then
      if free <= reserve then break end
      from, waiting = r, redis.call('ZCARD', r)
    end
    if waiting == 0 then break end
    local size = math.min(batch, waiting)
    local wait = 0
    -- (A short replay lease is the tail of its replay: nothing gathers into it, see take.)
    if size < batch and from == q then
      -- A short batch: one at a time per webhook waits to start, and its task gathers what
      -- queues meanwhile (see take). Beside a live slot it waits a moment first to gather more.
      -- One whose task has not started 10 s after it was dispatched (the token begins with that
      -- time) is presumed lost to gathering; it keeps its slot until its lease expires.
      local unstarted = redis.call('HGET', p .. ':unstarted', wh)
      if unstarted and recent(unstarted, now) then break end
      -- Beside replays only, nothing is gathered by waiting: it goes at once.
      if live > 0 and live_leases(slots, now) > 0 then wait = linger end
    end
    local lane = 1
    if slow == 0 and fast_live < fast then
      lane, led = 0, true
    elseif slow == 0 and led and rode < riders then
      -- It rides in the task of the fast lease before it, and starts with it: no linger of
      -- its own (client.send_leases keeps it with that lease, lingering or not).
      lane, rode, wait = 2, rode + 1, 0
    elseif from == q and room > 0 and (free <= room or waiting <= room * batch) then
      break  -- it waits to board the fast-lane lease waiting to start
    end
    if lane ~= 1 then fast_live = fast_live + 1 end
    local ids = pop(from, size)
    -- A replay lease's token holds an 'R' (see take); a prefork process's ends in 'f' (a lease
    -- riding with another's too: it holds that process).
    local token = new_token(p, now, (from == r and 'R' or '') .. (lane ~= 1 and 'f' or ''))
    local joined = table.concat(ids, ',')
    hold_lease(p, wh, token, now + lease, joined)
    if size < batch and from == q then redis.call('HSET', p .. ':unstarted', wh, token) end
    if lane == 0 and from == q then
      -- (Those that could board it ride with it now; an earlier one's room is no longer ours.)
      leader, room = token, 0
      redis.call('HSET', p .. ':boarding', wh, token .. '|0')
    end
    if probe_at then set_open(p, wh, probe_at, cooldown, token) end
    out[#out + 1] = token
    out[#out + 1] = joined
    out[#out + 1] = lane
    out[#out + 1] = wait
    free = free - 1
    live = live + 1
  end
  if leader and rode > 0 then redis.call('HSET', p .. ':boarding', wh, leader .. '|' .. rode) end
  if redis.call('ZCARD', q) == 0 and redis.call('ZCARD', r) == 0 then
    redis.call('SREM', p .. ':queued', wh)
  end
  return out
end
"""

# Forget that a lease has not started, when it starts, ends or expires.
_STARTED_FN = """
local function started(p, wh, token)
  if redis.call('HGET', p .. ':unstarted', wh) == token then
    redis.call('HDEL', p .. ':unstarted', wh)
  end
  local boarding = redis.call('HGET', p .. ':boarding', wh)
  if boarding and string.sub(boarding, 1, #token + 1) == token .. '|' then
    redis.call('HDEL', p .. ':boarding', wh)
  end
end
"""

_DISPATCH = _DISPATCH_FN + """
return dispatch(ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
                tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]))
"""

_ENQUEUE = _ENQUEUE_FN + """
enqueue(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV, 5)
return 1
"""

# Enqueue, then dispatch: what ingest does for every webhook its events reach, in one call.
# Each webhook is its id, its limit and its count of deliveries, then their ids and scores; its
# reply is the leases dispatched, or false while Redis has lost its state.
_OFFER = _ENQUEUE_FN + _DISPATCH_FN + """
local p, batch, now, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local slow_ms, linger, fast = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local riders = tonumber(ARGV[8])
local out, i = {}, 9
while i <= #ARGV do
  local wh, last = ARGV[i], i + 2 + 2 * tonumber(ARGV[i + 2])
  enqueue(p, wh, 'q', ARGV[i + 1], ARGV, i + 3, last)
  out[#out + 1] = dispatch(p, wh, batch, now, lease, slow_ms, linger, fast, riders)
  i = last + 1
end
return out
"""

# Put deliveries back at the head of a webhook's queue, before all that waits there, in the
# order given: what a lease carried was taken from the head, so it is older than the rest, and
# sending it behind a backlog made a request cut by a crash wait for the whole backlog.
_TO_HEAD_FN = """
local function to_head(p, wh, ids, fallback)
  local q = p .. ':q:' .. wh
  local head = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
  local top = head[2] and tonumber(head[2]) or fallback
  for i, id in ipairs(ids) do redis.call('ZADD', q, 'NX', top - (#ids - i + 1), id) end
  redis.call('SADD', p .. ':queued', wh)
end
"""

# The lease as its task starts, topped up with what queued meanwhile (see Queues.take_many),
# how many failures in a row it may have before it stops (0: no limit), the leases that
# boarded it (their tokens and deliveries), and the leases dispatched as it started (as
# dispatch gives them), to send at once. A fast-lane lease that what queued waits for (see
# dispatch) boards it (`mode` 1: its task holds no other webhook), or moves out to a task of its
# own with it (2: the task's other leases are other webhooks'; its slot is given back, what it
# carried goes back to the head of the queue, and the queue is dispatched: a fast-lane lease
# and those riding with it), or neither (0); what still waits then is dispatched.
_TAKE_FN = _STARTED_FN + _DISPATCH_FN + _TO_HEAD_FN + """
local function take(p, wh, token, batch, now, trip, mode, lease, slow_ms, linger, fast, riders)
  local member, slots = wh .. '|' .. token, p .. ':slots:' .. wh
  local expiry = redis.call('ZSCORE', slots, token)
  -- A lease that was given back or expired carries nothing: its slot is no longer ours, and
  -- the sweeper has re-queued what it held.
  if not expiry or tonumber(expiry) < now then return false end
  -- A fast-lane lease that what queued was left to board (see dispatch): how many more may,
  -- as long as dispatch leaves them to it.
  local room = -1
  local boarding = redis.call('HGET', p .. ':boarding', wh)
  if boarding and string.sub(boarding, 1, #token + 1) == token .. '|' and recent(token, now) then
    room = riders - tonumber(string.sub(boarding, #token + 2))
  end
  started(p, wh, token)
  local q, r = p .. ':q:' .. wh, p .. ':r:' .. wh
  local items = redis.call('HGET', p .. ':lease:items', member) or ''
  local probe_at, _, probing = breaker(p, wh)
  if probe_at then
    -- The breaker opened since this lease was dispatched: only its probe goes (as it is, one
    -- failure allowed); any other lease gives what it carries back to the head of the queue.
    if probing == token then return {items, 1, {}, {}} end
    local ids = split(items)
    if #ids > 0 then to_head(p, wh, ids, now) end
    redis.call('HSET', p .. ':lease:items', member, '')
    return {'', 1, {}, {}}
  end
  local allowed = 0
  if trip > 0 then
    allowed = math.max(1, trip - tonumber(redis.call('HGET', p .. ':breaker:runs', wh) or '0'))
  end
  local count = #split(items)
  if room >= 0 and mode == 2 and redis.call('ZCARD', q) > batch - count
      and redis.call('ZCOUNT', slots, now, '+inf')
          < tonumber(redis.call('HGET', p .. ':limit', wh) or '1') then
    -- More waits than it takes, and a slot is free: it moves out, to a task of its own with
    -- those riding with it.
    local ids = split(items)
    drop_lease(p, wh, token)
    if #ids > 0 then to_head(p, wh, ids, now) end
    return {false, allowed, {}, dispatch(p, wh, batch, now, lease, slow_ms, linger, fast, riders)
                                or {}}
  end
  local topped = false
  -- Topped up from its own queue only: a live lease takes no replays (they would hold up the
  -- live deliveries after it), a replay lease no live delivery (it would wait behind replays).
  local from = string.find(token, 'R', 1, true) and r or q
  if count < batch and redis.call('ZCARD', from) > 0 then
    local popped = redis.call('ZPOPMIN', from, batch - count)
    for i = 1, #popped, 2 do
      items = (items == '') and popped[i] or (items .. ',' .. popped[i])
      count = count + 1
    end
    topped = true
  end
  if topped then
    redis.call('HSET', p .. ':lease:items', member, items)
    if redis.call('ZCARD', q) == 0 and redis.call('ZCARD', r) == 0 then
      redis.call('SREM', p .. ':queued', wh)
    end
  end
  -- What waited for it boards it once the task's every lease is topped up (see board).
  return {items, allowed, {}, {}}, room >= 0 and {wh, room, mode, expiry} or nil
end

-- What queued boards a lease as it starts: up to `room` more leases, in the webhook's free
-- slots, ride in its task (their tokens end in 'f': they hold its process), and expire with it.
-- What waited for it and did not board goes as dispatch sends it (by the slow lane).
local function board(p, wh, room, mode, expiry, batch, now, lease, slow_ms, linger, fast, riders)
  local q, slots = p .. ':q:' .. wh, p .. ':slots:' .. wh
  local boarded = {}
  if room > 0 and mode == 1 then
    local free = tonumber(redis.call('HGET', p .. ':limit', wh) or '1')
                 - redis.call('ZCOUNT', slots, now, '+inf')
    for _ = 1, math.min(room, free) do
      local ids = pop(q, batch)
      if #ids == 0 then break end
      local more = new_token(p, now, 'f')
      local joined = table.concat(ids, ',')
      hold_lease(p, wh, more, expiry, joined)
      boarded[#boarded + 1] = more
      boarded[#boarded + 1] = joined
    end
  end
  if redis.call('ZCARD', q) > 0 then
    return boarded, dispatch(p, wh, batch, now, lease, slow_ms, linger, fast, riders) or {}
  end
  if redis.call('ZCARD', p .. ':r:' .. wh) == 0 then redis.call('SREM', p .. ':queued', wh) end
  return boarded, {}
end
"""

_TAKE = _TAKE_FN + """
local p, batch, now, trip = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, slow_ms, linger = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local fast, riders = tonumber(ARGV[8]), tonumber(ARGV[9])
local out, boarding = {}, {}
for i = 10, #ARGV, 3 do
  local reply, waited = take(p, ARGV[i], ARGV[i + 1], batch, now, trip, tonumber(ARGV[i + 2]),
                             lease, slow_ms, linger, fast, riders)
  out[#out + 1] = reply
  if waited then boarding[#boarding + 1] = {#out, waited} end
end
-- Once every lease is topped up (a short one riding with a fast-lane lease takes what queued
-- before anything boards that lease).
for _, each in ipairs(boarding) do
  local wh, room, mode, expiry = unpack(each[2])
  out[each[1]][3], out[each[1]][4] = board(p, wh, room, mode, expiry, batch, now, lease, slow_ms,
                                           linger, fast, riders)
end
return out
"""

# A slot rebuilt from a live claim of the database, named after the claim's token (see
# Queues.hold_claims). Never the name of a lease (those begin with a digit).
_CLAIM_SLOT_FN = """
local function claim_slot(claim)
  return 'claim-' .. claim
end
"""

_HOLD_CLAIMS = _CLAIM_SLOT_FN + _LEASE_FN + """
local p, now = ARGV[1], tonumber(ARGV[2])
for i = 3, #ARGV, 4 do
  local wh, claim, expiry, items = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if tonumber(expiry) > now then
    hold_lease(p, wh, claim_slot(claim), expiry, items)
  end
end
return 1
"""

# Whether each lease is still held (present and not expired).
_HOLDING = """
local p, now = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV, 2 do
  local expiry = redis.call('ZSCORE', p .. ':slots:' .. ARGV[i], ARGV[i + 1])
  out[#out + 1] = (expiry and tonumber(expiry) >= now) and 1 or 0
end
return out
"""

# Give slots back, noting how long each webhook's slowest response of the batch took (jumping
# up at once, easing down by 30% per faster batch), since when it has been failing (the first
# failed attempt after its last success) and its run of failures for its circuit breaker; then,
# every slot given back, dispatch what waits. A task's claim token ('': none) also gives back
# the slot rebuilt from its claim, if Redis lost its state meanwhile. Each reply: whether the
# slot was still held, the webhook's failing mark (0: none), whether Redis lost its state
# (nothing dispatched), what became of its breaker (0: nothing, 1: it opened, 2: it closed after
# being open), then the dispatched leases.
_RELEASE = _STARTED_FN + _DISPATCH_FN + _CLAIM_SLOT_FN + """
local p, batch, now, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local slow_ms, linger, fast = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local riders = tonumber(ARGV[8])
local trip, cool, cool_max = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local marks, runs = p .. ':failing', p .. ':breaker:runs'
local given = {}
for i = 12, #ARGV, 7 do
  local wh, token, took = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local delivered, failing = ARGV[i + 3] == '1', tonumber(ARGV[i + 4])
  local failures = tonumber(ARGV[i + 6])
  started(p, wh, token)
  local held = drop_lease(p, wh, token)
  if ARGV[i + 5] ~= '' then drop_lease(p, wh, claim_slot(ARGV[i + 5])) end
  if took >= 0 then
    local before = tonumber(redis.call('HGET', p .. ':latency', wh) or '-1')
    redis.call('HSET', p .. ':latency', wh, math.max(took, math.floor(before * 0.7)))
  end
  if delivered then
    if failing > 0 then redis.call('HSET', marks, wh, failing) else redis.call('HDEL', marks, wh) end
  elseif failing > 0 then
    redis.call('HSETNX', marks, wh, failing)
  end
  -- The circuit breaker: a success closes it (the failures after it start the next run); a
  -- run of `trip` failures opens it; its probe failing opens it again for twice as long.
  local breaker_change = 0
  local probe_at, cooldown, probing = breaker(p, wh)
  local run = 0
  if delivered then
    if failures > 0 then redis.call('HSET', runs, wh, failures) else redis.call('HDEL', runs, wh) end
    run = failures
    if probe_at then
      redis.call('HDEL', p .. ':breaker:open', wh)
      probe_at, breaker_change = nil, 2
    end
  elseif failures > 0 then
    run = redis.call('HINCRBY', runs, wh, failures)
  end
  if trip == 0 then
    -- The breaker is off: one open from before lets all go again (at its next probe at the
    -- latest: then it is given back here).
    if probe_at then redis.call('HDEL', p .. ':breaker:open', wh) end
  elseif probe_at then
    if probing == token then
      if failures > 0 then
        cooldown = math.min(cooldown * 2, cool_max)
        set_open(p, wh, now + cooldown, cooldown, '')
      else
        -- The probe asked nothing (its delivery was done or held meanwhile): another goes now.
        set_open(p, wh, probe_at, cooldown, '')
      end
    end
  elseif run >= trip then
    set_open(p, wh, now + cool, cool, '')
    breaker_change = 1
  end
  given[#given + 1] = {wh, held, breaker_change}
end
-- Then what waits is dispatched, once every slot is given back: a task's leases of one webhook
-- (one in the fast lane and those riding with it) free their prefork process together.
local out = {}
for _, back in ipairs(given) do
  local wh, held, breaker_change = back[1], back[2], back[3]
  local released = dispatch(p, wh, batch, now, lease, slow_ms, linger, fast, riders)
  local lost = 0
  if not released then released, lost = {}, 1 end
  table.insert(released, 1, breaker_change)
  table.insert(released, 1, lost)
  table.insert(released, 1, tonumber(redis.call('HGET', marks, wh) or '0'))
  table.insert(released, 1, held)
  out[#out + 1] = released
end
return out
"""

# Due retries take their place in their queues by their due time; due re-checks go back to the
# head (they were taken from it, by a task whose claim they waited for).
_PROMOTE = _TO_HEAD_FN + """
local p, now, most = ARGV[1], ARGV[2], tonumber(ARGV[3])
local touched, out, rechecked = {}, {}, {}
local function touch(wh)
  if not touched[wh] then
    touched[wh] = true
    out[#out + 1] = wh
  end
end
for _, parked in ipairs({p .. ':retry', p .. ':recheck'}) do
  local due = redis.call('ZRANGEBYSCORE', parked, '-inf', now, 'WITHSCORES', 'LIMIT', 0, most)
  for i = 1, #due, 2 do
    local member, score = due[i], due[i + 1]
    local sep = string.find(member, '|', 1, true)
    local wh, id = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
    redis.call('ZREM', parked, member)
    touch(wh)
    if parked == p .. ':retry' then
      redis.call('ZADD', p .. ':q:' .. wh, 'NX', score, id)
      redis.call('SADD', p .. ':queued', wh)
    else
      rechecked[wh] = rechecked[wh] or {}
      table.insert(rechecked[wh], id)
    end
  end
end
for wh, ids in pairs(rechecked) do to_head(p, wh, ids, tonumber(now)) end
return out
"""

# Leases whose holder outlived them: their slots back, and what they carried to the head of its
# queue (the earliest lease first).
_EXPIRE = _STARTED_FN + _TO_HEAD_FN + """
local p, now = ARGV[1], ARGV[2]
local expired = redis.call('ZRANGEBYSCORE', p .. ':leases', '-inf', '(' .. now)
local touched, out = {}, {}
for k = #expired, 1, -1 do
  local member = expired[k]
  local sep = string.find(member, '|', 1, true)
  local wh = string.sub(member, 1, sep - 1)
  redis.call('ZREM', p .. ':leases', member)
  redis.call('ZREM', p .. ':slots:' .. wh, string.sub(member, sep + 1))
  started(p, wh, string.sub(member, sep + 1))
  local items = redis.call('HGET', p .. ':lease:items', member)
  redis.call('HDEL', p .. ':lease:items', member)
  local ids = {}
  for id in string.gmatch(items or '', '[^,]+') do ids[#ids + 1] = id end
  to_head(p, wh, ids, tonumber(now))
  if not touched[wh] then
    touched[wh] = true
    out[#out + 1] = wh
  end
end
return out
"""

_CLAIM_REBUILD = """
if redis.call('EXISTS', ARGV[1] .. ':epoch') == 1 then return 0 end
return redis.call('SET', ARGV[1] .. ':rebuilding', '1', 'NX', 'PX', ARGV[2]) and 1 or 0
"""

_REBUILT = """
redis.call('SET', ARGV[1] .. ':epoch', '1')
redis.call('DEL', ARGV[1] .. ':rebuilding')
return 1
"""

_COUNT = """
for i = 2, #ARGV, 2 do redis.call('HINCRBY', ARGV[1] .. ':metrics', ARGV[i], ARGV[i + 1]) end
return 1
"""

# What the queues hold now, for the metrics: parked retries, live leases, measured webhooks at
# or over the slow lane's threshold, each waiting queue's length, and parked re-checks.
_STATE = """
local p, now, slow_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local waiting = {}
for _, wh in ipairs(redis.call('SMEMBERS', p .. ':queued')) do
  local count = redis.call('ZCARD', p .. ':q:' .. wh) + redis.call('ZCARD', p .. ':r:' .. wh)
  if count > 0 then
    waiting[#waiting + 1] = wh
    waiting[#waiting + 1] = count
  end
end
local slow = 0
for _, ms in ipairs(redis.call('HVALS', p .. ':latency')) do
  if tonumber(ms) >= slow_ms then slow = slow + 1 end
end
return {redis.call('ZCARD', p .. ':retry'), redis.call('ZCOUNT', p .. ':leases', now, '+inf'),
        slow, waiting, redis.call('ZCARD', p .. ':recheck')}
"""


@dataclass(frozen=True)
class Lease:
    """One connection slot of a webhook, and the deliveries it was given to carry."""

    webhook_id: str
    token: str
    delivery_ids: tuple[str, ...]
    # The webhook answered slowly of late (or was never measured): send it by the slow lane.
    slow: bool = False
    # Wait this long before starting, gathering what queues meanwhile (a short batch beside a
    # busy slot).
    linger_ms: int = 0
    # A further slot of a webhook, dispatched with its fast-lane lease (the one before it): it
    # rides in that lease's task, which sends both side by side in the one prefork process it
    # holds (``client.send_leases``); sent without it, it goes by the slow lane.
    rides: bool = False
    # Failed attempts in a row after which the lease stops, its webhook's circuit breaker about
    # to open (or the lease its probe: 1); 0: no limit. Known once taken (``Queues.take_many``).
    failures_allowed: int = 0


@dataclass(frozen=True)
class Taken:
    """A task's leases as it starts (``Queues.take_many``)."""

    # Each lease given, topped up; None where it is no longer held (or moved out).
    leases: list[Lease | None]
    # Each lease's boarders: further slots of its webhook taken for what waited to board it.
    # They ride in the task (``Lease.rides``).
    boarded: list[tuple[Lease, ...]]
    # Leases dispatched as the task started, to send at once (those of a lease that moved out,
    # or what waited to board one and did not).
    dispatched: list[Lease]

    @property
    def held(self) -> list[Lease]:
        """The leases the task holds now, each followed by its boarders."""
        return [held for lease, more in zip(self.leases, self.boarded, strict=True) if lease
                for held in (lease, *more)]


@dataclass(frozen=True)
class Report:
    """What a lease's batch did, told when its slot is given back: the slowest response picks
    the webhook's lane, and its failures say since when the webhook has been failing."""

    # The slowest response, in milliseconds (-1: no request made).
    took_ms: int = -1
    # Whether one of its deliveries succeeded.
    delivered: bool = False
    # When the first failed attempt after its last success was made (0: none).
    failing_since_ms: int = 0
    # Its failed attempts after its last success (all of them, if none succeeded): they add to
    # the webhook's run of failures, which opens its circuit breaker.
    failures: int = 0


@dataclass(frozen=True)
class Released:
    """A slot given back: whether it was still held, since when the webhook has been failing
    (its first failed attempt after its last success; 0: it is not), and the leases
    dispatched after it."""

    held: bool
    failing_since_ms: int
    leases: list[Lease]
    # Redis lost its state and is not rebuilt yet: nothing was dispatched (see StateLost).
    state_lost: bool = False
    # The webhook's circuit breaker opened with this release (its queue is paused), or closed
    # after being open (its probe, or a lease from before, succeeded: the webhook recovered).
    breaker_opened: bool = False
    breaker_closed: bool = False


# A circuit breaker's states, as the API and the metrics name them.
BREAKER_STATES = ("closed", "open", "halfOpen")


@dataclass(frozen=True)
class Breaker:
    """A webhook's circuit breaker as Redis holds it (``Queues.breakers``).

    ``closed``: its queue goes as usual. ``open``: paused, nothing is sent until
    ``next_probe_at_ms``. ``halfOpen``: the cool-down is over: one probe delivery may go, or is
    out; its success closes the breaker, its failure opens it again for twice the cool-down.
    """

    state: str = "closed"
    consecutive_failures: int = 0
    next_probe_at_ms: int | None = None
    cooldown_ms: int | None = None


@dataclass(frozen=True)
class QueueState:
    """What the queues hold at one moment (``Queues.state``)."""

    waiting: dict[str, int]
    parked: int
    slots_held: int
    slow: int
    rechecks: int


def _kind(replay: bool) -> str:
    """The key of a webhook's live queue (``q``) or of its replays (``r``)."""
    return "r" if replay else "q"


def _ids(joined: bytes | str) -> tuple[str, ...]:
    return tuple(i for i in _text(joined).split(",") if i)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _state_lost(webhook_id: str) -> StateLost:
    return StateLost(f"webhook {webhook_id}: Redis lost its state; nothing is dispatched until "
                     "it is rebuilt from the database")


# Most deliveries, and webhooks, ``Queues.offer_many`` queues in one call: Redis does nothing
# else meanwhile, and dispatching a webhook's queue costs it about 30-60 us.
OFFER_CALL_ITEMS = 2000
OFFER_CALL_WEBHOOKS = 100


class Queues:
    """The Redis side of delivery: queues, slots, parked retries. Safe to share per process."""

    def __init__(self, url: str, prefix: str, *, slow_ms: int = 1000, linger_ms: int = 0,
                 fast_leases: int = 1, riders: int = 0, breaker_failures: int = 0,
                 breaker_cooldown_ms: int = 10_000,
                 breaker_cooldown_max_ms: int = 600_000) -> None:
        self.url = url
        self.prefix = prefix
        self.slow_ms = slow_ms
        self.linger_ms = linger_ms
        # Most live leases of one webhook in the fast lane (NOTIFIER_FAST_LANE_LEASES).
        self.fast_leases = fast_leases
        # Most further leases of a webhook dispatched with a fast-lane one that ride in its task
        # (NOTIFIER_SEND_CONCURRENCY - 1: it sends them side by side with it).
        self.riders = riders
        # A webhook's circuit breaker opens after this many failed attempts in a row (0: never),
        # for this cool-down, doubled after each failed probe up to the most
        # (NOTIFIER_BREAKER_FAILURES, NOTIFIER_BREAKER_COOLDOWN, NOTIFIER_BREAKER_COOLDOWN_MAX).
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_ms = breaker_cooldown_ms
        self.breaker_cooldown_max_ms = max(breaker_cooldown_max_ms, breaker_cooldown_ms)
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
                for name, source in (("dispatch", _DISPATCH), ("take", _TAKE),
                                     ("release", _RELEASE), ("hold_claims", _HOLD_CLAIMS),
                                     ("holding", _HOLDING),
                                     ("enqueue", _ENQUEUE), ("offer", _OFFER),
                                     ("promote", _PROMOTE), ("expire", _EXPIRE),
                                     ("state", _STATE), ("count", _COUNT),
                                     ("claim_rebuild", _CLAIM_REBUILD), ("rebuilt", _REBUILT))
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

    def enqueue(self, webhook_id: str, limit: int, items: Iterable[tuple[str, int]], *,
                replay: bool = False) -> None:
        """Add deliveries ``(id, score)`` to a webhook's queue (its replay queue if ``replay``);
        ids already there stay put."""
        flat: list[Any] = []
        for delivery_id, score in items:
            flat += [delivery_id, score]
        if flat:
            self._script("enqueue", webhook_id, _kind(replay), limit, *flat)

    def offer(self, webhook_id: str, limit: int, items: Iterable[tuple[str, int]], *, batch: int,
              lease_ms: int, now_ms: int) -> list[Lease]:
        """``enqueue`` then ``dispatch``, in one call. ``StateLost`` (the deliveries queued, none
        dispatched) while Redis has lost its state and is not rebuilt."""
        (leases,) = self.offer_many([(webhook_id, limit, items)], batch=batch, lease_ms=lease_ms,
                                    now_ms=now_ms)
        if leases is None:
            raise _state_lost(webhook_id)
        return leases

    def offer_many(self, offers: Iterable[tuple[str, int, Iterable[tuple[str, int]]]], *,
                   batch: int, lease_ms: int,
                   now_ms: int) -> Iterator[list[Lease] | None]:
        """``offer`` for several webhooks (``(webhook_id, limit, deliveries)`` each), in one call
        for up to ``OFFER_CALL_WEBHOOKS`` of them carrying up to ``OFFER_CALL_ITEMS`` deliveries
        (a bigger one goes alone): ingest reaches the webhooks of an ingest batch this way, not
        with a round trip each.

        Yields each webhook's leases, in order, or None (its deliveries queued, none dispatched)
        while Redis has lost its state and is not rebuilt; a call's before the next call is
        made, so that the leases of a call are the caller's to send even if a later call fails.
        """
        head = [batch, now_ms, lease_ms, self.slow_ms, self.linger_ms, self.fast_leases,
                self.riders]
        call: list[tuple[str, list[Any]]] = []  # each webhook and its part of the arguments
        carried = 0  # deliveries in ``call``
        for webhook_id, limit, items in offers:
            pairs: list[Any] = []
            for delivery_id, score in items:
                pairs += [delivery_id, score]
            if call and (carried + len(pairs) // 2 > OFFER_CALL_ITEMS
                         or len(call) == OFFER_CALL_WEBHOOKS):
                yield from self._offer_call(head, call)
                call, carried = [], 0
            call.append((webhook_id, [webhook_id, limit, len(pairs) // 2, *pairs]))
            carried += len(pairs) // 2
        if call:
            yield from self._offer_call(head, call)

    def _offer_call(self, head: list[Any],
                    call: list[tuple[str, list[Any]]]) -> list[list[Lease] | None]:
        replies = self._script("offer", *head, *(arg for _, args in call for arg in args))
        return [None if reply is None else self._leases(webhook_id, reply)
                for (webhook_id, _), reply in zip(call, replies, strict=True)]

    def set_limit(self, webhook_id: str, limit: int) -> None:
        self._run(lambda: self.client.hset(f"{self.prefix}:limit", webhook_id, limit))

    def dispatch(self, webhook_id: str, *, batch: int, lease_ms: int, now_ms: int) -> list[Lease]:
        """Take free slots of a webhook that has work waiting, one lease per slot.

        Leases are full batches while the queue holds enough; of a short batch there is one at
        a time per webhook, which gathers what queues until its task starts (see ``take_many``).
        ``StateLost`` while Redis has lost its state and is not rebuilt.
        """
        return self._leases(webhook_id, self._script(
            "dispatch", webhook_id, batch, now_ms, lease_ms, self.slow_ms, self.linger_ms,
            self.fast_leases, self.riders))

    @staticmethod
    def _leases(webhook_id: str, flat: list[Any] | None) -> list[Lease]:
        if flat is None:
            raise _state_lost(webhook_id)
        return [Lease(webhook_id, _text(flat[i]), _ids(flat[i + 1]),
                      slow=int(flat[i + 2]) == 1, linger_ms=int(flat[i + 3]),
                      rides=int(flat[i + 2]) == 2)
                for i in range(0, len(flat), 4)]

    def take_many(self, leases: Sequence[Lease], *, batch: int, lease_ms: int,
                  now_ms: int) -> Taken:
        """The leases (of one delivery task) as their task starts, in one call: each topped up
        to ``batch`` with what queued meanwhile.

        A task waits in the broker after its leases are dispatched; deliveries queued for a
        webhook in that time ride along instead of each waiting for a task of its own. None for
        a lease no longer held (given back, expired, or Redis lost it). A lease's
        ``failures_allowed`` is what its webhook's circuit breaker leaves it; a lease whose
        webhook's breaker opened since it was dispatched carries nothing (what it carried goes
        back to the head of the queue), unless it is the breaker's probe.

        What queued for a webhook while its fast-lane lease waited to start, left to board it
        (see the module's docstring), boards it in up to ``riders`` (less those dispatched with
        it) more of the webhook's free slots (``Taken.boarded``) when the task holds no other
        webhook's lease. In a task shared with other webhooks, the lease moves out instead (None
        here): its slot is given back and its webhook's queue dispatched, a fast-lane lease and
        those riding with it in a task of their own. What waited for it and is left goes as
        dispatch sends it (``Taken.dispatched``, to send at once).
        """
        flat: list[Any] = []
        webhooks = collections.Counter(lease.webhook_id for lease in leases)
        for lease in leases:
            mode = 1 if len(webhooks) == 1 else 2 if webhooks[lease.webhook_id] == 1 else 0
            flat += [lease.webhook_id, lease.token, mode]
        replies = self._script("take", batch, now_ms, self.breaker_failures, lease_ms,
                               self.slow_ms, self.linger_ms, self.fast_leases, self.riders,
                               *flat) if flat else []
        taken = Taken([], [], [])
        for lease, reply in zip(leases, replies, strict=True):
            if reply is None or reply[0] is None:  # no longer held, or moved out
                taken.leases.append(None)
                taken.boarded.append(())
            else:
                allowed = int(reply[1])
                taken.leases.append(replace(lease, delivery_ids=_ids(reply[0]), linger_ms=0,
                                            failures_allowed=allowed))
                more = reply[2]
                taken.boarded.append(tuple(
                    Lease(lease.webhook_id, _text(more[i]), _ids(more[i + 1]), rides=True,
                          failures_allowed=allowed)
                    for i in range(0, len(more), 2)))
            if reply is not None:
                taken.dispatched.extend(self._leases(lease.webhook_id, reply[3]))
        return taken

    def still_held(self, leases: Sequence[Lease], *, now_ms: int) -> list[bool]:
        """Whether each lease still holds its slot (not given back, expired, or lost by Redis)."""
        flat: list[Any] = []
        for lease in leases:
            flat += [lease.webhook_id, lease.token]
        return [bool(held) for held in self._script("holding", now_ms, *flat)] if flat else []

    def release_many(self, leases: Sequence[tuple[Lease, Report]], *, batch: int, lease_ms: int,
                     now_ms: int, claim: str | None = None) -> list[Released]:
        """Give slots back, then dispatch their webhooks' queues, in one call: the leases of one
        delivery task, each with its ``Report``.

        A report is what its lease's batch did: its slowest response decides which lane the
        webhook's next leases take, and its failures mark since when the webhook has been
        failing. A ``Released``'s ``held`` is False when its lease had already expired (the
        sweeper took it back). ``claim`` is the token of the task's claims
        (``store.Claim.token``): the slot rebuilt from them (``hold_claims``), if any, is given
        back too.
        """
        flat: list[Any] = []
        for lease, report in leases:
            flat += [lease.webhook_id, lease.token, report.took_ms, int(report.delivered),
                     report.failing_since_ms, claim or "", report.failures]
        if not flat:
            return []
        replies = self._script("release", batch, now_ms, lease_ms, self.slow_ms, self.linger_ms,
                               self.fast_leases, self.riders, self.breaker_failures,
                               self.breaker_cooldown_ms,
                               self.breaker_cooldown_max_ms, *flat)
        return [Released(bool(reply[0]), int(reply[1]), self._leases(lease.webhook_id, reply[4:]),
                         state_lost=bool(reply[2]), breaker_opened=int(reply[3]) == 1,
                         breaker_closed=int(reply[3]) == 2)
                for (lease, _), reply in zip(leases, replies, strict=True)]

    def hold_claims(self, claims: Mapping[tuple[str, str], tuple[int, Sequence[str]]], *,
                    now_ms: int) -> None:
        """Count live claims of the database against their webhooks' caps: one slot for each
        ``(webhook, claim token)``, carrying its deliveries, until the claim's expiry
        (``{(webhook, token): (expiry, delivery ids)}``).

        For a Redis that lost its state while requests were open: their tasks carry on, so their
        slots must be taken before any is granted. A task gives its claim's slot back with its
        own (``release_many``'s ``claim``); one whose task died expires with the claim, and the
        sweeper re-queues what it carried, as for any lease.
        """
        flat: list[Any] = []
        for (webhook_id, token), (expiry, delivery_ids) in claims.items():
            flat += [webhook_id, token, expiry, ",".join(delivery_ids)]
        if flat:
            self._script("hold_claims", now_ms, *flat)

    def park(self, webhooks_and_ids: Sequence[tuple[str, str, int]]) -> None:
        """Park retries ``(webhook, delivery, due_ms)`` until due; the sweeper brings them back."""
        self._park("retry", webhooks_and_ids)

    def recheck(self, webhooks_and_ids: Sequence[tuple[str, str, int]]) -> None:
        """``park`` deliveries under another task's claim until it would run out (``due_ms``).

        The sweeper brings them back like retries, in case that task died; but they are no
        retries (their holder finishes most of them long before), so the gauge of parked
        retries leaves them out.
        """
        self._park("recheck", webhooks_and_ids)

    def _park(self, key: str, webhooks_and_ids: Sequence[tuple[str, str, int]]) -> None:
        if webhooks_and_ids:
            mapping = {f"{wh}|{delivery}": due for wh, delivery, due in webhooks_and_ids}
            self._run(lambda: self.client.zadd(f"{self.prefix}:{key}", mapping))

    def promote_due(self, now_ms: int, most: int = 10_000) -> list[str]:
        """Move due parked retries and re-checks into their queues; returns the webhooks
        touched."""
        return [_text(w) for w in self._script("promote", now_ms, most)]

    def expire_leases(self, now_ms: int) -> list[str]:
        """Take back slots whose holder outlived its lease and re-queue what they carried."""
        return [_text(w) for w in self._script("expire", now_ms)]

    def queued_webhooks(self) -> list[str]:
        return sorted(_text(w) for w in self._run(
            lambda: self.client.smembers(f"{self.prefix}:queued")))

    def claim_rebuild(self, most_ms: int) -> bool:
        """True when Redis lost (or never had) notifier's state and the caller is to rebuild it:
        no one else is at it, or the one who was has not finished in ``most_ms``."""
        return bool(self._script("claim_rebuild", most_ms))

    def rebuilt(self) -> None:
        """The state is whole again (after ``claim_rebuild``): slots may be granted."""
        self._script("rebuilt")

    def forget_rebuild(self) -> None:
        """Undo ``claim_rebuild`` when the rebuild that followed it failed, so it runs again."""
        self._run(lambda: self.client.delete(f"{self.prefix}:rebuilding"))

    def add_counts(self, counts: Mapping[str, int]) -> None:
        """Add to the service's counters (``notifier.metrics``), in one call."""
        flat: list[Any] = []
        for name, count in counts.items():
            flat += [name, count]
        if flat:
            self._script("count", *flat)

    def counts(self) -> dict[str, int]:
        return {_text(name): int(value) for name, value in self._run(
            lambda: self.client.hgetall(f"{self.prefix}:metrics")).items()}

    def state(self, now_ms: int) -> QueueState:
        parked, held, slow, flat, rechecks = self._script("state", now_ms, self.slow_ms)
        return QueueState({_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)},
                          int(parked), int(held), int(slow), int(rechecks))

    def reset_breaker(self, webhook_id: str) -> None:
        """Close a webhook's circuit breaker and forget its failures (a fresh start)."""
        def reset() -> None:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.hdel(f"{self.prefix}:breaker:runs", webhook_id)
                pipe.hdel(f"{self.prefix}:breaker:open", webhook_id)
                pipe.execute()
        self._run(reset)

    def breakers(self, webhook_ids: Sequence[str] | None = None, *,
                 now_ms: int) -> dict[str, Breaker]:
        """The circuit breakers of these webhooks (default: every one not closed or with
        failures counted); a webhook with no failures counted has a closed one."""
        runs_key, open_key = f"{self.prefix}:breaker:runs", f"{self.prefix}:breaker:open"
        if webhook_ids is None:
            runs = {_text(k): _text(v) for k, v in self._run(
                lambda: self.client.hgetall(runs_key)).items()}
            opened = {_text(k): _text(v) for k, v in self._run(
                lambda: self.client.hgetall(open_key)).items()}
            webhook_ids = sorted(runs.keys() | opened.keys())
        else:
            ids = list(webhook_ids)
            if not ids:
                return {}
            runs = {wh: _text(v) for wh, v in zip(ids, self._run(
                lambda: self.client.hmget(runs_key, ids)), strict=True) if v is not None}
            opened = {wh: _text(v) for wh, v in zip(ids, self._run(
                lambda: self.client.hmget(open_key, ids)), strict=True) if v is not None}
        found = {}
        for webhook_id in webhook_ids:
            failures = int(runs.get(webhook_id, 0))
            if webhook_id not in opened:
                found[webhook_id] = Breaker("closed", failures)
                continue
            probe_at, cooldown, _ = opened[webhook_id].split("|", 2)
            state = "open" if now_ms < int(probe_at) else "halfOpen"
            found[webhook_id] = Breaker(state, failures, int(probe_at), int(cooldown))
        return found

    def ping(self) -> bool:
        return bool(self._run(lambda: self.client.ping()))
