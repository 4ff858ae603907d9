-- wrk script: POST save-message with a unique uuid per request; prints a JSON summary.
-- Environment: EAT_BENCH_RUN_AT (epoch ms for every message; default far future).
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  n = 0
  run_at = os.getenv("EAT_BENCH_RUN_AT") or "253402300799999"
  math.randomseed(os.time() * 1000 + tid)
  salt = math.random(0, 0xffff)
end

request = function()
  n = n + 1
  local uuid = string.format("%08x-%04x-4000-8000-%012x", tid, salt, n)
  local body = '{"message":"bench message of a typical small size","runAt":' .. run_at ..
    ',"uuid":"' .. uuid .. '"}'
  return wrk.format("POST", "/api/v1/save-message", {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
