"""Block-size policies as the verifier sees them: a small interface with two implementations,
in process (`LocalPolicy`, and `FixedPolicy` = fixed sizes only) and remote (`RemotePolicy`, the
policy service over gRPC, which wraps a LocalPolicy).

    describe(name) -> PolicySpec {features the name needs, versions, experiment}   (cacheable)
    decide(features) -> Decision {block_size, policy_version, arm, decision_id, experiment}
    report(outcome)                                                   after the request

Policy names: "default" (the fixed default size: the configured one, else the drafter's trained
size), "fixed-<n>", a learned policy of the repository (blockpilot/policy/repository.py), or an
experiment (blockpilot/policy/experiments.py) whose arms name policies of the other kinds. ""
stands for the configured default policy; when that names a learned policy that is not loaded,
the fixed default size answers with fallback_reason "default_policy_not_loaded".

Feature errors, checked where the features arrive (the service boundary and LocalPolicy.decide):
a malformed feature (unknown kind, twice the same kind, not a float32 vector, NaN/Inf, or a length
other than the policy's feature_dim) is InvalidArgumentError; a policy whose feature kind the
request does not carry is FailedPreconditionError (the caller's cached spec is stale).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import grpc
import numpy as np

from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnavailableError
from blockpilot.policy.experiments import ARM_NAME, Experiment, ExperimentStore, is_fixed_name
from blockpilot.policy.metadata import FEATURE_KINDS
from blockpilot.policy.repository import POLICY_NAME, PolicyRepository, ServedPolicy
from blockpilot.serving import metrics
from blockpilot.serving.channels import MESSAGE_SIZE_OPTIONS
from blockpilot.serving.security import ClientSecurity
from blockpilot.serving.session_store import MemorySessionStore
from blockpilot.serving.status import from_rpc_error, quoted
from blockpilot.v1 import policy_pb2, policy_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)

DEFAULT_POLICY = "default"
FIXED_VERSION = "fixed-v1"
_FIXED = re.compile(r"^fixed-(\d+)$")


@dataclass(frozen=True)
class FeatureSpec:
    """A feature a policy reads: kind (FEATURE_KINDS) and length."""

    kind: str
    dim: int


@dataclass(frozen=True)
class PolicySpec:
    """What describe() says about a policy name (see DescribePolicyResponse)."""

    policy: str
    features: tuple[FeatureSpec, ...] = ()
    policy_versions: tuple[str, ...] = ()
    experiment: str = ""
    cache_ttl_s: float = 0.0
    fallback_reason: str = ""


@dataclass(frozen=True)
class PolicyFeatures:
    """What a policy sees: the prefill features (kind -> float32 vector) and the limits."""

    features: Mapping[str, np.ndarray]
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
    experiment: str = ""
    fallback_reason: str = ""


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
    """timeout_s: the longest the call may take (the caller's remaining deadline, bounded by its own
    policy timeout); None = the implementation's default. describe(fresh=True) skips any cache."""

    async def describe(self, policy: str, timeout_s: float | None = None, *, fresh: bool = False) -> PolicySpec: ...

    async def decide(self, features: PolicyFeatures, timeout_s: float | None = None) -> Decision: ...

    async def report(self, outcome: Outcome) -> None: ...


def known_policies(learned: list[str] | None = None) -> str:
    names = [f"'{DEFAULT_POLICY}'", "'fixed-<n>'"] + [f"'{n}'" for n in sorted(learned or [])]
    return ", ".join(names) + " or an experiment"


