"""The heartbeat policy: viewer heartbeats answered at the edge (sampled or batched and
flushed upstream), presence from the store.

config.py: `HeartbeatConfig` (a route's `heartbeat:`)
policy.py: `HeartbeatPolicy`, `Recorder`, `Flusher`, the presence endpoint, the scripts'
Python twins
lua/heartbeat_{record,outcome,flush,index,presence}.lua
metrics.py: `edge_heartbeat*`
"""

from __future__ import annotations

from gateway.policies.heartbeat import config
from gateway.policies.spec import PolicyFactory, PolicySpec


def _load() -> PolicyFactory:
    from gateway.policies.heartbeat.policy import HeartbeatPolicy

    return HeartbeatPolicy


SPEC = PolicySpec(
    key="heartbeat",
    enabled=lambda route: route.heartbeat is not None,
    load=_load,
    upstream_refs=config.UPSTREAM_REFS,
)
