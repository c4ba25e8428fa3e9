"""Session routing in the verifier's drafter client (blockpilot/serving/remote_drafter.py): the
pool of channels to individual drafter replicas, and a Draft stream opened on the replica a
session's record names, with the fallback to the configured address. Real gRPC over loopback
sockets against small in-process Drafter servers that answer DraftOpen only (no model)."""

from __future__ import annotations

import socket
import time
from concurrent import futures

import grpc
import pytest

from blockpilot.decoding.drafting import DraftResume
from blockpilot.errors import DrafterUnavailableError
from blockpilot.serving.remote_drafter import RemoteDrafter, ReplicaChannels
from blockpilot.v1 import drafter_pb2, drafter_pb2_grpc

pytestmark = pytest.mark.timeout(60)

KEPT_TAG = "kept-tag"
KEPT_LENGTH = 7


class FakeReplica(drafter_pb2_grpc.DrafterServicer):
    """A drafter replica that holds one kept cache (KEPT_TAG, KEPT_LENGTH tokens) and answers
    DraftOpen; `refuse`: the status it refuses streams with instead (e.g. a draining replica)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.refuse: grpc.StatusCode | None = None
        self.opened: list[drafter_pb2.DraftOpen] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        drafter_pb2_grpc.add_DrafterServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def Describe(self, request, context):
        return drafter_pb2.DescribeResponse(has_drafter=True, block_size=4, max_block_size=16, target_layer_ids=[0],
                                            feature_size=8, vocab_size=32, drafter_name="fake", replica_id=self.name,
                                            advertise_address=self.address)

    def Draft(self, request_iterator, context):
        if self.refuse is not None:
            context.abort(self.refuse, f"{self.name} refuses")
        opening = next(request_iterator).open
        self.opened.append(opening)
        held = min(opening.resume_length, KEPT_LENGTH) if opening.resume_tag == KEPT_TAG else 0
        yield drafter_pb2.DraftResponse(opened=drafter_pb2.DraftOpened(replica_id=self.name, capacity=opening.capacity,
                                                                       context_length=held, advertise_address=self.address))
        for _ in request_iterator:  # until the client ends the stream
            pass

    def stop(self) -> None:
        self.server.stop(0).wait()


@pytest.fixture
def replicas():
    started = {name: FakeReplica(name) for name in ("a", "b", "c")}
    yield started
    for replica in started.values():
        replica.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def usable(channel: grpc.Channel) -> bool:
    """Whether RPCs can still be made on `channel` (a closed channel refuses them at once)."""
    try:
        drafter_pb2_grpc.DrafterStub(channel).Describe(drafter_pb2.DescribeRequest(), timeout=5)
        return True
    except ValueError:  # "Cannot invoke RPC on closed channel!"
        return False


def open_insecure(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address)


# ------------------------------------------------------------------ the pool
def test_pool_is_bounded_and_closes_the_least_recently_used_channel(replicas):
    a, b, c = (replicas[n].address for n in "abc")
    pool = ReplicaChannels(2, open_insecure)
    first = pool.acquire(a, 5)
    pool.release(first)
    pool.release(pool.acquire(b, 5))
    again = pool.acquire(a, 5)  # a is used again: b is now the least recently used
    assert again is first
    pool.release(again)
    third = pool.acquire(c, 5)
    pool.release(third)
    assert pool.addresses() == [a, c]
    assert usable(first.channel) and usable(third.channel)
    evicted = pool.acquire(b, 5)  # reopened: a new channel, and a (now the oldest) goes
    pool.release(evicted)
    assert pool.addresses() == [c, b] and not usable(first.channel)
    pool.close()
    assert not usable(third.channel) and not usable(evicted.channel) and pool.addresses() == []
    with pytest.raises(DrafterUnavailableError):
        pool.acquire(a, 5)


def test_an_evicted_channel_in_use_closes_when_its_stream_lets_go(replicas):
    a, b = replicas["a"].address, replicas["b"].address
    pool = ReplicaChannels(1, open_insecure)
    busy = pool.acquire(a, 5)  # a stream runs on it
    pool.release(pool.acquire(b, 5))  # evicts a from the pool
    assert pool.addresses() == [b]
    assert usable(busy.channel), "a channel carrying a stream must not be closed under it"
    pool.release(busy)
    assert not usable(busy.channel)
    pool.close()


def test_an_unreachable_replica_fails_fast_and_is_then_skipped():
    pool = ReplicaChannels(4, open_insecure, down_s=30)
    address = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(DrafterUnavailableError) as info:
        pool.acquire(address, 10)
    assert info.value.reason == "drafter_replica_unavailable"
    assert time.monotonic() - started < 5, "a refused connection must not wait out the timeout"
    started = time.monotonic()
    with pytest.raises(DrafterUnavailableError, match="failed recently"):
        pool.acquire(address, 10)
    assert time.monotonic() - started < 0.5
    pool.close()


def test_a_replica_that_does_not_answer_costs_at_most_the_connect_timeout():
    """A listener that never speaks HTTP/2 (like an address that drops packets): the wait ends at
    the timeout, not at gRPC's own 20 s connect deadline."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        pool = ReplicaChannels(4, open_insecure)
        started = time.monotonic()
        with pytest.raises(DrafterUnavailableError, match="no connection within 0.3 s"):
            pool.acquire(f"127.0.0.1:{silent.getsockname()[1]}", 0.3)
        assert 0.25 < time.monotonic() - started < 3
        pool.close()


