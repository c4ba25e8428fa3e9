"""Draft caches a drafter replica keeps after a session's stream ends (DESIGN.md §4: drafter
replicas own draft KV for the sessions they serve), so the session's next turn resumes them and
the verifier sends only the context the drafter does not hold yet.

One kept cache per session, under the `cache_tag` its stream was opened with. Bounded: at most
`max_entries` (least recently used evicted first) and `ttl_s` idle seconds (expired caches are
freed by `expire()`, which the service calls periodically, and on every access). A resume with
another tag (an older or newer turn than the one that built the cache) gets nothing: the cache is
freed and the stream starts empty.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class KeptCache:
    session: Any  # a LocalDraftSession (its draft KV cache)
    tag: str
    kept_at: float = field(default_factory=time.monotonic)


class DraftCachePool:
    def __init__(self, max_entries: int, ttl_s: float, *, on_change: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, KeptCache] = OrderedDict()
        self._lock = threading.Lock()
        self._on_change = on_change
        self._clock = clock
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self._entries))

    def _free(self, entry: KeptCache) -> None:
        entry.session.close()

    def keep(self, session_id: str, tag: str, session: Any) -> bool:
        """Keep `session` (its cache) for the session's next turn; False (and freed) when keeping
        is disabled or the stream had no id or tag."""
        if not session_id or not tag or self.max_entries <= 0:
            session.close()
            return False
        with self._lock:
            old = self._entries.pop(session_id, None)
            self._entries[session_id] = KeptCache(session, tag, self._clock())
            evicted = []
            while len(self._entries) > self.max_entries:
                evicted.append(self._entries.popitem(last=False)[1])
            self.evicted += len(evicted)
        for entry in ([old] if old is not None else []) + evicted:
            if entry.session is not session:
                self._free(entry)
        self.expire()
        self._changed()
        return True

    def take(self, session_id: str, tag: str) -> Any | None:
        """The kept session for (session_id, tag), removed from the pool; None when there is none
        (unknown, evicted, expired) or it has another tag (then it is freed: stale)."""
        self.expire()
        if not session_id:
            return None
        with self._lock:
            entry = self._entries.pop(session_id, None)
        self._changed()
        if entry is None:
            return None
        if not tag or entry.tag != tag:
            self._free(entry)
            return None
        return entry.session

    def expire(self) -> int:
        """Free the caches idle for longer than ttl_s; returns how many."""
        now = self._clock()
        with self._lock:
            stale = [sid for sid, entry in self._entries.items() if now - entry.kept_at > self.ttl_s]
            entries = [self._entries.pop(sid) for sid in stale]
            self.expired += len(entries)
        for entry in entries:
            self._free(entry)
        if entries:
            self._changed()
        return len(entries)

    def clear(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            self._free(entry)
        self._changed()
