--[[ accept.lua: accept messages, each idempotent by uuid.

Decides due-or-future with Redis' own clock, so no host clock ever decides.
The same uuid again changes nothing and returns the stored record. One call
takes one message or many (the API coalesces concurrent requests into one
call); each message is treated exactly as if it came alone, in argument order
(a uuid twice in one call: the second is a duplicate of the first). Lookups and
writes go in one command per kind for the whole call, not one per message:
each redis.call costs about as much as the work it does.

KEYS[1] messages  HASH    uuid -> record (format in _record.lua)
KEYS[2] delayed   ZSET    member <6-byte seq><uuid>, score runAt ms
KEYS[3] stream    STREAM  due messages: u uuid, m body, r runAt, a attempts
KEYS[4] seq       STRING  acceptance counter (tie-breaker for equal runAt)
KEYS[5] dead      STREAM  where quarantined data goes
KEYS[6] retention LIST    see _record.lua
ARGV[1] channel   string  wake channel; published to when a new message becomes the earliest
ARGV[2] deadlen   integer approximate cap on the dead stream
ARGV[3] keep      integer retention window for a dead record, ms
ARGV[4+3i..6+3i]  per message:
          uuid    bytes   the uuid's 16 bytes
          body    string  the message
          runAt   integer epoch milliseconds

A duplicate whose stored record cannot be decoded is quarantined (see _record.lua): the
uuid stays taken, and the message is dead.

Returns a flat list, three entries per message, in argument order:
  created  1 when accepted now, 0 when the uuid already existed
  state    "queued" (in the stream) or "scheduled" (in the sorted set), or the stored state
  runAt    integer ms (the stored one for a duplicate; 0 for one just quarantined)
followed, only when something was quarantined, by how many were.
]]
local now = now_ms()
local count = (#ARGV - 3) / 3
local uuids = {}
for i = 1, count do
  uuids[i] = ARGV[3 * i + 1]
end
local stored = hmget_all(KEYS[1], uuids)
local out, records, later, seen = {}, {}, {}, {}
local quarantined = 0

for i = 1, count do
  local uuid, body, run_at_arg = uuids[i], ARGV[3 * i + 2], ARGV[3 * i + 3]
  local packed = stored[i]
  local first = seen[uuid]
  if packed and rec_valid(packed) then
    out[#out + 1] = 0
    out[#out + 1] = STATE_NAMES[string.sub(packed, 1, 1)]
    out[#out + 1] = struct.unpack('>I6', packed, 4)
  elseif packed and not first then
    local q = {dead = KEYS[5], deadlen = ARGV[2], retention = KEYS[6], keep = tonumber(ARGV[3])}
    rec_quarantine(q, KEYS[1], uuid, packed, now)
    quarantined = quarantined + 1
    seen[uuid] = #out + 1  -- the same uuid again in this call answers as this one
    out[#out + 1] = 0
    out[#out + 1] = 'dead'
    out[#out + 1] = 0
  elseif first then
    out[#out + 1] = 0
    out[#out + 1] = out[first + 1]
    out[#out + 1] = out[first + 2]
  else
    seen[uuid] = #out + 1
    local run_at = tonumber(run_at_arg)
    if run_at <= now then
      local id = redis.call('XADD', KEYS[3], '*', 'u', uuid, 'm', body, 'r', run_at_arg, 'a', '0')
      -- The body lives in the stream entry now; the record keeps only what status needs.
      records[#records + 1] = uuid
      records[#records + 1] = rec_fresh('q', run_at, now, id, '')
      out[#out + 1] = 1
      out[#out + 1] = 'queued'
    else
      later[#later + 1] = i
      out[#out + 1] = 1
      out[#out + 1] = 'scheduled'
    end
    out[#out + 1] = run_at
  end
end

-- Sequences in argument order, from one INCRBY for the whole call.
local members, earliest = {}, nil
if #later > 0 then
  local seq_base = redis.call('INCRBY', KEYS[4], #later) - #later
  for j, i in ipairs(later) do
    local uuid, body, run_at_arg = uuids[i], ARGV[3 * i + 2], ARGV[3 * i + 3]
    local run_at = tonumber(run_at_arg)
    local seq = struct.pack('>I6', seq_base + j)
    local member = seq .. uuid
    members[#members + 1] = run_at_arg
    members[#members + 1] = member
    records[#records + 1] = uuid
    records[#records + 1] = rec_fresh('s', run_at, now, seq, body)
    if earliest == nil or run_at < earliest[1] then
      earliest = {run_at, member, run_at_arg}
    end
  end
end
call_spread('ZADD', KEYS[2], members)
call_spread('HSET', KEYS[1], records)

if earliest and redis.call('ZRANGE', KEYS[2], 0, 0)[1] == earliest[2] then
  redis.call('PUBLISH', ARGV[1], earliest[3])
end
if quarantined > 0 then
  out[#out + 1] = quarantined
end
return out
