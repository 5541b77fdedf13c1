-- Read or acknowledge one webinar's unflushed heartbeats (batch mode).
--   KEYS[1] dirty zset viewer -> last seen ms   KEYS[2] ix (see heartbeat_record.lua)
--   KEYS[3] join  zset viewer -> ms of a join not flushed yet
--   ARGV[1] 'take', ARGV[2] limit -> {viewer, score, join ms or '', viewer, ...}
--   ARGV[1] 'ack', ARGV[2..] viewer score join -> entries left
-- 'ack' removes an entry (and a join) only if its score is still the one that was sent:
-- a heartbeat recorded while the flush was in flight stays for the next flush, so
-- nothing is dropped.
if ARGV[1] == 'take' then
  local page = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
  local out = {}
  for i = 1, #page, 2 do
    out[#out + 1] = page[i]
    out[#out + 1] = page[i + 1]
    out[#out + 1] = redis.call('ZSCORE', KEYS[3], page[i]) or ''
  end
  return out
end
for i = 2, #ARGV, 3 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
  if ARGV[i + 2] ~= '' then
    local joined = redis.call('ZSCORE', KEYS[3], ARGV[i])
    if joined and tonumber(joined) == tonumber(ARGV[i + 2]) then
      redis.call('ZREM', KEYS[3], ARGV[i])
    end
  end
end
local left = redis.call('ZCARD', KEYS[1])
if left == 0 then
  -- The next heartbeat announces the webinar to the index again.
  redis.call('DEL', KEYS[2])
end
return left
