--[[ _record.lua: prepended to every script (see app/store/scripts.py); the storage format,
and the steps several scripts share.

A uuid is stored as its 16 raw bytes. A sorted-set member is a 6-byte
big-endian acceptance sequence followed by the uuid. A record (a field of the
messages hash, keyed by the uuid) is, big-endian:

  c1 I2 I6 I6 c1   state code, attempts, runAt ms, acceptedAt ms, first state code
  B  n x (c1 I6)   later transitions: state code -> ms after acceptedAt it was last entered
  B  ref           the member's sequence (scheduled, retrying), stream entry id (queued)
                   or dead entry id (dead)
  rest             the body while scheduled or retrying, else empty

State codes: s scheduled, q queued, d delivered, r retrying, x dead, c cancelled.
The Python side of the same format is app/store/codec.py.
]]
local STATE_NAMES = {s = 'scheduled', q = 'queued', d = 'delivered', r = 'retrying',
  x = 'dead', c = 'cancelled'}
local STATE_CODES = {'s', 'q', 'd', 'r', 'x', 'c'}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Integers as Redis replies and stream fields: tostring would print 1.9e+12.
local function int_text(n)
  return string.format('%.0f', n)
end

-- The 6-byte ref of a new sorted-set member: the next acceptance sequence.
local function next_seq(seq_key)
  return struct.pack('>I6', redis.call('INCR', seq_key))
end

