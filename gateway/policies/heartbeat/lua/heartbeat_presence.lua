-- Viewers of one webinar seen at or after ARGV[1] (ms).  KEYS[1] seen zset.
return redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf')
