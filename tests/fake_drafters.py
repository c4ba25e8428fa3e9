"""Test doubles behind the DraftProvider interface.

`OracleDrafter` knows a reference continuation and drafts it correctly with a given probability per
token: it makes long accepted runs, full-block acceptance and the bonus path happen on tiny random
targets, where a real (random) drafter would almost never be right.
"""

from __future__ import annotations

from typing import Sequence

import torch

from blockpilot.decoding import acceptance
from blockpilot.decoding.drafting import Draft, DraftRequest


class OracleSession:
    def __init__(self, owner: "OracleDrafter") -> None:
        self.owner = owner
        self.seen_context = 0
        self.requests: list[DraftRequest] = []

    def propose(self, request: DraftRequest) -> Draft:
        owner = self.owner
        # The context must arrive in order, with no gap and no repeat: the loop's bookkeeping.
        assert request.context_start == self.seen_context, (request.context_start, self.seen_context)
        assert request.start == request.context_start + request.context.shape[0]
        self.seen_context += request.context.shape[0]
        self.requests.append(request)
        tokens = []
        for i in range(request.num_draft):
            position = request.start + 1 + i
            right = position < len(owner.reference) and torch.rand((), generator=owner.generator).item() < owner.accuracy
            if right:
                tokens.append(owner.reference[position])
            else:
                tokens.append(int(torch.randint(owner.vocab_size, (), generator=owner.generator)))
        if request.temperature > 0 and request.sample:
            # A fixed, deliberately imperfect q that puts extra mass on the oracle's token.
            probs = torch.full((request.num_draft, owner.vocab_size), 1.0 / owner.vocab_size)
            for i, token in enumerate(tokens):
                probs[i] = 0.5 * probs[i]
                probs[i, token] += 0.5
            sampled = acceptance.sample_categorical(probs, request.uniforms)
            return Draft(sampled, probs)
        return Draft(torch.tensor(tokens, dtype=torch.long))

    def close(self) -> None:
        self.owner.closed_sessions += 1


class OracleDrafter:
    max_block_size = 64

    def __init__(self, reference: Sequence[int], vocab_size: int, accuracy: float, *, block_size: int = 8,
                 target_layer_ids: tuple[int, ...] = (0,), seed: int = 0) -> None:
        self.reference = list(reference)  # prompt + continuation, indexed by absolute position
        self.vocab_size = vocab_size
        self.accuracy = accuracy
        self.block_size = block_size
        self.target_layer_ids = target_layer_ids
        self.generator = torch.Generator().manual_seed(seed)
        self.sessions: list[OracleSession] = []
        self.closed_sessions = 0

    def open_session(self, capacity: int) -> OracleSession:
        session = OracleSession(self)
        self.sessions.append(session)
        return session
