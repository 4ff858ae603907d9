--[[ fail.lua: a handler failed on an entry: schedule a retry, or dead-letter it.

The entry leaves the stream; its body comes from the entry itself, so the
caller passes no message data. A retry goes back through the sorted set with
the caller's backoff, and keeps its original runAt in the record.

KEYS[1] stream     STREAM
KEYS[2] messages   HASH
KEYS[3] delayed    ZSET
KEYS[4] dead       STREAM
KEYS[5] seq        STRING
KEYS[6] retention  ZSET     uuid -> ms after which its record may go
ARGV[1] group      string   consumer group
ARGV[2] id         string   stream entry id
ARGV[3] delay      integer  ms from now until the retry
ARGV[4] max        integer  handler runs allowed before dead-lettering
ARGV[5] reason     string   why it failed (exception type and text, bounded by the caller)
ARGV[6] deadlen    integer  approximate cap on the dead stream
ARGV[7] channel    string   wake channel
ARGV[8] keep       integer  retention window for a dead record, ms

Returns {outcome, attempts}
  outcome  "retrying", "dead", or "gone" (no longer pending: acknowledged or
           dead-lettered by someone else; nothing changed)
]]
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return {'gone', 0}
end
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if #entries == 0 then
  return {'gone', 0}
end
local f = {}
local raw = entries[1][2]
for i = 1, #raw, 2 do
  f[raw[i]] = raw[i + 1]
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local attempts = tonumber(f.a) + 1
local packed = redis.call('HGET', KEYS[2], f.u)
local rec = {'queued', tonumber(f.r), 0, now, now, ''}
if packed then
  rec = cmsgpack.unpack(packed)
end
rec[3] = attempts
rec[5] = now
rec[7] = rec[7] or {}  -- transitions (see accept.lua; absent in older records)

if attempts >= tonumber(ARGV[4]) then
  local dead_id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'u', f.u, 'm', f.m,
    'r', f.r, 'a', string.format('%d', attempts), 'reason', ARGV[5],
    'at', string.format('%.0f', now))
  rec[1] = 'dead'
  rec[6] = ''
  rec[7].x = now - rec[4]
  rec[8] = dead_id
  redis.call('HSET', KEYS[2], f.u, cmsgpack.pack(rec))
  -- The dead stream is capped, so the record must not outlive it forever either.
  redis.call('ZADD', KEYS[6], now + tonumber(ARGV[8]), f.u)
  return {'dead', attempts}
end

local retry_at = now + tonumber(ARGV[3])
local seq = redis.call('INCR', KEYS[5])
local member = string.format('%012x', seq) .. f.u
redis.call('ZADD', KEYS[3], retry_at, member)
rec[1] = 'retrying'
rec[6] = f.m
rec[7].r = now - rec[4]
rec[8] = seq
redis.call('HSET', KEYS[2], f.u, cmsgpack.pack(rec))
if redis.call('ZRANGE', KEYS[3], 0, 0)[1] == member then
  redis.call('PUBLISH', ARGV[7], string.format('%.0f', retry_at))
end
return {'retrying', attempts}
