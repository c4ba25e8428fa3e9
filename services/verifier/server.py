"""Verifier service: the client-facing Generate stream. Parses the wire request at the boundary,
then hands it to blockpilot.serving.verifier.VerifierCore."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Sequence

import grpc
import torch
from google.protobuf import json_format

from blockpilot.config import VerifierServiceConfig, load_config
from blockpilot.errors import InvalidArgumentError, UnavailableError
from blockpilot.serving import metrics
from blockpilot.serving.models import load_verifier_target
from blockpilot.serving.policy import FixedPolicy, RemotePolicy
from blockpilot.serving.remote_drafter import RemoteDrafter
from blockpilot.serving.security import ClientSecurity, caller_id
from blockpilot.serving.server import ServiceRunner, add_servicer, default_replica_id, setup_logging
from blockpilot.serving.session_store import open_store
from blockpilot.serving.status import to_status
from blockpilot.serving.tracing import TRACE_ID_KEY, current_trace_id
from blockpilot.serving.verifier import GenerateSpec, VerifierCore
from blockpilot.v1 import verifier_pb2, verifier_pb2_grpc

log = logging.getLogger("services.verifier")

_MODES = {verifier_pb2.BLOCK_SIZE_MODE_UNSPECIFIED: "auto", verifier_pb2.BLOCK_SIZE_MODE_AUTO: "auto",
          verifier_pb2.BLOCK_SIZE_MODE_FIXED: "fixed", verifier_pb2.BLOCK_SIZE_MODE_OFF: "off"}
_PROMPT_LOOKUP = {verifier_pb2.PROMPT_LOOKUP_UNSPECIFIED: None, verifier_pb2.PROMPT_LOOKUP_ON: True,
                  verifier_pb2.PROMPT_LOOKUP_OFF: False}
_DRAFT_SAMPLING = {verifier_pb2.DRAFT_SAMPLING_UNSPECIFIED: "greedy", verifier_pb2.DRAFT_SAMPLING_GREEDY: "greedy",
                   verifier_pb2.DRAFT_SAMPLING_SAMPLE: "sample"}


def parse_request(request: verifier_pb2.GenerateRequest, time_remaining: float | None) -> GenerateSpec:
    """Wire request -> GenerateSpec; malformed fields raise InvalidArgumentError."""
    kind = request.WhichOneof("prompt")
    text = messages = token_ids = None
    if kind == "text":
        text = request.text
    elif kind == "messages":
        messages = tuple({"role": m.role, "content": m.content} for m in request.messages.messages)
    elif kind == "token_ids":
        token_ids = tuple(int(t) for t in request.token_ids.ids)
    else:
        raise InvalidArgumentError("the prompt is empty (set text, messages or token_ids)")
    sampling = request.sampling
    if request.block_size_mode not in _MODES:
        raise InvalidArgumentError(f"unknown block_size_mode {request.block_size_mode}")
    if request.prompt_lookup not in _PROMPT_LOOKUP:
        raise InvalidArgumentError(f"unknown prompt_lookup {request.prompt_lookup}")
    if sampling.draft_sampling not in _DRAFT_SAMPLING:
        raise InvalidArgumentError(f"unknown draft_sampling {sampling.draft_sampling}")
    mode = _MODES[request.block_size_mode]
    if mode != "fixed" and request.block_size:
        raise InvalidArgumentError(f"block_size {request.block_size} is only allowed with BLOCK_SIZE_MODE_FIXED")
    return GenerateSpec(
        text=text, messages=messages, token_ids=token_ids, temperature=float(sampling.temperature),
        top_k=int(sampling.top_k), top_p=float(sampling.top_p) if sampling.HasField("top_p") else 1.0,
        seed=int(sampling.seed) if sampling.HasField("seed") else None, max_new_tokens=int(sampling.max_new_tokens),
        stop_token_ids=tuple(int(t) for t in sampling.stop_token_ids) or None,
        draft_sampling=_DRAFT_SAMPLING[sampling.draft_sampling], mode=mode, block_size=int(request.block_size),
        policy=request.policy, session_id=request.session_id, new_session=request.new_session,
        return_prompt_token_ids=request.return_prompt_token_ids, prompt_lookup=_PROMPT_LOOKUP[request.prompt_lookup],
        logprobs=sampling.logprobs,
        chat_template_kwargs=json_format.MessageToDict(request.chat_template_kwargs)
        if request.HasField("chat_template_kwargs") else None,
        deadline=None if time_remaining is None else time.monotonic() + time_remaining)


class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    def __init__(self, runner: ServiceRunner) -> None:
        self.runner = runner
        self.core: VerifierCore | None = None

    async def Generate(self, request, context):
        metrics.INFLIGHT.labels("verifier").inc()
        status = "OK"
        # The request's trace id ends the stream, errors included (GenerateFinal has no field for it).
        trace_id = current_trace_id()
        if trace_id:
            context.set_trailing_metadata(((TRACE_ID_KEY, trace_id),))
        try:
            with self.runner.track():
                if not self.runner.ready or self.core is None:
                    raise UnavailableError(self.runner.not_ready_message("its model"))
                spec = replace(parse_request(request, context.time_remaining()), caller=caller_id(context.invocation_metadata()))
                # Yielded, not context.write(): the tracing interceptor wraps streaming handlers
                # that are async generators.
                async for message in self.core.generate(spec):
                    yield message
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: cancelled while grpc sent a message
            status = "CANCELLED"
            raise
        except Exception as err:  # noqa: BLE001 - mapped to a status in one place
            code, message = to_status(err)
            status = code.name
            await context.abort(code, message)
        finally:
            metrics.REQUESTS.labels("verifier", status).inc()
            metrics.INFLIGHT.labels("verifier").dec()

    async def GetServerInfo(self, request, context):
        try:
            if not self.runner.ready or self.core is None:
                raise UnavailableError(self.runner.not_ready_message("its model"))
            remaining = context.time_remaining()
            # Each part asked within the caller's deadline (leaving time to answer), at most 2 s.
            return await self.core.server_info(min(2.0, remaining / 2) if remaining is not None else 2.0)
        except Exception as err:  # noqa: BLE001 - mapped to a status in one place
            await context.abort(*to_status(err))


async def serve(argv: Sequence[str] | None = None) -> None:
    config = load_config(VerifierServiceConfig, argv)
    setup_logging(config.log_level)
    runner = ServiceRunner(config, "verifier", "blockpilot.v1.Verifier")
    servicer = VerifierServicer(runner)
    resources: dict = {}

    async def setup(server: grpc.aio.Server):
        add_servicer(server, verifier_pb2_grpc.add_VerifierServicer_to_server, servicer)

        async def cleanup():
            core = servicer.core
            if core is not None:
                await core.drain()
                core.close()
            if "store" in resources:
                await resources["store"].close()
            if "policy" in resources and hasattr(resources["policy"], "close"):
                await resources["policy"].close()
            if "drafter" in resources:
                resources["drafter"].close()
        return cleanup

    async def load():
        torch.set_num_threads(config.threads)
        target = await asyncio.to_thread(load_verifier_target, config)  # target + verifier backend
        internal = ClientSecurity(config.client_tls_ca, config.client_tls_cert, config.client_tls_key, config.client_token_file)
        drafter = (RemoteDrafter(config.drafter_address, step_timeout_s=config.drafter_timeout_s,
                                 connect_timeout_s=config.drafter_connect_timeout_s,
                                 replica_channels=config.drafter_replica_channels, security=internal)
                   if config.drafter_address else None)
        policy = RemotePolicy(config.policy_address, timeout_s=config.policy_timeout_s, security=internal) if config.policy_address else \
            FixedPolicy(config.default_block_size)
        store = open_store(config.redis_url, ttl_s=config.session_ttl_s, timeout_s=config.redis_timeout_s)
        resources.update(drafter=drafter, policy=policy, store=store) if drafter else resources.update(policy=policy, store=store)
        if drafter is not None:
            try:  # learn the drafter's shape early; a drafter that is down now is retried per request
                await asyncio.to_thread(drafter.describe, 2.0)
            except UnavailableError as err:
                log.warning("%s (requests fall back to block size 1 until it answers)", err)
        servicer.core = VerifierCore(config, target, drafter, policy, store, replica_id=default_replica_id(config))

    await runner.run(setup, load)
