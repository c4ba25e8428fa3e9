"""Target caches the verifier keeps between a conversation's turns (this replica only; LRU + TTL).

A follow-up turn sends the whole conversation again; the kept cache already holds the K/V (and the
drafter context features) of its earlier tokens, so only the new tokens are prefilled. Which
replica holds a session is in its Redis record; this module is the replica's own memory of them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from blockpilot.models.kv_cache import KVCache


@dataclass
class KeptSession:
    """A conversation's target cache: `tokens` are the ids whose K/V sit at cache positions 0..
    (only the first min(cache.length, len(tokens)) are valid); `features` the drafter context
    features of the first features.shape[0] of them (None: not known)."""

    cache: KVCache
    tokens: list[int]
    features: torch.Tensor | None
    owner: str = ""  # who may continue it (see blockpilot.serving.security.caller_id)
    last_used: float = field(default_factory=lambda: time.monotonic())  # when its last turn ended

    @property
    def valid(self) -> int:
        return min(self.cache.length, len(self.tokens))


@dataclass(frozen=True)
class Reuse:
    """What a turn starts from: its cache (holding `cached_tokens` prompt tokens) and the drafter
    features of those tokens (None when it reads none or nothing is cached)."""

    cache: KVCache
    features: torch.Tensor | None
    cached_tokens: int


class SessionCaches:
    """Up to `max_sessions` kept sessions, least recently used evicted first, each dropped after
    `ttl_s` idle seconds. Used from the event loop only."""

    def __init__(self, max_sessions: int, ttl_s: float) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._kept: OrderedDict[str, KeptSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, session_id: str) -> KeptSession | None:
        """The session's kept cache if it has not expired (it becomes the most recently used)."""
        kept = self._kept.get(session_id)
        if kept is not None and time.monotonic() - kept.last_used > self.ttl_s:
            del self._kept[session_id]
            kept = None
        if kept is not None:
            self._kept.move_to_end(session_id)
        return kept

    def keep(self, session_id: str, cache: KVCache, tokens: list[int], features: torch.Tensor | None, owner: str = "") -> None:
        if self.max_sessions == 0:
            self._kept.pop(session_id, None)
            return
        self._kept[session_id] = KeptSession(cache, tokens, features, owner)
        self._kept.move_to_end(session_id)
        while len(self._kept) > self.max_sessions:
            self._kept.popitem(last=False)

    @staticmethod
    def reuse(kept: KeptSession | None, prompt_ids: Sequence[int], need: int, reads_features: bool,
              new_cache: Callable[[int], KVCache]) -> Reuse:
        """The cache a turn with `prompt_ids` (room for `need` tokens) starts from: the kept one,
        cut to the longest prefix it shares with the prompt (all but the prompt's last token at
        most, which must go through the target; with features, no longer than the features kept)
        and grown when too small; else a new one."""
        if kept is not None:
            limit = min(kept.valid, len(prompt_ids) - 1)
            common = 0
            while common < limit and kept.tokens[common] == prompt_ids[common]:
                common += 1
            if reads_features:
                common = min(common, kept.features.shape[0] if kept.features is not None else 0)
            if common > 0:
                cache = kept.cache
                if cache.capacity < need:
                    grown = new_cache(need)
                    grown.keys[:, :, :, :common] = cache.keys[:, :, :, :common]
                    grown.values[:, :, :, :common] = cache.values[:, :, :, :common]
                    cache = grown
                cache.length = common
                return Reuse(cache, kept.features[:common] if reads_features else None, common)
        return Reuse(new_cache(need), None, 0)
