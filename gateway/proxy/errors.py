"""What can go wrong forwarding a request, classified where it is raised.

Owns: the client's faults (`ClientRequestError`: a framing the gateway will not pass on,
a body over `max_body_bytes`, a client that left mid-body), the upstream's
(`UpstreamFailure`: no answer obtained, with the status and error code the client gets),
and a failure after the answer started (`TruncatedResponse`). The upstream client raises
`UpstreamError` subclasses that already say which answer they deserve, so nothing has to
dig through `__cause__` chains to find out what happened.
"""

from __future__ import annotations


class ClientRequestError(Exception):
    """The client's request cannot be forwarded as sent (answered with `status`)."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class BodyTooLarge(ClientRequestError):
    """The request body exceeds `server.max_body_bytes` (413)."""

    status = 413
    code = "payload_too_large"

    def __init__(self, limit: int = 0) -> None:
        super().__init__(f"request body exceeds {limit} bytes")


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class UpstreamFailure(Exception):
    """No upstream response was obtained (raised by `Proxy.fetch`)."""

    def __init__(self, status: int, code: str, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.kind = kind


class TruncatedResponse(Exception):
    """The upstream failed after the response started; app.py closes the connection."""


class UpstreamError(Exception):
    """An upstream call failed; the subclass is the answer the client gets."""

    status = 502
    code = "bad_gateway"
    message = "upstream connection failed"

    @property
    def kind(self) -> str:
        """The `edge_upstream_errors_total` label."""
        return self.code.removeprefix("upstream_")

    def failure(self) -> UpstreamFailure:
        return UpstreamFailure(self.status, self.code, self.message, self.kind)


class ConnectFailed(UpstreamError):
    code = "upstream_unavailable"
    message = "upstream refused or unreachable"


class ConnectTimeout(UpstreamError):
    """The TCP connect, or the wait for a free pooled connection, took too long."""

    status = 504
    code = "upstream_timeout"
    message = "upstream connect timed out"


class ReadTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    message = "upstream did not answer in time"


class ConnectionDropped(UpstreamError):
    """The connection closed or failed mid-exchange. `stale` when it was a reused
    connection that closed before any byte of an answer (the upstream closed it while
    idle and never saw the request): the one case a resend is safe."""

    def __init__(self, detail: str = "", *, stale: bool = False) -> None:
        super().__init__(detail or self.message)
        self.stale = stale
