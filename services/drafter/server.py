"""Drafter service: Describe, and one Draft bidi stream per request. The steps of all streams
run as shared drafter passes (DraftBatcher: one forward over every session waiting). A session's
draft cache is kept after its stream ends (DraftCachePool: LRU + TTL) so the session's next turn
resumes it; one-off streams free theirs when they end."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import grpc
import torch

from blockpilot.config import DrafterServiceConfig, load_config
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError, UnavailableError
from blockpilot.serving import metrics
from blockpilot.decoding.drafting import propose_together
from blockpilot.serving.draft_batcher import DraftBatcher
from blockpilot.serving.draft_cache import DraftCachePool
from blockpilot.serving.draft_wire import StepAssembler, block_messages
from blockpilot.models.placement import Placement
from blockpilot.serving.models import load_drafter_target, load_served_drafter
from blockpilot.serving.server import ServiceRunner, add_servicer, connection_age_options, default_replica_id, setup_logging
from blockpilot.serving.status import to_status
from blockpilot.v1 import drafter_pb2, drafter_pb2_grpc

log = logging.getLogger("services.drafter")


class DrafterServicer(drafter_pb2_grpc.DrafterServicer):
    def __init__(self, config: DrafterServiceConfig, runner: ServiceRunner) -> None:
        self.config = config
        self.runner = runner
        self.replica_id = default_replica_id(config)
        self.drafter = None
        self.name = "none"
        self.feature_size = 0
        self.sessions = 0
        self.pool = ThreadPoolExecutor(max_workers=max(1, config.max_sessions), thread_name_prefix="draft")
        # Draft passes run one at a time in their own thread, each over every session waiting.
        self.pass_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-pass")
        self.batcher = DraftBatcher(propose_together, self.pass_thread, max_sessions=config.max_batch_sessions,
                                    step_delay_s=config.step_delay_s, on_pass=self._passed)
        self.kept = DraftCachePool(config.max_kept_sessions, config.kept_session_ttl_s,
                                   on_change=metrics.DRAFTER_CACHED_SESSIONS.set)

    def load(self) -> None:
        torch.set_num_threads(self.config.threads)
        # Only the target's embedding and lm_head: the drafter uses nothing else of it.
        target = load_drafter_target(self.config.target, placement=Placement(self.config.dtype, self.config.device))
        self.drafter, self.name = load_served_drafter(target, self.config.drafter, random_block_size=self.config.random_block_size)
        if self.drafter is not None:
            self.feature_size = len(self.drafter.target_layer_ids) * target.model.config.hidden_size
        log.info("drafter %s (%s, %s) for target %s", self.name, self.drafter.precision if self.drafter else "-",
                 target.placement.describe(), target.target_dir)

    async def Describe(self, request, context) -> drafter_pb2.DescribeResponse:
        if not self.runner.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.runner.not_ready_message("its model"))
        d = self.drafter
        if d is None:
            return drafter_pb2.DescribeResponse(has_drafter=False, drafter_name=self.name, replica_id=self.replica_id,
                                                advertise_address=self.config.advertise_address)
        reply = drafter_pb2.DescribeResponse(has_drafter=True, block_size=d.block_size, max_block_size=d.max_block_size,
                                             target_layer_ids=list(d.target_layer_ids), feature_size=self.feature_size,
                                             vocab_size=d.target.config.vocab_size, drafter_name=self.name,
                                             replica_id=self.replica_id, advertise_address=self.config.advertise_address)
        reply.chat_template_kwargs.update(d.chat_template_kwargs)
        return reply

    async def Draft(self, request_iterator, context):
        metrics.INFLIGHT.labels("drafter").inc()
        status = "OK"
        try:
            with self.runner.track():
                async for reply in self._draft(request_iterator, context):
                    yield reply
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as err:  # noqa: BLE001 - mapped to a status in one place
            code, message = to_status(err)
            status = code.name
            await context.abort(code, message)
        finally:
            metrics.REQUESTS.labels("drafter", status).inc()
            metrics.INFLIGHT.labels("drafter").dec()

    async def _draft(self, request_iterator, context):
        if not self.runner.ready:
            raise UnavailableError(self.runner.not_ready_message("its model"))
        if self.drafter is None:
            raise FailedPreconditionError("this drafter service runs without a drafter model")
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if not first.HasField("open"):
            raise InvalidArgumentError("the first message of a Draft stream must be DraftOpen")
        opening = first.open
        if tuple(opening.target_layer_ids) != tuple(self.drafter.target_layer_ids):
            raise FailedPreconditionError(f"the client extracts target layers {list(opening.target_layer_ids)}, this drafter "
                                          f"reads {list(self.drafter.target_layer_ids)}")
        if not 1 <= opening.capacity <= self.drafter.target.config.max_position_embeddings + 1:
            raise InvalidArgumentError(f"capacity must be in 1..{self.drafter.target.config.max_position_embeddings + 1}, got {opening.capacity}")
        if (opening.cache_tag or opening.resume_tag) and not opening.session_id:
            raise InvalidArgumentError("cache_tag / resume_tag need a session_id")
        if opening.resume_length and not opening.resume_tag:
            raise InvalidArgumentError("resume_length needs the resume_tag of the cache to resume")
        if self.sessions >= self.config.max_sessions:
            raise ResourceExhaustedError(f"the drafter holds its limit of {self.config.max_sessions} sessions")
        loop = asyncio.get_running_loop()
        session, held = None, 0
        if opening.session_id:
            # A session's earlier cache: resumed when the tag matches, else freed (stale or absent).
            session = self.kept.take(opening.session_id, opening.resume_tag)
            if opening.resume_tag:
                metrics.DRAFTER_CACHE_RESUMES.labels("hit" if session is not None else "miss").inc()
                if session is None:
                    log.info("session %s: no kept draft cache with tag %s here; the context is sent again",
                             opening.session_id, opening.resume_tag)
        if session is not None:
            held = await loop.run_in_executor(self.pool, session.resume, int(opening.resume_length), opening.capacity)
        else:
            session = await loop.run_in_executor(self.pool, self.drafter.open_session, opening.capacity)
        self.sessions += 1
        metrics.DRAFTER_SESSIONS.inc()
        busy = False  # a step runs in a worker thread (its cache cannot be kept if the stream ends now)
        try:
            yield drafter_pb2.DraftResponse(opened=drafter_pb2.DraftOpened(replica_id=self.replica_id, capacity=opening.capacity,
                                                                           context_length=held,
                                                                           advertise_address=self.config.advertise_address))
            steps = StepAssembler(self.feature_size, self.drafter.max_block_size, opening.capacity, held)
            async for message in request_iterator:
                kind = message.WhichOneof("payload")
                if kind == "context":
                    steps.add_chunk(message.context)
                    continue
                if kind != "step":
                    raise InvalidArgumentError(f"unexpected {kind or 'empty'} message inside a Draft stream")
                request = steps.build(message.step)
                started = time.perf_counter()
                busy = True
                draft = await self.batcher.propose(session, request)
                busy = False
                metrics.STEP_SECONDS.labels("drafter", str(request.num_draft + 1)).observe(time.perf_counter() - started)
                for reply in block_messages(draft, message.step.step, session.cached_length):
                    yield reply
        except InvalidArgumentError:
            busy = True  # a broken stream: its cache is not kept
            raise
        finally:
            self.sessions -= 1
            metrics.DRAFTER_SESSIONS.dec()
            if busy or not opening.session_id:
                self.batcher.release(session)
            else:  # ended or cancelled between steps: the cache holds exactly the context received
                self.kept.keep(opening.session_id, opening.cache_tag, session)

    @staticmethod
    def _passed(sessions: int, seconds: float) -> None:
        metrics.DRAFTER_BATCH_SESSIONS.observe(sessions)
        metrics.DRAFTER_PASS_SECONDS.observe(seconds)


async def serve(argv: Sequence[str] | None = None) -> None:
    config = load_config(DrafterServiceConfig, argv)
    setup_logging(config.log_level)
    runner = ServiceRunner(config, "drafter", "blockpilot.v1.Drafter",
                           connection_age_options(config.max_connection_age_s, config.max_connection_age_grace_s))

    async def setup(server: grpc.aio.Server):
        servicer = DrafterServicer(config, runner)
        add_servicer(server, drafter_pb2_grpc.add_DrafterServicer_to_server, servicer)
        holder.append(servicer)

        async def expire_kept():  # kept caches are freed once idle past their TTL
            while True:
                await asyncio.sleep(min(5.0, config.kept_session_ttl_s / 4))
                servicer.kept.expire()

        expiry = asyncio.ensure_future(expire_kept())

        async def cleanup():
            expiry.cancel()
            servicer.kept.clear()
            servicer.pool.shutdown(wait=False, cancel_futures=True)
            servicer.pass_thread.shutdown(wait=False, cancel_futures=True)
        return cleanup

    async def load():
        await asyncio.to_thread(holder[0].load)

    holder: list[DrafterServicer] = []
    await runner.run(setup, load)
