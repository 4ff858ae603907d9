--[[ ack.lua: acknowledge handled entries, delete them from the stream, mark delivered.

Deleting acknowledged entries keeps the stream as long as the work not yet
done. Delivered records are kept for the retention window (the idempotency
window) and then purged here, a bounded number per call, because Redis 7.0
cannot expire a single hash field. The deletions and retention entries of the
whole batch go in one command each: per entry they cost several times more.

KEYS[1] stream     STREAM
KEYS[2] messages   HASH
KEYS[3] retention  LIST    <6-byte ms after which the record may go><uuid>
ARGV[1] group      string  consumer group
ARGV[2] keep       integer retention window, ms
ARGV[3] purge      integer most expired records to purge in this call
ARGV[4..] pairs    entry id, uuid (16 bytes)

Returns acknowledged: how many entries were still pending (0 for an entry
another worker already acknowledged or dead-lettered; its record is left as is)
]]
local now = now_ms()
local keep = tonumber(ARGV[2])
local keep_until = struct.pack('>I6', now + keep)
local acked = 0
local ids, kept = {}, {}

for i = 4, #ARGV, 2 do
  local id, uuid = ARGV[i], ARGV[i + 1]
  ids[#ids + 1] = id
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    acked = acked + 1
    local packed = redis.call('HGET', KEYS[2], uuid)
    if packed then
      redis.call('HSET', KEYS[2], uuid, rec_advance(packed, 'd', now, 1))
      kept[#kept + 1] = keep_until .. uuid
    end
  end
end
call_spread('XDEL', KEYS[1], ids)
call_spread('RPUSH', KEYS[3], kept)
purge_retained(KEYS[3], KEYS[2], now, keep, tonumber(ARGV[3]))
return acked
