-- After a forwarded heartbeat: remember a negative answer, or undo the forward stamp.
--   KEYS[1] seen  KEYS[2] fwd  KEYS[3] neg  KEYS[4] dirty  KEYS[5] join
--   (see heartbeat_record.lua)
--   ARGV[1] 'neg' | 'fail'   ARGV[2] viewer   ARGV[3] negative blob   ARGV[4] gc_ms
-- 'neg': the app (or a flush, join: batch) refused this viewer: answer the same at the
--        edge until the blob expires, and take the viewer out of presence and of the
--        next flush (it is not a valid viewer, so nothing may be written for it).
-- 'fail': the app did not take the heartbeat (5xx, timeout): forward the next one.
local v = ARGV[2]
if ARGV[1] == 'neg' then
  redis.call('HSET', KEYS[3], v, ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  redis.call('ZREM', KEYS[1], v)
  redis.call('ZREM', KEYS[4], v)
  redis.call('ZREM', KEYS[5], v)
end
redis.call('ZREM', KEYS[2], v)
return 1
