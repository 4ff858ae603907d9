--[[ drop_dead.lua: delete entries of one uuid from the dead stream.

Examines up to `count` entries between `start` and `end` (XRANGE bounds) and
deletes those of the uuid. The message's record is left as it is (dead, until
the retention window purges it), so the uuid stays a duplicate meanwhile. (A
purge of the whole dead stream is one UNLINK, not this script.)

KEYS[1] dead   STREAM  dead-lettered entries: u, m, r, a, reason, at
ARGV[1] start  string  XRANGE start: "-", an id, or "(" id (exclusive)
ARGV[2] end    string  XRANGE end: "+" or an id
ARGV[3] count  integer most entries to examine
ARGV[4] uuid   bytes   the uuid whose entries go (16 bytes)

Returns {deleted, examined, last}
  deleted   entries deleted
  examined  entries looked at (fewer than count: the range is exhausted)
  last      id of the last entry examined, "" when none
]]
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local deleted, last = 0, ''
for _, entry in ipairs(entries) do
  last = entry[1]
  if entry_fields(entry[2]).u == ARGV[4] then
    deleted = deleted + redis.call('XDEL', KEYS[1], entry[1])
  end
end
return {deleted, #entries, last}
