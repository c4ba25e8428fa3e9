"""Replay of the greedy speculative loop over a recorded greedy continuation.

At temperature 0 the loop commits the target's own greedy continuation at every block size, so
τ and the step count at any block size follow from that continuation and the drafter alone: a
draft token is accepted iff it equals the recorded token. Used by policy sweeps and drafter eval
(drafter passes only, no target forward per step); tests check it against real decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from blockpilot.decoding.drafting import DraftProvider, DraftRequest
from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig, PromptLookupIndex


@dataclass(frozen=True)
class ReplayResult:
    """Per step: tokens committed (acceptance length, bonus included), tokens verified and the
    draft source ("dflash", "lookup" or "" for a one-token step), as GenerationResult has them."""

    acceptance_lengths: tuple[int, ...]
    verify_sizes: tuple[int, ...]
    sources: tuple[str, ...] = ()


@torch.inference_mode()
def replay_greedy(provider: DraftProvider | None, token_ids: Sequence[int], prompt_len: int,
                  context_features: torch.Tensor | None, block_size: int, max_new_tokens: int,
                  stop_token_ids: Sequence[int] = (), lookup: LookupConfig = LOOKUP_OFF) -> ReplayResult:
    """The steps SpeculativeDecoder.stream takes at temperature 0 for this request, given its
    greedy output.

    token_ids: prompt + the target's greedy continuation (first token included) as decoded with
    these max_new_tokens and stop tokens. context_features [>= len(token_ids) - 1, F]: the drafter
    context features of those tokens. The drafter session receives exactly the calls the real loop
    makes (same anchors, positions, context slices and draft lengths), so the drafts are the real
    loop's; a draft is accepted iff it equals the recorded token, since at temperature 0 the loop
    commits that same continuation at every block size. With `lookup`, a step copies when prompt
    lookup over the committed tokens proposes something, as the loop does (no drafter call then).
    """
    ids = list(token_ids)
    seq_len = len(ids)
    if not 0 < prompt_len < seq_len:
        raise ValueError(f"token_ids must hold the prompt ({prompt_len} tokens) and at least one generated token; got {seq_len}")
    if block_size > 1 and (provider is None or context_features is None):
        raise ValueError(f"block size {block_size} needs a drafter and context features")
    stop = set(stop_token_ids)
    if ids[prompt_len] in stop or max_new_tokens == 1:
        return ReplayResult((), ())
    session = provider.open_session(prompt_len + max_new_tokens + 1) if block_size > 1 else None
    lengths: list[int] = []
    sizes: list[int] = []
    sources: list[str] = []
    index = PromptLookupIndex(lookup, ids[: prompt_len + 1]) if lookup.enabled else None
    generated = 1
    sent = int(getattr(session, "context_length", 0) or 0)  # context the session already holds
    try:
        while True:
            room = max_new_tokens - generated
            verify = min(block_size, room)
            start = prompt_len + generated - 1  # position of the anchor
            draft: list[int] = index.propose(room - 1) if index is not None else []
            source = "lookup" if draft else ""
            if draft:
                verify = 1 + len(draft)
            elif verify > 1 and session is not None:
                request = DraftRequest(anchor=ids[start], start=start, num_draft=verify - 1,
                                       context=context_features[sent:start], context_start=sent)
                draft = session.propose(request).tokens.tolist()
                sent, source = start, "dflash"
            else:
                verify = 1
            truth = ids[start + 1 : start + verify]
            accepted = 0
            while accepted < len(truth) and draft[accepted] == truth[accepted]:
                accepted += 1
            # The accepted drafts and the target's own next token (the bonus). Shorter only when
            # the recorded output ends inside the block with a stop token: the loop cuts there too.
            committed = ids[start + 1 : start + 2 + accepted]
            for i, token in enumerate(committed):
                if token in stop:
                    committed = committed[: i + 1]
                    break
            if not committed:
                raise ValueError("the recorded continuation ends before the decoding loop would stop: it is not the "
                                 "greedy output for these max_new_tokens and stop tokens")
            if index is not None:
                index.extend(committed)
            generated += len(committed)
            lengths.append(len(committed))
            sizes.append(verify)
            sources.append(source)
            if committed[-1] in stop or generated >= max_new_tokens:
                return ReplayResult(tuple(lengths), tuple(sizes), tuple(sources))
    finally:
        if session is not None:
            session.close()
