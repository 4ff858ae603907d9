--[[ void.lua: make sure the given messages never run: the occurrences of a schedule
definition that was replaced or deleted.

A message waiting in the sorted set (scheduled, retrying) is cancelled as cancel.lua
does. A uuid with no record gets a cancelled record (a tombstone, kept for the
retention window): a leader that accepts that occurrence later, having read the
old definition before it changed, meets a duplicate and changes nothing. Any other
state (queued or later) is left alone: it was due before the change.

KEYS[1] messages   HASH    uuid -> record (format in _record.lua)
KEYS[2] delayed    ZSET    member <6-byte seq><uuid>, score runAt ms
KEYS[3] retention  LIST    see _record.lua
KEYS[4] dead       STREAM  where quarantined data goes
ARGV[1] keep       integer retention window, ms
ARGV[2] deadlen    integer approximate cap on the dead stream
ARGV[3+2i..4+2i]   per message: uuid (16 bytes), runAt ms

Returns {cancelled, tombstones}
]]
local q = {dead = KEYS[4], deadlen = ARGV[2], retention = KEYS[3], keep = tonumber(ARGV[1])}
local now = now_ms()
local cancelled, tombstones = 0, 0
for i = 3, #ARGV, 2 do
  local uuid, run_at = ARGV[i], tonumber(ARGV[i + 1])
  local rec, refused = take_waiting(KEYS[1], KEYS[2], uuid, q)
  if rec then
    rec_enter(rec, 'c', now)
    redis.call('HSET', KEYS[1], uuid, rec_encode(rec))
    retain(KEYS[3], uuid, now, q.keep)
    cancelled = cancelled + 1
  elseif refused[1] == 'missing' then
    redis.call('HSET', KEYS[1], uuid, rec_fresh('c', run_at, now, '', ''))
    retain(KEYS[3], uuid, now, q.keep)
    tombstones = tombstones + 1
  end
end
return {cancelled, tombstones}
