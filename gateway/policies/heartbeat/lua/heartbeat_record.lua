-- Record heartbeats of one webinar and decide what to do with each, atomically, in one
-- round trip (the gateway sends the heartbeats that arrive together in one call).
-- Every key shares the webinar's hash tag.
--   KEYS[1] seen  zset  viewer -> last seen ms (per webinar, shared by all heartbeat routes)
--   KEYS[2] fwd   zset  viewer -> last forwarded ms (per route)
--   KEYS[3] neg   hash  viewer -> "expires_ms|status|content-type|body" (per route)
--   KEYS[4] dirty zset  viewer -> last seen ms not flushed yet (batch mode, per route)
--   KEYS[5] ix    str   ms when this webinar was last announced to the flush index
--   KEYS[6] join  zset  viewer -> ms of a join not flushed yet (batch with join: batch)
--   ARGV[1] now_ms   ARGV[2] forward_interval_ms   ARGV[3] now_ms - forward_interval_ms
--   ARGV[4] seen_cut_ms (older entries leave the presence set)
--   ARGV[5] 0 sample, 1 batch, 2 batch with bulk joins (join: batch)
--   ARGV[6] reindex_every_ms   ARGV[7] gc_ms (idle expiry of the per-webinar keys)
--   ARGV[8] the heartbeats, one per line: track-dirty 0|1 then the viewer ("1u:<sub>\n0ip:...")
--           (viewer ids are printable ASCII without spaces: no line break inside one)
-- Returns {reindex, decisions, negative_blob, negative_blob, ...}: `decisions` has one
-- digit per heartbeat, in order: 0 absorb, 1 forward, 2 negative (its blob, the cached
-- answer, is the next of the blobs), 3 joined (answered at the edge like 0; the next
-- flush registers the viewer). One argument and one digit a heartbeat, not two of each:
-- the client's cost grows with the arguments and reply elements (redis-py packs a
-- command by re-joining its whole buffer once per argument).
-- Times come from the gateway's clock (ARGV), so every replica and the memory twin agree
-- and tests can inject it; TTLs are only garbage collection.
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local batch = ARGV[5] ~= '0'
local joins = ARGV[5] == '2'
local gc = ARGV[7]
local out = {0, ''}
local codes = {}
local tracked = false

for item in string.gmatch(ARGV[8], '[^\n]+') do
  local v = string.sub(item, 2)
  local decision = -1
  local neg = redis.call('HGET', KEYS[3], v)
  if neg then
    local expires = tonumber(string.match(neg, '^(%d+)|'))
    if expires and expires > now then
      decision = 2
      out[#out + 1] = neg
    else
      redis.call('HDEL', KEYS[3], v)
    end
  end
  if decision == -1 then
    redis.call('ZADD', KEYS[1], now, v)
    local last = redis.call('ZSCORE', KEYS[2], v)
    decision = 0
    if (not last) or now - tonumber(last) >= interval then
      decision = 1
    end
    -- Sample mode stamps only forwarded heartbeats (one per interval); batch mode stamps
    -- every one, so a viewer who keeps pinging is never forwarded again.
    if decision == 1 or batch then
      redis.call('ZADD', KEYS[2], now, v)
    end
    if string.byte(item, 1) == 49 then  -- '1'
      -- Never expires: only a successful flush removes what it sent.
      redis.call('ZADD', KEYS[4], now, v)
      tracked = true
      if decision == 1 and joins then
        -- The heartbeat the app would have registered the viewer with: the flush does.
        decision = 3
        redis.call('ZADD', KEYS[6], now, v)
      end
    end
  end
  codes[#codes + 1] = decision
end
out[2] = table.concat(codes)

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[4])
redis.call('PEXPIRE', KEYS[1], gc)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
redis.call('PEXPIRE', KEYS[2], gc)
if tracked then
  local ix = redis.call('GET', KEYS[5])
  if (not ix) or now - tonumber(ix) >= tonumber(ARGV[6]) then
    redis.call('SET', KEYS[5], ARGV[1], 'PX', gc)
    out[1] = 1
  end
end
return out
