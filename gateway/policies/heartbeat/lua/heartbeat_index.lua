-- The per-route index of webinars that have unflushed heartbeats (batch mode).
--   KEYS[1] index zset webinar -> sequence   KEYS[2] sequence counter
--   ARGV[1] 'add', ARGV[2] webinar             -> sequence
--   ARGV[1] 'list'                             -> {webinar, sequence, ...}
--   ARGV[1] 'ack', ARGV[2] webinar, ARGV[3] seq -> 1 if removed
-- 'ack' removes a webinar only if nobody announced it again since it was listed (its
-- sequence is unchanged), so a webinar re-announced during a flush is flushed next time.
local op = ARGV[1]
if op == 'add' then
  local seq = redis.call('INCR', KEYS[2])
  redis.call('ZADD', KEYS[1], seq, ARGV[2])
  return seq
elseif op == 'list' then
  return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
end
local seq = redis.call('ZSCORE', KEYS[1], ARGV[2])
if seq and tonumber(seq) == tonumber(ARGV[3]) then
  return redis.call('ZREM', KEYS[1], ARGV[2])
end
return 0
