"""`Vary` for the response cache (RFC 9111 §4.1): which request headers select a stored
answer, and the secondary key made of their values.

Owns: the set of `Vary` names that make an answer unstorable (personal ones and `*`),
the names a route ignores (what fills never send, plus `cache.ignore_vary`), the
secondary-key digest, and the "vary marker" that tells a process which names a route's
answers vary on before it has seen one itself.

Why a secondary key and not a refusal: Next.js 15 adds `Vary: rsc,
next-router-state-tree, next-router-prefetch, next-router-segment-prefetch` to every App
Router answer, route handlers included. A plain `fetch()` poll sends none of those
headers, so all polls share one variant, while RSC and HTML answers stay apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

# An answer that varies on these is personal (or on `*`: on anything): never stored.
# `x-edge-*` are the identity headers the gateway itself sends upstream.
_PERSONAL = frozenset({b"*", b"authorization", b"cookie", b"proxy-authorization"})
_EDGE_PREFIX = b"x-edge-"
_MARKER_MAGIC = b"EV1"


def vary_names(
    headers: Iterable[tuple[bytes, bytes]], ignore: frozenset[bytes]
) -> tuple[bytes, ...] | None:
    """The sorted request-header names an answer varies on, minus `ignore`; None when
    the answer must not be stored at all (`Vary: *` or a personal header)."""
    names: set[bytes] = set()
    for k, v in headers:
        if k != b"vary":
            continue
        for part in v.split(b","):
            name = part.strip().lower()
            if not name:
                continue
            if name in _PERSONAL or name.startswith(_EDGE_PREFIX):
                return None
            if name not in ignore:
                names.add(name)
    return tuple(sorted(names))


def variant_digest(names: Sequence[bytes], request_headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The secondary key: each listed request header's values (all lines, in order,
    joined as one field value); an absent header is a value of its own, distinct from
    an empty one."""
    wanted = set(names)
    values: dict[bytes, list[bytes]] = {}
    for k, v in request_headers:
        if k in wanted:
            values.setdefault(k, []).append(v.strip())
    h = hashlib.sha256()
    for name in names:
        h.update(name)
        got = values.get(name)
        if got is None:
            h.update(b"\x00-")
        else:
            h.update(b"\x00=" + b", ".join(got))
        h.update(b"\x00")
    return h.hexdigest()[:24]


def encode_marker(names: Sequence[bytes]) -> bytes:
    """Stored at the entry key of the no-variant slot: "this key's answers vary on
    `names`", so a process that has not learnt it yet finds the variant in one more read."""
    return _MARKER_MAGIC + b",".join(names)


def decode_marker(raw: bytes | None) -> tuple[bytes, ...] | None:
    if raw is None or not raw.startswith(_MARKER_MAGIC):
        return None
    rest = raw[len(_MARKER_MAGIC) :]
    return tuple(n for n in rest.split(b",") if n)


__all__ = ["decode_marker", "encode_marker", "variant_digest", "vary_names"]
