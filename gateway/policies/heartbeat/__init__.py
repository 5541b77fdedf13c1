"""The heartbeat policy: viewer heartbeats answered at the edge (sampled or batched and
flushed upstream), presence from the store.

config.py: `HeartbeatConfig` (a route's `heartbeat:`)
policy.py: `HeartbeatPolicy`, `Recorder`, `Flusher`, the presence endpoint, the scripts'
Python twins
lua/heartbeat_{record,outcome,flush,index,presence}.lua
metrics.py: `edge_heartbeat*`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.policies.heartbeat import config
from gateway.policies.spec import PolicySpec

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.http import Handler
    from gateway.runtime import Runtime


def _build(next_handler: Handler, route: Route, rt: Runtime) -> Handler:
    from gateway.policies.heartbeat.policy import HeartbeatPolicy

    return HeartbeatPolicy(next_handler, route, rt)


SPEC = PolicySpec(
    key="heartbeat",
    enabled=lambda route: route.heartbeat is not None,
    build=_build,
    upstream_refs=config.UPSTREAM_REFS,
)