def validate_features(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each feature: a known kind and a non-empty, finite float32 vector. Returns them as arrays."""
    out: dict[str, np.ndarray] = {}
    for kind, values in features.items():
        if kind not in FEATURE_KINDS:
            raise InvalidArgumentError(f"unknown feature kind {kind!r} (known: {list(FEATURE_KINDS)})")
        array = np.asarray(values)
        if array.dtype != np.float32 or array.ndim != 1 or array.size == 0:
            raise InvalidArgumentError(f"feature {kind} must be a non-empty float32 vector, got {array.dtype} "
                                       f"of shape {list(array.shape)}")
        if not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise InvalidArgumentError(f"feature {kind} has {bad} NaN or infinite value(s)")
        out[kind] = array
    return out


# ---- the engine ---------------------------------------------------------------------------------

class LocalPolicy:
    """The policy engine (what the policy service serves; also usable in process).

    default_block_size: size of the 'default' policy (0 = the drafter's trained size the request
    carries). default_policy: the name "" stands for. repository: learned policies (None = none).
    experiments: the experiment store (None = experiments off). store: the session store that
    keeps per-version counters and the outcome stream (None = not kept)."""

    def __init__(self, *, default_block_size: int = 0, fixed_version: str = FIXED_VERSION,
                 default_policy: str = DEFAULT_POLICY, repository: PolicyRepository | None = None,
                 experiments: ExperimentStore | None = None, store=None, stats_ttl_s: float = 7 * 86400.0,
                 spec_ttl_s: float = 5.0, threads: int = 2, decision_ttl_s: float = 3600.0) -> None:
        self.default_block_size = default_block_size
        self.fixed_version = fixed_version
        self.default_policy = default_policy
        self.repository = repository
        self.experiments = experiments
        self.store = store
        self.stats_ttl_s = stats_ttl_s
        self.spec_ttl_s = spec_ttl_s
        # Issued decisions, each redeemable by one Report within decision_ttl_s (in the shared store,
        # so any replica checks a Report; in process memory without one).
        self.decision_ttl_s = decision_ttl_s
        self._ledger = store if store is not None else MemorySessionStore()
        # ONNX Runtime releases the GIL while it runs: scoring in worker threads keeps the event
        # loop (health checks, Report, other Decides) responsive.
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="policy")
        self._background: set[asyncio.Task] = set()
        self.outcomes: list[Outcome] = []  # the last 1000 reported (in-process inspection)

    # ---- names --------------------------------------------------------------------------------

    def _learned_names(self) -> list[str]:
        return sorted(self.repository.served()) if self.repository is not None else []

    def _lookup(self, name: str) -> tuple[ServedPolicy | None, str]:
        """(the learned policy, or None for the fixed default / fixed-<n>; fallback reason)."""
        if is_fixed_name(name):
            return None, ""
        served = self.repository.get(name) if self.repository is not None else None
        if served is not None:
            return served, ""
        if name == self.default_policy:
            return None, "default_policy_not_loaded"
        problem = self.repository.last_errors.get(name) if self.repository is not None else None
        detail = f"; its newest version failed to load: {problem}" if problem else ""
        raise NotFoundError(f"unknown policy {quoted(name)} (known: {known_policies(self._learned_names())}){detail}")

    def _names_policy(self, name: str) -> bool:
        return is_fixed_name(name) or name == self.default_policy or (
            self.repository is not None and self.repository.get(name) is not None)

    async def _experiment(self, name: str) -> tuple[Experiment | None, str]:
        """The experiment `name` routes to (None if none), and a fallback reason when Redis or the
        experiment's config could not be used (then the name is decided without it). A stopped
        experiment whose name is also a policy's gives way to that policy; otherwise it is returned
        (inactive) and its control arm answers, so clients naming it keep working."""
        if self.experiments is None or is_fixed_name(name):
            return None, ""
        try:
            experiment = await self.experiments.get(name)
        except UnavailableError as err:
            metrics.FALLBACKS.labels("experiment_unavailable").inc()
            log.warning("experiment lookup for %r failed (%s): deciding without experiments", name, err)
            return None, "experiment_unavailable"
        except InvalidArgumentError as err:
            metrics.FALLBACKS.labels("experiment_unavailable").inc()
            log.error("experiment %r has a malformed config in Redis (%s): deciding without it", name, err)
            return None, "experiment_unavailable"
        if experiment is None or (not experiment.active and self._names_policy(name)):
            return None, ""
        return experiment, ""

    # ---- describe -----------------------------------------------------------------------------

    async def describe(self, policy: str, timeout_s: float | None = None, *, fresh: bool = False) -> PolicySpec:
        name = policy or self.default_policy
        experiment, reason = await self._experiment(name)
        if experiment is not None and not experiment.active:
            names = [experiment.control_arm.policy]
        else:
            names = experiment.policies() if experiment is not None else [name]
        features: list[FeatureSpec] = []
        versions: list[str] = []
        reasons = [reason] if reason else []
        for policy_name in names:
            try:
                served, why = self._lookup(policy_name)
            except NotFoundError:
                if experiment is None:
                    raise
                continue  # an arm whose policy is not loaded: Decide falls back to the control
            if why and why not in reasons:
                reasons.append(why)
            if served is None:
                version = self.fixed_version
            else:
                version = served.policy_version
                spec = FeatureSpec(served.metadata.feature_kind, served.metadata.feature_dim)
                if spec not in features:
                    features.append(spec)
            if version not in versions:
                versions.append(version)
        return PolicySpec(name, tuple(features), tuple(versions), experiment.name if experiment and experiment.active else "",
                          self.spec_ttl_s, ",".join(reasons))

    # ---- decide -------------------------------------------------------------------------------

    def _fixed(self, name: str, features: PolicyFeatures) -> int:
        limit = features.max_block_size
        match = _FIXED.match(name)
        if match is None:  # the default size
            size = self.default_block_size or features.default_block_size or 1
            return max(1, min(size, limit or size))
        size = int(match.group(1))
        if not 1 <= size <= max(1, limit):
            raise InvalidArgumentError(f"policy '{name}': block size {size} is outside the allowed range 1..{limit}")
        return size

    async def _score(self, served: ServedPolicy, features: PolicyFeatures) -> tuple[int, str]:
        meta = served.metadata
        vector = features.features.get(meta.feature_kind)
        if vector is None:
            carried = sorted(features.features) or ["none"]
            raise FailedPreconditionError(f"policy {meta.policy_version} needs feature {meta.feature_kind} "
                                          f"[{meta.feature_dim}] but the request carries {', '.join(carried)}: "
                                          "describe the policy again")
        if vector.shape != (meta.feature_dim,):
            raise InvalidArgumentError(f"feature {meta.feature_kind} has {vector.size} values; policy "
                                       f"{meta.policy_version} expects {meta.feature_dim}")
        loop = asyncio.get_running_loop()
        scores = np.asarray(await loop.run_in_executor(self._executor, served.model.logits, vector))
        limit = features.max_block_size
        allowed = [i for i, c in enumerate(meta.candidates) if not limit or c <= limit]
        if not allowed:
            return max(1, limit), "no_candidate_fits"
        # argmax over the allowed candidates; ties go to the smaller block size (metadata.py).
        best = max(allowed, key=lambda i: (float(scores[i]), -i))
        return meta.candidates[best], ""

    async def _evaluate(self, name: str, features: PolicyFeatures) -> tuple[int, str, str]:
        """(block size, policy version, fallback reason) of one policy name (not an experiment)."""
        served, reason = self._lookup(name)
        if served is None:
            return self._fixed(name if is_fixed_name(name) else DEFAULT_POLICY, features), self.fixed_version, reason
        size, why = await self._score(served, features)
        return size, served.policy_version, why

    async def _evaluate_arm(self, experiment: Experiment, arm, features: PolicyFeatures,
                            reasons: list[str]) -> tuple[int, str, str]:
        """An arm's decision; when its policy is not loaded, the fixed default size (said so)."""
        try:
            return await self._evaluate(arm.policy, features)
        except NotFoundError as err:
            if "arm_policy_unavailable" not in reasons:
                reasons.append("arm_policy_unavailable")
                metrics.FALLBACKS.labels("arm_policy_unavailable").inc()
            log.warning("experiment %s: arm %s cannot decide either (%s); the fixed default size answers",
                        experiment.name, arm.name, err)
            return self._fixed(DEFAULT_POLICY, features), self.fixed_version, ""

    async def decide(self, features: PolicyFeatures, timeout_s: float | None = None) -> Decision:
        started = time.perf_counter()
        features = PolicyFeatures(validate_features(features.features), features.prompt_tokens,
                                  features.default_block_size, features.max_block_size, features.session_id,
                                  features.policy)
        decision_id = uuid.uuid4().hex
        name = features.policy or self.default_policy
        experiment, reason = await self._experiment(name)
        reasons = [reason] if reason else []
        if experiment is None:
            size, version, why = await self._evaluate(name, features)
            arm, experiment_name = name, ""
        elif not experiment.active:  # stopped: its control arm answers, outside the statistics
            chosen = experiment.control_arm
            size, version, why = await self._evaluate_arm(experiment, chosen, features, reasons)
            arm, experiment_name = chosen.name, ""
        else:
            chosen = experiment.assign(features.session_id or decision_id)
            try:
                size, version, why = await self._evaluate(chosen.policy, features)
            except NotFoundError as err:
                # The arm's policy is not loaded (not shipped yet, broken, removed): the control decides
                # and the outcome counts for the control, so neither arm's statistics mix policies.
                metrics.FALLBACKS.labels("arm_policy_unavailable").inc()
                log.warning("experiment %s: arm %s cannot decide (%s); the control arm %s decides", experiment.name,
                            chosen.name, err, experiment.control)
                reasons.append("arm_policy_unavailable")
                chosen = experiment.control_arm
                size, version, why = await self._evaluate_arm(experiment, chosen, features, reasons)
            arm, experiment_name = chosen.name, experiment.name
            if experiment.shadows:
                self._spawn(self._shadows(experiment, features, size, decision_id))
        if why:
            reasons.append(why)
            metrics.FALLBACKS.labels(why).inc()
            # default_policy_not_loaded is a state of the repository, logged when a scan finds it;
            # the others are about this request.
            if why != "default_policy_not_loaded":
                log.warning("decision %s: %s (policy %s)", decision_id, why, version)
        metrics.POLICY_DECISIONS.labels(version, arm, experiment_name, str(size)).inc()
        metrics.POLICY_DECIDE_SECONDS.labels(version).observe(time.perf_counter() - started)
        try:
            await self._ledger.issue_decision(decision_id, {"block_size": size, "policy_version": version, "arm": arm,
                                                            "experiment": experiment_name}, self.decision_ttl_s)
        except UnavailableError as err:  # decisions never wait for statistics; this one's Report will be dropped
            metrics.FALLBACKS.labels("session_store_unavailable").inc()
            log.warning("decision %s not recorded for its Report: %s", decision_id, err)
        return Decision(size, version, arm, decision_id, experiment_name, ",".join(reasons))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadows(self, experiment: Experiment, features: PolicyFeatures, applied: int, decision_id: str) -> None:
        """Decide with every shadow arm (after the answer went out): log, count, never apply."""
        for arm in experiment.shadows:
            try:
                size, version, _ = await self._evaluate(arm.policy, features)
            except Exception as err:  # noqa: BLE001 - a shadow never affects requests; counted and logged
                metrics.POLICY_SHADOW_DECISIONS.labels(arm.policy, arm.name, experiment.name, "error").inc()
                metrics.FALLBACKS.labels("shadow_arm_failed").inc()
                log.warning("experiment %s: shadow arm %s (%s) failed on decision %s: %s", experiment.name, arm.name,
                            arm.policy, decision_id, err)
                continue
            result = "agree" if size == applied else "differ"
            metrics.POLICY_SHADOW_DECISIONS.labels(version, arm.name, experiment.name, result).inc()
            log.info("experiment %s: shadow arm %s (%s) would choose block size %d; applied %d (decision %s)",
                     experiment.name, arm.name, version, size, applied, decision_id)
            if self.experiments is not None:
                try:
                    await self.experiments.record_shadow(experiment.name, arm.name, size, applied, self.stats_ttl_s)
                except UnavailableError as err:
                    metrics.FALLBACKS.labels("session_store_unavailable").inc()
                    log.warning("shadow decision not recorded: %s", err)

    async def drain(self) -> None:
        """Wait for background work (shadow decisions)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # ---- report -------------------------------------------------------------------------------

    async def report(self, outcome: Outcome) -> None:
        """Record the outcome of a decision this policy issued (any replica sharing the store):
        each decision once, within decision_ttl_s, with plausible figures. Metric labels and
        statistics keys come from the issued decision, never from the request."""
        d = outcome.decision
        check_plausible(outcome)
        try:
            issued = await self._ledger.redeem_decision(d.decision_id)
        except UnavailableError as err:  # statistics fail open: an outcome that cannot be checked is dropped
            metrics.FALLBACKS.labels("session_store_unavailable").inc()
            log.warning("outcome of decision %s dropped (its decision cannot be checked): %s", quoted(d.decision_id), err)
            return
        if issued is None:
            raise NotFoundError(f"unknown, expired or already reported decision {quoted(d.decision_id)}")
        claimed = (d.block_size, d.policy_version, d.arm, d.experiment)
        if claimed != (int(issued["block_size"]), issued["policy_version"], issued["arm"], issued["experiment"]):
            raise InvalidArgumentError(f"the outcome of decision {quoted(d.decision_id)} names another block size, policy, arm "
                                       "or experiment than the decision did")
        self.outcomes.append(outcome)
        del self.outcomes[:-1000]
        lengths = outcome.acceptance_lengths
        steps, decode_tokens = len(lengths), sum(lengths)
        metrics.POLICY_OUTCOMES.labels(d.policy_version, d.arm, d.experiment).inc()
        if steps:
            metrics.POLICY_TAU.labels(d.policy_version, d.arm, d.experiment).observe(decode_tokens / steps)
        accepted = sum(max(0, a - 1) for a in lengths)
        try:
            if self.store is not None:
                counters = {"requests": 1, "tokens": outcome.generated_tokens, "steps": steps,
                            "accepted_tokens": accepted, "decode_seconds": outcome.decode_seconds}
                record = {"decision_id": d.decision_id, "session_id": outcome.session_id,
                          "policy_version": d.policy_version, "arm": d.arm, "experiment": d.experiment,
                          "block_size": d.block_size, "prompt_tokens": outcome.prompt_tokens,
                          "generated_tokens": outcome.generated_tokens, "acceptance_lengths": ",".join(map(str, lengths)),
                          "decode_seconds": outcome.decode_seconds, "finish_reason": outcome.finish_reason,
                          "fallback_reason": outcome.fallback_reason}
                await self.store.record_outcome(d.policy_version, d.arm, counters, record, new_session=False)
            if d.experiment and self.experiments is not None:
                await self.experiments.record_outcome(
                    d.experiment, d.arm, outcome.session_id or d.decision_id, tokens=outcome.generated_tokens,
                    steps=steps, accepted_tokens=accepted, decode_seconds=outcome.decode_seconds,
                    decode_tokens=decode_tokens, fallback=bool(outcome.fallback_reason), ttl_s=self.stats_ttl_s)
        except UnavailableError as err:  # statistics fail open: decisions never depend on them
            metrics.FALLBACKS.labels("session_store_unavailable").inc()
            log.warning("outcome of decision %s not recorded: %s", d.decision_id, err)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


MAX_OUTCOME_TOKENS = 10_000_000  # more than any context: a larger count is not an outcome of this server
MAX_STEP_TOKENS = 128  # tokens one step may commit (widest block + bonus, with room)
MAX_DECODE_SECONDS = 86400.0


def check_plausible(outcome: Outcome) -> None:
    """InvalidArgumentError unless the outcome's figures could come from one generation."""
    lengths = outcome.acceptance_lengths
    if not 0 <= outcome.prompt_tokens <= MAX_OUTCOME_TOKENS or not 0 <= outcome.generated_tokens <= MAX_OUTCOME_TOKENS:
        raise InvalidArgumentError("prompt_tokens and generated_tokens must be token counts of one generation")
    if any(not 1 <= n <= MAX_STEP_TOKENS for n in lengths) or sum(lengths) > outcome.generated_tokens:
        raise InvalidArgumentError(f"acceptance_lengths must be 1..{MAX_STEP_TOKENS} per step and add up to at most generated_tokens")
    if not outcome.decode_seconds <= MAX_DECODE_SECONDS:
        raise InvalidArgumentError(f"decode_seconds must be at most {MAX_DECODE_SECONDS:.0f}")


class FixedPolicy(LocalPolicy):
    """In-process fixed-size policies only ('default', 'fixed-<n>'). default_block_size 0 = the
    drafter's trained size."""

    def __init__(self, default_block_size: int = 0, policy_version: str = FIXED_VERSION) -> None:
        super().__init__(default_block_size=default_block_size, fixed_version=policy_version, threads=1)


# ---- wire ---------------------------------------------------------------------------------------

_FINISH = {"stop": policy_pb2.FINISH_REASON_STOP, "length": policy_pb2.FINISH_REASON_LENGTH,
           "cancelled": policy_pb2.FINISH_REASON_CANCELLED}
FINISH_NAMES = {v: k for k, v in _FINISH.items()}


def vector_to_proto(values: np.ndarray) -> tensor_pb2.Tensor:
    array = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[array.size], data=array.tobytes())


