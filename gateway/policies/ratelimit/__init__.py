"""The rate-limit policy: GCRA rules checked in one store round trip.

Behaviour in policy.py, the store script in lua/gcra.lua."""
