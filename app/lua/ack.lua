--[[ ack.lua: acknowledge handled entries, delete them from the stream, mark delivered.

Deleting acknowledged entries keeps the stream as long as the work not yet
done. Delivered records are kept for the retention window (the idempotency
window) and then purged here, a bounded number per call, because Redis 7.0
cannot expire a single hash field.

KEYS[1] stream     STREAM
KEYS[2] messages   HASH
KEYS[3] retention  ZSET    uuid -> ms after which its record may go
ARGV[1] group      string  consumer group
ARGV[2] keep       integer retention window, ms
ARGV[3] purge      integer most expired records to purge in this call
ARGV[4..] pairs    entry id, uuid

Returns acknowledged: how many entries were still pending (0 for an entry
another worker already acknowledged or dead-lettered; its record is left as is)
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep_until = now + tonumber(ARGV[2])
local acked = 0

for i = 4, #ARGV, 2 do
  local id, uuid = ARGV[i], ARGV[i + 1]
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    acked = acked + 1
    local packed = redis.call('HGET', KEYS[2], uuid)
    if packed then
      local rec = cmsgpack.unpack(packed)
      rec[1] = 'delivered'
      rec[3] = rec[3] + 1
      rec[5] = now
      rec[6] = ''
      rec[7] = rec[7] or {}
      rec[7].d = now - rec[4]
      rec[8] = nil
      redis.call('HSET', KEYS[2], uuid, cmsgpack.pack(rec))
      redis.call('ZADD', KEYS[3], keep_until, uuid)
    end
  end
  redis.call('XDEL', KEYS[1], id)
end

local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
if #expired > 0 then
  redis.call('HDEL', KEYS[2], unpack(expired))
  redis.call('ZREM', KEYS[3], unpack(expired))
end
return acked