def vector_from_proto(message: tensor_pb2.Tensor, what: str) -> np.ndarray:
    """A float32 vector from the wire (numpy, no copy); anything else is InvalidArgumentError."""
    if message.dtype != tensor_pb2.DTYPE_FLOAT32:
        raise InvalidArgumentError(f"{what}: dtype must be DTYPE_FLOAT32, got {tensor_pb2.DType.Name(message.dtype)}"
                                   if message.dtype in tensor_pb2.DType.values() else f"{what}: unknown dtype {message.dtype}")
    shape = list(message.shape)
    if len(shape) != 1 or shape[0] < 1:
        raise InvalidArgumentError(f"{what}: shape must be [dim] with dim >= 1, got {shape}")
    if len(message.data) != 4 * shape[0]:
        raise InvalidArgumentError(f"{what}: {len(message.data)} bytes do not match shape {shape} of float32 "
                                   f"({4 * shape[0]} bytes)")
    return np.frombuffer(message.data, dtype="<f4")


def features_to_proto(features: PolicyFeatures) -> policy_pb2.DecideRequest:
    return policy_pb2.DecideRequest(
        session_id=features.session_id, policy=features.policy, prompt_tokens=features.prompt_tokens,
        default_block_size=features.default_block_size, max_block_size=features.max_block_size,
        prefill_features=[policy_pb2.Feature(kind=kind, values=vector_to_proto(values))
                          for kind, values in features.features.items()])


