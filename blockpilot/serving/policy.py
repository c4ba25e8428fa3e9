"""Block-size policies as the verifier sees them: a small interface with two implementations,
in process (`FixedPolicy`) and remote (`RemotePolicy`, the policy service over gRPC).

decide(features) -> Decision {block_size, policy_version, arm, decision_id}, once per request;
report(outcome) after the request. Only fixed-size policies here (the learned policy is another
issue): "default" (the configured size, or the drafter's trained size) and "fixed-<n>".
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import torch

from blockpilot.errors import InvalidArgumentError, NotFoundError
from blockpilot.serving.status import from_rpc_error
from blockpilot.serving.wire import tensor_from_proto, tensor_to_proto
from blockpilot.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_POLICY = "default"
_FIXED = re.compile(r"^fixed-(\d+)$")


@dataclass(frozen=True)
class PolicyFeatures:
    """What a policy sees: the prefill feature (last prompt token's logits) and the limits."""

    logits: torch.Tensor
    prompt_tokens: int
    default_block_size: int
    max_block_size: int
    session_id: str = ""
    policy: str = ""


@dataclass(frozen=True)
class Decision:
    block_size: int
    policy_version: str
    arm: str
    decision_id: str


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    session_id: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    acceptance_lengths: tuple[int, ...] = field(default_factory=tuple)
    decode_seconds: float = 0.0
    finish_reason: str = ""
    fallback_reason: str = ""


class Policy(Protocol):
    """timeout_s: the longest the decision may take (the caller's remaining deadline, bounded by
    its own policy timeout); None = the implementation's default."""

    async def decide(self, features: PolicyFeatures, timeout_s: float | None = None) -> Decision: ...

    async def report(self, outcome: Outcome) -> None: ...


def known_policies() -> str:
    return f"'{DEFAULT_POLICY}', 'fixed-<n>'"


class FixedPolicy:
    """In-process fixed-size policies. default_block_size 0 = the drafter's trained size."""

    def __init__(self, default_block_size: int = 0, policy_version: str = "fixed-v1") -> None:
        self.default_block_size = default_block_size
        self.policy_version = policy_version
        self.outcomes: list[Outcome] = []

    def resolve(self, features: PolicyFeatures) -> int:
        name = features.policy or DEFAULT_POLICY
        if name == DEFAULT_POLICY:
            size = self.default_block_size or features.default_block_size or 1
            return max(1, min(size, features.max_block_size or size))
        match = _FIXED.match(name)
        if match is None:
            raise NotFoundError(f"unknown policy '{name}' (known: {known_policies()})")
        size = int(match.group(1))
        if not 1 <= size <= max(1, features.max_block_size):
            raise InvalidArgumentError(f"policy '{name}': block size {size} is outside the allowed range 1..{features.max_block_size}")
        return size

    async def decide(self, features: PolicyFeatures, timeout_s: float | None = None) -> Decision:
        size = self.resolve(features)
        return Decision(size, self.policy_version, features.policy or DEFAULT_POLICY, uuid.uuid4().hex)

    async def report(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        del self.outcomes[:-1000]


_FINISH = {"stop": policy_pb2.FINISH_REASON_STOP, "length": policy_pb2.FINISH_REASON_LENGTH,
           "cancelled": policy_pb2.FINISH_REASON_CANCELLED}
FINISH_NAMES = {v: k for k, v in _FINISH.items()}


def features_to_proto(features: PolicyFeatures) -> policy_pb2.DecideRequest:
    return policy_pb2.DecideRequest(session_id=features.session_id, policy=features.policy,
                                    features=tensor_to_proto(features.logits.to(torch.float32)),
                                    prompt_tokens=features.prompt_tokens, default_block_size=features.default_block_size,
                                    max_block_size=features.max_block_size)


def features_from_proto(request: policy_pb2.DecideRequest) -> PolicyFeatures:
    logits = tensor_from_proto(request.features, "features")
    if logits.dim() != 1 or logits.numel() == 0:
        raise InvalidArgumentError(f"features must be a non-empty vector [vocab_size], got shape {list(logits.shape)}")
    return PolicyFeatures(logits, request.prompt_tokens, request.default_block_size, request.max_block_size,
                          request.session_id, request.policy)


def outcome_to_proto(outcome: Outcome) -> policy_pb2.ReportRequest:
    d = outcome.decision
    return policy_pb2.ReportRequest(
        decision_id=d.decision_id, session_id=outcome.session_id, policy_version=d.policy_version, arm=d.arm,
        block_size=d.block_size, prompt_tokens=outcome.prompt_tokens, generated_tokens=outcome.generated_tokens,
        acceptance_lengths=list(outcome.acceptance_lengths), decode_seconds=outcome.decode_seconds,
        finish_reason=_FINISH.get(outcome.finish_reason, policy_pb2.FINISH_REASON_UNSPECIFIED),
        fallback_reason=outcome.fallback_reason)


def outcome_from_proto(request: policy_pb2.ReportRequest) -> Outcome:
    if not request.decision_id:
        raise InvalidArgumentError("decision_id is empty")
    decision = Decision(request.block_size, request.policy_version, request.arm, request.decision_id)
    return Outcome(decision, request.session_id, request.prompt_tokens, request.generated_tokens,
                   tuple(request.acceptance_lengths), request.decode_seconds,
                   FINISH_NAMES.get(request.finish_reason, ""), request.fallback_reason)


class RemotePolicy:
    """The policy service over gRPC (asyncio). Errors come back typed: UnavailableError /
    DeadlineExceededError when it cannot answer (the verifier falls back to the default block
    size), NotFoundError / InvalidArgumentError for a bad policy name (the request fails)."""

    def __init__(self, address: str, *, timeout_s: float = 2.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address, options=[("grpc.initial_reconnect_backoff_ms", 200),
                                                                    ("grpc.max_reconnect_backoff_ms", 2000)])
        self._stub = policy_pb2_grpc.PolicyStub(self._channel)

    async def decide(self, features: PolicyFeatures, timeout_s: float | None = None) -> Decision:
        try:
            timeout = self.timeout_s if timeout_s is None else max(0.001, min(timeout_s, self.timeout_s))
            reply = await self._stub.Decide(features_to_proto(features), timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"policy Decide at {self.address}") from None
        return Decision(reply.block_size, reply.policy_version, reply.arm, reply.decision_id)

    async def report(self, outcome: Outcome) -> None:
        try:
            await self._stub.Report(outcome_to_proto(outcome), timeout=self.timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"policy Report at {self.address}") from None

    async def close(self) -> None:
        await self._channel.close()