-- redis.call(command, key, ...items) in slices: Lua's unpack fails beyond ~8000 values.
local function call_spread(command, key, items)
  for i = 1, #items, 4000 do
    redis.call(command, key, unpack(items, i, math.min(i + 3999, #items)))
  end
end

-- A stream entry id "<ms>-<seq>" as two numbers (exact: both stay below 2^53).
local function id_parts(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

-- Whether id (ms_a, seq_a) comes before id (ms_b, seq_b).
local function id_before(ms_a, seq_a, ms_b, seq_b)
  return ms_a < ms_b or (ms_a == ms_b and seq_a < seq_b)
end

-- HMGET of any number of fields, in slices like call_spread.
local function hmget_all(key, fields)
  local out = {}
  for i = 1, #fields, 4000 do
    local part = redis.call('HMGET', key, unpack(fields, i, math.min(i + 3999, #fields)))
    for j = 1, #part do
      out[i + j - 1] = part[j]
    end
  end
  return out
end

local function rec_decode(packed)
  local code, attempts, run_at, accepted_at, first, n, pos =
    struct.unpack('>c1I2I6I6c1B', packed)
  local marks = {}
  for _ = 1, n do
    local mark, offset
    mark, offset, pos = struct.unpack('>c1I6', packed, pos)
    marks[mark] = offset
  end
  local ref_len
  ref_len, pos = struct.unpack('B', packed, pos)
  return {code = code, attempts = attempts, run_at = run_at, accepted_at = accepted_at,
    first = first, marks = marks, ref = string.sub(packed, pos, pos + ref_len - 1),
    body = string.sub(packed, pos + ref_len)}
end

local function rec_encode(rec)
  local parts, n = {}, 0
  for _, code in ipairs(STATE_CODES) do
    local offset = rec.marks[code]
    if offset then
      n = n + 1
      parts[n] = struct.pack('>c1I6', code, offset)
    end
  end
  return struct.pack('>c1I2I6I6c1B', rec.code, rec.attempts, rec.run_at, rec.accepted_at,
    rec.first, n) .. table.concat(parts) .. struct.pack('B', #rec.ref) .. rec.ref .. rec.body
end

-- The record of `uuid`, decoded; nil when there is none (never written, or purged).
local function rec_load(messages, uuid)
  local packed = redis.call('HGET', messages, uuid)
  if packed then
    return rec_decode(packed)
  end
  return nil
end

-- A new record: `code` is its first state, entered at `now`.
local function rec_new(code, run_at, now, ref, body)
  return {code = code, attempts = 0, run_at = run_at, accepted_at = now, first = code,
    marks = {}, ref = ref, body = body}
end

-- rec_encode(rec_new(...)) without the table, for accept's per-message path.
local function rec_fresh(code, run_at, now, ref, body)
  return struct.pack('>c1I2I6I6c1BB', code, 0, run_at, now, code, 0, #ref) .. ref .. body
end

-- The record enters state `code` at `now`; its ref and body go unless the caller sets them.
local function rec_enter(rec, code, now)
  rec.code = code
  rec.marks[code] = now - rec.accepted_at
  rec.ref = ''
  rec.body = ''
end

-- The hot paths (promote, ack) rewrite a record without building tables: about three
-- times cheaper than rec_decode + rec_encode. Offsets follow the layout above.
local HEAD_LEN = 17

-- Position of the ref's length byte: after the header and the n transitions.
local function ref_at(packed)
  return HEAD_LEN + 1 + 7 * string.byte(packed, HEAD_LEN)
end

-- runAt, attempts and body of a scheduled or retrying record.
local function rec_due_fields(packed)
  local attempts, run_at = struct.unpack('>I2I6', packed, 2)
  local at = ref_at(packed)
  return run_at, attempts, string.sub(packed, at + 1 + string.byte(packed, at))
end

-- The record entered state `code` at `now` with `extra` more attempts and the new `ref`
-- ('' for none); its body is dropped.
local function rec_advance(packed, code, now, extra, ref)
  local attempts, _, accepted_at = struct.unpack('>I2I6I6', packed, 2)
  local n = string.byte(packed, HEAD_LEN)
  local code_byte = string.byte(code)
  local marks_end = HEAD_LEN + 7 * n
  local marks = string.sub(packed, HEAD_LEN + 1, marks_end)
  for at = HEAD_LEN + 1, marks_end, 7 do
    if string.byte(packed, at) == code_byte then
      -- It was in this state before: keep only its latest entry.
      marks = string.sub(packed, HEAD_LEN + 1, at - 1) .. string.sub(packed, at + 7, marks_end)
      n = n - 1
      break
    end
  end
  return struct.pack('>c1I2', code, attempts + extra) .. string.sub(packed, 4, HEAD_LEN - 1)
    .. string.char(n + 1) .. marks .. struct.pack('>c1I6B', code, now - accepted_at, #ref) .. ref
end

-- The ref of a record (its stream entry id while queued).
local function rec_ref(packed)
  local at = ref_at(packed)
  return string.sub(packed, at + 1, at + string.byte(packed, at))
end

-- Epoch ms of the record's latest transition.
local function rec_updated_at(packed)
  local accepted_at = struct.unpack('>I6', packed, 10)
  local latest = 0
  for at = HEAD_LEN + 2, HEAD_LEN + 7 * string.byte(packed, HEAD_LEN), 7 do
    latest = math.max(latest, (struct.unpack('>I6', packed, at)))
  end
  return accepted_at + latest
end

-- The retention list: <I6 ms after which the record may go><uuid>, appended when a record
-- reaches a final state (delivered, dead, cancelled). Every record's window is the same
-- length, so appending keeps the list in expiry order and purging reads only its head.
local function retain(key, uuid, now, keep)
  redis.call('RPUSH', key, struct.pack('>I6', now + keep) .. uuid)
end

-- A stream entry's flat reply {field, value, field, value, ...} as a table. A field
-- written twice reads as its last value.
local function entry_fields(raw)
  local f = {}
  for i = 1, #raw, 2 do
    f[raw[i]] = raw[i + 1]
  end
  return f
end

-- Dead-letter a message that left the stream: its delivery `f` (entry_fields of the
-- entry: u, m, r) goes to the dead stream, capped near `deadlen` entries, with its
-- attempts, the reason and the time. Its record `rec` (nil when there is none: nothing
-- is written then) enters state dead with the dead entry's id as ref, so a lookup by uuid
-- finds the entry, and joins the retention list: the dead stream is capped, so the record
-- must not outlive it forever either.
local function dead_letter(dead, messages, retention, f, rec, attempts, reason, deadlen, now,
    keep)
  local dead_id = redis.call('XADD', dead, 'MAXLEN', '~', deadlen, '*', 'u', f.u, 'm', f.m,
    'r', f.r, 'a', attempts, 'reason', reason, 'at', int_text(now))
  if rec then
    rec.attempts = attempts
    rec_enter(rec, 'x', now)
    rec.ref = dead_id
    redis.call('HSET', messages, f.u, rec_encode(rec))
    retain(retention, f.u, now, keep)
  end
end

-- Forget up to `limit` records whose retention passed. A record that left its final state
-- meanwhile (a replayed dead message) stays: it is appended again when it next ends.
local function purge_retained(retention, messages, now, keep, limit)
  local head = redis.call('LRANGE', retention, 0, limit - 1)
  local done = 0
  for _, item in ipairs(head) do
    if struct.unpack('>I6', item) > now then
      break
    end
    done = done + 1
    local uuid = string.sub(item, 7)
    local packed = redis.call('HGET', messages, uuid)
    if packed then
      local code = string.sub(packed, 1, 1)
      local final = code == 'd' or code == 'x' or code == 'c'
      if final and rec_updated_at(packed) + keep <= now then
        redis.call('HDEL', messages, uuid)
      end
    end
  end
  if done > 0 then
    redis.call('LTRIM', retention, done, -1)
  end
end

-- The sorted-set member of a scheduled or retrying record.
local function rec_member(rec, uuid)
  return rec.ref .. uuid
end

-- The record of a message waiting in the sorted set (scheduled or retrying), its member
-- removed from the set; or nil and the caller's reply: {'missing'} or {'conflict', state}.
local function take_waiting(messages, delayed, uuid)
  local packed = redis.call('HGET', messages, uuid)
  if not packed then
    return nil, {'missing'}
  end
  local rec = rec_decode(packed)
  if rec.code ~= 's' and rec.code ~= 'r' then
    return nil, {'conflict', STATE_NAMES[rec.code]}
  end
  redis.call('ZREM', delayed, rec_member(rec, uuid))
  return rec
end

