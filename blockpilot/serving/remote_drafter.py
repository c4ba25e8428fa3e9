"""The drafter service behind the loop's DraftProvider interface (gRPC, one bidi stream per session).

Synchronous on purpose: the decoding loop runs in a worker thread and calls `propose` once per
step. Every failure becomes DrafterUnavailableError, which the loop turns into "continue at block
size 1" (same output, `fallback_reason` reported): a dead, unreachable or slow drafter degrades
speed, never output.

Session routing: a drafter replica advertises an address of its own (DraftOpened.advertise_address);
the verifier records it with the session's kept draft cache, and the session's next Draft stream
opens there (ReplicaChannels: one pooled channel per replica) instead of on the configured address,
which through a load balancer reaches any replica. A replica that cannot be reached within
`connect_timeout_s`, or refuses the stream, costs the cache, not the turn: the stream opens on the
configured address and the cache is rebuilt there (`fallback_reason` "drafter_replica_unavailable").
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from google.protobuf import json_format

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

# How long a replica whose connection failed is skipped without a new attempt: the sessions it held
# fall back at once instead of each waiting out connect_timeout_s on an address that does not answer.
REPLICA_DOWN_S = 10.0


def _connected(channel: grpc.Channel, timeout_s: float) -> bool:
    """Whether `channel` is READY within timeout_s. A connection attempt that fails (a refused port,
    an unknown name) answers False at once; only an address that does not answer at all waits."""
    settled = threading.Event()
    states: list[grpc.ChannelConnectivity] = []

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                     grpc.ChannelConnectivity.SHUTDOWN):
            states.append(state)
            settled.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        settled.wait(timeout_s)
    finally:
        channel.unsubscribe(watch)
    return bool(states) and states[0] == grpc.ChannelConnectivity.READY


class ReplicaChannel:
    """One pooled channel to one drafter replica; `users`: streams running on it."""

    def __init__(self, address: str, channel: grpc.Channel) -> None:
        self.address = address
        self.channel = channel
        self.stub = drafter_pb2_grpc.DrafterStub(channel)
        self.users = 0
        self.evicted = False
        self.down_until = 0.0  # time.monotonic() before which a connection is not tried again


class ReplicaChannels:
    """Channels to individual drafter replicas, keyed by address: at most `capacity` in the pool,
    the least recently used evicted first. Closing a channel ends the calls on it, so an evicted
    channel that still carries a stream is closed when that stream lets go of it (release)."""

    def __init__(self, capacity: int, open_channel: Callable[[str], grpc.Channel], *, down_s: float = REPLICA_DOWN_S) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.down_s = down_s
        self._open_channel = open_channel
        self._entries: OrderedDict[str, ReplicaChannel] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def addresses(self) -> list[str]:
        """The pooled addresses, least recently used first."""
        with self._lock:
            return list(self._entries)

    def acquire(self, address: str, timeout_s: float) -> ReplicaChannel:
        """A connected channel to `address`, held until release(). Raises DrafterUnavailableError
        ("drafter_replica_unavailable") when it does not connect within timeout_s, or failed to
        within the last `down_s`."""
        with self._lock:
            if self._closed:
                raise DrafterUnavailableError("the drafter client is closed", "drafter_replica_unavailable")
            entry = self._entries.get(address)
            if entry is None:
                entry = self._entries[address] = ReplicaChannel(address, self._open_channel(address))
                while len(self._entries) > self.capacity:
                    _, oldest = self._entries.popitem(last=False)
                    oldest.evicted = True
                    self._close_if_unused(oldest)
            else:
                self._entries.move_to_end(address)
            entry.users += 1
            down = entry.down_until > time.monotonic()
        if down or not _connected(entry.channel, timeout_s):
            with self._lock:
                if not down:
                    entry.down_until = time.monotonic() + self.down_s
            self.release(entry)
            raise DrafterUnavailableError(f"the drafter replica at {address} is unreachable"
                                          + (" (it failed recently)" if down else f" (no connection within {timeout_s} s)"),
                                          "drafter_replica_unavailable")
        return entry

    def release(self, entry: ReplicaChannel) -> None:
        with self._lock:
            entry.users -= 1
            self._close_if_unused(entry)

    def _close_if_unused(self, entry: ReplicaChannel) -> None:
        if entry.evicted and entry.users == 0:
            entry.channel.close()

    def close(self) -> None:
        """Close every channel now (ending the calls on them), and refuse new ones."""
        with self._lock:
            self._closed = True
            entries, self._entries = list(self._entries.values()), OrderedDict()
        for entry in entries:
            entry.evicted = True
            entry.channel.close()


@dataclass(frozen=True)
class DrafterInfo:
    block_size: int
    max_block_size: int
    target_layer_ids: tuple[int, ...]
    feature_size: int
    vocab_size: int
    name: str
    replica_id: str
    advertise_address: str
    # The chat-template arguments the drafter was trained with ({} = none named). Not hashed (a dict).
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)


class RemoteDrafter:
    """A connection to the drafter service; `provider()` gives a per-request DraftProvider.
    address: the service's (load-balanced) address; a session's stream goes to the replica its
    previous turn drafted on when that one advertised an address (see the module's docstring)."""

    def __init__(self, address: str, *, step_timeout_s: float = 10.0, describe_timeout_s: float = 1.0,
                 connect_timeout_s: float = 1.0, replica_channels: int = 16,
                 security: ClientSecurity = ClientSecurity()) -> None:
        self.address = address
        self.step_timeout_s = step_timeout_s
        self.describe_timeout_s = describe_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.security = security
        self._channel = security.channel(address, CHANNEL_OPTIONS)
        self._stub = drafter_pb2_grpc.DrafterStub(self._channel)
        self.replicas = ReplicaChannels(replica_channels, lambda replica: security.channel(replica, CHANNEL_OPTIONS))
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
                               reply.vocab_size, reply.drafter_name, reply.replica_id, reply.advertise_address,
                               json_format.MessageToDict(reply.chat_template_kwargs))
        with self._lock:
            self._info, self._has_drafter = info, reply.has_drafter
        return info

    def template_defaults(self) -> dict[str, Any]:
        """The chat-template arguments the drafter was trained with ({} when it names none or the
        service has no drafter model), from its description (asked once, then cached). Raises
        DrafterUnavailableError when the service cannot be reached."""
        info = self.describe()
        return dict(info.chat_template_kwargs) if info is not None else {}

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
        self.replicas.close()
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
        self.address = self.client.address  # where the stream runs
        self.advertise_address = ""  # the serving replica's own address, recorded for the session's next turn
        self.fallback_reason = ""  # "drafter_replica_unavailable": the recorded replica could not take the stream
        self._replica: ReplicaChannel | None = None  # the pooled channel the stream runs on, if routed
        self.cache_length = 0  # context tokens the drafter holds (as last reported)
        self.context_length = 0  # context tokens it held when the stream opened (a resumed cache)
        self.resume = resume
        self.cache_tag = resume.cache_tag if resume is not None else ""
        opening = drafter_pb2.DraftOpen(session_id=provider.session_id, capacity=capacity,
                                        target_layer_ids=list(provider.target_layer_ids))
        if resume is not None:
            opening.session_id = resume.session_id
            opening.cache_tag = resume.cache_tag
            if resume.resume_tag:
                opening.resume_tag, opening.resume_length = resume.resume_tag, resume.resume_length
        # Only a kept cache is worth a connection of its own: without one any replica will do.
        routed = resume.address if resume is not None and resume.resume_tag else ""
        if routed and routed != self.client.address:
            try:
                self._replica = self.client.replicas.acquire(routed, self.client.connect_timeout_s)
                self._open(self._replica.stub, routed, opening)
                return
            except DrafterUnavailableError as err:
                self.fallback_reason = "drafter_replica_unavailable"
                log.warning("session %s: %s; drafting through %s, the draft cache is rebuilt", opening.session_id, err,
                            self.client.address)
                self._closed = False  # that attempt is closed; the stream opens anew below
        self._open(self.client._stub, self.client.address, opening)

    def _open(self, stub: drafter_pb2_grpc.DrafterStub, address: str, opening: drafter_pb2.DraftOpen) -> None:
        self.address = address
        self._requests = queue.SimpleQueue()
        timeout = None
        if self.provider.deadline is not None:
            timeout = max(0.001, self.provider.deadline - time.monotonic())
        self._call = stub.Draft(iter(self._requests.get, _END), timeout=timeout, metadata=self.client.security.metadata())
        self._requests.put(drafter_pb2.DraftRequest(open=opening))
        reply = self._next("drafter_unavailable", "opening a draft stream")
        if not reply.HasField("opened"):
            self._fail("drafter_unavailable", "the drafter did not answer DraftOpen with DraftOpened")
        held = reply.opened.context_length
        if held > opening.resume_length:
            self._fail("drafter_unavailable", f"the drafter claims {held} context tokens; at most {opening.resume_length} were asked")
        self.replica_id = reply.opened.replica_id
        self.advertise_address = reply.opened.advertise_address
        self.context_length = self.cache_length = int(held)

    def _fail(self, reason: str, message: str):
        self.close()
        log.warning("drafter at %s: %s (%s)", self.address, message, reason)
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
        if self._replica is not None:  # the call is over: an evicted channel may close now
            self.client.replicas.release(self._replica)
            self._replica = None
