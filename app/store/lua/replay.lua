--[[ replay.lua: send dead-lettered messages back to the stream, attempts reset.

Examines up to `count` entries of the dead stream between `start` and `end`
(XRANGE bounds), optionally only those of one uuid. Each is added to the
stream as a fresh delivery (attempts 0), its record marked queued (or made
anew when it was already purged: no longer final, the retention purge passes it by), and the
entry deleted from the dead stream. An entry stays where it is when its uuid
has a record that is not dead (the message lives elsewhere: replaying it would
run it twice), or when it lacks the fields of a delivery (a quarantined entry has
none). A record that cannot be decoded is quarantined (see _record.lua) and the
message replayed as if it had none.

KEYS[1] messages   HASH    uuid -> record (format in _record.lua)
KEYS[2] dead       STREAM  dead-lettered entries: u, m, r, a, reason, at
KEYS[3] stream     STREAM  due messages
ARGV[1] start      string  XRANGE start: "-", an id, or "(" id (exclusive)
ARGV[2] end        string  XRANGE end: "+" or an id
ARGV[3] count      integer most entries to examine
ARGV[4] uuid       bytes   only entries of this uuid (16 bytes); "" for every entry
ARGV[5] deadlen    integer approximate cap on the dead stream

Returns {replayed, examined, last, blocked, quarantined}
  replayed     entries sent back to the stream
  examined     entries looked at (fewer than count: the range is exhausted)
  last         id of the last entry examined, "" when none
  blocked      state of a live record that kept a matching entry in place, "" when none
  quarantined  records quarantined
]]
local entries = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local now = now_ms()
local replayed, last, blocked, quarantined = 0, '', '', 0
local q = {dead = KEYS[2], deadlen = ARGV[5]}

for _, entry in ipairs(entries) do
  local id, raw = entry[1], entry[2]
  last = id
  local f = entry_fields(raw)
  if f.u and #f.u == UUID_LEN and f.m and whole(f.r, 2 ^ 48)
      and (ARGV[4] == '' or f.u == ARGV[4]) then
    local rec, corrupt = rec_load(KEYS[1], f.u)
    if corrupt then
      quarantine(q, now, 'corrupt record', f.u, corrupt)
      quarantined = quarantined + 1
    end
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
return {replayed, #entries, last, blocked, quarantined}
