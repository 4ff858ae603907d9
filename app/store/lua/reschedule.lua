--[[ reschedule.lua: move a message still waiting in the sorted set to a new runAt.

Decided with Redis' own clock: a runAt that has passed sends the message to
the stream at once (queued); otherwise it goes back into the sorted set under
a new acceptance sequence, so among equal runAt it now sorts after the
messages accepted before this call (FIFO by when it got its current time). A
retrying message stays retrying (its attempts count on). When the message
becomes the earliest, the leader is woken as on accept.

KEYS[1] messages  HASH    uuid -> record (format in _record.lua)
KEYS[2] delayed   ZSET    member <6-byte seq><uuid>, score runAt ms
KEYS[3] stream    STREAM  due messages
KEYS[4] seq       STRING  acceptance counter
KEYS[5] dead      STREAM  where quarantined data goes
KEYS[6] retention LIST    see _record.lua
ARGV[1] uuid      bytes   the uuid's 16 bytes
ARGV[2] runAt     integer the new epoch milliseconds
ARGV[3] channel   string  wake channel
ARGV[4] deadlen   integer approximate cap on the dead stream
ARGV[5] keep      integer retention window for a dead record, ms

Returns {state, runAt}        "queued", "scheduled" or "retrying"; the new runAt
     or {"missing"}           no record for the uuid
     or {"conflict", state}   not in the sorted set: queued, delivered, dead or cancelled
     or {"conflict", "dead", 1}  its record could not be decoded and was quarantined
]]
local q = {dead = KEYS[5], deadlen = ARGV[4], retention = KEYS[6], keep = tonumber(ARGV[5])}
local rec, refused = take_waiting(KEYS[1], KEYS[2], ARGV[1], q)
if not rec then
  return refused
end
local now = now_ms()
local run_at = tonumber(ARGV[2])
rec.run_at = run_at

if run_at <= now then
  local id = redis.call('XADD', KEYS[3], '*', 'u', ARGV[1], 'm', rec.body, 'r', ARGV[2],
    'a', rec.attempts)
  rec_enter(rec, 'q', now)
  rec.ref = id
  redis.call('HSET', KEYS[1], ARGV[1], rec_encode(rec))
  return {'queued', run_at}
end

rec.ref = next_seq(KEYS[4])
local member = rec_member(rec, ARGV[1])
redis.call('ZADD', KEYS[2], run_at, member)
redis.call('HSET', KEYS[1], ARGV[1], rec_encode(rec))
if redis.call('ZRANGE', KEYS[2], 0, 0)[1] == member then
  redis.call('PUBLISH', ARGV[3], ARGV[2])
end
return {STATE_NAMES[rec.code], run_at}
