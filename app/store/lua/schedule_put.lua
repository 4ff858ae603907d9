--[[ schedule_put.lua: create or replace a schedule's definition.

An identical definition (the same bytes: the api normalises it) changes nothing. A
different one takes a new generation, from a counter that never repeats, and its
progress starts at Redis' now (no occurrence before the change is produced for it).
The definition it replaces is kept under `retired` until its pending occurrences
are voided (see app/store/schedules.py).

KEYS[1] schedules   HASH    name -> definition JSON
KEYS[2] meta        HASH    name -> <generation>:<stored at ms>
KEYS[3] progress    HASH    name -> <generation>:<last occurrence materialised, ms>
KEYS[4] retired     HASH    generation -> JSON of a replaced definition to void
KEYS[5] generation  STRING  counter of generations
KEYS[6] version     STRING  counter of changes (the leader reloads when it moves)
ARGV[1] name        string
ARGV[2] definition  string  normalised JSON
ARGV[3] expect      string  "" or the generation the caller read (pause/resume): another
                            one answers "conflict"
ARGV[4] void_ms     integer how far past now a replaced definition's occurrences may
                            already be materialised (horizon and slack), ms

Returns {"created", generation, now}
     or {"replaced", generation, now, old generation}
     or {"unchanged", generation, stored at}
     or {"conflict"}   ARGV[3] given and not the current generation (or no schedule)
]]
local name = ARGV[1]
local old = redis.call('HGET', KEYS[1], name)
local meta = redis.call('HGET', KEYS[2], name)
local old_gen, old_at = nil, nil
if meta then
  local colon = string.find(meta, ':', 1, true)
  old_gen, old_at = string.sub(meta, 1, colon - 1), string.sub(meta, colon + 1)
end
if ARGV[3] ~= '' and ARGV[3] ~= old_gen then
  return {'conflict'}
end
if old == ARGV[2] then
  return {'unchanged', tonumber(old_gen), tonumber(old_at)}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_text = string.format('%.0f', now)
local gen = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[1], name, ARGV[2])
redis.call('HSET', KEYS[2], name, gen .. ':' .. now_text)
redis.call('HSET', KEYS[3], name, gen .. ':' .. now_text)
redis.call('INCR', KEYS[6])
if old then
  redis.call('HSET', KEYS[4], old_gen, cjson.encode({name = name, generation = tonumber(old_gen),
    created = tonumber(old_at), ['until'] = now + tonumber(ARGV[4]), at = now,
    definition = old}))
  return {'replaced', gen, now, tonumber(old_gen)}
end
return {'created', gen, now}
