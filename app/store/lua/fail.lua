--[[ fail.lua: a handler failed on an entry: schedule a retry, or dead-letter it.

The entry leaves the stream; its body comes from the entry itself, so the
caller passes no message data. A retry goes back through the sorted set with
the caller's backoff, and keeps its original runAt in the record.

KEYS[1] stream     STREAM
KEYS[2] messages   HASH
KEYS[3] delayed    ZSET
KEYS[4] dead       STREAM
KEYS[5] seq        STRING
KEYS[6] retention  LIST     see _record.lua; KEYS[4] also takes quarantined data
ARGV[1] group      string   consumer group
ARGV[2] id         string   stream entry id
ARGV[3] delay      integer  ms from now until the retry
ARGV[4] max        integer  handler runs allowed before dead-lettering (0: dead-letter now)
ARGV[5] reason     string   why it failed (exception type and text, bounded by the caller)
ARGV[6] deadlen    integer  approximate cap on the dead stream
ARGV[7] channel    string   wake channel
ARGV[8] keep       integer  retention window for a dead record, ms

An entry that cannot be decoded is quarantined (see _record.lua); a record that cannot
be, too, and the message goes on from the entry as if it had none.

Returns {outcome, attempts, quarantined}
  outcome      "retrying", "dead", "quarantined" (the entry), or "gone" (no longer
               pending: acknowledged or dead-lettered by someone else; nothing changed)
  quarantined  how many things were quarantined (0 or 1)
]]
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return {'gone', 0, 0}
end
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if #entries == 0 then
  return {'gone', 0, 0}
end
local f = entry_fields(entries[1][2])

local now = now_ms()
local q = {dead = KEYS[4], deadlen = ARGV[6], retention = KEYS[6], keep = tonumber(ARGV[8])}
if not entry_valid(f) then
  entry_quarantine(q, KEYS[2], ARGV[2], entries[1][2], now)
  return {'quarantined', 0, 1}
end
local attempts = tonumber(f.a) + 1
local rec, corrupt = rec_load(KEYS[2], f.u)
local quarantined = 0
if corrupt then
  quarantine(q, now, 'corrupt record', f.u, corrupt)
  quarantined = 1
end
rec = rec or rec_new('q', tonumber(f.r), now, '', '')
rec.attempts = attempts

if attempts >= tonumber(ARGV[4]) then
  dead_letter(KEYS[4], KEYS[2], KEYS[6], f, rec, attempts, ARGV[5], ARGV[6], now,
    tonumber(ARGV[8]))
  return {'dead', attempts, quarantined}
end

local retry_at = now + tonumber(ARGV[3])
local seq = next_seq(KEYS[5])
local member = seq .. f.u
redis.call('ZADD', KEYS[3], retry_at, member)
rec_enter(rec, 'r', now)
rec.ref = seq
rec.body = f.m
redis.call('HSET', KEYS[2], f.u, rec_encode(rec))
if redis.call('ZRANGE', KEYS[3], 0, 0)[1] == member then
  redis.call('PUBLISH', ARGV[7], int_text(retry_at))
end
return {'retrying', attempts, quarantined}
