-- cache_lock: take an entry's refresh lock (SET NX PX) and read the entry in the same
-- round trip, so a caller that read a stale entry just before another replica refreshed
-- it sees the new one instead of refreshing again.
-- KEYS[1] lock, KEYS[2] entry; ARGV[1] token, ARGV[2] lock ttl ms.
-- Returns {1 if the lock was taken else 0, entry or nil}.
local got = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local taken = 0
if got then taken = 1 end
return {taken, redis.call('GET', KEYS[2])}
