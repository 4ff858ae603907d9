--[[ quarantine.lua: move stream entries a worker could not decode to the dead stream.

A worker that reads an entry it cannot turn into a delivery (a field missing, runAt not
a number, a body that is not UTF-8: written by hand, or damaged) must not raise: the
entry would stay pending and meet every worker, and every restart, again. It calls this
instead, with the entry ids and what was wrong. Each entry still pending in the group is
acknowledged, deleted and quarantined as _record.lua's entry_quarantine does (its fields
kept as raw:<field>, its id as entry, and the record of its message, if one still says
queued at this entry, marked dead at the quarantine entry). One no longer pending (another
worker quarantined it first) is left alone.

KEYS[1] stream     STREAM
KEYS[2] messages   HASH
KEYS[3] dead       STREAM
KEYS[4] retention  LIST     see _record.lua
ARGV[1] group      string   consumer group
ARGV[2] deadlen    integer  approximate cap on the dead stream
ARGV[3] keep       integer  retention window for a dead record, ms
ARGV[4..] pairs    entry id, what was wrong (text, bounded by the caller)

Returns quarantined: how many entries were moved
]]
local now = now_ms()
local q = {dead = KEYS[3], deadlen = ARGV[2], retention = KEYS[4], keep = tonumber(ARGV[3])}
local quarantined = 0
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    local entries = redis.call('XRANGE', KEYS[1], id, id)
    redis.call('XDEL', KEYS[1], id)
    if #entries == 1 then
      entry_quarantine(q, KEYS[2], id, entries[1][2], now, 'corrupt stream entry: ' .. ARGV[i + 1])
      quarantined = quarantined + 1
    end
  end
end
return quarantined