def features_from_proto(request: policy_pb2.DecideRequest) -> PolicyFeatures:
    if request.policy and not POLICY_NAME.fullmatch(request.policy):
        raise NotFoundError(f"unknown policy {quoted(request.policy)} (not a valid policy name)")
    vectors: dict[str, np.ndarray] = {}
    for feature in request.prefill_features:
        if feature.kind in vectors:
            raise InvalidArgumentError(f"feature {feature.kind!r} is given twice")
        if feature.kind not in FEATURE_KINDS:
            raise InvalidArgumentError(f"unknown feature kind {feature.kind!r} (known: {list(FEATURE_KINDS)})")
        vectors[feature.kind] = vector_from_proto(feature.values, f"feature {feature.kind}")
    return PolicyFeatures(validate_features(vectors), request.prompt_tokens, request.default_block_size,
                          request.max_block_size, request.session_id, request.policy)


def spec_to_proto(spec: PolicySpec) -> policy_pb2.DescribePolicyResponse:
    return policy_pb2.DescribePolicyResponse(
        policy=spec.policy, features=[policy_pb2.FeatureSpec(kind=f.kind, dim=f.dim) for f in spec.features],
        policy_versions=list(spec.policy_versions), experiment=spec.experiment, cache_ttl_s=spec.cache_ttl_s,
        fallback_reason=spec.fallback_reason)


