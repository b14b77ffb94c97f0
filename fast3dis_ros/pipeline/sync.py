"""Approximate-time synchronisation of several camera streams into FrameSets (no ROS).

Behaviour follows message_filters' ApproximateTimeSynchronizer (Python flavour: a set is emitted as soon
as every camera has a pending frame and the chosen frames lie within ``slop`` of each other), made
deterministic and fully accounted: every pushed frame is either emitted in exactly one FrameSet, still
pending (``pending_count()``), or counted once in ``drops`` under one reason:

- ``unknown_camera``: camera not in the configured list.
- ``duplicate_stamp``: same stamp as the newest frame already accepted for that camera.
- ``out_of_order``: older than the newest frame already accepted for that camera (by at most
  ``jump_back_ns``; further back is a time jump).
- ``time_jump_back``: pending frames discarded because a camera's stamps jumped back by more than
  ``jump_back_ns`` (bag loop, sim-time reset). The state is reset and the jumping frame is kept;
  ``resets`` counts these events.
- ``stale``: a pending frame that can no longer be part of any set (another camera has moved on by
  more than ``slop``, or a newer frame of its own camera was emitted).
- ``queue_overflow``: more than ``queue_size`` pending frames for one camera (oldest dropped).
- ``flushed``: pending frames discarded by ``flush()``.

Matching: the earliest feasible set is taken: for the smallest pending stamp ``m`` such that every
camera has a pending frame in ``[m, m + slop]``, each camera contributes its earliest frame in that
interval. Emitted sets therefore have strictly increasing stamps, per camera as well as overall.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from fast3dis_ros.core.frames import CameraFrame, FrameSet
from fast3dis_ros.core.stats import DropCounter

__all__ = ["ApproximateTimeSync"]


class ApproximateTimeSync:
    def __init__(
        self,
        cameras: list[str],
        slop_ns: int,
        queue_size: int = 10,
        jump_back_ns: int = 1_000_000_000,
        on_reset: Callable[[], None] | None = None,
    ) -> None:
        if not cameras:
            raise ValueError("ApproximateTimeSync: need at least one camera")
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"ApproximateTimeSync: duplicate camera names in {cameras}")
        if slop_ns < 0 or queue_size < 1 or jump_back_ns < 0:
            raise ValueError("ApproximateTimeSync: slop_ns >= 0, queue_size >= 1, jump_back_ns >= 0 required")
        self.cameras = list(cameras)
        self.slop_ns = int(slop_ns)
        self.queue_size = int(queue_size)
        self.jump_back_ns = int(jump_back_ns)
        self.on_reset = on_reset
        self.drops = DropCounter()
        self.resets = 0
        self.pushed = 0
        self.emitted_sets = 0
        self._next_index = 0
        self._clear()

    def _clear(self) -> None:
        self._pending: dict[str, list[CameraFrame]] = {c: [] for c in self.cameras}
        self._stamps: dict[str, list[int]] = {c: [] for c in self.cameras}
        self._last: dict[str, int | None] = {c: None for c in self.cameras}  # newest accepted stamp

    # ------------------------------------------------------------------ public
    def pending_count(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def pending(self) -> dict[str, list[int]]:
        return {c: list(s) for c, s in self._stamps.items()}

    def reset(self, reason: str = "time_jump_back") -> None:
        """Discard all state; pending frames are counted under ``reason``."""
        self.drops.add(reason, self.pending_count())
        self._clear()

    def flush(self) -> int:
        """Drop all pending frames (counted 'flushed'); returns how many."""
        n = self.pending_count()
        self.drops.add("flushed", n)
        self._clear()
        return n

    def push(self, frame: CameraFrame) -> list[FrameSet]:
        self.pushed += 1
        cam = frame.camera
        if cam not in self._pending:
            self.drops.add("unknown_camera")
            return []
        t = int(frame.stamp_ns)
        last = self._last[cam]
        if last is not None:
            if t < last - self.jump_back_ns:
                self.resets += 1
                self.reset("time_jump_back")
                if self.on_reset is not None:
                    self.on_reset()
            elif t == last:
                self.drops.add("duplicate_stamp")
                return []
            elif t < last:
                self.drops.add("out_of_order")
                return []
        self._last[cam] = t
        self._pending[cam].append(frame)
        self._stamps[cam].append(t)
        if len(self._pending[cam]) > self.queue_size:
            self._pop_front(cam, 1, "queue_overflow")
        out = []
        while True:
            self._drop_stale()
            fs = self._try_match()
            if fs is None:
                break
            out.append(fs)
        return out

    # ------------------------------------------------------------------ internals
    def _pop_front(self, cam: str, n: int, reason: str | None) -> None:
        if n <= 0:
            return
        del self._pending[cam][:n]
        del self._stamps[cam][:n]
        if reason:
            self.drops.add(reason, n)

    def _lower_bound(self, cam: str) -> float:
        """Smallest stamp camera ``cam`` can still contribute (pending or future)."""
        s = self._stamps[cam]
        if s:
            return s[0]
        last = self._last[cam]
        return float("-inf") if last is None else last + 1

    def _drop_stale(self) -> None:
        bound = max(self._lower_bound(c) for c in self.cameras)
        if bound == float("-inf"):
            return
        limit = bound - self.slop_ns  # frames with t < limit can never be matched
        for c in self.cameras:
            n = bisect.bisect_left(self._stamps[c], limit)
            self._pop_front(c, n, "stale")

    def _try_match(self) -> FrameSet | None:
        if any(not s for s in self._stamps.values()):
            return None
        candidates = sorted({t for s in self._stamps.values() for t in s})
        for m in candidates:
            picks = []
            for c in self.cameras:
                s = self._stamps[c]
                i = bisect.bisect_left(s, m)
                if i >= len(s) or s[i] > m + self.slop_ns:
                    break
                picks.append(i)
            else:
                frames = []
                for c, i in zip(self.cameras, picks):
                    frames.append(self._pending[c][i])
                    self._pop_front(c, i, "stale")  # older frames of this camera are now out of date
                    self._pop_front(c, 1, None)
                fs = FrameSet(self._next_index, max(f.stamp_ns for f in frames), frames)
                self._next_index += 1
                self.emitted_sets += 1
                return fs
        return None
