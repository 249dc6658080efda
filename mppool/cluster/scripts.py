"""The Lua scripts of a cluster pool: every decision is one script, atomic in Redis.

Expiry is decided by Redis server time (``TIME`` inside the script), never by a host's
clock. Every script first *purges* (leases past their expiry, tickets whose waiter stopped
renewing) and then *promotes* (hands free units to the oldest tickets, pushing each granted
ticket onto its supervisor's wake-up list), so a unit freed by a lapse is handed on by the
next script any host runs, at the latest by a renewal, every ``lease_ttl / 3``.

Every script is idempotent by member: a call retried after a lost reply changes nothing
more. Keys are those of `keys.PoolKeys.script_keys`, all under one hash tag; the wake-up list
is named from ``ARGV[1]`` (the pool's tag), so it is in the same slot too.
"""

from __future__ import annotations

import hashlib

_PRELUDE = r"""
local K_META, K_LEASES, K_QUEUE, K_QLIVE = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_KILL, K_TKILL, K_SEQ = KEYS[5], KEYS[6], KEYS[7]
local WAKE = ARGV[1]
local WANT = tonumber(ARGV[2])
local TTL = tonumber(ARGV[3])

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function cap_of()
  local cap = redis.call('HGET', K_META, 'max_size')
  if not cap then
    redis.call('HSET', K_META, 'max_size', WANT)
    cap = WANT
  end
  redis.call('PEXPIRE', K_META, math.max(TTL * 10, 60000))
  return tonumber(cap)
end

local function score(now, m)
  local s = now + TTL
  local dl = redis.call('HGET', K_KILL, m)
  if dl and tonumber(dl) < s then s = tonumber(dl) end
  return s
end

local function grant(now, m, kill)
  if kill > 0 then redis.call('HSET', K_KILL, m, now + kill) end
  redis.call('ZADD', K_LEASES, score(now, m), m)
end

local function purge(now)
  local gone = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now)
  for _, m in ipairs(gone) do
    redis.call('ZREM', K_LEASES, m)
    redis.call('HDEL', K_KILL, m)
  end
  if #gone > 0 then redis.call('HINCRBY', K_META, 'lapsed', #gone) end
  local dead = redis.call('ZRANGEBYSCORE', K_QLIVE, '-inf', now)
  for _, m in ipairs(dead) do
    redis.call('ZREM', K_QUEUE, m)
    redis.call('ZREM', K_QLIVE, m)
    redis.call('HDEL', K_TKILL, m)
  end
end

local function promote(now, cap)
  local granted = {}
  local n = redis.call('ZCARD', K_LEASES)
  while n < cap do
    local head = redis.call('ZRANGE', K_QUEUE, 0, 0)
    if #head == 0 then break end
    local m = head[1]
    local kill = tonumber(redis.call('HGET', K_TKILL, m) or '0')
    redis.call('ZREM', K_QUEUE, m)
    redis.call('ZREM', K_QLIVE, m)
    redis.call('HDEL', K_TKILL, m)
    grant(now, m, kill)
    local run = string.match(m, '^(.*)|[^|]*$') or m
    local wk = WAKE .. run
    redis.call('RPUSH', wk, m)
    redis.call('PEXPIRE', wk, math.max(TTL * 3, 10000))
    granted[#granted + 1] = m
    n = n + 1
  end
  return granted
end
"""

# ARGV: wake prefix, max_size, ttl ms, member, kill ms, enqueue (1/0), waiter ttl ms
# -> {1}: granted; {0, seq}: queued; {2}: refused (try only); {-1, cap}: another max_size
ACQUIRE = _PRELUDE + r"""
local m, kill, wttl = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[7])
local now = now_ms()
local cap = cap_of()
if cap ~= WANT then return {-1, cap} end
purge(now)
promote(now, cap)
if redis.call('ZSCORE', K_LEASES, m) then return {1, 0} end
if redis.call('ZSCORE', K_QUEUE, m) then
  redis.call('ZADD', K_QLIVE, now + wttl, m)
  return {0, 0}
end
if redis.call('ZCARD', K_QUEUE) == 0 and redis.call('ZCARD', K_LEASES) < cap then
  grant(now, m, kill)
  return {1, 0}
end
if ARGV[6] ~= '1' then return {2, 0} end
local seq = redis.call('INCR', K_SEQ)
redis.call('ZADD', K_QUEUE, seq, m)
redis.call('ZADD', K_QLIVE, now + wttl, m)
if kill > 0 then redis.call('HSET', K_TKILL, m, kill) end
return {0, seq}
"""

# ARGV: wake prefix, max_size, ttl ms, members...
# -> {per member 1 (it held a live lease) or 0, the tickets granted by this call}
FORGET = _PRELUDE + r"""
local now = now_ms()
local cap = cap_of()
purge(now)
local out = {}
for i = 4, #ARGV do
  local m = ARGV[i]
  out[#out + 1] = redis.call('ZREM', K_LEASES, m)
  redis.call('HDEL', K_KILL, m)
  redis.call('ZREM', K_QUEUE, m)
  redis.call('ZREM', K_QLIVE, m)
  redis.call('HDEL', K_TKILL, m)
end
return {out, promote(now, cap)}
"""

# ARGV: wake prefix, max_size, ttl ms, waiter ttl ms, n leases, leases..., tickets...
# -> {lease statuses "1"/"0" (still held / lost), ticket statuses "L"/"Q"/"X" (granted /
#     queued / gone), queue length, every lease member, max_size, lapsed so far}
RENEW = _PRELUDE + r"""
local wttl, nl = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local cap = cap_of()
purge(now)
promote(now, cap)
local ls, ts = {}, {}
for i = 6, 5 + nl do
  local m = ARGV[i]
  if redis.call('ZSCORE', K_LEASES, m) then
    redis.call('ZADD', K_LEASES, score(now, m), m)
    ls[#ls + 1] = '1'
  else
    ls[#ls + 1] = '0'
  end
end
for i = 6 + nl, #ARGV do
  local m = ARGV[i]
  if redis.call('ZSCORE', K_LEASES, m) then
    redis.call('ZADD', K_LEASES, score(now, m), m)
    ts[#ts + 1] = 'L'
  elseif redis.call('ZSCORE', K_QUEUE, m) then
    redis.call('ZADD', K_QLIVE, now + wttl, m)
    ts[#ts + 1] = 'Q'
  else
    ts[#ts + 1] = 'X'
  end
end
return {table.concat(ls), table.concat(ts), redis.call('ZCARD', K_QUEUE),
        redis.call('ZRANGE', K_LEASES, 0, -1), cap,
        tonumber(redis.call('HGET', K_META, 'lapsed') or '0')}
"""

# ARGV: wake prefix, max_size, ttl ms -> the max_size the cluster has (declared if new)
DECLARE = _PRELUDE + r"""
return cap_of()
"""

SCRIPTS = {"acquire": ACQUIRE, "forget": FORGET, "renew": RENEW, "declare": DECLARE}
SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}
