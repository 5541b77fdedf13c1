-- A live leader extends its lock; 0 if the lock is no longer ours.
-- KEYS[1] = lock; ARGV[1] = our flight id, ARGV[2] = lock ttl (ms)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
