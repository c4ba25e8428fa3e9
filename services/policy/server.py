"""Policy service: Decide (block size per request) and Report (outcomes -> Redis statistics)."""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import grpc

from blockpilot.config import PolicyServiceConfig, load_config
from blockpilot.errors import BlockPilotError, UnavailableError
from blockpilot.serving import metrics
from blockpilot.serving.policy import FixedPolicy, features_from_proto, outcome_from_proto
from blockpilot.serving.server import ServiceRunner, setup_logging
from blockpilot.serving.session_store import open_store
from blockpilot.serving.status import to_status
from blockpilot.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger("services.policy")


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, policy: FixedPolicy, store, runner: ServiceRunner, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.policy = policy
        self.store = store
        self.runner = runner

    async def _answer(self, context, call):
        metrics.INFLIGHT.labels("policy").inc()
        try:
            with self.runner.track():
                if not self.runner.ready:
                    raise UnavailableError(self.runner.not_ready_message("its policies"))
                reply = await call()
            metrics.REQUESTS.labels("policy", "OK").inc()
            return reply
        except asyncio.CancelledError:  # the caller cancelled or its deadline expired
            metrics.REQUESTS.labels("policy", "CANCELLED").inc()
            raise
        except Exception as err:  # noqa: BLE001 - mapped to a status in one place
            code, message = to_status(err)
            metrics.REQUESTS.labels("policy", code.name).inc()
            await context.abort(code, message)
        finally:
            metrics.INFLIGHT.labels("policy").dec()

    async def Decide(self, request: policy_pb2.DecideRequest, context) -> policy_pb2.DecideResponse:
        async def call():
            features = features_from_proto(request)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            decision = await self.policy.decide(features)
            return policy_pb2.DecideResponse(block_size=decision.block_size, policy_version=decision.policy_version,
                                             arm=decision.arm, decision_id=decision.decision_id)
        return await self._answer(context, call)

    async def Report(self, request: policy_pb2.ReportRequest, context) -> policy_pb2.ReportResponse:
        async def call():
            outcome = outcome_from_proto(request)
            counters = {"requests": 1, "tokens": outcome.generated_tokens, "steps": len(outcome.acceptance_lengths),
                        "accepted_tokens": sum(max(0, a - 1) for a in outcome.acceptance_lengths),
                        "decode_seconds": outcome.decode_seconds}
            record = {"decision_id": outcome.decision.decision_id, "session_id": outcome.session_id,
                      "policy_version": outcome.decision.policy_version, "arm": outcome.decision.arm,
                      "block_size": outcome.decision.block_size, "prompt_tokens": outcome.prompt_tokens,
                      "generated_tokens": outcome.generated_tokens,
                      "acceptance_lengths": ",".join(map(str, outcome.acceptance_lengths)),
                      "decode_seconds": outcome.decode_seconds, "finish_reason": outcome.finish_reason,
                      "fallback_reason": outcome.fallback_reason}
            try:
                await self.store.record_outcome(outcome.decision.policy_version, outcome.decision.arm, counters, record,
                                                new_session=False)
            except UnavailableError as err:  # statistics fail open: decisions never depend on them
                metrics.FALLBACKS.labels("session_store_unavailable").inc()
                log.warning("outcome not recorded: %s", err)
            return policy_pb2.ReportResponse()
        return await self._answer(context, call)


async def serve(argv: Sequence[str] | None = None) -> None:
    config = load_config(PolicyServiceConfig, argv)
    setup_logging(config.log_level)
    runner = ServiceRunner(config, "policy", "blockpilot.v1.Policy")

    async def setup(server: grpc.aio.Server):
        store = open_store(config.redis_url, timeout_s=config.redis_timeout_s, outcome_maxlen=config.outcome_stream_maxlen,
                           stats_ttl_s=config.stats_ttl_s)
        policy_pb2_grpc.add_PolicyServicer_to_server(
            PolicyServicer(FixedPolicy(config.default_block_size, config.policy_version), store, runner,
                           config.decide_delay_s), server)
        return store.close

    await runner.run(setup)
