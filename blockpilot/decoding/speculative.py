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

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from blockpilot.decoding import acceptance
from blockpilot.decoding.drafting import DraftProvider, DraftRequest
from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig, PromptLookupIndex
from blockpilot.errors import DrafterUnavailableError, InvalidArgumentError, ResourceExhaustedError
from blockpilot.models.kv_cache import KVCache
from blockpilot.models.target import TargetModel

DRAFT_SAMPLING_MODES = ("greedy", "sample")
DRAFT_SOURCES = ("dflash", "lookup")
STEP_PHASES = ("lookup", "draft", "verify", "accept", "bookkeeping")


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request.

    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    max_new_tokens: upper bound on generated tokens (the stop token, if any, counts).
    stop_token_ids: generation ends after the first of these is committed.
    seed: seeds the request's own random stream (None = nondeterministic).
    draft_sampling: at temperature > 0, "greedy" drafts the argmax and accepts by sample-and-match
        (DFlash's rule); "sample" samples the draft from the drafter's distribution q and accepts
        with min(1, p/q) plus residual resampling (accepts more; needs q at the verifier).
    """

    temperature: float = 0.0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    draft_sampling: str = "greedy"

    def validate(self, vocab_size: int) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgumentError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
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


@dataclass(frozen=True)
class StepEvent:
    """Tokens committed by one step (the first event carries the prefill's first token)."""

    token_ids: tuple[int, ...]
    acceptance_length: int | None  # None for the prefill's token
    source: str = ""  # the step's draft source (DRAFT_SOURCES), "" for a one-token step or the prefill
    drafted: int = 0  # draft tokens the step verified (accepted or not)


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
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


class SpeculativeDecoder:
    """Runs requests against one target and an optional drafter (in-process or remote)."""

    def __init__(self, target: TargetModel, drafter: DraftProvider | None = None, *, max_context: int | None = None) -> None:
        self.target = target
        self.drafter = drafter
        self.max_context = max_context or target.config.max_position_embeddings

    @property
    def max_block_size(self) -> int:
        return 1 if self.drafter is None else self.drafter.max_block_size

    def check_block_size(self, block_size: int) -> None:
        if block_size < 1:
            raise InvalidArgumentError(f"block size must be >= 1, got {block_size}")
        if block_size > 1 and self.drafter is None:
            raise InvalidArgumentError(f"block size {block_size} needs a drafter; none is loaded")
        if block_size > self.max_block_size:
            raise InvalidArgumentError(f"block size must be <= {self.max_block_size}, got {block_size}")

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, block_size: int | BlockSizeHook = 1,
        *, lookup: LookupConfig = LOOKUP_OFF,
    ) -> GenerationResult:
        result = GenerationResult(prompt_token_ids=list(prompt_ids))
        for _ in self.stream(prompt_ids, params, block_size, result, lookup=lookup):
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
    ) -> Iterator[StepEvent]:
        """Decode, yielding the tokens of each step as soon as they are committed. `result` (if
        given) is filled in as decoding goes and is complete when the iterator is exhausted.
        Closing the iterator early (client gone) frees the request's caches at once.

        cache: a caller-owned target cache (kept for a conversation's next turn); it may already hold
            the first `cache.length` prompt tokens (earlier turns): only the rest is prefilled. Its capacity
            must fit prompt + max_new_tokens + 1. With a drafter, `prefix_features` [cache.length, F]
            must give the drafter context features of those cached tokens (also with
            `collect_features`).
        collect_features: target layers whose outputs to keep for every committed token in
            `result.context_features`, even at block size 1 (the target pass returns them at almost no
            cost); must equal the drafter's target_layer_ids when there is a drafter.
        lookup: prompt-lookup drafting (off by default here; the CLI and the verifier turn it on).
        A draft session that opens holding context already (`session.context_length`, a drafter
            cache resumed from an earlier turn) is sent context from that position on only.
        If the drafter fails (DrafterUnavailableError) the request continues at block size 1 with
        `result.fallback_reason` set: the target cache is already correct, so the output is unchanged."""
        self._validate(prompt_ids, params, block_size)
        result = result if result is not None else GenerationResult(prompt_token_ids=list(prompt_ids))
        generator = torch.Generator(device="cpu")
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        device = self.target.device
        prompt_len = len(prompt_ids)
        collect_features = tuple(collect_features)
        if collect_features and self.drafter is not None and collect_features != tuple(self.drafter.target_layer_ids):
            raise ValueError(f"collect_features {collect_features} differ from the drafter's layers {self.drafter.target_layer_ids}")
        feature_layers = self.drafter.target_layer_ids if self.drafter is not None else collect_features

        # ---- prefill: first token, then the block size for the whole request -----------------
        started = time.perf_counter()
        reused = 0
        if cache is None:
            cache = self.target.new_cache(prompt_len + params.max_new_tokens + 1)
        else:
            reused = cache.length
            self._check_reused_cache(cache, prompt_len, params.max_new_tokens, prefix_features, bool(feature_layers))
        prompt = torch.tensor([list(prompt_ids[reused:])], dtype=torch.long, device=device)
        out = self.target(prompt, cache, num_logits=1, hidden_layer_ids=feature_layers)
        prompt_features = out.hidden
        if reused and prompt_features is not None:
            prompt_features = torch.cat([prefix_features.to(prompt_features)[None], prompt_features], dim=1)
        last_logits = out.logits[0, -1]
        first = self._sample_one(last_logits, params.temperature, generator)
        if callable(block_size):
            last_hidden = out.hidden[0, -1] if out.hidden is not None else None
            final_hidden = self.target.norm(out.final_state[0, -1]) if out.final_state is not None else None
            block_size = block_size(PrefillInfo(prompt_len, last_logits, last_hidden, final_hidden))
            self.check_block_size(block_size)
        result.block_size = block_size
        result.token_ids.append(first)
        result.ttft_s = time.perf_counter() - started
        decode_started = time.perf_counter()
        stop_ids = set(params.stop_token_ids)
        # Features of committed tokens, kept for the caller (collect_features).
        kept: list[torch.Tensor] | None = [prompt_features[0]] if collect_features and prompt_features is not None else None
        try:
            yield StepEvent((first,), None)
            if first in stop_ids or params.max_new_tokens == 1:
                result.finish_reason = "stop" if first in stop_ids else "length"
                return
            session = None
            if block_size > 1:
                try:
                    session = self.drafter.open_session(prompt_len + params.max_new_tokens + 1)
                except DrafterUnavailableError as err:
                    result.fallback_reason = err.reason
            try:
                index = PromptLookupIndex(lookup, [*prompt_ids, first]) if lookup.enabled else None
                yield from self._decode_steps(cache, session, prompt_features, first, block_size, params, generator, result,
                                              kept, collect_features, index)
            finally:
                if session is not None:
                    session.close()
        finally:
            result.decode_s = time.perf_counter() - decode_started
            if kept is not None:
                result.context_features = torch.cat(kept) if len(kept) > 1 else kept[0]

    def _decode_steps(self, cache, session, prompt_features, first, block_size, params, generator, result, kept,
                      collect_features, index: PromptLookupIndex | None):
        device = self.target.device
        prompt_len = len(result.prompt_token_ids)
        feature_layers = self.drafter.target_layer_ids if session is not None else collect_features
        stop_ids = set(params.stop_token_ids)
        # Target features the drafter has not seen yet ([N, F] chunks, positions pending_start ..
        # the anchor's - 1): after the prefill, the prompt from the context the session already
        # holds (a resumed drafter cache) on; then what each step commits, until a drafter call.
        pending: list[torch.Tensor] = []
        pending_start = 0
        if session is not None:
            held = int(getattr(session, "context_length", 0) or 0)
            if not 0 <= held <= prompt_len:
                raise ValueError(f"the draft session holds {held} context tokens; the prompt has {prompt_len}")
            result.draft_context_reused = held
            pending, pending_start = [prompt_features[0, held:]], held
        anchor = first
        generated = 1
        phase = result.phase_s
        clock = time.perf_counter
        while True:
            began = clock()
            room = params.max_new_tokens - generated  # tokens this step may still commit
            start = prompt_len + generated - 1  # position of the anchor
            copied = index.propose(room - 1) if index is not None else []
            looked = clock()
            phase["lookup"] += looked - began
            draft, source = None, ""
            if copied:
                source = "lookup"
                block = torch.tensor([[anchor, *copied]], dtype=torch.long, device=device)
                if session is not None and min(block_size, room) > 1:
                    result.drafter_passes_skipped += 1
            elif session is not None and min(block_size, room) > 1:
                verify_size = min(block_size, room)
                sample = params.temperature > 0 and params.draft_sampling == "sample"
                context = pending[0] if len(pending) == 1 else torch.cat(pending)
                try:
                    draft = session.propose(
                        DraftRequest(
                            anchor=anchor,
                            start=start,
                            num_draft=verify_size - 1,
                            context=context,
                            context_start=pending_start,
                            temperature=params.temperature,
                            sample=sample,
                            uniforms=acceptance.draw_uniforms(generator, verify_size - 1) if sample else None,
                        )
                    )
                except DrafterUnavailableError as err:
                    # Drafting stops; the target cache holds exactly the committed tokens, so the
                    # rest of the request runs without DFlash drafts (lookup drafts go on) with the
                    # same output. (The session is closed by stream()'s cleanup.)
                    result.fallback_reason = err.reason
                    session, feature_layers, pending = None, collect_features, []
                    block = torch.tensor([[anchor]], dtype=torch.long, device=device)
                else:
                    source = "dflash"
                    pending, pending_start = [], start
                    block = torch.empty((1, verify_size), dtype=torch.long, device=device)
                    block[0, 0] = anchor
                    block[0, 1:] = draft.tokens.to(device)
            else:
                block = torch.tensor([[anchor]], dtype=torch.long, device=device)
            drafted = clock()
            phase["draft"] += drafted - looked
            out = self.target(block, cache, num_logits=None, hidden_layer_ids=feature_layers)
            verified = clock()
            phase["verify"] += verified - drafted
            verdict = self._verify(block[0, 1:], draft, out.logits[0], params, generator)
            accepted = clock()
            phase["accept"] += accepted - verified
            committed = block[0, 1 : 1 + verdict.num_accepted].tolist() + [verdict.next_token]
            # The anchor and the accepted drafts stay in the target cache; the rejected tail is
            # dropped by moving the length back. The new token is the next anchor.
            cache.truncate(start + 1 + verdict.num_accepted)
            if session is not None:
                pending.append(out.hidden[0, : 1 + verdict.num_accepted])
            finish = ""
            for i, token in enumerate(committed):
                if token in stop_ids:
                    committed = committed[: i + 1]
                    finish = "stop"
                    break
            if kept is not None and out.hidden is not None:
                # Features of the anchor and the committed tokens but the last (the next anchor).
                kept.append(out.hidden[0, : len(committed)])
            if index is not None:
                index.extend(committed)
            generated += len(committed)
            result.token_ids.extend(committed)
            result.acceptance_lengths.append(len(committed))
            result.step_sources.append(source)
            result.verify_sizes.append(block.shape[1])
            if source:
                # A stop token among the accepted drafts cuts the step there: all it commits are drafts.
                result.accepted_by_source[source] += min(verdict.num_accepted, len(committed))
            if not finish and generated >= params.max_new_tokens:
                finish = "length"
            if finish:
                result.finish_reason = finish
            phase["bookkeeping"] += clock() - accepted
            yield StepEvent(tuple(committed), len(committed), source, block.shape[1] - 1)
            if finish:
                return
            anchor = committed[-1]

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
    def _verify(draft_tokens, draft, target_logits, params, generator) -> acceptance.Verdict:
        # draft_tokens [n] (n = 0 for a one-token step), target_logits [n + 1, V]
        if params.temperature == 0:
            return acceptance.greedy_verify(draft_tokens, target_logits)
        target_probs = acceptance.probs_from_logits(target_logits, params.temperature)
        n = draft_tokens.shape[0]
        if draft is not None and draft.probs is not None:
            uniforms = acceptance.draw_uniforms(generator, n + 1)
            return acceptance.speculative_sampling_verify(
                draft_tokens, draft.probs.to(target_probs.device), target_probs, uniforms[:n], float(uniforms[n])
            )
        return acceptance.sample_and_match_verify(draft_tokens, target_probs, acceptance.draw_uniforms(generator, n + 1))

    @staticmethod
    def _sample_one(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
        if temperature == 0:
            return int(logits.argmax())
        probs = acceptance.probs_from_logits(logits, temperature)
        return int(acceptance.sample_categorical(probs, acceptance.draw_uniforms(generator, 1)[0]))
