--[[ ack.lua: acknowledge handled entries, delete them from the stream, mark delivered.

Deleting acknowledged entries keeps the stream as long as the work not yet
done (the stream must have this one consumer group: the trim assumes so). Delivered records are kept for the retention window (the idempotency
window) and then purged here, a bounded number per call, because Redis 7.0
cannot expire a single hash field. The deletions and retention entries of the
whole batch go in one command each: per entry they cost several times more.

A record that cannot be decoded is quarantined (see _record.lua) and replaced by a
delivered one: the handler ran, whatever the record said.

KEYS[1] stream     STREAM
KEYS[2] messages   HASH
KEYS[3] retention  LIST    <6-byte ms after which the record may go><uuid>
KEYS[4] dead       STREAM  where quarantined data goes
ARGV[1] group      string  consumer group
ARGV[2] keep       integer retention window, ms
ARGV[3] purge      integer most expired records to purge in this call
ARGV[4] deadlen    integer approximate cap on the dead stream
ARGV[5..] pairs    entry id, uuid (16 bytes)

Returns {delivered, quarantined}
  delivered    how many records were marked delivered. A record is marked when it still
               says queued at this entry, whether or not the entry was still pending: an
               entry another worker already acknowledged or dead-lettered has a record
               that moved on (left as is, 0), and one lost with its stream or consumer
               group (a DEL, an eviction, a Redis restarted without its data: XACK counts
               nothing) was handled all the same
  quarantined  how many records (and retention items) were quarantined
]]
local now = now_ms()
local keep = tonumber(ARGV[2])
local keep_until = struct.pack('>I6', now + keep)
local acked = 0
local q = {dead = KEYS[4], deadlen = ARGV[4], retention = KEYS[3], keep = keep}
local quarantined = 0
local ids, uuids = {}, {}
for i = 5, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
  uuids[#uuids + 1] = ARGV[i + 1]
end
-- One XACK for the batch. Which entries are ours to mark delivered is read from the
-- records: a queued record names its current entry, and an entry stops being pending
-- only by a script that also moves its record on (ack, fail, reclaim).
for i = 1, #ids, 4000 do
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, math.min(i + 3999, #ids)))
end
local stored = hmget_all(KEYS[2], uuids)
local records, kept = {}, {}
for i, uuid in ipairs(uuids) do
  local packed = stored[i]
  local ref = packed and rec_ref_at(packed)
  if ref == ids[i] and byte(packed, 1) == 113 then
    records[#records + 1] = uuid
    records[#records + 1] = rec_advance(packed, 'd', now, 1, '')
    kept[#kept + 1] = keep_until .. uuid
  elseif packed and not rec_valid(packed) then
    quarantine(q, now, 'corrupt record', uuid, packed)
    quarantined = quarantined + 1
    records[#records + 1] = uuid
    records[#records + 1] = rec_fresh('d', 0, now, '', '')
    kept[#kept + 1] = keep_until .. uuid
  end
end
call_spread('HSET', KEYS[2], records)
call_spread('RPUSH', KEYS[3], kept)
quarantined = quarantined + purge_retained(q, KEYS[2], now, tonumber(ARGV[3]))
if acked < #ids then
  -- Some entry was not pending in this group: acknowledged by another worker, or its group
  -- was lost and made anew (at "0", by a worker meeting NOGROUP). The trim below assumes
  -- the group delivered every entry up to the newest acknowledged one, which a new group
  -- has not: delete exactly these entries, so none is delivered again, and trim nothing.
  call_spread('XDEL', KEYS[1], ids)
  return {#records / 2, quarantined}
end
-- Entries older than the oldest one still pending are all done (ids only grow, and a
-- group delivers in id order): one XTRIM drops them at a fraction of XDEL's cost per
-- entry. Only acknowledged entries newer than that (behind a slower worker's) need XDEL.
local oldest = redis.call('XPENDING', KEYS[1], ARGV[1])[2]
local floor = nil
if oldest then
  floor = {id_parts(oldest)}
end
local stragglers, latest = {}, nil
for _, id in ipairs(ids) do
  local ms, seq = id_parts(id)
  if floor and not id_before(ms, seq, floor[1], floor[2]) then
    stragglers[#stragglers + 1] = id
  elseif not latest or id_before(latest[1], latest[2], ms, seq) then
    latest = {ms, seq}
  end
end
if floor then
  redis.call('XTRIM', KEYS[1], 'MINID', oldest)
elseif latest then
  -- Nothing pending: everything up to the newest acknowledged entry is done.
  redis.call('XTRIM', KEYS[1], 'MINID', int_text(latest[1]) .. '-' .. int_text(latest[2] + 1))
end
call_spread('XDEL', KEYS[1], stragglers)
return {#records / 2, quarantined}
