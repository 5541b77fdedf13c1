"""What a policy package declares about itself (its `SPEC`), so the chain, the config
checks and `explain` can walk the registry in gateway/policies/__init__.py instead of
naming every policy.

Every package's `__init__.py` has the same few lines (a `_load` and a `SPEC`) on
purpose: the declaration belongs to the package and is read there; `duplicates` reports
them as same-shape pairs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.http import Handler
    from gateway.model import ConfigIssue
    from gateway.runtime import Runtime


# What a policy's class is to the chain: called once per route with the next handler.
PolicyFactory = Callable[["Handler", "Route", "Runtime"], "Handler"]


def _no_issues(key: str, route: Route) -> Iterable[ConfigIssue]:
    return ()


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """One policy as the registry sees it.

    `key` is its section on a route (a `Route` field, the key in config.yaml). `load`
    returns the policy's class, importing its module only then, so a config without the
    policy never loads it; `build` makes one for a route. `route_issues(key, route)` names what its
    section asks of the rest of the route (`key` is the route's own, `routes[2]`).
    `upstream_refs` are the section's keys that name an upstream, checked with the
    route's own against `upstreams:`."""

    key: str
    enabled: Callable[[Route], bool]
    load: Callable[[], PolicyFactory]
    # Also in front of the route's WebSocket proxy (app.build_ws_chain).
    websocket: bool = False
    route_issues: Callable[[str, Route], Iterable[ConfigIssue]] = _no_issues
    upstream_refs: tuple[str, ...] = ()

    def build(self, next_handler: Handler, route: Route, rt: Runtime) -> Handler:
        return self.load()(next_handler, route, rt)