def spec_from_proto(reply: policy_pb2.DescribePolicyResponse) -> PolicySpec:
    return PolicySpec(reply.policy, tuple(FeatureSpec(f.kind, f.dim) for f in reply.features),
                      tuple(reply.policy_versions), reply.experiment, reply.cache_ttl_s, reply.fallback_reason)


def decision_to_proto(decision: Decision) -> policy_pb2.DecideResponse:
    return policy_pb2.DecideResponse(block_size=decision.block_size, policy_version=decision.policy_version,
                                     arm=decision.arm, decision_id=decision.decision_id,
                                     experiment=decision.experiment, fallback_reason=decision.fallback_reason)


def decision_from_proto(reply: policy_pb2.DecideResponse) -> Decision:
    return Decision(reply.block_size, reply.policy_version, reply.arm, reply.decision_id, reply.experiment,
                    reply.fallback_reason)


def outcome_to_proto(outcome: Outcome) -> policy_pb2.ReportRequest:
    d = outcome.decision
    return policy_pb2.ReportRequest(
        decision_id=d.decision_id, session_id=outcome.session_id, policy_version=d.policy_version, arm=d.arm,
        block_size=d.block_size, prompt_tokens=outcome.prompt_tokens, generated_tokens=outcome.generated_tokens,
        acceptance_lengths=list(outcome.acceptance_lengths), decode_seconds=outcome.decode_seconds,
        finish_reason=_FINISH.get(outcome.finish_reason, policy_pb2.FINISH_REASON_UNSPECIFIED),
        fallback_reason=outcome.fallback_reason, experiment=d.experiment)


