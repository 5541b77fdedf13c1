-- Read or acknowledge one webinar's unflushed heartbeats (batch mode).
--   KEYS[1] dirty zset viewer -> last seen ms   KEYS[2] ix (see heartbeat_record.lua)
--   ARGV[1] 'take', ARGV[2] limit         -> {viewer, score, viewer, score, ...}
--   ARGV[1] 'ack', ARGV[2..] viewer score -> entries left
-- 'ack' removes an entry only if its score is still the one that was sent: a heartbeat
-- recorded while the flush was in flight stays for the next flush, so nothing is dropped.
if ARGV[1] == 'take' then
  return redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
end
for i = 2, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
local left = redis.call('ZCARD', KEYS[1])
if left == 0 then
  -- The next heartbeat announces the webinar to the index again.
  redis.call('DEL', KEYS[2])
end
return left
