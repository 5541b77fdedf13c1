-- GCRA (generic cell rate algorithm) for every rate-limit rule of one request, in one
-- round trip. All-or-nothing: the request is admitted only if every rule admits it, and
-- only then is every rule's theoretical arrival time (TAT) advanced, so a request refused
-- by one rule costs nothing against the others.
--
-- KEYS[i]            TAT of rule i (microseconds, integer string); all keys share one
--                    Redis Cluster hash tag (see gateway/policies/ratelimit/policy.py).
-- ARGV[2i-1]         emission interval of rule i in microseconds (1e6 / rate), integer
-- ARGV[2i]           burst of rule i (requests that may arrive at once), integer >= 1
--
-- Returns {admitted, r_1, t_1, retry_1, r_2, t_2, retry_2, ...} where
--   admitted  1 or 0
--   r_i       requests rule i would still admit right now (after this one, if admitted)
--   t_i       ms until rule i is back to its full burst
--   retry_i   ms until rule i admits one request (0 if it admits this one)
--
-- Time comes from the Redis server (TIME), so gateway replicas with skewed clocks agree.
-- Redis < 5 replicates whole scripts and refuses a write after TIME unless told to
-- replicate effects instead; from Redis 5 on that is the default (and 7 ignores it).
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local admitted = 1
local tats = {}
local news = {}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local limit = tonumber(ARGV[2 * i]) * interval
  local tat = tonumber(redis.call('GET', KEYS[i]) or 0) or 0
  if tat < now then tat = now end
  local new = tat + interval
  tats[i] = tat
  news[i] = new
  if new - now > limit then admitted = 0 end
end
local out = {admitted}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local limit = tonumber(ARGV[2 * i]) * interval
  local tat, new = tats[i], news[i]
  local r, reset, retry
  if new - now > limit then
    r = 0
    reset = tat - now
    retry = new - limit - now
  elseif admitted == 1 then
    r = math.floor((now + limit - new) / interval)
    reset = new - now
    retry = 0
    redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.ceil(reset / 1000))
  else
    -- Admitted by this rule but refused by another: nothing was consumed.
    r = math.floor((now + limit - tat) / interval)
    reset = tat - now
    retry = 0
  end
  out[#out + 1] = r
  out[#out + 1] = math.ceil(reset / 1000)
  out[#out + 1] = math.ceil(retry / 1000)
end
return out
