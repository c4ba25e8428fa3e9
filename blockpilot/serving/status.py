"""The one place where errors become gRPC status codes (servers) and status codes become typed
errors again (clients).

Servers call `to_status(exc)`: a BlockPilotError keeps its message and its class's `grpc_code`;
anything else is logged with its traceback here and answered INTERNAL with a generic message, so a
traceback never reaches a client.
"""

from __future__ import annotations

import logging

import grpc

from blockpilot import errors

log = logging.getLogger(__name__)

_CLASS_BY_CODE: dict[grpc.StatusCode, type[errors.BlockPilotError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.ABORTED: errors.AbortedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    grpc.StatusCode.CANCELLED: errors.CancelledError,
}


def quoted(value: str, limit: int = 64) -> str:
    """A client-given id or name for an error message: quoted, cut to `limit` characters (a long
    one would be echoed whole, past gRPC's metadata limit)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, client-facing message) for an exception raised while serving a request."""
    if isinstance(exc, errors.BlockPilotError):
        code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
        return code, str(exc) or type(exc).__name__
    log.error("internal error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error (details are in the server log)"


def from_rpc_error(err: grpc.RpcError, what: str = "call", where: str = "") -> errors.BlockPilotError:
    """A typed error for a failed call (client side): same message, class chosen by status code.
    where: the peer's address, logged but kept out of the message (a service's errors reach its
    own clients, who are not told the addresses of the services behind it)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _CLASS_BY_CODE.get(code, errors.BlockPilotError)
    if where:
        log.info("%s at %s failed (%s): %s", what, where, code.name if code else "UNKNOWN", details)
    error = cls(f"{what} failed ({code.name if code else 'UNKNOWN'}): {details}")
    error.status_code = code  # type: ignore[attr-defined]
    return error


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the current RPC with the status of `exc` (raises grpc's AbortError)."""
    code, message = to_status(exc)
    await context.abort(code, message)
