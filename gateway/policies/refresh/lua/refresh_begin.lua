-- Start of a refresh of one token (gateway/policies/refresh/policy.py), one round trip.
-- KEYS[1] = replay-cache entry, KEYS[2] = lock
-- ARGV[1] = our flight id, ARGV[2] = lock ttl (ms), ARGV[3] = '1' to look at the cache
-- Returns {'replay', blob} | {'leader', our id} | {'follower', leader's id}.
if ARGV[3] == '1' then
  local cached = redis.call('GET', KEYS[1])
  if cached then return {'replay', cached} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'leader', ARGV[1]}
end
return {'follower', redis.call('GET', KEYS[2]) or ''}
