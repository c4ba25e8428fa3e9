"""The speculative decoding loop: prefill -> first token -> block size -> draft/verify steps.

One request at a time (batch 1), as in DFlash's reference loop. Terms (see acceptance.py for the
per-step math):
- committed tokens: tokens the output is made of; they never change once committed.
- anchor: the last committed token; it opens each block and has not yet been through the target.
- step: one drafter pass (block of `block_size`) and one target pass over the block; it commits
  `acceptance_length` = accepted drafts + 1 tokens.
- pending context: target features of committed tokens the drafter has not seen yet (the prompt
  after prefill; then, after each step, the anchor and the accepted drafts; steps that make no
  drafter call let it grow, and the next drafter call sends all of it).
- draft source: where a step's draft comes from. "lookup": prompt lookup (lookup.py) found the
  current suffix earlier in prompt + output and proposes what followed it; the drafter pass is
  skipped for that step. "dflash": no lookup match and block size > 1: the DFlash drafter drafts
  block_size - 1 tokens. Neither: a one-token step. Both are verified by the same acceptance rules
  (a lookup draft is deterministic: a one-hot q).

Block size 1 with prompt lookup off is plain autoregressive decoding through this same loop: no
draft, a one-token target pass per step. Every speed-up is measured against it. (Block size 1
with lookup on verifies lookup drafts only.)
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from blockpilot.decoding import acceptance
from blockpilot.decoding.drafting import Draft, DraftProvider, DraftRequest, DraftSession
from blockpilot.decoding.load_cap import SpeculationGate
from blockpilot.decoding.lookup import COPY, CORPUS, LOOKUP_OFF, LookupConfig, PromptLookupIndex
from blockpilot.errors import DrafterUnavailableError, InvalidArgumentError, ResourceExhaustedError
from blockpilot.models.kv_cache import KVCache
from blockpilot.models.target import TargetModel

DRAFT_SAMPLING_MODES = ("greedy", "sample")
DRAFT_SOURCES = ("dflash", "lookup")
# What the speed gate judges apart (StepPlan.kind): the DFlash drafter, and prompt lookup's two
# kinds, copies and corpus guesses (both the "lookup" source in results). Judged as one, a stretch
# of text with nothing to copy, where one-token corpus guesses pay, let copies' record cap them
# too (and the reverse): measured on a Zen 4, one thread, greedy, 35 held-out prompts.
GATE_SOURCES = ("dflash", COPY, CORPUS)
STEP_PHASES = ("lookup", "draft", "verify", "accept", "bookkeeping")


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request.

    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    top_k / top_p: at temperature > 0, sample from the top_k most likely tokens (0 = all), then
        from the smallest set of those holding top_p of their mass (1.0 = all), renormalised
        (acceptance.truncate_probs). Lossless under speculation: verification uses the same
        truncated distribution. Temperature 0 ignores them.
    max_new_tokens: upper bound on generated tokens (the stop token, if any, counts).
    stop_token_ids: generation ends after the first of these is committed.
    seed: seeds the request's own random stream (None = nondeterministic).
    draft_sampling: at temperature > 0, "greedy" drafts the argmax and accepts by sample-and-match
        (DFlash's rule); "sample" samples the draft from the drafter's distribution q and accepts
        with min(1, p/q) plus residual resampling (accepts more; needs q at the verifier).
    logprobs: also report each committed token's log-probability under the target's raw
        distribution (acceptance.token_logprobs) in StepEvent.logprobs and GenerationResult.logprobs.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    draft_sampling: str = "greedy"
    logprobs: bool = False

    def validate(self, vocab_size: int) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgumentError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgumentError(f"top_p must be in (0, 1] (1.0 = off), got {self.top_p!r}")
        if self.max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgumentError(f"stop token ids {bad} are outside the vocabulary [0, {vocab_size})")
        if self.draft_sampling not in DRAFT_SAMPLING_MODES:
            raise InvalidArgumentError(
                f"draft_sampling must be one of {DRAFT_SAMPLING_MODES}, got {self.draft_sampling!r}"
            )


@dataclass(frozen=True)
class PrefillInfo:
    """What the block-size hook sees once per request, right after prefill.

    last_logits [V]: target logits of the last prompt token (BlockPilot's feature).
    last_hidden [F] or None: drafter context features of the last prompt token.
    final_hidden [C]: the last prompt token's final hidden state (after the final norm: the
    lm_head input), the policy's alternative feature.
    """

    prompt_len: int
    last_logits: torch.Tensor
    last_hidden: torch.Tensor | None
    final_hidden: torch.Tensor | None = None


BlockSizeHook = Callable[[PrefillInfo], int]


def feature_layers_of(drafter: DraftProvider | None, collect_features: Sequence[int]) -> tuple[int, ...]:
    """The target layers a request's passes return: its drafter's, else those it collects."""
    return tuple(drafter.target_layer_ids) if drafter is not None else tuple(collect_features)


@dataclass(frozen=True)
class StepEvent:
    """Tokens committed by one step (the first event carries the prefill's first token)."""

    token_ids: tuple[int, ...]
    acceptance_length: int | None  # None for the prefill's token
    source: str = ""  # the step's draft source (DRAFT_SOURCES), "" for a one-token step or the prefill
    drafted: int = 0  # draft tokens the step verified (accepted or not)
    logprobs: tuple[float, ...] = ()  # with SamplingParams.logprobs: one per token_ids, else empty


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    # With SamplingParams.logprobs: each token_ids entry's log-probability (else empty).
    logprobs: list[float] = field(default_factory=list)
    block_size: int = 1
    acceptance_lengths: list[int] = field(default_factory=list)
    finish_reason: str = ""
    ttft_s: float = 0.0
    decode_s: float = 0.0
    # Why drafting stopped early ("" = it did not): the drafter failed and the rest of the request
    # ran autoregressively (same output, lower speed). Set from DrafterUnavailableError.reason.
    fallback_reason: str = ""
    # With stream(collect_features=...): the drafter context features [N, F] of the first N
    # tokens of prompt + output (N = all but the last token, which has not been through the
    # target), so a follow-up turn can reuse the target cache and feed a drafter without a
    # recompute. None otherwise. Set when the stream ends (also when it is closed early).
    context_features: torch.Tensor | None = field(default=None, repr=False)
    # Context tokens the draft session already held when it opened (a resumed drafter cache).
    draft_context_reused: int = 0
    # Accepted draft tokens (bonus tokens excluded) by draft source; every DRAFT_SOURCES key.
    accepted_by_source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DRAFT_SOURCES, 0))
    # Per step: its draft source ("" = a one-token step) and the tokens it verified.
    step_sources: list[str] = field(default_factory=list)
    verify_sizes: list[int] = field(default_factory=list)
    # Steps that would have called the drafter (block size > 1) but verified a lookup draft instead.
    drafter_passes_skipped: int = 0
    # Steps a batch's load-aware cap ran without a draft (its drafts did not pay in that batch).
    capped_steps: int = 0
    # Seconds of the decode steps by phase (STEP_PHASES): the lookup proposal, the drafter pass,
    # the target's verify pass, the acceptance rule, and the step's bookkeeping (cache length,
    # stop tokens, features kept, the lookup index). Time the caller spends between steps is not
    # in any phase.
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEP_PHASES, 0.0))

    @property
    def tau(self) -> float:
        """Mean tokens committed per verify step, bonus included (0 when no step ran)."""
        return sum(self.acceptance_lengths) / len(self.acceptance_lengths) if self.acceptance_lengths else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # Tokens produced by decode steps only: the first token belongs to the prefill.
        produced = sum(self.acceptance_lengths)
        return produced / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class StepPlan:
    """One step's block: tokens = (anchor, *draft) (just the anchor for a one-token step); draft:
    the DFlash draft (with q when sampled), None for lookup or no draft; source: DRAFT_SOURCES or "";
    kind: the GATE_SOURCES record the step counts in ("" with no draft)."""

    tokens: tuple[int, ...]
    draft: Draft | None
    source: str
    kind: str = ""


