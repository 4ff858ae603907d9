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

What a script cannot decode (a record, a stream entry, a sorted-set member) is quarantined
(see `quarantine` below), never fatal: one bad record must not fail every call that meets it.
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

-- The hot paths (promote, ack) rewrite a record without building tables: about three
-- times cheaper than rec_decode + rec_encode. Offsets follow the layout above.
local HEAD_LEN = 17
local byte, sub = string.byte, string.sub  -- locals: cheaper than a global lookup per call
-- The state codes as bytes (s q d r x c).
local CODE_BYTES = {[115] = true, [113] = true, [100] = true, [114] = true, [120] = true,
  [99] = true}
local UUID_LEN = 16
local MEMBER_LEN = 6 + UUID_LEN

-- Whether `packed` has a record's shape: known state codes (its state, its first, each
-- transition's), at most one transition per state, and the length its header and ref promise. Returns the position of the ref's
-- length byte, or false. Byte reads only, cheap enough for every record the hot scripts
-- read: struct.unpack raises on a short string, which would fail the whole call.
local function rec_valid(packed)
  local len = #packed
  if len <= HEAD_LEN or not CODE_BYTES[string.byte(packed, 1)]
      or not CODE_BYTES[string.byte(packed, HEAD_LEN - 1)] then
    return false
  end
  local n = string.byte(packed, HEAD_LEN)
  local at = HEAD_LEN + 1 + 7 * n
  if n > 6 or at > len or at + string.byte(packed, at) > len then
    return false
  end
  for mark = HEAD_LEN + 1, at - 1, 7 do
    if not CODE_BYTES[string.byte(packed, mark)] then
      return false
    end
  end
  return at
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


-- The record of `uuid`, decoded; nil when there is none (never written, or purged); false and
-- its bytes when it cannot be decoded (the caller quarantines them).
local function rec_load(messages, uuid)
  local packed = redis.call('HGET', messages, uuid)
  if not packed then
    return nil
  end
  if not rec_valid(packed) then
    return false, packed
  end
  return rec_decode(packed)
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


-- Position of the ref's length byte: after the header and the n transitions.
local function ref_at(packed)
  return HEAD_LEN + 1 + 7 * string.byte(packed, HEAD_LEN)
end

-- A record's ref and the position of its length byte, from byte reads alone; nil when the
-- record is too short to hold them. The hot scripts check a record by this (its state and
-- its ref must be what they expect: then it is one they wrote) and call rec_valid only on
-- one that is not, which costs a call per record in promote and ack, not several.
local function rec_ref_at(packed)
  local n = byte(packed, HEAD_LEN)
  if not n then
    return nil
  end
  local at = HEAD_LEN + 1 + 7 * n
  local len = byte(packed, at)
  if not len then
    return nil
  end
  return sub(packed, at + 1, at + len), at
end

