--[[ forget_consumers.lua: a worker says it lives; consumers gone workers left are deleted.

Every worker process reads under its own consumer name (host and pid), so each
restart and each autoscaled pod leaves a consumer behind in the group: XINFO
CONSUMERS, the dashboard's workers and eat_consumers would grow forever. Idle
time alone cannot tell a dead worker from a quiet live one (Redis before 7.2
refreshes it only when entries are delivered), so each live worker records
itself in the workers hash, and a consumer is deleted only when it has no fresh
record there, has been idle as long, and holds no pending entry, checked in
this same script: XGROUP DELCONSUMER drops a consumer's pending entries with
it, and those would never be delivered again. A live worker deleted anyway
loses nothing: its next delivery makes the consumer anew.

KEYS[1] stream     STREAM
KEYS[2] workers    HASH    consumer name -> ms it last said it lives
ARGV[1] group      string  consumer group
ARGV[2] me         string  the caller's consumer name
ARGV[3] after      int ms  how long a consumer without a record must be idle
ARGV[4] leaving    "1"|"0" "1": the caller stops: delete its record, and its consumer
                           if it holds nothing; "0": record it, forget the others
ARGV[5] most       int     delete at most this many consumers

Returns the number of consumers deleted
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local after = tonumber(ARGV[3])
local leaving = ARGV[4] == '1'
if leaving then
  redis.call('HDEL', KEYS[2], ARGV[2])
else
  redis.call('HSET', KEYS[2], ARGV[2], now)
end
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then
  consumers = {}  -- no stream or group yet
end
local most = tonumber(ARGV[5])
local deleted = 0
for _, flat in ipairs(consumers) do
  if deleted >= most then
    break
  end
  local c = {}
  for i = 1, #flat, 2 do
    c[flat[i]] = flat[i + 1]
  end
  local gone
  if leaving then
    gone = c['name'] == ARGV[2]
  else
    local seen = tonumber(redis.call('HGET', KEYS[2], c['name']))
    gone = c['name'] ~= ARGV[2] and c['idle'] >= after and (seen == nil or now - seen >= after)
  end
  if gone and c['pending'] == 0 then
    -- (DELCONSUMER answers the pending entries it dropped: none here.)
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    redis.call('HDEL', KEYS[2], c['name'])
    deleted = deleted + 1
  end
end
-- Records of workers that stopped saying they live and hold no consumer any more.
if not leaving then
  local records = redis.call('HGETALL', KEYS[2])
  for i = 1, #records, 2 do
    if records[i] ~= ARGV[2] and now - tonumber(records[i + 1]) >= 2 * after then
      redis.call('HDEL', KEYS[2], records[i])
    end
  end
end
return deleted
