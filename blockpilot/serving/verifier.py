"""The verifier's request handling, independent of gRPC: validate, tokenize, pick the block size
(policy), hand the request to the decode scheduler, stream committed tokens, keep per-session
target caches for follow-up turns, record session metadata, report the outcome.

services/verifier/ parses the wire request into a GenerateSpec and turns the messages this yields
into the stream; everything else lives here.

Threads: one DecodeScheduler thread runs every request's prefill and steps (one batched target
pass per iteration on the torch engine); it hands each request's messages to the asyncio loop
(call_soon_threadsafe into the request's asyncio.Queue). The policy decision is awaited here, on
the event loop, between the request's prefill and its first step, while the batch goes on.
Tokenizing runs in a worker thread. Cancelling a request (client gone, deadline) takes it out of
the batch at the scheduler's next iteration, freeing its row and its draft session.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import math
import os
import time
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Protocol

import torch

from blockpilot import __version__
from blockpilot.backends.base import backend_name, backend_precision
from blockpilot.decoding.drafting import DraftProvider, DraftResume, DraftSession, LocalDrafter
from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig, lookup_for
from blockpilot.decoding.speculative import GenerationResult, PrefillInfo, SamplingParams
from blockpilot.errors import (AbortedError, BlockPilotError, DeadlineExceededError, DrafterUnavailableError,
                               FailedPreconditionError, InvalidArgumentError, NotFoundError, ResourceExhaustedError,
                               UnavailableError)
from blockpilot.models.kv_cache import KVCache
from blockpilot.models.tokenizer import IncrementalDecoder, check_template_kwargs
from blockpilot.policy.features import policy_features
from blockpilot.serving import metrics
from blockpilot.serving.models import ServedTarget
from blockpilot.serving.policy import Decision, Outcome, Policy, PolicyFeatures
from blockpilot.serving.scheduler import DecodeScheduler, ScheduledRequest
from blockpilot.serving.session_cache import KeptSession, SessionCaches
from blockpilot.serving.session_store import new_session_id
from blockpilot.serving.tracing import current_trace_id
from blockpilot.v1 import verifier_pb2
from blockpilot.serving.status import quoted

log = logging.getLogger(__name__)

BLOCK_SIZE_LIMIT = 64  # largest block size accepted when the drafter's own limit is not known


def ragged_batches(setting: str, backend: str) -> bool:
    """The verifier config's `ragged_batches` for this backend. 'auto' is on for torch (its
    per-session passes cost far more) and off for onnxruntime: on the 2-core development machine
    (Intel Xeon, 2026-12-07, `blockpilot bench`, 64 new tokens) the default path served 67.7 / 58.0
    tok/s at 4 / 16 streams with per-session passes on both cores against 60.9 / 49.5 ragged, whose
    int8 MatMulNBits cost grows with the rows (plain decoding gained from ragged at 16: 72.9 vs 63.7)."""
    if setting == "auto":
        return backend == "torch"
    return setting == "on"


@dataclass(frozen=True)
class GenerateSpec:
    """A parsed Generate request (wire-independent).

    prompt: exactly one of text / messages / token_ids. max_new_tokens 0 = the server default;
    stop_token_ids None = the target's own stop tokens. mode: "auto" | "fixed" | "off".
    deadline: time.monotonic() by which the request must end (None = no deadline).
    logprobs: report each committed token's log-probability (SamplingParams.logprobs).
    chat_template_kwargs: chat-template arguments over the config's (messages only; None = none).
    """

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    token_ids: tuple[int, ...] | None = None
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None
    max_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] | None = None
    draft_sampling: str = "greedy"
    logprobs: bool = False
    chat_template_kwargs: Mapping[str, Any] | None = None
    mode: str = "auto"
    block_size: int = 0
    policy: str = ""
    session_id: str = ""
    new_session: bool = False
    return_prompt_token_ids: bool = False
    prompt_lookup: bool | None = None  # None = the verifier config's prompt_lookup
    deadline: float | None = None
    caller: str = ""  # who asks (a digest of its bearer token, "" without one): a session answers only its opener


class DrafterSource(Protocol):
    """Where the verifier gets a DraftProvider per request (RemoteDrafter or LocalDrafterSource).
    provider() returns None when there is no drafter model; raises DrafterUnavailableError when
    the drafter cannot be reached. known_target_layer_ids(): the target layers the drafter reads,
    if known without a call (None otherwise): turns without drafting keep those features too, so
    the next drafting turn of the session does not prefill again. template_defaults(): the
    chat-template arguments the drafter was trained with ({} = none named, or no drafter model);
    raises DrafterUnavailableError as provider() does."""

    def provider(self, *, deadline: float | None = None, session_id: str = "") -> DraftProvider | None: ...

    def known_target_layer_ids(self) -> tuple[int, ...] | None: ...

    def template_defaults(self) -> dict[str, Any]: ...


class LocalDrafterSource:
    """An in-process drafter behind the DrafterSource interface (CLI, benchmarks, tests)."""

    def __init__(self, drafter: DraftProvider | None) -> None:
        self.drafter = drafter

    def provider(self, *, deadline: float | None = None, session_id: str = "") -> DraftProvider | None:
        return self.drafter

    def known_target_layer_ids(self) -> tuple[int, ...] | None:
        return tuple(self.drafter.target_layer_ids) if self.drafter is not None else None

    def template_defaults(self) -> dict[str, Any]:
        return self.drafter.chat_template_kwargs if isinstance(self.drafter, LocalDrafter) else {}


def _batch_metrics(sessions: int, tokens: int) -> None:
    metrics.BATCH_SESSIONS.set(sessions)
    metrics.BATCH_TOKENS.observe(tokens)


def token_digest(token_ids) -> str:
    """Digest of a token id sequence (its length included): the session record says which tokens
    a kept drafter cache was built from, so a follow-up turn resumes it only for the same prefix."""
    data = array("q", [len(token_ids), *token_ids]).tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class _Recorder:
    """Wraps a DraftProvider: opens its sessions with the turn's resume claim (a drafter cache
    kept from the session's previous turn), in the request's context."""

    def __init__(self, inner: DraftProvider) -> None:
        self.inner = inner
        # The scheduler thread opens the draft session; the request's context (its trace, so the
        # Draft call joins the request's trace) is the one the turn was prepared in.
        self.context = contextvars.copy_context()
        self.block_size = inner.block_size
        self.max_block_size = inner.max_block_size
        self.target_layer_ids = inner.target_layer_ids
        self.resume: DraftResume | None = None
        self.sessions: list[Any] = []

    def open_session(self, capacity: int) -> DraftSession:
        # A copy per call: one Context cannot be entered by two threads at once.
        if self.resume is not None:
            session = self.context.copy().run(self.inner.open_session, capacity, resume=self.resume)
        else:
            session = self.context.copy().run(self.inner.open_session, capacity)
        self.sessions.append(session)
        return session


@dataclass
class _Turn:
    spec: GenerateSpec
    prompt_ids: list[int]
    params: SamplingParams
    session_id: str
    fence: int | None
    local: KeptSession | None
    started: float
    reasons: list[str] = field(default_factory=list)
    recorder: _Recorder | None = None
    record: dict[str, str] | None = None  # the session's Redis record when the turn began
    feature_layers: tuple[int, ...] = ()  # drafter context features kept for the session ((): none)
    decision: Decision | None = None
    block_size: int = 1
    cached_tokens: int = 0
    cache: KVCache | None = None
    result: GenerationResult | None = None
    request: ScheduledRequest | None = None  # once handed to the scheduler
    done: asyncio.Future | None = None  # resolved when the scheduler has let go of the request
    ended: bool = False
    owns_session_lock: bool = False
    lease_task: asyncio.Future | None = None  # renews the session's lease while the turn runs
    lookup: LookupConfig = LOOKUP_OFF
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # what a messages prompt was rendered with


class VerifierCore:
    def __init__(self, config, target: ServedTarget, drafter: DrafterSource | None, policy: Policy, store, *,
                 replica_id: str = "") -> None:
        self.config = config
        self.target = target
        self.drafter = drafter
        self.policy = policy
        self.store = store
        self.replica_id = replica_id
        self.vocab_size = target.model.config.vocab_size
        # Chat-template arguments of every messages prompt (over the drafter's own) unless the
        # request names them itself.
        self.template_defaults: dict[str, Any] = json.loads(config.chat_template_kwargs) if config.chat_template_kwargs else {}
        check_template_kwargs(self.template_defaults)
        self.backend, self.precision = backend_name(target.model), backend_precision(target.model)
        self.lookup = lookup_for(target.model, target.corpus)  # proposal lengths for this backend's verify costs
        metrics.VERIFIER_BACKEND.labels(self.backend, self.precision).set(1)
        self.max_context = target.model.config.max_position_embeddings
        # Rows hold prompt + max_new_tokens + 1 + the widest block; they start at batch_row_tokens and
        # grow (once per pool) for a longer request, up to the context.
        self.scheduler = DecodeScheduler(
            target.model, max_sessions=config.max_streams, capacity=config.batch_row_tokens,
            max_capacity=self.max_context + 1 + BLOCK_SIZE_LIMIT, max_block_size=BLOCK_SIZE_LIMIT,
            prefill_chunk_tokens=config.prefill_chunk_tokens, planners=config.max_streams if drafter is not None else 0,
            parallel_passes=max(1, len(os.sched_getaffinity(0)) // config.threads), load_aware=config.load_aware_drafts,
            on_iteration=_batch_metrics, threads=config.threads, ragged=ragged_batches(config.ragged_batches, self.backend))
        self._streams = 0
        self._sessions = SessionCaches(config.max_sessions, config.session_ttl_s)
        self._active_sessions: set[str] = set()
        self._background: set[asyncio.Task] = set()

    # ---- public -------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._streams

    def drafter_name(self, provider: DraftProvider | None) -> str:
        if provider is None:
            return "none"
        info = getattr(provider, "info", None)
        return getattr(info, "name", None) or getattr(self, "local_drafter_name", "local")

    async def generate(self, spec: GenerateSpec) -> AsyncIterator[verifier_pb2.GenerateResponse]:
        """Stream the responses of one request. Raises BlockPilotError subclasses for bad input
        (before any message) and, rarely, after messages were sent."""
        if spec.deadline is not None and spec.deadline <= time.monotonic():
            raise DeadlineExceededError("the request's deadline had already expired when it arrived")
        if self._streams >= self.config.max_streams:
            raise ResourceExhaustedError(f"the verifier is at its limit of {self.config.max_streams} concurrent streams; retry later")
        self._streams += 1
        turn: _Turn | None = None
        try:
            turn = await self._prepare(spec)
        except BaseException:
            self._streams -= 1
            raise
        try:
            async for message in self._run(turn):
                yield message
        finally:
            if turn.request is not None and not turn.request.ended:
                self.scheduler.cancel(turn.request)
            if not turn.ended:
                task = asyncio.ensure_future(self._finish(turn, cancelled=True))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def server_info(self, timeout_s: float) -> verifier_pb2.GetServerInfoResponse:
        """GetServerInfo. The drafter and the policy are asked within timeout_s each; one that does
        not answer leaves its fields empty instead of failing the call, since the verifier still
        serves without it (block size 1, or the drafter's size: counted fallbacks)."""
        provider, drafter_down = None, False
        if self.drafter is not None:
            try:
                provider = await asyncio.to_thread(self.drafter.provider, deadline=time.monotonic() + timeout_s)
            except DrafterUnavailableError:
                drafter_down = True
        try:
            default_policy = (await self.policy.describe("", timeout_s=timeout_s)).policy
        except BlockPilotError as err:
            log.warning("GetServerInfo: the policy did not describe its default (%s)", err)
            default_policy = ""
        # The largest fixed block size _prepare accepts in the same state.
        max_block = provider.max_block_size if provider is not None else (BLOCK_SIZE_LIMIT if drafter_down else 1)
        corpus = self.lookup.corpus
        corpus_fields = {} if corpus is None else {  # proto defaults ("", 0) without one
            "lookup_corpus": Path(corpus.info.get("folder", "")).name,
            "lookup_corpus_trigrams": len(corpus.trigram), "lookup_corpus_bigrams": len(corpus.bigram)}
        return verifier_pb2.GetServerInfoResponse(
            version=__version__, target=self.target.target_dir.name, drafter="" if drafter_down else self.drafter_name(provider),
            drafter_block_size=provider.block_size if provider is not None else 0,
            drafter_max_block_size=provider.max_block_size if provider is not None else 0,
            backend=self.backend, precision=self.precision, default_policy=default_policy, replica_id=self.replica_id,
            **corpus_fields,
            limits=verifier_pb2.ServerLimits(
                context_length=self.max_context, max_new_tokens=self.config.max_new_tokens_cap,
                default_max_new_tokens=self.config.default_max_new_tokens, max_streams=self.config.max_streams,
                max_block_size=max_block, max_prompt_tokens=self.config.max_prompt_tokens or self.max_context))

    async def drain(self) -> None:
        """Wait for background work (turn cleanup, outcome reports)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def close(self) -> None:
        self.scheduler.close()

    # ---- preparation --------------------------------------------------------------------

    def _prompt_ids(self, spec: GenerateSpec, template_kwargs: Mapping[str, Any]) -> list[int]:
        given = [spec.text is not None, spec.messages is not None, spec.token_ids is not None]
        if sum(given) != 1:
            raise InvalidArgumentError("give the prompt as exactly one of text, messages or token_ids")
        if spec.token_ids is not None:
            ids = list(spec.token_ids)
            if not ids:
                raise InvalidArgumentError("the prompt is empty")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidArgumentError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
            return ids
        tokenizer = self.target.tokenizer
        if spec.text is not None:
            if not spec.text.strip():
                raise InvalidArgumentError("the prompt is empty")
            if tokenizer is None:
                raise FailedPreconditionError("this target has no tokenizer: send the prompt as token_ids")
            ids = tokenizer.encode_raw(spec.text)
        else:
            if not spec.messages:
                raise InvalidArgumentError("the prompt is empty (no messages)")
            if tokenizer is None:
                raise FailedPreconditionError("this target has no tokenizer: send the prompt as token_ids")
            ids = tokenizer.encode_chat(list(spec.messages), template_kwargs)
        if not ids:
            raise InvalidArgumentError("the prompt is empty after tokenization")
        return ids

    def template_kwargs(self, spec: GenerateSpec, drafter_defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The chat-template arguments a request's prompt is rendered with: the drafter's (those it
        was trained with), the config's over them, then the request's over both ({} unless the
        prompt is messages)."""
        if spec.messages is None:
            if spec.chat_template_kwargs:
                raise InvalidArgumentError("chat_template_kwargs apply to a messages prompt only")
            return {}
        return {**(drafter_defaults or {}), **self.template_defaults, **(spec.chat_template_kwargs or {})}

    def _drafter_template(self, spec: GenerateSpec) -> dict[str, Any]:
        """The drafter's chat-template arguments for a messages prompt, asked whatever the block
        size: a prompt must render the same at block size 1 as when drafted (the lossless
        contract). Raises DrafterUnavailableError when the drafter cannot be reached."""
        if spec.messages is None or self.drafter is None:
            return {}
        return self.drafter.template_defaults()

    def _params(self, spec: GenerateSpec, prompt_len: int) -> SamplingParams:
        cap = self.config.max_new_tokens_cap
        if spec.max_new_tokens < 0 or spec.max_new_tokens > cap:
            raise InvalidArgumentError(f"max_new_tokens must be in 1..{cap} (0 = the default of "
                                       f"{self.config.default_max_new_tokens}), got {spec.max_new_tokens}")
        max_new = spec.max_new_tokens or self.config.default_max_new_tokens
        if not math.isfinite(spec.temperature) or spec.temperature < 0:
            raise InvalidArgumentError(f"temperature must be a finite number >= 0, got {spec.temperature!r}")
        stop = spec.stop_token_ids if spec.stop_token_ids is not None else self.target.stop_token_ids
        params = SamplingParams(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, max_new_tokens=max_new,
                                stop_token_ids=tuple(stop), seed=spec.seed, draft_sampling=spec.draft_sampling,
                                logprobs=spec.logprobs)
        params.validate(self.vocab_size)
        if prompt_len + max_new > self.max_context:
            raise ResourceExhaustedError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the "
                                         f"context of {self.max_context} tokens")
        return params

    def _count_fallback(self, turn: _Turn, reason: str, message: str) -> None:
        if reason not in turn.reasons:
            turn.reasons.append(reason)
        metrics.FALLBACKS.labels(reason).inc()
        log.warning("request degraded (%s): %s", reason, message)

    async def _prepare(self, spec: GenerateSpec) -> _Turn:
        started = time.perf_counter()
        if spec.mode not in ("auto", "fixed", "off"):
            raise InvalidArgumentError(f"unknown block size mode {spec.mode!r}")
        if spec.session_id and spec.new_session:
            raise InvalidArgumentError("give either session_id (continue) or new_session (open), not both")
        # A drafter that cannot be reached leaves its template arguments out (a counted fallback
        # below) and is not asked again for this request.
        drafter_down: DrafterUnavailableError | None = None
        try:
            drafter_template = await asyncio.to_thread(self._drafter_template, spec)
        except DrafterUnavailableError as err:
            drafter_template, drafter_down = {}, err
        template_kwargs = self.template_kwargs(spec, drafter_template)
        # Off the event loop: a long prompt takes a while to tokenize, and other streams go on.
        prompt_ids = await asyncio.to_thread(self._prompt_ids, spec, template_kwargs)
        cap = self.config.max_prompt_tokens or self.max_context
        if len(prompt_ids) > cap:
            raise ResourceExhaustedError(f"the prompt has {len(prompt_ids)} tokens; this verifier accepts at most {cap}")
        params = self._params(spec, len(prompt_ids))
        fixed = spec.block_size if spec.mode == "fixed" else (1 if spec.mode == "off" else None)
        if fixed is not None and fixed < 1:
            raise InvalidArgumentError(f"block size must be >= 1, got {fixed}")
        if spec.mode != "auto" and spec.policy:
            raise InvalidArgumentError("a policy override needs block size mode AUTO")
        turn = _Turn(spec, prompt_ids, params, "", None, None, started, template_kwargs=template_kwargs)
        if drafter_down is not None:
            self._count_fallback(turn, drafter_down.reason,
                                 f"{drafter_down} (the prompt is rendered without the drafter's chat-template arguments)")

        # The drafter for this request (None: autoregressive).
        provider: DraftProvider | None = None
        if self.drafter is not None and fixed != 1:
            if drafter_down is None:
                try:
                    provider = await asyncio.to_thread(self.drafter.provider, deadline=spec.deadline, session_id=spec.session_id)
                except DrafterUnavailableError as err:
                    self._count_fallback(turn, err.reason, str(err))
            if provider is None and fixed is not None and fixed > 1 and not turn.reasons:
                raise InvalidArgumentError(f"block size {fixed} needs a drafter; the drafter service has none loaded")
        elif fixed is not None and fixed > 1:
            raise InvalidArgumentError(f"block size {fixed} needs a drafter; this verifier runs without one")
        limit = provider.max_block_size if provider is not None else BLOCK_SIZE_LIMIT
        if fixed is not None and fixed > limit:
            raise InvalidArgumentError(f"block size must be <= {limit}, got {fixed}")
        if provider is not None:
            turn.recorder = _Recorder(provider)
            turn.feature_layers = tuple(provider.target_layer_ids)
        elif self.drafter is not None:
            turn.feature_layers = tuple(self.drafter.known_target_layer_ids() or ())
        turn.block_size = fixed if fixed is not None else 1

        await self._open_session(turn)
        if turn.recorder is not None and turn.session_id:
            turn.recorder.resume = self._resume_claim(turn)
        return turn

    def _resume_claim(self, turn: _Turn) -> DraftResume:
        """The drafter cache this turn asks to resume: the one the session's record says the last
        drafting turn left (its tag, length and the address of the replica holding it), when the new
        prompt starts with the tokens it was built from (their digest); else none. The drafter
        answers what it actually holds."""
        resume = DraftResume(turn.session_id, uuid.uuid4().hex)
        record = turn.record or {}
        try:
            length = int(record.get("drafter_cache_len", 0) or 0)
        except ValueError:
            length = 0
        tag, digest = record.get("drafter_cache_tag", ""), record.get("drafter_cache_digest", "")
        if 0 < length <= len(turn.prompt_ids) and tag and digest == token_digest(turn.prompt_ids[:length]):
            resume = DraftResume(turn.session_id, resume.cache_tag, tag, length, record.get("drafter_replica_address", ""))
        return resume

    async def _store_call(self, turn: _Turn, coro):
        try:
            return await coro
        except UnavailableError as err:
            self._count_fallback(turn, "session_store_unavailable", str(err))
            return None

    async def _open_session(self, turn: _Turn) -> None:
        spec = turn.spec
        if spec.new_session:
            turn.session_id = new_session_id()
            await self._store_call(turn, self.store.create(turn.session_id, {"verifier_replica": self.replica_id,
                                                                             "owner": spec.caller}))
            turn.fence = await self._store_call(turn, self.store.begin_turn(turn.session_id, self._lease_s(spec)))
            self._active_sessions.add(turn.session_id)
            turn.owns_session_lock = True
            if turn.fence is not None:
                self._hold_session(turn)
            return
        if not spec.session_id:
            return
        sid = spec.session_id
        if sid in self._active_sessions:
            raise AbortedError(f"session {quoted(sid)} is already in use by another stream")
        local = self._sessions.get(sid)
        # Another caller's session is answered as an unknown one: its id tells nothing.
        if local is not None and local.owner != spec.caller:
            raise NotFoundError(f"unknown or expired session {quoted(sid)}")
        store_down = False
        try:
            record = await self.store.get(sid)
            if record is not None and record.get("owner", "") != spec.caller:
                raise NotFoundError(f"unknown or expired session {quoted(sid)}")
            if record is None:
                if local is None:
                    raise NotFoundError(f"unknown or expired session {quoted(sid)}")
                await self.store.create(sid, {"verifier_replica": self.replica_id, "owner": spec.caller})
            turn.record = record
            turn.fence = await self.store.begin_turn(sid, self._lease_s(spec))
        except UnavailableError as err:
            store_down = True
            self._count_fallback(turn, "session_store_unavailable", str(err))
        if store_down and local is None:
            raise NotFoundError(f"unknown or expired session {quoted(sid)} (the session store is unavailable, so only "
                                "sessions held by this replica can continue)")
        turn.session_id = sid
        turn.local = local
        self._active_sessions.add(sid)
        turn.owns_session_lock = True
        if turn.fence is not None:
            self._hold_session(turn)

    def _lease_s(self, spec: GenerateSpec) -> float:
        """How long a turn holds its session without renewing (see _hold_session)."""
        return self.config.session_lease_s

    def _hold_session(self, turn: "_Turn") -> None:
        """Renew the turn's lease every third of it while the turn runs (stopped in _finish): a
        verifier that dies frees its sessions within one lease instead of holding them until a
        deadline."""
        lease = self._lease_s(turn.spec)

        async def renew():
            while True:
                await asyncio.sleep(lease / 3)
                try:
                    if not await self.store.renew(turn.session_id, turn.fence, lease):
                        log.warning("session %s: the lease was lost to a newer turn", turn.session_id)
                        return
                except UnavailableError as err:
                    log.warning("session %s: lease not renewed (%s)", turn.session_id, err)

        turn.lease_task = asyncio.ensure_future(renew())

    def _reuse(self, turn: _Turn) -> tuple[KVCache, torch.Tensor | None]:
        """The target cache for this request: the session's, cut to the prefix it shares with the
        new prompt, or a new one."""
        need = len(turn.prompt_ids) + turn.params.max_new_tokens + 1
        reuse = SessionCaches.reuse(turn.local, turn.prompt_ids, need, bool(turn.feature_layers), self.target.model.new_cache)
        turn.cached_tokens = reuse.cached_tokens
        return reuse.cache, reuse.features

    # ---- running ------------------------------------------------------------------------

    async def _decide(self, turn: _Turn, info: PrefillInfo) -> int:
        """The block size of an AUTO turn with a drafter, from its prefill: the policy's answer,
        or the default size (a counted fallback) when the policy fails or answers out of range."""
        recorder = turn.recorder
        default = self.config.default_block_size or recorder.block_size
        default = max(1, min(default, recorder.max_block_size))
        # The policy calls get the client's remaining time, bounded by the policy timeout.
        timeout = self.config.policy_timeout_s
        if turn.spec.deadline is not None:
            remaining = turn.spec.deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError("the request's deadline expired before the block size was chosen")
            timeout = min(timeout, remaining)
        try:
            decision = await asyncio.wait_for(self._choose(turn, info, default, timeout), timeout + 0.5)
        except (NotFoundError, InvalidArgumentError):
            raise
        except Exception as err:  # noqa: BLE001 - any policy failure falls back to the default
            self._count_fallback(turn, "policy_unavailable", f"policy decision failed ({err!r}); block size {default}")
            decision = Decision(default, "", "", "")
        size = decision.block_size
        if not 1 <= size <= recorder.max_block_size:
            log.error("policy answered block size %d outside 1..%d; using %d", size, recorder.max_block_size, default)
            size = default
        turn.decision = decision
        turn.block_size = size
        return size

    async def _choose(self, turn: _Turn, info: PrefillInfo, default: int, timeout: float) -> Decision:
        """Ask the policy: which features it reads (DescribePolicy, cached), then the decision for
        this prefill's features. A FAILED_PRECONDITION / INVALID_ARGUMENT answer with a cached
        feature list that is stale (a new policy version reads another feature) is retried once
        with a fresh one; a policy this target cannot feed (another vocabulary or hidden size: a
        feature left out, or one of an experiment's policies expecting another length) falls back
        to the default size ("policy_feature_mismatch"). Unknown policy names and bad
        overrides (NOT_FOUND, INVALID_ARGUMENT) reach the client."""
        recorder = turn.recorder
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.001, deadline - time.monotonic())

        name = turn.spec.policy
        spec = await self.policy.describe(name, timeout_s=left())
        for attempt in (0, 1):
            vectors, problems = policy_features(spec.features, info)
            features = PolicyFeatures(vectors, info.prompt_len, recorder.block_size, recorder.max_block_size,
                                      turn.session_id, name)
            try:
                decision = await self.policy.decide(features, timeout_s=left())
                break
            except (FailedPreconditionError, InvalidArgumentError) as err:
                if attempt == 0:
                    fresh = await self.policy.describe(name, timeout_s=left(), fresh=True)
                    if fresh.features != spec.features:
                        spec = fresh
                        continue
                if isinstance(err, InvalidArgumentError) and not problems:
                    raise  # a bad request (e.g. a fixed size above the limit), not a feature this target lacks
                self._count_fallback(turn, "policy_feature_mismatch",
                                     f"policy {name or '(default)'} needs features this target cannot give "
                                     f"({'; '.join(problems) or err}); block size {default}")
                return Decision(default, "", "", "")
        for reason in filter(None, decision.fallback_reason.split(",")):
            # Reported by the policy service, which logs it; here it is counted and passed on.
            if reason not in turn.reasons:
                turn.reasons.append(reason)
            metrics.FALLBACKS.labels(reason).inc()
        return decision

    async def _run(self, turn: _Turn) -> AsyncIterator[verifier_pb2.GenerateResponse]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        turn.done = loop.create_future()

        def deliver(item) -> None:  # on the event loop
            queue.put_nowait(item)
            if item[0] in ("done", "error") and not turn.done.done():
                turn.done.set_result(None)

        def notify(kind: str, payload, since: float) -> None:  # on the scheduler thread
            try:
                loop.call_soon_threadsafe(deliver, (kind, payload, since))
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        cache, prefix = self._reuse(turn)
        turn.cache = cache
        result = GenerationResult(prompt_token_ids=list(turn.prompt_ids))
        turn.result = result
        # A session keeps the drafter features of every turn (block size 1 included), so its next
        # drafting turn feeds the drafter without a new prefill.
        collect = turn.feature_layers if turn.session_id else ()
        lookup_on = turn.spec.prompt_lookup if turn.spec.prompt_lookup is not None else self.config.prompt_lookup
        turn.lookup = self.lookup if lookup_on else LOOKUP_OFF
        request = ScheduledRequest(
            list(turn.prompt_ids), turn.params, cache, result, notify, drafter=turn.recorder, prefix_features=prefix,
            collect_features=collect, lookup=turn.lookup, keep_cache=bool(turn.session_id),
            load_cap=turn.spec.mode == "auto")  # FIXED and OFF sizes are honoured as given
        self.scheduler.submit(request)
        turn.request = request

        text = IncrementalDecoder(self.target.tokenizer) if self.target.tokenizer is not None else None
        index = 0
        first = True
        last_emit = time.perf_counter()
        while True:
            kind, payload, step_s = await queue.get()
            if kind == "error":
                raise payload
            if kind == "done":
                break
            if kind == "prefilled":
                auto = turn.recorder is not None and turn.spec.mode == "auto"
                self.scheduler.decide(turn.request, await self._decide(turn, payload) if auto else turn.block_size)
                continue
            event = payload
            now = time.perf_counter()
            tokens = list(event.token_ids)
            version = (turn.decision.policy_version if turn.decision else "") or "none"
            arm = (turn.decision.arm if turn.decision else "") or "none"
            if first:
                first = False
                metrics.TTFT.labels(version).observe(now - turn.started)
                metrics.BLOCK_SIZE_CHOSEN.labels(str(turn.block_size), version, arm).inc()
            else:
                label = str(turn.block_size)
                for _ in tokens:
                    metrics.INTER_TOKEN.labels(label).observe((now - last_emit) / len(tokens))
                metrics.STEP_SECONDS.labels("verifier", label).observe(step_s)
                metrics.ACCEPTANCE_LENGTH.labels(label, version, arm).observe(len(tokens))
                if event.drafted:
                    accepted = min(len(tokens), event.acceptance_length or 0) - 1
                    metrics.DRAFTS.labels(label, version, event.source).inc()
                    metrics.DRAFT_TOKENS.labels(label, version, event.source).inc(event.drafted)
                    metrics.ACCEPTED_TOKENS.labels(label, version, event.source).inc(max(0, accepted))
                    for position in range(1, accepted + 1):
                        metrics.ACCEPTED_BY_POSITION.labels(str(position)).inc()
            last_emit = now
            metrics.GENERATED_TOKENS.inc(len(tokens))
            delta = verifier_pb2.TokenDelta(token_ids=tokens, text=text.push(tokens) if text else "",
                                            acceptance_length=event.acceptance_length or 0,
                                            logprobs=self._logprobs(tokens, event.logprobs))
            if index == 0:
                delta.prompt_tokens = len(turn.prompt_ids)
                delta.block_size = turn.block_size
                if turn.decision:
                    delta.policy_version, delta.arm = turn.decision.policy_version, turn.decision.arm
            yield verifier_pb2.GenerateResponse(index=index, session_id=turn.session_id, delta=delta)
            index += 1
        resume = turn.recorder.resume if turn.recorder is not None else None
        for session in turn.recorder.sessions if turn.recorder is not None else ():
            if getattr(session, "fallback_reason", ""):  # the recorded drafter replica could not take the stream
                self._count_fallback(turn, session.fallback_reason, f"session {turn.session_id}: drafted through "
                                     f"{session.address}, not on the drafter replica its record names")
        if resume is not None and resume.resume_length and turn.recorder.sessions:
            held = turn.recorder.sessions[0].context_length
            if held < resume.resume_length:
                self._count_fallback(turn, "drafter_cache_rebuilt",
                                     f"session {turn.session_id}: the drafter held {held} of the {resume.resume_length} "
                                     "context tokens of its kept cache; sent the context again")
        if result.fallback_reason:
            self._count_fallback(turn, result.fallback_reason, "the drafter failed mid-request; continued at block size 1")
        metrics.CAPPED_STEPS.inc(result.capped_steps)
        await self._finish(turn, cancelled=False)
        yield verifier_pb2.GenerateResponse(index=index, session_id=turn.session_id, final=self._final(turn))

    def _logprobs(self, tokens: list[int], logprobs: tuple[float, ...] | list[float]) -> list[verifier_pb2.TokenLogprob]:
        """TokenLogprob messages of committed tokens (none when the request did not ask)."""
        tokenizer = self.target.tokenizer
        return [verifier_pb2.TokenLogprob(token_id=t, logprob=lp, text=tokenizer.decode([t], skip_special_tokens=False) if tokenizer else "")
                for t, lp in zip(tokens, logprobs)]

    def _final(self, turn: _Turn) -> verifier_pb2.GenerateFinal:
        result = turn.result
        decision = turn.decision
        decode_tokens = sum(result.acceptance_lengths)
        final = verifier_pb2.GenerateFinal(
            finish_reason=result.finish_reason,
            usage=verifier_pb2.Usage(prompt_tokens=len(turn.prompt_ids), completion_tokens=len(result.token_ids),
                                     cached_prompt_tokens=turn.cached_tokens,
                                     cached_draft_tokens=result.draft_context_reused),
            acceptance_lengths=result.acceptance_lengths, tau=result.tau, block_size=result.block_size,
            policy_version=decision.policy_version if decision else "", arm=decision.arm if decision else "",
            decision_id=decision.decision_id if decision else "", experiment=decision.experiment if decision else "",
            fallback_reason=",".join(turn.reasons),
            timings=verifier_pb2.Timings(ttft_s=result.ttft_s, decode_s=result.decode_s,
                                         decode_tokens_per_s=decode_tokens / result.decode_s if result.decode_s > 0 else 0.0,
                                         total_s=time.perf_counter() - turn.started),
            token_ids=result.token_ids, text=self.target.tokenizer.decode(result.token_ids) if self.target.tokenizer else "",
            target=str(self.target.target_dir), drafter=self.drafter_name(turn.recorder.inner if turn.recorder else None),
            accepted_by_source=result.accepted_by_source, drafter_passes_skipped=result.drafter_passes_skipped,
            prompt_lookup=turn.lookup.enabled, batch_sessions=turn.request.batch_sessions if turn.request else 0,
            capped_steps=result.capped_steps, backend=self.backend, precision=self.precision,
            logprobs=self._logprobs(result.token_ids, result.logprobs), trace_id=current_trace_id())
        final.chat_template_kwargs.update(turn.template_kwargs)
        if turn.spec.return_prompt_token_ids:
            final.prompt_token_ids.extend(turn.prompt_ids)
        return final

    async def _finish(self, turn: _Turn, *, cancelled: bool) -> None:
        """End of a turn (once): wait for the worker, keep the session's cache, write the session
        record, release the stream slot and the session, report the outcome to the policy."""
        if turn.ended:
            return
        turn.ended = True
        if turn.lease_task is not None:  # before the record's final write ends the turn's hold
            turn.lease_task.cancel()
        try:
            if turn.request is not None:
                # The scheduler has freed the request (or copied its row into turn.cache) once it said so.
                await asyncio.shield(turn.done)
            result = turn.result
            if turn.session_id and result is not None and turn.cache is not None:
                tokens = list(turn.prompt_ids) + list(result.token_ids)
                self._sessions.keep(turn.session_id, turn.cache, tokens, result.context_features, turn.spec.caller)
                fields = self._session_fields(turn, tokens)
                if turn.fence is not None:
                    try:
                        if not await self.store.write(turn.session_id, turn.fence, fields):
                            log.warning("session %s: a newer turn owns the record; this turn's write was fenced off", turn.session_id)
                    except UnavailableError as err:
                        metrics.FALLBACKS.labels("session_store_unavailable").inc()
                        log.warning("session %s: record not updated (%s)", turn.session_id, err)
            if turn.decision is not None and turn.decision.decision_id and result is not None:
                outcome = Outcome(turn.decision, turn.session_id, len(turn.prompt_ids), len(result.token_ids),
                                  tuple(result.acceptance_lengths), result.decode_s,
                                  "cancelled" if cancelled else result.finish_reason, ",".join(turn.reasons))
                task = asyncio.ensure_future(self._report(outcome))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        finally:
            if turn.owns_session_lock:
                self._active_sessions.discard(turn.session_id)
            self._streams -= 1

    def _session_fields(self, turn: _Turn, tokens: list[int]) -> dict[str, Any]:
        decision = turn.decision
        local = self._sessions.get(turn.session_id)  # None when max_sessions is 0
        fields = {
            "state": "idle", "lease_until": 0, "turns": int(turn.fence or 0),
            "committed_tokens": len(tokens), "block_size": turn.block_size,
            "policy_version": decision.policy_version if decision else "", "arm": decision.arm if decision else "",
            "decision_id": decision.decision_id if decision else "", "experiment": decision.experiment if decision else "",
            "verifier_replica": self.replica_id, "verifier_cache_len": local.valid if local else 0,
            "fallback_reason": ",".join(turn.reasons),
        }
        # Where this turn's draft cache lives (the drafter keeps it for the next turn): replica and
        # the address it is reached at directly ("" = not routable), context length, the tag it is
        # kept under and the digest of the tokens it was built from.
        # A turn that opened no draft stream leaves the previous turn's entry (still valid) alone.
        if turn.recorder is not None and turn.recorder.sessions:
            session = turn.recorder.sessions[-1]
            length = min(int(getattr(session, "cache_length", 0) or 0), len(tokens))
            tag = getattr(session, "cache_tag", "")
            fields.update(drafter_replica=getattr(session, "replica_id", "") or "local",
                          drafter_replica_address=getattr(session, "advertise_address", ""), drafter_cache_len=length,
                          drafter_cache_tag=tag, drafter_cache_digest=token_digest(tokens[:length]) if tag else "")
        return fields

    async def _report(self, outcome: Outcome) -> None:
        try:
            await self.policy.report(outcome)
        except BlockPilotError as err:
            metrics.FALLBACKS.labels("policy_report_failed").inc()
            log.warning("policy report failed: %s", err)
