--[[ reschedule.lua: move a message still waiting in the sorted set to a new runAt.

Decided with Redis' own clock: a runAt that has passed sends the message to
the stream at once (queued); otherwise it goes back into the sorted set under
a new acceptance sequence, so among equal runAt it now sorts after the
messages accepted before this call (FIFO by when it got its current time). A
retrying message stays retrying (its attempts count on). When the message
becomes the earliest, the leader is woken as on accept.

KEYS[1] messages  HASH    uuid -> msgpack record (see accept.lua)
KEYS[2] delayed   ZSET    member <12 hex seq><uuid>, score runAt ms
KEYS[3] stream    STREAM  due messages
KEYS[4] seq       STRING  acceptance counter
ARGV[1] uuid      string  canonical lower-case uuid
ARGV[2] runAt     integer the new epoch milliseconds
ARGV[3] channel   string  wake channel

Returns {state, runAt}        "queued", "scheduled" or "retrying"; the new runAt
     or {"missing"}           no record for the uuid
     or {"conflict", state}   not in the sorted set: queued, delivered, dead or cancelled
]]

-- As in cancel.lua: rec[8] holds the member's sequence; older records are found by score
-- (scheduled: score = runAt) or by a scan.
local function member_of(rec, uuid)
  if type(rec[8]) == 'number' then
    return string.format('%012x', rec[8]) .. uuid
  end
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], rec[2], rec[2])) do
    if string.sub(m, 13) == uuid then
      return m
    end
  end
  local cursor = '0'
  repeat
    local res = redis.call('ZSCAN', KEYS[2], cursor, 'MATCH', '????????????' .. uuid, 'COUNT', 1000)
    cursor = res[1]
    if res[2][1] then
      return res[2][1]
    end
  until cursor == '0'
  return nil
end

local packed = redis.call('HGET', KEYS[1], ARGV[1])
if not packed then
  return {'missing'}
end
local rec = cmsgpack.unpack(packed)
if rec[1] ~= 'scheduled' and rec[1] ~= 'retrying' then
  return {'conflict', rec[1]}
end

local old = member_of(rec, ARGV[1])
if old then
  redis.call('ZREM', KEYS[2], old)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local run_at = tonumber(ARGV[2])
rec[2] = run_at
rec[5] = now
rec[7] = rec[7] or {}

if run_at <= now then
  redis.call('XADD', KEYS[3], '*', 'u', ARGV[1], 'm', rec[6], 'r', ARGV[2],
    'a', string.format('%d', rec[3]))
  rec[1] = 'queued'
  rec[6] = ''
  rec[7].q = now - rec[4]
  rec[8] = nil
  redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack(rec))
  return {'queued', run_at}
end

local seq = redis.call('INCR', KEYS[4])
local member = string.format('%012x', seq) .. ARGV[1]
redis.call('ZADD', KEYS[2], run_at, member)
rec[8] = seq
redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack(rec))
if redis.call('ZRANGE', KEYS[2], 0, 0)[1] == member then
  redis.call('PUBLISH', ARGV[3], ARGV[2])
end
return {rec[1], run_at}
