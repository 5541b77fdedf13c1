"""The refresh policy: single flight and replay of Supabase token refreshes.

Behaviour in policy.py, the store scripts in lua/refresh_*.lua."""
