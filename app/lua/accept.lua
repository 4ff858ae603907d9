--[[ accept.lua: accept messages, each idempotent by uuid.

Decides due-or-future with Redis' own clock, so no host clock ever decides.
The same uuid again changes nothing and returns the stored record. One call
takes one message or many (the API coalesces concurrent requests into one
call); each message is treated exactly as if it came alone, in argument order.

KEYS[1] messages  HASH    uuid -> record (format in _record.lua)
KEYS[2] delayed   ZSET    member <6-byte seq><uuid>, score runAt ms
KEYS[3] stream    STREAM  due messages: u uuid, m body, r runAt, a attempts
KEYS[4] seq       STRING  acceptance counter (tie-breaker for equal runAt)
ARGV[1] channel   string  wake channel; published to when a new message becomes the earliest
ARGV[2+3i..4+3i]  per message:
          uuid    bytes   the uuid's 16 bytes
          body    string  the message
          runAt   integer epoch milliseconds

Returns a flat list, three entries per message, in argument order:
  created  1 when accepted now, 0 when the uuid already existed
  state    "queued" (in the stream) or "scheduled" (in the sorted set), or the stored state
  runAt    integer ms (the stored one for a duplicate)
]]
local now = now_ms()
local out = {}
local earliest = nil

for i = 2, #ARGV, 3 do
  local uuid, body, run_at_arg = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local packed = redis.call('HGET', KEYS[1], uuid)
  if packed then
    local rec = rec_decode(packed)
    out[#out + 1] = 0
    out[#out + 1] = STATE_NAMES[rec.code]
    out[#out + 1] = rec.run_at
  else
    local run_at = tonumber(run_at_arg)
    if run_at <= now then
      redis.call('XADD', KEYS[3], '*', 'u', uuid, 'm', body, 'r', run_at_arg, 'a', '0')
      -- The body lives in the stream entry now; the record keeps only what status needs.
      redis.call('HSET', KEYS[1], uuid, rec_fresh('q', run_at, now, '', ''))
      out[#out + 1] = 1
      out[#out + 1] = 'queued'
    else
      local seq = next_seq(KEYS[4])
      local member = seq .. uuid
      redis.call('ZADD', KEYS[2], run_at, member)
      redis.call('HSET', KEYS[1], uuid, rec_fresh('s', run_at, now, seq, body))
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
