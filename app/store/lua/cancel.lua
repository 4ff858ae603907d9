--[[ cancel.lua: cancel a message still waiting in the sorted set.

Only a scheduled or retrying message (one in the sorted set) can be cancelled:
once queued it may already be in a worker's hands. The record stays, as
cancelled and without its body, for the retention window: its status can be
read and the uuid stays a duplicate; then it is purged like a delivered one.

KEYS[1] messages   HASH    uuid -> record (format in _record.lua)
KEYS[2] delayed    ZSET    member <6-byte seq><uuid>, score runAt ms
KEYS[3] retention  LIST    see _record.lua
KEYS[4] dead       STREAM  where quarantined data goes
ARGV[1] uuid       bytes   the uuid's 16 bytes
ARGV[2] keep       integer retention window, ms
ARGV[3] deadlen    integer approximate cap on the dead stream

Returns {"cancelled", runAt}
     or {"missing"}           no record for the uuid
     or {"conflict", state}   not in the sorted set: queued, delivered, dead or cancelled
     or {"conflict", "dead", 1}  its record could not be decoded and was quarantined
]]
local q = {dead = KEYS[4], deadlen = ARGV[3], retention = KEYS[3], keep = tonumber(ARGV[2])}
local rec, refused = take_waiting(KEYS[1], KEYS[2], ARGV[1], q)
if not rec then
  return refused
end
local now = now_ms()
rec_enter(rec, 'c', now)
redis.call('HSET', KEYS[1], ARGV[1], rec_encode(rec))
retain(KEYS[3], ARGV[1], now, tonumber(ARGV[2]))
return {'cancelled', rec.run_at}
