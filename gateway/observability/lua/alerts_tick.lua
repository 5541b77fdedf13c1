-- One replica's alerting turn: add its per-minute count deltas, mark the breaker groups
-- it sees open, and (once per evaluation slot, fleet-wide) claim the right to evaluate.
-- KEYS[1] = evaluation lock of this slot, KEYS[2] = alert state (JSON string),
-- KEYS[3] = open-breaker hash (group -> last seen ms), KEYS[4] = current minute hash,
-- KEYS[5] = previous minute hash
-- ARGV[1] = now (ms, caller's clock), ARGV[2] = minute hash ttl (ms),
-- ARGV[3] = breaker hash ttl (ms), ARGV[4] = '1' to try to evaluate, ARGV[5] = owner id,
-- ARGV[6] = lock ttl (ms), ARGV[7] = n current-minute deltas, then n (field, count) pairs,
-- then n previous-minute deltas and pairs, then n open groups and the group names.
-- Returns {1, state, breakers, current, previous} to the evaluator (hashes as flat
-- field/value lists), else {0, state}. A missing state is '' (a nil would end the array).
local i = 7
local function apply(key)
  local n = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, n do
    redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  if n > 0 then
    redis.call('PEXPIRE', key, ARGV[2])
  end
end
apply(KEYS[4])
apply(KEYS[5])
local groups = tonumber(ARGV[i])
i = i + 1
for _ = 1, groups do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[1])
  i = i + 1
end
if groups > 0 then
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
local state = redis.call('GET', KEYS[2]) or ''
if ARGV[4] == '1' and redis.call('SET', KEYS[1], ARGV[5], 'NX', 'PX', ARGV[6]) then
  return {1, state, redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4]),
          redis.call('HGETALL', KEYS[5])}
end
return {0, state}
