"""Route policies: one package per policy, and the order they run in.

A policy is one folder, gateway/policies/<name>/:

- `__init__.py`: its `SPEC` (gateway/policies/spec.py): the route key it is configured
  under, when it applies, how it is built, the checks of what it asks of the route;
- `config.py`: its config section (pydantic models; `Route` in gateway/config.py mounts
  it) and those checks;
- `policy.py`: its behaviour, a handler wrapper built once per route that keeps no
  per-request state on itself;
- `metrics.py`: its metric families (`Metrics` composes them as `metrics.<name>`);
- `lua/`: its store scripts, each a Redis Lua source with a Python twin in policy.py.

`POLICIES` is the chain, outermost first; the proxy is innermost, after the last one.
app.build_chain / build_ws_chain walk it once per route, config.py runs each policy's
checks from it and explain.py describes a route's chain in its order. Adding a policy:
its folder, one line here, and its typed field on `Route` (and on `Metrics` if it counts
anything).
"""

from __future__ import annotations

from gateway.policies import auth, breaker, cache, concurrency, heartbeat, ratelimit, refresh
from gateway.policies.spec import PolicySpec

POLICIES: tuple[PolicySpec, ...] = (
    auth.SPEC,  # first: an invalid token is refused before it costs anything else
    ratelimit.SPEC,  # keys may be the verified user
    refresh.SPEC,  # refresh | heartbeat | cache: the edge answers for the app itself
    heartbeat.SPEC,
    cache.SPEC,
    # A cap on requests going upstream: inside heartbeat, cache and refresh, so what the
    # edge answers itself (absorbed heartbeats, cache hits, replays) and the waiters of a
    # single flight take no slot.
    concurrency.SPEC,
    breaker.SPEC,  # innermost: it observes exactly the upstream's answers
)

# The route keys in chain order (explain.py, tests).
POLICY_ORDER = tuple(spec.key for spec in POLICIES)
