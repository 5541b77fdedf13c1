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
-- Each key is read and written once per call with all of its viewers (HMGET, ZMSCORE,
-- ZADD with many members), not once per heartbeat: inside a script each redis.call costs
-- ~0.5-1 µs (a read) or ~2 µs (a write: it is also queued for replication) besides the
-- command's own work, and three calls a heartbeat were most of the script's time
-- (bench/record_script.py: 5.0-6.4 µs a heartbeat at 32-128 a call, now 2.8-4.1).
-- ZMSCORE needs Redis 6.2.
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local batch = ARGV[5] ~= '0'
local joins = ARGV[5] == '2'
local gc = ARGV[7]
local SLICE = 1000  -- even (ZADD pairs); unpack is bounded by Lua's C stack (8,000)

-- redis.call(cmd, key, <list>), in slices when the list is long; a reading command's
-- replies joined.
local function bulk(cmd, key, list)
  local n = #list
  if n == 0 then
    return {}
  elseif n <= SLICE then
    return redis.call(cmd, key, unpack(list))
  end
  local all = {}
  for i = 1, n, SLICE do
    local part = redis.call(cmd, key, unpack(list, i, math.min(i + SLICE - 1, n)))
    if type(part) == 'table' then
      for j = 1, #part do all[#all + 1] = part[j] end
    end
  end
  return all
end

local viewers, tracks = {}, {}
for item in string.gmatch(ARGV[8], '[^\n]+') do
  viewers[#viewers + 1] = string.sub(item, 2)
  tracks[#tracks + 1] = string.byte(item, 1) == 49  -- '1'
end
-- A route without negative answers (the common case) costs one EXISTS, not a lookup.
local negs = {}
if #viewers > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  negs = bulk('HMGET', KEYS[3], viewers)
end
local lasts = bulk('ZMSCORE', KEYS[2], viewers)

local out = {0, ''}
local codes = {}
local expired, seen, fwd, dirty, join = {}, {}, {}, {}, {}
local stamped = {}  -- viewers this call stamped: a repeat of one in the batch sees now
for i = 1, #viewers do
  local v = viewers[i]
  local decision = -1
  local neg = negs[i]
  if neg then
    local expires = tonumber(string.match(neg, '^(%d+)|'))
    if expires and expires > now then
      decision = 2
      out[#out + 1] = neg
    else
      expired[#expired + 1] = v
    end
  end
  if decision == -1 then
    seen[#seen + 1] = now
    seen[#seen + 1] = v
    local last = lasts[i]
    if stamped[v] then
      last = now
    elseif last then
      last = tonumber(last)
    end
    decision = 0
    if (not last) or now - last >= interval then
      decision = 1
    end
    -- Sample mode stamps only forwarded heartbeats (one per interval); batch mode stamps
    -- every one, so a viewer who keeps pinging is never forwarded again.
    if decision == 1 or batch then
      fwd[#fwd + 1] = now
      fwd[#fwd + 1] = v
      stamped[v] = true
    end
    if tracks[i] then
      -- Never expires: only a successful flush removes what it sent.
      dirty[#dirty + 1] = now
      dirty[#dirty + 1] = v
      if decision == 1 and joins then
        -- The heartbeat the app would have registered the viewer with: the flush does.
        decision = 3
        join[#join + 1] = now
        join[#join + 1] = v
      end
    end
  end
  codes[#codes + 1] = decision
end
out[2] = table.concat(codes)

bulk('HDEL', KEYS[3], expired)
bulk('ZADD', KEYS[1], seen)
bulk('ZADD', KEYS[2], fwd)
bulk('ZADD', KEYS[4], dirty)
bulk('ZADD', KEYS[6], join)
-- Garbage collection at most once a second per route, as the memory twin does: every
-- read compares scores with a cut-off, so pruned members are garbage either way, and
-- four writes a call were a fifth of a one-heartbeat call. The idle expiry set then
-- (gc ms) is the mark: a TTL above gc - 1 s means it ran less than a second ago. The
-- seen set is shared with other routes, whose outcomes can empty (delete) it: one this
-- call re-created has no TTL, and must get one now, not only when this route's mark is
-- due (that may never come).
if redis.call('PTTL', KEYS[2]) <= tonumber(gc) - 1000 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[4])
  redis.call('PEXPIRE', KEYS[1], gc)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
  redis.call('PEXPIRE', KEYS[2], gc)
end
if #dirty > 0 then
  local ix = redis.call('GET', KEYS[5])
  if (not ix) or now - tonumber(ix) >= tonumber(ARGV[6]) then
    redis.call('SET', KEYS[5], ARGV[1], 'PX', gc)
    out[1] = 1
  end
end
return out