def outcome_from_proto(request: policy_pb2.ReportRequest) -> Outcome:
    if not request.decision_id:
        raise InvalidArgumentError("decision_id is empty")
    if not math.isfinite(request.decode_seconds) or request.decode_seconds < 0:
        raise InvalidArgumentError(f"decode_seconds must be a finite number >= 0, got {request.decode_seconds!r}")
    decision = Decision(request.block_size, request.policy_version, request.arm, request.decision_id, request.experiment)
    return Outcome(decision, request.session_id, request.prompt_tokens, request.generated_tokens,
                   tuple(request.acceptance_lengths), request.decode_seconds,
                   FINISH_NAMES.get(request.finish_reason, ""), request.fallback_reason)


class RemotePolicy:
    """The policy service over gRPC (asyncio). Errors come back typed: UnavailableError /
    DeadlineExceededError when it cannot answer (the verifier falls back to the default block
    size), NotFoundError / InvalidArgumentError for a bad policy name (the request fails),
    FailedPreconditionError when the features sent do not cover the policy (describe again).

    describe() answers are cached per name for the service's cache_ttl_s."""

    def __init__(self, address: str, *, timeout_s: float = 2.0, security: ClientSecurity = ClientSecurity()) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.security = security
        self._channel = security.aio_channel(address, [("grpc.initial_reconnect_backoff_ms", 200),
                                                       ("grpc.max_reconnect_backoff_ms", 2000),
                                                       *MESSAGE_SIZE_OPTIONS])
        self._stub = policy_pb2_grpc.PolicyStub(self._channel)
        self._specs: dict[str, tuple[float, PolicySpec]] = {}

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else max(0.001, min(timeout_s, self.timeout_s))

    async def describe(self, policy: str, timeout_s: float | None = None, *, fresh: bool = False) -> PolicySpec:
        cached = self._specs.get(policy)
        if cached is not None and not fresh and cached[0] > time.monotonic():
            return cached[1]
        try:
            reply = await self._stub.DescribePolicy(policy_pb2.DescribePolicyRequest(policy=policy),
                                                    timeout=self._timeout(timeout_s), metadata=self.security.metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err, "policy DescribePolicy", self.address) from None
        spec = spec_from_proto(reply)
        if spec.cache_ttl_s > 0:
            if len(self._specs) > 1024:  # names come from clients: bound the cache
                self._specs.clear()
            self._specs[policy] = (time.monotonic() + spec.cache_ttl_s, spec)
        else:
            self._specs.pop(policy, None)
        return spec

    async def decide(self, features: PolicyFeatures, timeout_s: float | None = None) -> Decision:
        try:
            reply = await self._stub.Decide(features_to_proto(features), timeout=self._timeout(timeout_s),
                                            metadata=self.security.metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err, "policy Decide", self.address) from None
        return decision_from_proto(reply)

    async def report(self, outcome: Outcome) -> None:
        try:
            await self._stub.Report(outcome_to_proto(outcome), timeout=self.timeout_s, metadata=self.security.metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err, "policy Report", self.address) from None

    async def reload(self, timeout_s: float | None = None) -> policy_pb2.ReloadResponse:
        try:
            return await self._stub.Reload(policy_pb2.ReloadRequest(), timeout=timeout_s or 60.0, metadata=self.security.metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err, "policy Reload", self.address) from None

    async def close(self) -> None:
        await self._channel.close()