# ------------------------------------------------------------------ routing a session's stream
def open_stream(client: RemoteDrafter, resume: DraftResume):
    provider = client.provider(session_id=resume.session_id)
    return provider.open_session(32, resume=resume)


def claim(address: str, tag: str = KEPT_TAG) -> DraftResume:
    return DraftResume("session-1", "new-tag", tag, KEPT_LENGTH if tag else 0, address)


def test_a_follow_up_stream_opens_on_the_recorded_replica(replicas):
    service, recorded = replicas["a"], replicas["b"]
    client = RemoteDrafter(service.address, connect_timeout_s=2)
    try:
        session = open_stream(client, claim(recorded.address))
        assert len(recorded.opened) == 1 and service.opened == []
        assert session.address == recorded.address and session.advertise_address == recorded.address
        assert session.context_length == KEPT_LENGTH and session.fallback_reason == ""
        assert recorded.opened[0].resume_tag == KEPT_TAG and recorded.opened[0].cache_tag == "new-tag"
        session.close()
        # The channel stays pooled for the session's next turn.
        assert client.replicas.addresses() == [recorded.address]
        # Nothing to resume: any replica will do, the stream goes to the configured address.
        plain = open_stream(client, claim(recorded.address, tag=""))
        assert plain.address == service.address and len(service.opened) == 1 and len(recorded.opened) == 1
        plain.close()
        # The record names the configured address itself: its own channel, not a pooled one.
        same = open_stream(client, claim(service.address))
        assert same.address == service.address and same.context_length == KEPT_LENGTH
        same.close()
        assert client.replicas.addresses() == [recorded.address]
    finally:
        client.close()


@pytest.mark.parametrize("how", ["stopped", "draining"])
def test_a_recorded_replica_that_cannot_take_the_stream_falls_back_to_the_configured_address(replicas, how):
    service, recorded = replicas["a"], replicas["b"]
    if how == "stopped":
        recorded.stop()
    else:  # up, but refusing new streams as a draining drafter does
        recorded.refuse = grpc.StatusCode.UNAVAILABLE
    client = RemoteDrafter(service.address, connect_timeout_s=2)
    try:
        session = open_stream(client, claim(recorded.address))
        assert session.fallback_reason == "drafter_replica_unavailable"
        assert session.address == service.address and len(service.opened) == 1
        # The configured address reached a replica that holds the same tag here (fake): resumed;
        # a real other replica answers 0 and the context is sent again.
        assert session.advertise_address == service.address
        session.close()
    finally:
        client.close()


def test_with_the_service_down_too_the_turn_continues_at_block_size_1(replicas):
    service, recorded = replicas["a"], replicas["b"]
    client = RemoteDrafter(service.address, connect_timeout_s=1)
    try:
        assert client.describe() is not None  # known from before: provider() makes no call
        service.stop()
        recorded.stop()
        with pytest.raises(DrafterUnavailableError) as info:
            open_stream(client, claim(recorded.address))
        assert info.value.reason == "drafter_unavailable"  # the loop continues at block size 1
    finally:
        client.close()


def test_streams_on_a_pooled_channel_keep_it_while_they_run(replicas):
    service = replicas["a"]
    client = RemoteDrafter(service.address, connect_timeout_s=2, replica_channels=1)
    try:
        on_b = open_stream(client, claim(replicas["b"].address))
        on_c = open_stream(client, claim(replicas["c"].address))  # evicts b's channel from the pool
        assert client.replicas.addresses() == [replicas["c"].address]
        held = on_b._replica
        assert held is not None and usable(held.channel)
        on_b.close()
        assert not usable(held.channel)
        on_c.close()
    finally:
        client.close()


# ------------------------------------------------------------------ connection age (re-balancing)
def test_connection_age_options_are_off_at_zero_and_in_milliseconds():
    from blockpilot.serving.server import connection_age_options

    assert connection_age_options(0, 300) == []
    assert connection_age_options(1.5, 0.25) == [("grpc.max_connection_age_ms", 1500), ("grpc.max_connection_age_grace_ms", 250)]
