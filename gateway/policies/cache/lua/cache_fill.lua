-- cache_fill: after an upstream answer, in one round trip and atomically:
--   store the entry      (KEYS[1], ARGV[1] value, ARGV[2] ttl ms; skipped when ARGV[1] is '')
--   store the caller's   (KEYS[2], ARGV[3] value, ARGV[4] ttl ms; skipped when ARGV[3] is '')
--     allow/deny record
--   release the lock     (KEYS[3], only if it still holds our token ARGV[5]; '' = no lock)
--   store a vary marker  (KEYS[4], ARGV[6] value, ARGV[2] ttl ms; skipped when ARGV[6] is
--     '' or KEYS[4] is absent): which request headers this key's answers vary on
if ARGV[1] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
end
if ARGV[5] ~= '' and redis.call('GET', KEYS[3]) == ARGV[5] then
  redis.call('DEL', KEYS[3])
end
if KEYS[4] and ARGV[6] and ARGV[6] ~= '' then
  redis.call('SET', KEYS[4], ARGV[6], 'PX', ARGV[2])
end
return 1
