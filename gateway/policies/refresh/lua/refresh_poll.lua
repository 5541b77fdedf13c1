-- A follower's look for its leader's answer; takes the lock if the leader let it expire.
-- KEYS[1] = replay-cache entry, KEYS[2] = lock, KEYS[3] = the followed flight's answer
-- ARGV[1] = our flight id, ARGV[2] = lock ttl (ms), ARGV[3] = '1' to look at the cache
-- Returns {'done', blob} | {'replay', blob} | {'leader', our id} | {'wait', leader's id}.
local done = redis.call('GET', KEYS[3])
if done then return {'done', done} end
if ARGV[3] == '1' then
  local cached = redis.call('GET', KEYS[1])
  if cached then return {'replay', cached} end
end
local owner = redis.call('GET', KEYS[2])
if not owner then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {'leader', ARGV[1]}
end
return {'wait', owner}
