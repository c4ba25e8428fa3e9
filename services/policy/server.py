"""Policy service: DescribePolicy (which features a policy needs), Decide (block size per request),
Report (outcomes -> Redis statistics) and Reload (rescan the policy repository).

The decisions themselves are blockpilot.serving.policy.LocalPolicy's: fixed sizes, learned policies
from the repository (ONNX Runtime; rescanned every poll_interval_s, so a new version is served
without a restart) and A/B experiments read from Redis on every Decide. This module is the gRPC
boundary: wire parsing, status codes, metrics of the RPCs, the repository poller.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import grpc

from blockpilot.config import PolicyServiceConfig, load_config
from blockpilot.errors import UnavailableError
from blockpilot.policy.experiments import ExperimentStore, is_fixed_name
from blockpilot.policy.repository import PolicyRepository, ServedPolicy, onnx_providers, resolve_repository_dir
from blockpilot.serving import metrics
from blockpilot.serving.policy import (LocalPolicy, decision_to_proto, features_from_proto, outcome_from_proto,
                                       spec_to_proto)
from blockpilot.serving.server import ServiceRunner, add_servicer, connection_age_options, setup_logging
from blockpilot.serving.session_store import open_store
from blockpilot.serving.status import to_status
from blockpilot.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger("services.policy")


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, engine: LocalPolicy, runner: ServiceRunner, delay_s: float = 0.0) -> None:
        self.engine = engine
        self.runner = runner
        self.delay_s = delay_s

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

    async def DescribePolicy(self, request: policy_pb2.DescribePolicyRequest, context) -> policy_pb2.DescribePolicyResponse:
        async def call():
            return spec_to_proto(await self.engine.describe(request.policy))
        return await self._answer(context, call)

    async def Decide(self, request: policy_pb2.DecideRequest, context) -> policy_pb2.DecideResponse:
        async def call():
            features = features_from_proto(request)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return decision_to_proto(await self.engine.decide(features))
        return await self._answer(context, call)

    async def Report(self, request: policy_pb2.ReportRequest, context) -> policy_pb2.ReportResponse:
        async def call():
            await self.engine.report(outcome_from_proto(request))
            return policy_pb2.ReportResponse()
        return await self._answer(context, call)

    async def Reload(self, request: policy_pb2.ReloadRequest, context) -> policy_pb2.ReloadResponse:
        async def call():
            repository = self.engine.repository
            if repository is None:
                return policy_pb2.ReloadResponse()
            result = await asyncio.to_thread(repository.scan)
            return policy_pb2.ReloadResponse(
                loaded=result.loaded, changed=result.changed, removed=result.removed,
                failures=[policy_pb2.LoadFailure(policy_version=v, error=e) for v, e in result.failures])
        return await self._answer(context, call)


class _ServedGauge:
    """Keeps blockpilot_policy_served in step with the repository, and says (once per change)
    whether the default policy is loaded."""

    def __init__(self, default_policy: str) -> None:
        self.default_policy = default_policy
        self.labels: set[str] = set()
        self.default_loaded: bool | None = None

    def __call__(self, served: dict[str, ServedPolicy]) -> None:
        now = {p.policy_version for p in served.values()}
        for gone in self.labels - now:
            metrics.POLICY_SERVED.remove(gone)
        for label in now:
            metrics.POLICY_SERVED.labels(label).set(1)
        self.labels = now
        if is_fixed_name(self.default_policy):
            return
        loaded = self.default_policy in served
        if loaded != self.default_loaded:
            if loaded:
                log.info("default policy %s is served", served[self.default_policy].policy_version)
            else:
                log.warning("default policy %r is not in the repository: requests naming no policy get the fixed "
                            "default block size (fallback_reason default_policy_not_loaded) unless an experiment "
                            "of that name runs", self.default_policy)
            self.default_loaded = loaded


async def serve(argv: Sequence[str] | None = None) -> None:
    config = load_config(PolicyServiceConfig, argv)
    setup_logging(config.log_level)
    runner = ServiceRunner(config, "policy", "blockpilot.v1.Policy",
                           connection_age_options(config.max_connection_age_s, config.max_connection_age_grace_s))
    stop_polling = asyncio.Event()
    resources: dict = {}

    async def setup(server: grpc.aio.Server):
        store = open_store(config.redis_url, timeout_s=config.redis_timeout_s, outcome_maxlen=config.outcome_stream_maxlen,
                           stats_ttl_s=config.stats_ttl_s)
        experiments = None
        if store.kind == "redis":
            experiments = ExperimentStore(store.client, call=store.call)
        else:
            log.warning("A/B experiments are off: they live in Redis, and this service runs with the in-memory store")
        root = resolve_repository_dir(config.repository)
        repository = PolicyRepository(root, providers=onnx_providers(config.onnx_providers),
                                      on_failure=lambda label, _: metrics.POLICY_LOAD_FAILURES.labels(label).inc(),
                                      on_served=_ServedGauge(config.default_policy))
        log.info("policy repository %s (ONNX Runtime providers %s)", root, repository.providers)
        engine = LocalPolicy(default_block_size=config.default_block_size, fixed_version=config.policy_version,
                             default_policy=config.default_policy, repository=repository, experiments=experiments,
                             store=store, stats_ttl_s=config.stats_ttl_s, spec_ttl_s=config.spec_ttl_s,
                             decision_ttl_s=config.decision_ttl_s)
        resources.update(engine=engine, store=store, repository=repository)
        add_servicer(server, policy_pb2_grpc.add_PolicyServicer_to_server, PolicyServicer(engine, runner, config.decide_delay_s))

        async def cleanup():
            stop_polling.set()
            if "poller" in resources:
                await resources["poller"]
            await engine.drain()
            engine.close()
            await store.close()
        return cleanup

    async def load():
        await asyncio.to_thread(resources["repository"].scan)
        if config.poll_interval_s > 0:
            resources["poller"] = asyncio.ensure_future(resources["repository"].poll(config.poll_interval_s, stop_polling))

    await runner.run(setup, load)
