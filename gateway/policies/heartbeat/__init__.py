"""The heartbeat policy: absorbs viewer heartbeats, flushes them upstream in batches.

Behaviour in policy.py, the store scripts in lua/heartbeat_*.lua."""
