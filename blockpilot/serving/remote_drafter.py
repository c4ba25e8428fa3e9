"""The drafter service behind the loop's DraftProvider interface (gRPC, one bidi stream per session).

Synchronous on purpose: the decoding loop runs in a worker thread and calls `propose` once per
step. Every failure becomes DrafterUnavailableError, which the loop turns into "continue at block
size 1" (same output, `fallback_reason` reported): a dead, unreachable or slow drafter degrades
speed, never output.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from blockpilot.decoding.drafting import Draft, DraftRequest, DraftResume
from blockpilot.errors import DrafterUnavailableError
from blockpilot.serving.channels import MESSAGE_SIZE_OPTIONS
from blockpilot.serving.draft_wire import BlockAssembler, step_messages
from blockpilot.serving.security import ClientSecurity
from blockpilot.v1 import drafter_pb2, drafter_pb2_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    *MESSAGE_SIZE_OPTIONS,
    # A restarted drafter is found again quickly.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),
]

_END = object()


@dataclass(frozen=True)
class DrafterInfo:
    block_size: int
    max_block_size: int
    target_layer_ids: tuple[int, ...]
    feature_size: int
    vocab_size: int
    name: str
    replica_id: str


class RemoteDrafter:
    """A connection to the drafter service; `provider()` gives a per-request DraftProvider."""

    def __init__(self, address: str, *, step_timeout_s: float = 10.0, describe_timeout_s: float = 1.0,
                 security: ClientSecurity = ClientSecurity()) -> None:
        self.address = address
        self.step_timeout_s = step_timeout_s
        self.describe_timeout_s = describe_timeout_s
        self.security = security
        self._channel = security.channel(address, CHANNEL_OPTIONS)
        self._stub = drafter_pb2_grpc.DrafterStub(self._channel)
        self._info: DrafterInfo | None = None
        self._has_drafter: bool | None = None
        self._lock = threading.Lock()

    def describe(self, timeout_s: float | None = None) -> DrafterInfo | None:
        """The drafter's description (cached once known); None when it has no drafter model.
        Raises DrafterUnavailableError when the service cannot be reached."""
        with self._lock:
            if self._has_drafter is not None:
                return self._info
        try:
            reply = self._stub.Describe(drafter_pb2.DescribeRequest(), timeout=timeout_s or self.describe_timeout_s,
                                        metadata=self.security.metadata())
        except grpc.RpcError as err:
            log.warning("drafter at %s: Describe failed (%s): %s", self.address, err.code().name, err.details())
            raise DrafterUnavailableError(f"the drafter service is unreachable: {err.code().name}", "drafter_unavailable") from None
        info = None
        if reply.has_drafter:
            info = DrafterInfo(reply.block_size, reply.max_block_size, tuple(reply.target_layer_ids), reply.feature_size,
                               reply.vocab_size, reply.drafter_name, reply.replica_id)
        with self._lock:
            self._info, self._has_drafter = info, reply.has_drafter
        return info

    def known_info(self) -> DrafterInfo | None:
        return self._info

    def known_target_layer_ids(self) -> tuple[int, ...] | None:
        """The target layers the drafter reads, when already known (no call is made)."""
        return self._info.target_layer_ids if self._info is not None else None

    def provider(self, *, deadline: float | None = None, session_id: str = "") -> "RemoteDraftProvider | None":
        """A DraftProvider for one request (None when the service has no drafter model).
        deadline: time.monotonic() by which the request must end (propagated to the draft stream)."""
        info = self.describe()
        if info is None:
            return None
        return RemoteDraftProvider(self, info, deadline=deadline, session_id=session_id)

    def close(self) -> None:
        self._channel.close()


class RemoteDraftProvider:
    """DraftProvider for one request: block_size / target_layer_ids / max_block_size of the remote
    drafter; open_session opens a Draft stream."""

    def __init__(self, client: RemoteDrafter, info: DrafterInfo, *, deadline: float | None, session_id: str) -> None:
        self.client = client
        self.info = info
        self.block_size = info.block_size
        self.max_block_size = info.max_block_size
        self.target_layer_ids = info.target_layer_ids
        self.deadline = deadline
        self.session_id = session_id
        self.sessions: list[RemoteDraftSession] = []

    def open_session(self, capacity: int, resume: DraftResume | None = None) -> "RemoteDraftSession":
        session = RemoteDraftSession(self, capacity, resume)
        self.sessions.append(session)
        return session


class RemoteDraftSession:
    """One Draft stream. Not thread-safe: one decoding loop drives it."""

    def __init__(self, provider: RemoteDraftProvider, capacity: int, resume: DraftResume | None = None) -> None:
        self.provider = provider
        self.client = provider.client
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._step = 0
        self.replica_id = ""
        self.cache_length = 0  # context tokens the drafter holds (as last reported)
        self.context_length = 0  # context tokens it held when the stream opened (a resumed cache)
        self.resume = resume
        self.cache_tag = resume.cache_tag if resume is not None else ""
        timeout = None
        if provider.deadline is not None:
            timeout = max(0.001, provider.deadline - time.monotonic())
        self._call = self.client._stub.Draft(iter(self._requests.get, _END), timeout=timeout, metadata=self.client.security.metadata())
        opening = drafter_pb2.DraftOpen(session_id=provider.session_id, capacity=capacity,
                                        target_layer_ids=list(provider.target_layer_ids))
        if resume is not None:
            opening.session_id = resume.session_id
            opening.cache_tag = resume.cache_tag
            if resume.resume_tag:
                opening.resume_tag, opening.resume_length = resume.resume_tag, resume.resume_length
        self._requests.put(drafter_pb2.DraftRequest(open=opening))
        reply = self._next("drafter_unavailable", "opening a draft stream")
        if not reply.HasField("opened"):
            self._fail("drafter_unavailable", "the drafter did not answer DraftOpen with DraftOpened")
        held = reply.opened.context_length
        if held > opening.resume_length:
            self._fail("drafter_unavailable", f"the drafter claims {held} context tokens; at most {opening.resume_length} were asked")
        self.replica_id = reply.opened.replica_id
        self.context_length = self.cache_length = int(held)

    def _fail(self, reason: str, message: str):
        self.close()
        log.warning("drafter %s: %s (%s); continuing at block size 1", self.client.address, message, reason)
        log.warning("drafter at %s: %s", self.client.address, message)
        raise DrafterUnavailableError(f"the drafter service: {message}", reason)

    def _next(self, reason: str, what: str) -> drafter_pb2.DraftResponse:
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            self._call.cancel()

        timer = threading.Timer(self.client.step_timeout_s, expire)
        timer.daemon = True
        timer.start()
        try:
            return next(self._call)
        except StopIteration:
            self._fail(reason, f"stream ended while {what}")
        except grpc.RpcError as err:
            if fired.is_set():
                self._fail("drafter_timeout", f"no answer within {self.client.step_timeout_s} s while {what}")
            code = err.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._fail("drafter_timeout", f"request deadline expired while {what}")
            self._fail(reason, f"{code.name} while {what}: {err.details()}")
        finally:
            timer.cancel()
        raise AssertionError("unreachable")  # pragma: no cover

    def propose(self, request: DraftRequest) -> Draft:
        if self._closed:
            raise DrafterUnavailableError("draft stream is closed", "drafter_lost")
        step = self._step
        self._step += 1
        for message in step_messages(request, step):
            self._requests.put(message)
        assembler = BlockAssembler(step, request.num_draft)
        while True:
            reply = self._next("drafter_lost", f"waiting for step {step}")
            if not reply.HasField("block"):
                self._fail("drafter_lost", "unexpected message on the draft stream")
            try:
                draft = assembler.add(reply.block)
            except Exception as err:  # noqa: BLE001 - a malformed answer is a drafter fault
                self._fail("drafter_lost", f"malformed draft: {err}")
            if draft is not None:
                self.cache_length = assembler.cache_length
                return draft

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._requests.put(_END)
        self._call.cancel()
