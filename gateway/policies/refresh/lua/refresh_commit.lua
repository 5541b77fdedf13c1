-- A leader publishes its answer and lets go of the lock, atomically.
-- KEYS[1] = replay-cache entry, KEYS[2] = lock, KEYS[3] = this flight's answer
-- ARGV[1] = our flight id, ARGV[2] = sealed answer, ARGV[3] = replay ttl (ms, 0 = do not
-- cache: errors and grace 0), ARGV[4] = flight-answer ttl (ms, for followers mid-poll)
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[4])
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return 1
