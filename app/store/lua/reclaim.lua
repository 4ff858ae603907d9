--[[ reclaim.lua: take over entries left pending by dead or stalled workers.

XAUTOCLAIM moves entries idle longer than the visibility timeout to the
caller. An entry whose deliveries (failed handler runs before this entry, plus
this entry's delivery count) exceed the maximum is dead-lettered instead of
being handed out again: a message that crashes every worker must not cycle. An
entry that cannot be decoded is quarantined (see _record.lua), and so is the
record of a message dead-lettered here when it cannot be decoded.

KEYS[1] stream     STREAM
KEYS[2] messages   HASH
KEYS[3] dead       STREAM   dead letters and quarantined data
KEYS[4] retention  LIST     see _record.lua
ARGV[1] group      string   consumer group
ARGV[2] consumer   string   the caller
ARGV[3] idle       integer  visibility timeout, ms
ARGV[4] start      string   XAUTOCLAIM cursor ("0-0" to begin)
ARGV[5] count      integer  most entries to examine
ARGV[6] max        integer  deliveries allowed
ARGV[7] deadlen    integer  approximate cap on the dead stream
ARGV[8] keep       integer  retention window for a dead record, ms

Returns {cursor, claimed, dead, quarantined}
  cursor       the next XAUTOCLAIM start ("0-0" when the scan wrapped around)
  claimed      flat list: id, {field, value, ...}, id, {...} handed to the caller
  dead         how many were dead-lettered
  quarantined  how many entries and records were quarantined
]]
local res = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  'COUNT', ARGV[5])
local now = now_ms()
local max = tonumber(ARGV[6])
local claimed = {}
local dead, quarantined = 0, 0
local q = {dead = KEYS[3], deadlen = ARGV[7], retention = KEYS[4], keep = tonumber(ARGV[8])}

for _, entry in ipairs(res[2]) do
  local id, raw = entry[1], entry[2]
  local f = entry_fields(raw)
  if not entry_valid(f) then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    entry_quarantine(q, KEYS[2], id, raw, now)
    quarantined = quarantined + 1
  else
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    local deliveries = tonumber(f.a) + tonumber(pending[1][4])
    if deliveries > max then
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
      local rec, corrupt = rec_load(KEYS[2], f.u)
      if corrupt then
        quarantine(q, now, 'corrupt record', f.u, corrupt)
        quarantined = quarantined + 1
        rec = rec_new('q', tonumber(f.r), now, '', '')
      end
      dead_letter(KEYS[3], KEYS[2], KEYS[4], f, rec, deliveries - 1,
        'deliveries exhausted (worker lost)', ARGV[7], now, tonumber(ARGV[8]))
      dead = dead + 1
    else
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = raw
    end
  end
end
return {res[1], claimed, dead, quarantined}
