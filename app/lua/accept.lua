--[[ accept.lua: accept one message, idempotent by uuid.

Decides due-or-future with Redis' own clock, so no host clock ever decides.
The same uuid again changes nothing and returns the stored record.

KEYS[1] messages  HASH    uuid -> msgpack {state, runAt, attempts, acceptedAt, updatedAt, body}
KEYS[2] delayed   ZSET    member <12 hex seq><uuid>, score runAt ms
KEYS[3] stream    STREAM  due messages
KEYS[4] seq       STRING  acceptance counter (tie-breaker for equal runAt)
ARGV[1] uuid      string  canonical lower-case uuid
ARGV[2] body      string  the message
ARGV[3] runAt     integer epoch milliseconds
ARGV[4] channel   string  wake channel; published to when this message becomes the earliest

Returns {created, state, runAt}
  created  1 when accepted now, 0 when the uuid already existed
  state    "queued" (in the stream) or "scheduled" (in the sorted set), or the stored state
  runAt    integer ms (the stored one for a duplicate)
]]
local packed = redis.call('HGET', KEYS[1], ARGV[1])
if packed then
  local rec = cmsgpack.unpack(packed)
  return {0, rec[1], rec[2]}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local run_at = tonumber(ARGV[3])

if run_at <= now then
  redis.call('XADD', KEYS[3], '*', 'u', ARGV[1], 'm', ARGV[2], 'r', ARGV[3], 'a', '0')
  -- The body lives in the stream entry now; the record keeps only what status needs.
  redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack({'queued', run_at, 0, now, now, ''}))
  return {1, 'queued', run_at}
end

local member = string.format('%012x', redis.call('INCR', KEYS[4])) .. ARGV[1]
redis.call('ZADD', KEYS[2], run_at, member)
redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack({'scheduled', run_at, 0, now, now, ARGV[2]}))
if redis.call('ZRANGE', KEYS[2], 0, 0)[1] == member then
  redis.call('PUBLISH', ARGV[4], ARGV[3])
end
return {1, 'scheduled', run_at}
