-- Record one heartbeat and decide what to do with it, atomically, in one round trip.
-- Every key shares the webinar's hash tag.
--   KEYS[1] seen  zset  viewer -> last seen ms (per webinar, shared by all heartbeat routes)
--   KEYS[2] fwd   zset  viewer -> last forwarded ms (per route)
--   KEYS[3] neg   hash  viewer -> "expires_ms|status|content-type|body" (per route)
--   KEYS[4] dirty zset  viewer -> last seen ms not flushed yet (batch mode, per route)
--   KEYS[5] ix    str   ms when this webinar was last announced to the flush index
--   ARGV[1] viewer        ARGV[2] now_ms           ARGV[3] forward_interval_ms
--   ARGV[4] seen_cut_ms (entries older than this leave the presence set)
--   ARGV[5] batch 0|1     ARGV[6] track dirty 0|1  ARGV[7] reindex_every_ms
--   ARGV[8] gc_ms (idle expiry of the per-webinar keys)   ARGV[9] now_ms - forward_interval_ms
-- Returns {decision, negative_blob, reindex}: decision 0 absorb, 1 forward, 2 negative.
-- Times come from the gateway's clock (ARGV), so every replica and the memory twin agree
-- and tests can inject it; TTLs are only garbage collection.
local v = ARGV[1]
local now = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local gc = ARGV[8]

local neg = redis.call('HGET', KEYS[3], v)
if neg then
  local expires = tonumber(string.match(neg, '^(%d+)|'))
  if expires and expires > now then
    return {2, neg, 0}
  end
  redis.call('HDEL', KEYS[3], v)
end

redis.call('ZADD', KEYS[1], now, v)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[4])
redis.call('PEXPIRE', KEYS[1], gc)

local decision = 0
local last = redis.call('ZSCORE', KEYS[2], v)
if (not last) or now - tonumber(last) >= interval then
  decision = 1
end
-- Sample mode stamps only forwarded heartbeats (one per interval); batch mode stamps every
-- one, so a viewer who keeps pinging is never forwarded again.
if decision == 1 or ARGV[5] == '1' then
  redis.call('ZADD', KEYS[2], now, v)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[9])
redis.call('PEXPIRE', KEYS[2], gc)

local reindex = 0
if ARGV[6] == '1' then
  -- Never expires: only a successful flush removes what it sent.
  redis.call('ZADD', KEYS[4], now, v)
  local ix = redis.call('GET', KEYS[5])
  if (not ix) or now - tonumber(ix) >= tonumber(ARGV[7]) then
    redis.call('SET', KEYS[5], ARGV[2], 'PX', gc)
    reindex = 1
  end
end
return {decision, '', reindex}
