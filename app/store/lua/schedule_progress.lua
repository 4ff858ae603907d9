--[[ schedule_progress.lua: the leader records how far it materialised each schedule.

Fenced like promote.lua: an epoch below the stored one (a newer leader recorded
progress since) is refused, and nothing is written. A schedule whose generation
is no longer the current one (replaced or deleted since the leader read it) is
not written and is named in the reply: the leader reloads. Progress only moves
forward.

KEYS[1] meta        HASH    name -> <generation>:<stored at ms>
KEYS[2] progress    HASH    name -> <generation>:<ms>
KEYS[3] epoch       STRING  highest epoch that recorded progress (20 digits, zero-padded)
ARGV[1] epoch       string  this leader's epoch, 20 digits zero-padded
ARGV[2+3i..4+3i]    per schedule: name, generation, last occurrence ms

Returns {"ok", stale name...} or {"refused", stored epoch}
]]
local stored = redis.call('GET', KEYS[3])
if stored and stored > ARGV[1] then
  return {'refused', stored}
end
if stored ~= ARGV[1] then
  redis.call('SET', KEYS[3], ARGV[1])
end
local out = {'ok'}
for i = 2, #ARGV, 3 do
  local name, gen, last = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local meta = redis.call('HGET', KEYS[1], name)
  if not meta or string.sub(meta, 1, #gen + 1) ~= gen .. ':' then
    out[#out + 1] = name
  else
    local progress = redis.call('HGET', KEYS[2], name)
    local colon = progress and string.find(progress, ':', 1, true)
    local before = colon and string.sub(progress, 1, colon - 1) == gen
      and tonumber(string.sub(progress, colon + 1)) or -1
    if last > before then
      redis.call('HSET', KEYS[2], name, gen .. ':' .. string.format('%.0f', last))
    end
  end
end
return out
