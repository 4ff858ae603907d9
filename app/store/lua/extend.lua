--[[ extend.lua: a live worker renews its claim on entries it is still handling.

Resets the idle time of each entry the caller still owns (XCLAIM JUSTID does
not count a delivery), so a slow handler is not mistaken for a dead worker.
Entries already taken over by another worker are left alone.

KEYS[1] stream     STREAM
ARGV[1] group      string  consumer group
ARGV[2] consumer   string  the caller
ARGV[3..] ids      string  stream entry ids the caller is handling

Returns the number of entries renewed
]]
local renewed = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed = renewed + 1
  end
end
return renewed
