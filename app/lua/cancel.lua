--[[ cancel.lua: cancel a message still waiting in the sorted set.

Only a scheduled or retrying message (one in the sorted set) can be cancelled:
once queued it may already be in a worker's hands. The record stays, as
cancelled and without its body, for the retention window: its status can be
read and the uuid stays a duplicate; then it is purged like a delivered one.

KEYS[1] messages   HASH    uuid -> msgpack record (see accept.lua)
KEYS[2] delayed    ZSET    member <12 hex seq><uuid>, score runAt ms
KEYS[3] retention  ZSET    uuid -> ms after which its record may go
ARGV[1] uuid       string  canonical lower-case uuid
ARGV[2] keep       integer retention window, ms

Returns {"cancelled", runAt}
     or {"missing"}           no record for the uuid
     or {"conflict", state}   not in the sorted set: queued, delivered, dead or cancelled
]]

-- The member of a record's message in the sorted set: rec[8] holds its sequence. Records
-- written before that was kept are found by score (scheduled: score = runAt) or by a scan.
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

local member = member_of(rec, ARGV[1])
if member then
  redis.call('ZREM', KEYS[2], member)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
rec[1] = 'cancelled'
rec[5] = now
rec[6] = ''
rec[7] = rec[7] or {}
rec[7].c = now - rec[4]
rec[8] = nil
redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack(rec))
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
return {'cancelled', rec[2]}
