"""Counters and latency statistics shared by sync, window, engine, fusion and the runner (thread safe)."""

from __future__ import annotations

import math
import threading
from collections import Counter, deque

__all__ = ["DropCounter", "LatencyStats"]


class DropCounter:
    """Counts of dropped items per reason, e.g. ``{'stale': 3, 'queue_full': 1}``."""

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._c[reason] += int(n)

    def get(self, reason: str) -> int:
        with self._lock:
            return self._c.get(reason, 0)

    def __getitem__(self, reason: str) -> int:
        return self.get(reason)

    def total(self) -> int:
        with self._lock:
            return sum(self._c.values())

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in sorted(self._c.items()) if v}

    def reset(self) -> None:
        with self._lock:
            self._c.clear()

    def __repr__(self) -> str:
        return f"DropCounter({self.as_dict()})"


class LatencyStats:
    """Running latency statistics in milliseconds over the last ``window`` samples (+ all-time count/max)."""

    def __init__(self, window: int = 256) -> None:
        self._v: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self.count = 0
        self.max_all = 0.0
        self.last = math.nan

    def add(self, ms: float) -> None:
        with self._lock:
            self._v.append(float(ms))
            self.count += 1
            self.last = float(ms)
            self.max_all = max(self.max_all, float(ms))

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            v = sorted(self._v)
            count, mx, last = self.count, self.max_all, self.last
        if not v:
            return {"count": count, "last": math.nan, "mean": math.nan, "p50": math.nan, "p95": math.nan,
                    "max": math.nan}

        def q(p: float) -> float:
            return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]

        return {"count": count, "last": last, "mean": sum(v) / len(v), "p50": q(0.5), "p95": q(0.95), "max": mx}
