"""The auth policy: Supabase JWT verification (JWKS cache, cookies, bearer tokens).

Behaviour in policy.py."""
