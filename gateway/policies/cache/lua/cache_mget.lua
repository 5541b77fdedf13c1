-- cache_mget: read the keys of one cache entry (entry, caller record, lock) in one round
-- trip. KEYS share one hash tag. Missing keys come back as nil in their slot (a Lua
-- `false` inside a table is sent as a nil bulk reply, so positions are kept).
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = redis.call('GET', k)
end
return out
