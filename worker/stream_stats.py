"""The query stream's running totals, for the status heartbeat and Prometheus (:mod:`worker.query_stream`)."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any


class StreamStats:
    """Running totals of the query stream, for the status heartbeat and Prometheus."""

    def __init__(self, registry=None) -> None:
        self.reads = self.entries = self.replies = self.claimed = self.poison = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, replies) of each write
        self._lock = threading.Lock()  # the writer appends while the heartbeat thread reads
        self._prom = _prometheus(registry) if registry is not None else None

    def read(self, n: int) -> None:
        """Count one XREADGROUP that returned ``n`` entries."""
        self.reads += 1
        self.entries += n
        if self._prom:
            self._prom["reads"].inc()
            self._prom["entries"].inc(n)

    def replied(self, n: int) -> None:
        """Count ``n`` replies written in one pipeline."""
        self.replies += n
        with self._lock:
            self._recent.append((time.monotonic(), n))
        if self._prom:
            self._prom["replies"].inc(n)

    def reclaimed(self, n: int, poison: int) -> None:
        """Count entries claimed from dead workers, ``poison`` of them given up on."""
        self.claimed += n
        self.poison += poison
        if self._prom:
            self._prom["claimed"].inc(n)

    def watch_pending(self, held) -> None:
        """Let Prometheus read the number of held entries from ``held()``."""
        if self._prom:
            self._prom["pending"].set_function(held)

    def replies_per_s(self, window_s: float = 60.0) -> float:
        """Replies per second over the last ``window_s`` (or since the first reply)."""
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > window_s:
                self._recent.popleft()
            recent = list(self._recent)
        span = max(1.0, min(window_s, now - recent[0][0])) if recent else window_s
        return sum(n for _, n in recent) / span


_PROMETHEUS: dict[int, dict[str, Any]] = {}


def _prometheus(registry) -> dict[str, Any]:
    # Once per registry: a query stream started again in the same process (a consumer restart) reuses its metrics.
    if id(registry) not in _PROMETHEUS:
        from prometheus_client import Counter, Gauge

        _PROMETHEUS[id(registry)] = {
            "reads": Counter("m3q_query_stream_reads", "XREADGROUP calls of the query stream that returned entries",
                             registry=registry),
            "entries": Counter("m3q_query_stream_entries", "Query jobs the query stream read", registry=registry),
            "replies": Counter("m3q_query_stream_replies", "Replies the query stream wrote", registry=registry),
            "claimed": Counter("m3q_query_stream_claimed", "Query jobs claimed from dead workers", registry=registry),
            "pending": Gauge("m3q_query_stream_pending", "Query jobs taken and not acknowledged yet",
                             registry=registry),
        }
    return _PROMETHEUS[id(registry)]