@dataclass(eq=False)
class DecodeState:
    """One request between steps: what the loop needs to plan, verify and commit its next step.
    Made by SpeculativeDecoder.prefill and changed only by the decoder's phase methods.

    anchor: the last committed token (not yet through the target); generated: tokens committed
    so far (the first included); cache_length: the tokens the request's target cache must hold
    after the last commit (the anchor's position). pending / pending_start: target features the
    drafter has not seen yet and the position of the first. kept: features of committed tokens
    kept for the caller (collect_features). drafter: this request's draft provider (None: no
    DFlash drafts); the decoder's own unless prefill was given another."""

    params: SamplingParams
    result: GenerationResult
    uniforms: acceptance.PositionalUniforms  # the request's sampling uniforms, by output position
    prompt_len: int
    stop_ids: frozenset[int]
    feature_layers: tuple[int, ...]
    collect_features: tuple[int, ...]
    lookup: LookupConfig
    prompt_features: torch.Tensor | None
    anchor: int
    drafter: DraftProvider | None
    cache_length: int
    kept: list[torch.Tensor] | None = None
    block_size: int = 1
    generated: int = 1
    finished: bool = False
    decode_started: float = 0.0
    session: DraftSession | None = None
    pending: list[torch.Tensor] = field(default_factory=list)
    pending_start: int = 0
    index: PromptLookupIndex | None = None

    def close_session(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.close()

    def was_capped(self, sources: frozenset[str] | None, plan: "StepPlan") -> bool:
        """Whether a step planned under `sources` (the speed gate's GATE_SOURCES allowed, None =
        all) verifies its anchor alone because the gate left out a source this request could have
        drafted from: the drafter while its session is open, lookup copies with an index, corpus
        guesses with an index that has a corpus (a sampled request has none)."""
        if sources is None or plan.source:
            return False
        usable = {"dflash"} if self.session is not None and self.block_size > 1 else set()
        if self.index is not None:
            usable |= {COPY, CORPUS} if self.index.config.corpus is not None else {COPY}
        return bool(usable - sources)


class SpeculativeDecoder:
    """Runs requests against one target and an optional drafter (in-process or remote)."""

    def __init__(self, target: TargetModel, drafter: DraftProvider | None = None, *, max_context: int | None = None) -> None:
        self.target = target
        self.drafter = drafter
        self.max_context = max_context or target.config.max_position_embeddings

    @property
    def max_block_size(self) -> int:
        return 1 if self.drafter is None else self.drafter.max_block_size

    def check_block_size(self, block_size: int, drafter: DraftProvider | None | str = "decoder") -> None:
        """A block size `drafter` ("decoder" = the decoder's own) can draft; raises InvalidArgumentError."""
        drafter = self.drafter if isinstance(drafter, str) else drafter
        if block_size < 1:
            raise InvalidArgumentError(f"block size must be >= 1, got {block_size}")
        if block_size > 1 and drafter is None:
            raise InvalidArgumentError(f"block size {block_size} needs a drafter; none is loaded")
        if block_size > 1 and block_size > drafter.max_block_size:
            raise InvalidArgumentError(f"block size must be <= {drafter.max_block_size}, got {block_size}")

    def speed_gate(self) -> SpeculationGate:
        """A gate that drops drafts which do not pay on this target (load_cap.py), priced by its
        verify-cost curve where the backend measured one. One per caller: it learns from every
        request it sees (share it across requests of one kind, not across kinds)."""
        return SpeculationGate(GATE_SOURCES, getattr(self.target, "verify_cost", None))

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, block_size: int | BlockSizeHook = 1,
        *, lookup: LookupConfig = LOOKUP_OFF, gate: SpeculationGate | None = None,
    ) -> GenerationResult:
        result = GenerationResult(prompt_token_ids=list(prompt_ids))
        for _ in self.stream(prompt_ids, params, block_size, result, lookup=lookup, gate=gate):
            pass
        return result

    @torch.inference_mode()
    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        block_size: int | BlockSizeHook = 1,
        result: GenerationResult | None = None,
        *,
        cache: KVCache | None = None,
        prefix_features: torch.Tensor | None = None,
        collect_features: Sequence[int] = (),
        lookup: LookupConfig = LOOKUP_OFF,
        gate: SpeculationGate | None = None,
    ) -> Iterator[StepEvent]:
        """Decode, yielding the tokens of each step as soon as they are committed. `result` (if
        given) is filled in as decoding goes and is complete when the iterator is exhausted.
        Closing the iterator early (client gone) frees the request's caches at once.

        This is the one-request driver of the loop's phases (prefill, start, open_drafting, then
        plan_step / target pass / commit_step until finished, then finish); BatchDecoder drives the
        same phases for many requests with one target pass per step.

        cache: a caller-owned target cache (kept for a conversation's next turn); it may already hold
            the first `cache.length` prompt tokens (earlier turns): only the rest is prefilled. Its capacity
            must fit prompt + max_new_tokens + 1. With a drafter, `prefix_features` [cache.length, F]
            must give the drafter context features of those cached tokens (also with
            `collect_features`).
        collect_features: target layers whose outputs to keep for every committed token in
            `result.context_features`, even at block size 1 (the target pass returns them at almost no
            cost); must equal the drafter's target_layer_ids when there is a drafter.
        lookup: prompt-lookup drafting (off by default here; the CLI and the verifier turn it on).
        gate: drop a step's draft where it does not pay for its cost (speed_gate(); a capped step
            verifies the anchor alone, same output, counted in result.capped_steps); None: every
            step drafts as the block size and lookup allow.
        A draft session that opens holding context already (`session.context_length`, a drafter
            cache resumed from an earlier turn) is sent context from that position on only.
        If the drafter fails (DrafterUnavailableError) the request continues at block size 1 with
        `result.fallback_reason` set: the target cache is already correct, so the output is unchanged."""
        if not callable(block_size):
            self.check_block_size(block_size)
        if cache is None:
            self._validate(prompt_ids, params, 1)
            cache = self.target.new_cache(len(prompt_ids) + params.max_new_tokens + 1)
        if gate is not None:
            gate.check_sources(GATE_SOURCES)
        state, info = self.prefill(prompt_ids, params, cache, result, prefix_features=prefix_features,
                                   collect_features=collect_features, lookup=lookup)
        try:
            chosen = block_size(info) if callable(block_size) else block_size
            yield self.start(state, chosen)
            if state.finished:
                return
            self.open_drafting(state)
            records = gate.new_records() if gate is not None else None
            while not state.finished:
                sources = (gate.allowed(records, params.temperature, params.seed, draft_sampling=params.draft_sampling)
                           if gate is not None else None)
                drafting = state.result.phase_s["draft"]
                plan = self.plan_step(state, sources)
                if state.was_capped(sources, plan):
                    state.result.capped_steps += 1
                began = time.perf_counter()
                block = torch.tensor([plan.tokens], dtype=torch.long, device=self.target.device)
                out = self.target(block, cache, num_logits=None, hidden_layer_ids=state.feature_layers)
                verified = time.perf_counter() - began
                state.result.phase_s["verify"] += verified
                event = self.commit_step(state, plan, out.logits[0], out.hidden[0] if out.hidden is not None else None)
                cache.truncate(state.cache_length)
                if gate is not None:
                    gate.passed(len(plan.tokens), verified)
                    if plan.kind:
                        gate.drafted(records, plan.kind, event.drafted, len(event.token_ids),
                                     state.result.phase_s["draft"] - drafting)
                yield event
        finally:
            self.finish(state)

    # ---- the loop's phases (one request each; the caller owns the loop and the target pass) -------

    def prefill(
        self, prompt_ids: Sequence[int], params: SamplingParams, cache: KVCache, result: GenerationResult | None = None,
        *, prefix_features: torch.Tensor | None = None, collect_features: Sequence[int] = (),
        lookup: LookupConfig = LOOKUP_OFF, drafter: DraftProvider | None | str = "decoder",
    ) -> tuple["DecodeState", PrefillInfo]:
        """Validate the request, run the target over the prompt (the part `cache` does not hold
        yet), sample the first token. Returns the request's state and what a block-size choice
        reads (PrefillInfo); nothing is yielded yet: call start() with the block size.
        drafter: this request's draft provider ("decoder" = the decoder's own; None = none): a
        batch of requests shares one decoder, each with its own draft source."""
        self._validate(prompt_ids, params, 1)
        result = result if result is not None else GenerationResult(prompt_token_ids=list(prompt_ids))
        uniforms = acceptance.PositionalUniforms(params.seed)  # unseeded: a fresh random seed
        prompt_len = len(prompt_ids)
        collect_features = tuple(collect_features)
        drafter = self.drafter if isinstance(drafter, str) else drafter
        if collect_features and drafter is not None and collect_features != tuple(drafter.target_layer_ids):
            raise ValueError(f"collect_features {collect_features} differ from the drafter's layers {drafter.target_layer_ids}")
        feature_layers = feature_layers_of(drafter, collect_features)
        started = time.perf_counter()
        reused = cache.length
        if reused:
            self._check_reused_cache(cache, prompt_len, params.max_new_tokens, prefix_features, bool(feature_layers))
        elif cache.capacity < prompt_len + params.max_new_tokens + 1:
            raise ValueError(f"the cache holds {cache.capacity} tokens; the request needs {prompt_len + params.max_new_tokens + 1}")
        prompt = torch.tensor([list(prompt_ids[reused:])], dtype=torch.long, device=self.target.device)
        out = self.target(prompt, cache, num_logits=1, hidden_layer_ids=feature_layers)
        prompt_features = out.hidden
        if reused and prompt_features is not None:
            prompt_features = torch.cat([prefix_features.to(prompt_features)[None], prompt_features], dim=1)
        last_logits = out.logits[0, -1]
        first = self._sample_one(last_logits, params, uniforms.at(0, 1))
        last_hidden = out.hidden[0, -1] if out.hidden is not None else None
        final_hidden = self.target.norm(out.final_state[0, -1]) if out.final_state is not None else None
        result.token_ids.append(first)
        if params.logprobs:
            result.logprobs.extend(acceptance.token_logprobs(last_logits[None], torch.tensor([first])).tolist())
        result.ttft_s = time.perf_counter() - started
        state = DecodeState(
            params=params, result=result, uniforms=uniforms, prompt_len=prompt_len,
            stop_ids=frozenset(params.stop_token_ids), feature_layers=feature_layers,
            collect_features=collect_features, lookup=lookup, prompt_features=prompt_features, anchor=first,
            drafter=drafter, cache_length=cache.length,
            kept=[prompt_features[0]] if collect_features and prompt_features is not None else None,
        )
        return state, PrefillInfo(prompt_len, last_logits, last_hidden, final_hidden)

    def start(self, state: "DecodeState", block_size: int) -> StepEvent:
        """Fix the request's block size; returns the event of the prefill's first token (the
        request may already be finished by it: state.finished)."""
        self.check_block_size(block_size, state.drafter)
        result = state.result
        result.block_size = block_size
        state.block_size = block_size
        state.decode_started = time.perf_counter()
        first = state.anchor
        if first in state.stop_ids or state.params.max_new_tokens == 1:
            result.finish_reason = "stop" if first in state.stop_ids else "length"
            state.finished = True
        return StepEvent((first,), None, logprobs=tuple(result.logprobs[:1]))

    def open_drafting(self, state: "DecodeState") -> None:
        """Open the drafter session (block size > 1) and the prompt-lookup index. A drafter that
        cannot open leaves the request at block size 1 with result.fallback_reason set."""
        params, result = state.params, state.result
        if state.block_size > 1:
            try:
                state.session = state.drafter.open_session(state.prompt_len + params.max_new_tokens + 1)
            except DrafterUnavailableError as err:
                result.fallback_reason = err.reason
        if state.session is not None:
            # Target features the drafter has not seen yet: the prompt from the context the
            # session already holds (a resumed drafter cache) on.
            held = int(getattr(state.session, "context_length", 0) or 0)
            if not 0 <= held <= state.prompt_len:
                raise ValueError(f"the draft session holds {held} context tokens; the prompt has {state.prompt_len}")
            result.draft_context_reused = held
            state.pending, state.pending_start = [state.prompt_features[0, held:]], held
        else:
            state.feature_layers = state.collect_features
        state.prompt_features = None
        if state.lookup.enabled:
            lookup = state.lookup
            if state.params.temperature > 0 and lookup.corpus is not None:
                # Corpus guesses follow the greedy path; sampled, a guess is accepted with the target's
                # probability of it only, and they did not pay (T = 1, Zen 4: 80.2 tok/s with them,
                # 83.7 without, plain 82.0; reports/default_path_t1_2026-12-07_zen4_gated.json).
                lookup = dataclasses.replace(lookup, corpus=None)
            state.index = PromptLookupIndex(lookup, [*result.prompt_token_ids, state.anchor])

    def plan_step(self, state: "DecodeState", sources: frozenset[str] | None = None) -> "StepPlan":
        """The next block to verify: the anchor and a lookup or DFlash draft (or the anchor alone).
        sources: the GATE_SOURCES allowed this step (None = all; e.g. the speed gate leaves out
        those that do not pay now)."""
        phase = state.result.phase_s
        began = time.perf_counter()
        room = state.params.max_new_tokens - state.generated  # tokens this step may still commit
        kind, copied = "", []
        if state.index is not None:
            kind, copied = state.index.propose_from(room - 1, copies=sources is None or COPY in sources,
                                                    corpus=sources is None or CORPUS in sources)
        looked = time.perf_counter()
        phase["lookup"] += looked - began
        verify_size = min(state.block_size, room)
        plan = StepPlan(tokens=(state.anchor,), draft=None, source="")
        if copied:
            plan = StepPlan(tokens=(state.anchor, *copied), draft=None, source="lookup", kind=kind)
            if state.session is not None and verify_size > 1:
                state.result.drafter_passes_skipped += 1
        elif state.session is not None and verify_size > 1 and (sources is None or "dflash" in sources):
            params = state.params
            sample = params.temperature > 0 and params.draft_sampling == "sample"
            context = state.pending[0] if len(state.pending) == 1 else torch.cat(state.pending)
            start = state.prompt_len + state.generated - 1  # position of the anchor
            try:
                draft = state.session.propose(
                    DraftRequest(
                        anchor=state.anchor,
                        start=start,
                        num_draft=verify_size - 1,
                        context=context,
                        context_start=state.pending_start,
                        temperature=params.temperature,
                        sample=sample,
                        uniforms=state.uniforms.at(state.generated, verify_size - 1, acceptance.PositionalUniforms.DRAFT)
                        if sample else None,
                    )
                )
            except DrafterUnavailableError as err:
                # Drafting stops; the target cache holds exactly the committed tokens, so the rest
                # of the request runs without DFlash drafts (lookup drafts go on) with the same
                # output. (The session is closed by finish().)
                state.result.fallback_reason = err.reason
                state.close_session()
                state.feature_layers, state.pending = state.collect_features, []
            else:
                state.pending, state.pending_start = [], start
                plan = StepPlan(tokens=(state.anchor, *draft.tokens.tolist()), draft=draft, source="dflash", kind="dflash")
        phase["draft"] += time.perf_counter() - looked
        return plan

    def commit_step(self, state: "DecodeState", plan: "StepPlan", logits: torch.Tensor, hidden: torch.Tensor | None) -> StepEvent:
        """Accept or reject the plan's draft from the target's pass over its block and commit.

        logits [n + 1, V]: the target's logits at the block's n + 1 positions; hidden [n + 1, F] or
        None: the feature layers' outputs there. Afterwards the caller sets the request's cache to
        state.cache_length (the anchor and the accepted drafts stay; the rejected tail goes)."""
        result, phase = state.result, state.result.phase_s
        began = time.perf_counter()
        draft_tokens = torch.tensor(plan.tokens[1:], dtype=torch.long, device=logits.device)
        verdict = self._verify(draft_tokens, plan.draft, logits, state.params, state.uniforms, state.generated)
        accepted = time.perf_counter()
        phase["accept"] += accepted - began
        committed = list(plan.tokens[1 : 1 + verdict.num_accepted]) + [verdict.next_token]
        start = state.prompt_len + state.generated - 1  # position of the anchor
        state.cache_length = start + 1 + verdict.num_accepted
        if state.session is not None and hidden is not None:
            state.pending.append(hidden[: 1 + verdict.num_accepted])
        finish = ""
        for i, token in enumerate(committed):
            if token in state.stop_ids:
                committed = committed[: i + 1]
                finish = "stop"
                break
        if state.kept is not None and hidden is not None:
            # Features of the anchor and the committed tokens but the last (the next anchor).
            state.kept.append(hidden[: len(committed)])
        if state.index is not None:
            state.index.extend(committed)
        logprobs: tuple[float, ...] = ()
        if state.params.logprobs:
            # Committed token i follows block position i: row i of the pass scored it.
            logprobs = tuple(acceptance.token_logprobs(logits[: len(committed)], torch.tensor(committed)).tolist())
            result.logprobs.extend(logprobs)
        state.generated += len(committed)
        result.token_ids.extend(committed)
        result.acceptance_lengths.append(len(committed))
        result.step_sources.append(plan.source)
        result.verify_sizes.append(len(plan.tokens))
        if plan.source:
            # A stop token among the accepted drafts cuts the step there: all it commits are drafts.
            result.accepted_by_source[plan.source] += min(verdict.num_accepted, len(committed))
        if not finish and state.generated >= state.params.max_new_tokens:
            finish = "length"
        if finish:
            result.finish_reason = finish
            state.finished = True
        state.anchor = committed[-1]
        phase["bookkeeping"] += time.perf_counter() - accepted
        return StepEvent(tuple(committed), len(committed), plan.source, len(plan.tokens) - 1, logprobs)

    @staticmethod
    def finish(state: "DecodeState") -> None:
        """Close the request's draft session and complete its result (also after an early close)."""
        state.close_session()
        result = state.result
        result.decode_s = time.perf_counter() - state.decode_started if state.decode_started else 0.0
        if state.kept is not None:
            result.context_features = torch.cat(state.kept) if len(state.kept) > 1 else state.kept[0]
            state.kept = None

    @staticmethod
    def _check_reused_cache(cache: KVCache, prompt_len: int, max_new_tokens: int, prefix_features, needs_features: bool) -> None:
        if not 0 <= cache.length < prompt_len:
            raise ValueError(f"a reused cache must hold 0 .. {prompt_len - 1} prompt tokens, it holds {cache.length}")
        capacity = prompt_len + max_new_tokens + 1
        if cache.capacity < capacity:
            raise ValueError(f"reused cache holds {cache.capacity} tokens; the request needs {capacity}")
        if needs_features and cache.length and (prefix_features is None or prefix_features.shape[0] != cache.length):
            raise ValueError("a reused cache needs the drafter features of its cached tokens (prefix_features)")

    def _validate(self, prompt_ids, params: SamplingParams, block_size) -> None:
        vocab = self.target.config.vocab_size
        params.validate(vocab)
        if len(prompt_ids) == 0:
            raise InvalidArgumentError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgumentError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if not callable(block_size):
            self.check_block_size(block_size)
        if len(prompt_ids) + params.max_new_tokens > self.max_context:
            raise ResourceExhaustedError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"context of {self.max_context} tokens"
            )

    @staticmethod
    def _verify(draft_tokens, draft, target_logits, params, uniforms: acceptance.PositionalUniforms,
                position: int) -> acceptance.Verdict:
        # draft_tokens [n] (n = 0 for a one-token step), target_logits [n + 1, V]; position: the
        # output position of the block's first new token (see PositionalUniforms)
        if params.temperature == 0:
            return acceptance.greedy_verify(draft_tokens, target_logits)
        target_probs = SpeculativeDecoder._target_probs(target_logits, params)
        n = draft_tokens.shape[0]
        if draft is not None and draft.probs is not None:
            # A test at block row i reads u(ACCEPT, position + i): rows past the first rejection are
            # never read, and the next step starts right after it, so no uniform decides twice. The
            # residual draw reads the step's own u(RESIDUAL, position) (steps' positions only grow).
            return acceptance.speculative_sampling_verify(
                draft_tokens, draft.probs.to(target_probs.device), target_probs,
                uniforms.at(position, n, acceptance.PositionalUniforms.ACCEPT),
                float(uniforms.at(position, 1, acceptance.PositionalUniforms.RESIDUAL)[0]))
        return acceptance.sample_and_match_verify(draft_tokens, target_probs, uniforms.at(position, n + 1))

    @staticmethod
    def _sample_one(logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor) -> int:
        """The prefill's token: argmax, or the inverse-CDF draw of p with uniform [1]."""
        if params.temperature == 0:
            return int(logits.argmax())
        probs = SpeculativeDecoder._target_probs(logits, params)
        return int(acceptance.sample_categorical(probs, uniform[0]))

    @staticmethod
    def _target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """p at temperature > 0, truncated as the request asks: [..., V] -> [..., V]. The prefill's
        token and every verify step take p from here, so all committed tokens follow one law."""
        return acceptance.probs_from_logits(logits, params.temperature, top_k=params.top_k, top_p=params.top_p)