-- runAt, attempts and body of a scheduled or retrying record whose ref is `ref`, its length
-- byte at `at` (rec_ref_at).
local function rec_due_fields(packed, ref, at)
  local attempts, run_at = struct.unpack('>I2I6', packed, 2)
  return run_at, attempts, sub(packed, at + 1 + #ref)
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

-- Quarantine: what a script cannot decode goes aside with its raw bytes and a reason, and the
-- rest keeps flowing. The place is the dead stream (capped near `q.deadlen` entries like every
-- dead letter, listed by the API): `reason` ("corrupt record", "corrupt stream entry",
-- "corrupt sorted-set member"), `at`, `u` when the uuid is known, the raw bytes (`raw`, or
-- for a stream entry each of its fields as `raw:<field>`) and any `extra` field pairs. It has
-- no `m` or `r`: a replay passes it by. `q` is {dead = key, deadlen = n, retention = key,
-- keep = ms}. Returns the dead entry's id.
local function quarantine(q, now, reason, uuid, raw, extra)
  local fields = {'reason', reason, 'at', int_text(now)}
  if uuid then
    fields[#fields + 1] = 'u'
    fields[#fields + 1] = uuid
  end
  if type(raw) == 'table' then
    -- Bounded: unpack below takes some 8,000 values at most.
    for i = 1, math.min(#raw, 4000), 2 do
      fields[#fields + 1] = 'raw:' .. raw[i]
      fields[#fields + 1] = raw[i + 1]
    end
  else
    fields[#fields + 1] = 'raw'
    fields[#fields + 1] = raw
  end
  for _, value in ipairs(extra or {}) do
    fields[#fields + 1] = value
  end
  return redis.call('XADD', q.dead, 'MAXLEN', '~', q.deadlen, '*', unpack(fields))
end

-- A record that cannot be decoded, where it was the message's only copy (scheduled or
-- retrying: the body was in it; or nothing else is known): quarantined, and the message is
-- dead from now on. Its new record names the quarantine entry, so a lookup answers dead, the
-- uuid stays taken, and the retention purge ends it like any dead record. Its runAt is
-- `run_at` when the caller knows it (a sorted-set score), else 0.
local function rec_quarantine(q, messages, uuid, packed, now, run_at)
  local id = quarantine(q, now, 'corrupt record', uuid, packed)
  if not run_at or run_at < 0 or run_at >= 2 ^ 48 then
    run_at = 0
  end
  redis.call('HSET', messages, uuid, rec_fresh('x', math.floor(run_at), now, id, ''))
  retain(q.retention, uuid, now, q.keep)
  return id
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

-- The fields a delivery needs (entry_fields of a stream entry), readable: a 16-byte uuid, a
-- body, a runAt and an attempts count that fit the record's fields. Every script writes entries so; anything else
-- was written by hand, or damaged.
local function whole(text, limit)
  local n = tonumber(text)
  return n ~= nil and n >= 0 and n < limit and n == math.floor(n)
end

local function entry_valid(f)
  return f.u ~= nil and #f.u == UUID_LEN and f.m ~= nil and whole(f.r, 2 ^ 48)
    and whole(f.a, 65535)
end

-- A stream entry that cannot be decoded (already acknowledged and deleted by the caller):
-- quarantined with its fields and its id, and the message's record, when it still says
-- queued at this entry, marked dead at the quarantine entry (the body is gone with the
-- entry's readable fields).
local function entry_quarantine(q, messages, id, raw, now, reason)
  local f = entry_fields(raw)
  local uuid = f.u
  if uuid and #uuid ~= UUID_LEN then
    uuid = nil
  end
  local dead_id = quarantine(q, now, reason or 'corrupt stream entry', uuid, raw, {'entry', id})
  if uuid then
    local packed = redis.call('HGET', messages, uuid)
    if packed and rec_valid(packed) and string.sub(packed, 1, 1) == 'q'
        and rec_ref(packed) == id then
      redis.call('HSET', messages, uuid, rec_advance(packed, 'x', now, 0, dead_id))
      retain(q.retention, uuid, now, q.keep)
    end
  end
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
-- meanwhile (a replayed dead message) stays: it is appended again when it next ends. A record
-- that cannot be decoded is quarantined (and its dead record retained anew), an item of the
-- list that cannot be read too. Returns how many were quarantined.
local function purge_retained(q, messages, now, limit)
  local head = redis.call('LRANGE', q.retention, 0, limit - 1)
  local done, quarantined = 0, 0
  for _, item in ipairs(head) do
    if #item ~= MEMBER_LEN then
      quarantine(q, now, 'corrupt retention item', nil, item)
      quarantined = quarantined + 1
    elseif struct.unpack('>I6', item) > now then
      break
    else
      local uuid = string.sub(item, 7)
      local packed = redis.call('HGET', messages, uuid)
      if packed and not rec_valid(packed) then
        rec_quarantine(q, messages, uuid, packed, now)
        quarantined = quarantined + 1
      elseif packed then
        local code = string.sub(packed, 1, 1)
        local final = code == 'd' or code == 'x' or code == 'c'
        if final and rec_updated_at(packed) + q.keep <= now then
          redis.call('HDEL', messages, uuid)
        end
      end
    end
    done = done + 1
  end
  if done > 0 then
    redis.call('LTRIM', q.retention, done, -1)
  end
  return quarantined
end

-- The sorted-set member of a scheduled or retrying record.
local function rec_member(rec, uuid)
  return rec.ref .. uuid
end

-- The record of a message waiting in the sorted set (scheduled or retrying), its member
-- removed from the set; or nil and the caller's reply: {'missing'} or {'conflict', state}.
-- A record that cannot be decoded is quarantined (`q`, see quarantine): the message is dead,
-- and the reply {'conflict', 'dead', 1} says one thing was quarantined. Its member, unknown,
-- stays in the set; promote drops it, since its record no longer names it.
local function take_waiting(messages, delayed, uuid, q)
  local packed = redis.call('HGET', messages, uuid)
  if not packed then
    return nil, {'missing'}
  end
  if not rec_valid(packed) then
    rec_quarantine(q, messages, uuid, packed, now_ms())
    return nil, {'conflict', 'dead', 1}
  end
  local rec = rec_decode(packed)
  if rec.code ~= 's' and rec.code ~= 'r' then
    return nil, {'conflict', STATE_NAMES[rec.code]}
  end
  redis.call('ZREM', delayed, rec_member(rec, uuid))
  return rec
end

