--[[ promote.lua: move due messages from the sorted set to the stream (leader only).

Fenced: refuses when a newer leader epoch is stored, so a paused ("zombie")
leader that wakes after another took over cannot promote. Every accepted call
also records who leads (for /stats) in a hash that expires a few seconds after
the last promote call. Members are moved in
(runAt, acceptance) order: equal scores sort by member, which starts with the
fixed-width acceptance sequence.

KEYS[1] delayed   ZSET
KEYS[2] messages  HASH
KEYS[3] stream    STREAM
KEYS[4] epoch     STRING  highest epoch that promoted, 20-digit zero-padded decimal
A due member whose record cannot be decoded is quarantined (see _record.lua): the
message is dead, since its body was in the record. One that is not a member's shape is
quarantined too. One whose record no longer names it (the record moved on: cancelled,
dead, or quarantined by another script) is dropped: promoting it would run the message
again.

KEYS[1] delayed   ZSET
KEYS[2] messages  HASH
KEYS[3] stream    STREAM
KEYS[4] epoch     STRING  highest epoch that promoted, 20-digit zero-padded decimal
KEYS[5] leader    HASH    identifier, epoch, since (ms this identifier and epoch first promoted)
KEYS[6] dead      STREAM  where quarantined data goes
KEYS[7] retention LIST    see _record.lua
ARGV[1] epoch     string  the caller's epoch, 20-digit zero-padded decimal
ARGV[2] limit     integer most members to move in this call
ARGV[3] ident     string  the caller's scheduler identifier
ARGV[4] ttl       integer ms the leader hash lives without another promote call
ARGV[5] deadlen   integer approximate cap on the dead stream
ARGV[6] keep      integer retention window for a dead record, ms

Returns {moved, now, next, quarantined}
                               moved count (members taken off the set), Redis time ms,
                               runAt ms of the earliest member left (-1 when the set is
                               empty), how many were quarantined
     or {-1, stored_epoch}     refused: a newer leader exists
]]
local stored = redis.call('GET', KEYS[4])
if stored and stored > ARGV[1] then
  return {-1, stored}
end
if stored ~= ARGV[1] then
  redis.call('SET', KEYS[4], ARGV[1])
end

local now = now_ms()
local seen = redis.call('HMGET', KEYS[5], 'identifier', 'epoch')
if seen[1] ~= ARGV[3] or seen[2] ~= ARGV[1] then
  redis.call('HSET', KEYS[5], 'identifier', ARGV[3], 'epoch', ARGV[1], 'since', int_text(now))
end
redis.call('PEXPIRE', KEYS[5], ARGV[4])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))

-- One HMGET and one HSET for the batch: per message, only its XADD.
local uuids = {}
for i, member in ipairs(due) do
  uuids[i] = string.sub(member, 7)
end
local stored = hmget_all(KEYS[2], uuids)
local records = {}
local q = {dead = KEYS[6], deadlen = ARGV[5], retention = KEYS[7], keep = tonumber(ARGV[6])}
local quarantined = 0
for i, uuid in ipairs(uuids) do
  local packed = stored[i]
  local ref, at
  if packed then
    ref, at = rec_ref_at(packed)
  end
  local code = ref and byte(packed, 1)
  -- Scheduled or retrying (s, r), and its ref is this member's sequence.
  if (code == 115 or code == 114) and ref == sub(due[i], 1, 6) then
    local run_at, attempts, body = rec_due_fields(packed, ref, at)
    local id = redis.call('XADD', KEYS[3], '*', 'u', uuid, 'm', body, 'r', int_text(run_at),
      'a', attempts)
    records[#records + 1] = uuid
    records[#records + 1] = rec_advance(packed, 'q', now, 0, id)
  elseif #due[i] ~= MEMBER_LEN then
    quarantine(q, now, 'corrupt sorted-set member', nil, due[i],
      {'r', redis.call('ZSCORE', KEYS[1], due[i])})
    quarantined = quarantined + 1
  elseif packed and not rec_valid(packed) then
    rec_quarantine(q, KEYS[2], uuid, packed, now, tonumber(redis.call('ZSCORE', KEYS[1], due[i])))
    quarantined = quarantined + 1
  end
end
call_spread('HSET', KEYS[2], records)
-- They are the set's first #due members (lowest scores, ties by member): removing them by
-- rank is one walk of the skiplist, where ZREM would search for each member anew.
if #due > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, #due - 1)
end

local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_due = -1
if first[2] then
  next_due = tonumber(first[2])
end
return {#due, now, next_due, quarantined}
