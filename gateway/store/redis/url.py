"""Store URLs: which Redis deployment a `store.url` names, and its parsing.

Owns: the schemes (`redis://`, `rediss://`, `unix://` for one server, `redis+cluster://`
and `redis+sentinel://`), parsing the cluster and sentinel forms (redis-py parses the
single-server ones), and the check `gateway check` runs on `store.url`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"
PLAIN_SCHEMES = frozenset({"redis", "rediss", "unix"})


@dataclass(frozen=True)
class StoreURL:
    """A parsed `redis+cluster://` or `redis+sentinel://` URL."""

    kind: str  # "cluster" | "sentinel"
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    service: str = ""
    db: int = 0


def scheme_of(url: str) -> str:
    return url.partition("://")[0] if "://" in url else urlsplit(url).scheme


def _nodes(netloc: str, scheme: str) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for part in netloc.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{scheme}:// wants host:port[,host:port...], got {part!r}")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def _sentinel_db(parts: list[str]) -> int:
    if not parts or len(parts) > 2:
        raise ValueError("redis+sentinel:// wants host:port[,host:port]/service_name[/db]")
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"database must be a number, got {parts[1]!r}")
        return int(parts[1])
    return 0


def parse_store_url(url: str) -> StoreURL | None:
    """Parse a cluster or sentinel URL (None for any other scheme). Raises ValueError with
    a message fit for `gateway check` when the URL is malformed."""
    scheme, _, rest = url.partition("://")
    if scheme not in (CLUSTER_SCHEME, SENTINEL_SCHEME):
        return None
    # urlsplit would choke on the comma-separated host list, so split by hand.
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    if query:
        raise ValueError(f"{scheme}:// takes no query string")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    nodes = _nodes(netloc, scheme)
    parts = [p for p in path.split("/") if p]
    if scheme == CLUSTER_SCHEME:
        if parts and parts != ["0"]:
            raise ValueError("Redis Cluster has only database 0; drop the path")
        return StoreURL("cluster", nodes, username, password)
    db = _sentinel_db(parts)
    return StoreURL("sentinel", nodes, username, password, unquote(parts[0]), db)


def check_store_url(url: str) -> None:
    """For the config validator: ValueError if `url` is not a store URL the gateway can use."""
    scheme = scheme_of(url)
    if scheme in PLAIN_SCHEMES or scheme == "memory":
        return
    if parse_store_url(url) is None:
        raise ValueError(
            f"unsupported store scheme {scheme!r}; use memory://, redis://, rediss://, "
            "unix://, redis+cluster:// or redis+sentinel://"
        )
