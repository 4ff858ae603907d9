--[[ accept.lua: accept messages, each idempotent by uuid.

Decides due-or-future with Redis' own clock, so no host clock ever decides.
The same uuid again changes nothing and returns the stored record. One call
takes one message or many (the API coalesces concurrent requests into one
call); each message is treated exactly as if it came alone, in argument order.

KEYS[1] messages  HASH    uuid -> msgpack {state, runAt, attempts, acceptedAt, updatedAt, body,
                          transitions, ref}. transitions: state code -> ms after acceptedAt it
                          last entered that state; codes s scheduled, q queued, d delivered,
                          r retrying, x dead, c cancelled (short: the record of every message
                          is kept for the retention window). ref: the integer acceptance
                          sequence of its sorted-set member while scheduled or retrying, its
                          dead-stream entry id while dead, absent otherwise. Records written
                          before these two existed have six elements.
KEYS[2] delayed   ZSET    member <12 hex seq><uuid>, score runAt ms
KEYS[3] stream    STREAM  due messages
KEYS[4] seq       STRING  acceptance counter (tie-breaker for equal runAt)
ARGV[1] channel   string  wake channel; published to when a new message becomes the earliest
ARGV[2+3i..4+3i]  per message:
          uuid    string  canonical lower-case uuid
          body    string  the message
          runAt   integer epoch milliseconds

Returns a flat list, three entries per message, in argument order:
  created  1 when accepted now, 0 when the uuid already existed
  state    "queued" (in the stream) or "scheduled" (in the sorted set), or the stored state
  runAt    integer ms (the stored one for a duplicate)
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local earliest = nil

for i = 2, #ARGV, 3 do
  local uuid, body, run_at_arg = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local packed = redis.call('HGET', KEYS[1], uuid)
  if packed then
    local rec = cmsgpack.unpack(packed)
    out[#out + 1] = 0
    out[#out + 1] = rec[1]
    out[#out + 1] = rec[2]
  else
    local run_at = tonumber(run_at_arg)
    if run_at <= now then
      redis.call('XADD', KEYS[3], '*', 'u', uuid, 'm', body, 'r', run_at_arg, 'a', '0')
      -- The body lives in the stream entry now; the record keeps only what status needs.
      redis.call('HSET', KEYS[1], uuid,
        cmsgpack.pack({'queued', run_at, 0, now, now, '', {q = 0}}))
      out[#out + 1] = 1
      out[#out + 1] = 'queued'
    else
      local seq = redis.call('INCR', KEYS[4])
      local member = string.format('%012x', seq) .. uuid
      redis.call('ZADD', KEYS[2], run_at, member)
      redis.call('HSET', KEYS[1], uuid,
        cmsgpack.pack({'scheduled', run_at, 0, now, now, body, {s = 0}, seq}))
      if earliest == nil or run_at < earliest[1] then
        earliest = {run_at, member, run_at_arg}
      end
      out[#out + 1] = 1
      out[#out + 1] = 'scheduled'
    end
    out[#out + 1] = run_at
  end
end

if earliest and redis.call('ZRANGE', KEYS[2], 0, 0)[1] == earliest[2] then
  redis.call('PUBLISH', ARGV[1], earliest[3])
end
return out
