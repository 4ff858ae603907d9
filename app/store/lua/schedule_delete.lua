--[[ schedule_delete.lua: delete a schedule; its definition is kept under `retired` until
its pending occurrences are voided (see app/store/schedules.py).

KEYS[1] schedules   HASH    name -> definition JSON
KEYS[2] meta        HASH    name -> <generation>:<stored at ms>
KEYS[3] progress    HASH    name -> <generation>:<ms>
KEYS[4] retired     HASH    generation -> JSON of a definition to void
KEYS[5] version     STRING  counter of changes
ARGV[1] name        string
ARGV[2] void_ms     integer as in schedule_put.lua

Returns {"deleted", generation} or {"missing"}
]]
local name = ARGV[1]
local old = redis.call('HGET', KEYS[1], name)
local meta = redis.call('HGET', KEYS[2], name)
if not old or not meta then
  return {'missing'}
end
local colon = string.find(meta, ':', 1, true)
local old_gen, old_at = string.sub(meta, 1, colon - 1), string.sub(meta, colon + 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HDEL', KEYS[1], name)
redis.call('HDEL', KEYS[2], name)
redis.call('HDEL', KEYS[3], name)
redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[4], old_gen, cjson.encode({name = name, generation = tonumber(old_gen),
  created = tonumber(old_at), ['until'] = now + tonumber(ARGV[2]), at = now, definition = old}))
return {'deleted', tonumber(old_gen)}
