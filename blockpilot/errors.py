"""Typed errors shared by the CLI, the engine and the services.

Every error a user can cause or meet is one of these classes. Each carries the name of the gRPC
status code it maps to (`grpc_code`), so the services translate them in one place and a traceback
never reaches a client; the CLI prints `str(error)` as one line and exits non-zero.
"""

from __future__ import annotations


class BlockPilotError(Exception):
    """Base class. `grpc_code` names a `grpc.StatusCode` member."""

    grpc_code = "INTERNAL"


class InvalidArgumentError(BlockPilotError):
    """The request or the arguments are malformed (bad value, out of range, empty prompt)."""

    grpc_code = "INVALID_ARGUMENT"


class NotFoundError(BlockPilotError):
    """A named thing (model, drafter, policy, session) does not exist."""

    grpc_code = "NOT_FOUND"


class FailedPreconditionError(BlockPilotError):
    """The request is well formed but the system is not in a state to serve it."""

    grpc_code = "FAILED_PRECONDITION"


class ResourceExhaustedError(BlockPilotError):
    """A size or capacity limit was hit (context length, message size, sessions)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class UnavailableError(BlockPilotError):
    """A dependency (drafter, policy, Redis) cannot be reached."""

    grpc_code = "UNAVAILABLE"


class ModelFormatError(BlockPilotError):
    """A model file or directory exists but cannot be read as a supported model."""

    grpc_code = "FAILED_PRECONDITION"


class AbortedError(BlockPilotError):
    """A concurrency conflict: e.g. the same session used by two streams at once."""

    grpc_code = "ABORTED"


class DeadlineExceededError(BlockPilotError):
    """The caller's deadline expired (or had already expired when the request arrived)."""

    grpc_code = "DEADLINE_EXCEEDED"


class CancelledError(BlockPilotError):
    """The caller cancelled the request."""

    grpc_code = "CANCELLED"


class DrafterUnavailableError(UnavailableError):
    """The drafter cannot draft (unreachable, gone mid-stream, too slow).

    The decoding loop catches it and continues at block size 1: the target cache is already
    correct, only drafting stops, so the output does not change. `reason` is the fallback reason
    reported to the client and counted: "drafter_unavailable", "drafter_lost", "drafter_timeout".
    """

    def __init__(self, message: str, reason: str = "drafter_unavailable") -> None:
        super().__init__(message)
        self.reason = reason
