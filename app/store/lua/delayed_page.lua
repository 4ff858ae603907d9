--[[ delayed_page.lua: one page of the delayed set, in (runAt, member) order, after a cursor.

Read-only: the dashboard's list of the next messages to run. Members with equal
scores sort by their bytes (acceptance sequence first), so (score, member) is a
total order, and the page after a cursor is found without reading what lies
before it: the ranks of the cursor's score come from two ZCOUNTs, and the first
member after the cursor's among them by a binary search over ranks (each step
one ZRANGE of one element). O(log^2 N) for any cursor, whether its member is
still in the set or was promoted, cancelled or moved since.

KEYS[1] delayed  ZSET    member <6-byte seq><16-byte uuid>, score runAt ms
ARGV[1] score    string  the cursor's runAt ms; "" for the first page
ARGV[2] member   bytes   the cursor's member (ignored for the first page)
ARGV[3] count    integer most members to return

Returns {member, score, member, score, ...}, at most count pairs, in order
]]
local count = tonumber(ARGV[3])
local start = 0
if ARGV[1] ~= '' then
  -- Bytewise, as Redis orders equal-score members (Lua's < on strings follows the locale).
  local function after(a, b)
    for i = 1, math.min(#a, #b) do
      local x, y = string.byte(a, i), string.byte(b, i)
      if x ~= y then
        return x > y
      end
    end
    return #a > #b
  end
  local lo = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. ARGV[1])
  local hi = redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[1])
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local at = redis.call('ZRANGE', KEYS[1], mid, mid)[1]
    if after(at, ARGV[2]) then
      hi = mid
    else
      lo = mid + 1
    end
  end
  start = lo
end
return redis.call('ZRANGE', KEYS[1], start, start + count - 1, 'WITHSCORES')
