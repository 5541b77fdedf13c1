"""The cache policy: shared response cache with single flight and per-user authorization.

Behaviour in policy.py, Vary handling in vary.py, the store scripts in lua/cache_*.lua."""
