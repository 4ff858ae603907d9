--[[ replay.lua: send dead-lettered messages back to the stream, attempts reset.

Examines up to `count` entries of the dead stream between `start` and `end`
(XRANGE bounds), optionally only those of one uuid. Each is added to the
stream as a fresh delivery (attempts 0), its record marked queued (or made
anew when it was already purged: no longer final, the retention purge passes it by), and the
entry deleted from the dead stream. An entry stays where it is when its uuid
has a record that is not dead (the message lives elsewhere: replaying it would
run it twice), or when it lacks the fields of a delivery.

KEYS[1] messages   HASH    uuid -> record (format in _record.lua)
KEYS[2] dead       STREAM  dead-lettered entries: u, m, r, a, reason, at
KEYS[3] stream     STREAM  due messages
ARGV[1] start      string  XRANGE start: "-", an id, or "(" id (exclusive)
ARGV[2] end        string  XRANGE end: "+" or an id
ARGV[3] count      integer most entries to examine
ARGV[4] uuid       bytes   only entries of this uuid (16 bytes); "" for every entry

Returns {replayed, examined, last, blocked}
  replayed  entries sent back to the stream
  examined  entries looked at (fewer than count: the range is exhausted)
  last      id of the last entry examined, "" when none
  blocked   state of a live record that kept a matching entry in place, "" when none
]]
local entries = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local now = now_ms()
local replayed, last, blocked = 0, '', ''

for _, entry in ipairs(entries) do
  local id, raw = entry[1], entry[2]
  last = id
  local f = entry_fields(raw)
  if f.u and f.m and f.r and tonumber(f.r) and (ARGV[4] == '' or f.u == ARGV[4]) then
    local rec = rec_load(KEYS[1], f.u)
    if rec and rec.code ~= 'x' then
      blocked = STATE_NAMES[rec.code]
    else
      local entry = redis.call('XADD', KEYS[3], '*', 'u', f.u, 'm', f.m, 'r', f.r, 'a', '0')
      if rec then
        rec.attempts = 0
        rec_enter(rec, 'q', now)
        rec.ref = entry
      else
        rec = rec_new('q', tonumber(f.r), now, entry, '')
      end
      redis.call('HSET', KEYS[1], f.u, rec_encode(rec))
      redis.call('XDEL', KEYS[2], id)
      replayed = replayed + 1
    end
  end
end
return {replayed, #entries, last, blocked}
