"""Approximate-time synchronisation of several camera streams into FrameSets (no ROS).

Behaviour follows message_filters' ApproximateTimeSynchronizer (Python flavour: a set is emitted as soon
as every camera has a pending frame and the chosen frames lie within ``slop`` of each other), made
deterministic and fully accounted: every pushed frame is either emitted in exactly one FrameSet, still
pending (``pending_count()``), or counted once in ``drops`` under one reason:

- ``unknown_camera``: camera not in the configured list.
- ``duplicate_stamp``: same stamp as the newest frame already accepted for that camera.
- ``out_of_order``: older than the newest frame already accepted for that camera (by at most
  ``jump_back_ns``; further back is a time jump).
- ``time_jump_back``: pending frames discarded because the stamps jumped back by more than
  ``jump_back_ns`` for good (bag loop, sim-time reset). The state is reset and the frames of the new
  timeline are kept; ``resets`` counts these events.
- ``stamp_outlier``: frames whose stamps left the timeline (more than ``jump_back_ns`` back, or further
  ahead than ``jump_back_ns`` plus the time elapsed since the newest frame) while the other frames
  stayed on it: a lone bad stamp (+1e6 s, 1970, 2^31-1 s) is dropped here and never resets anything.
- ``queue_bytes_overflow``: pending frames beyond ``max_bytes`` of image data in all (oldest frame of the
  camera holding the most bytes dropped), so that one dead camera and one 1080p camera cannot grow the
  buffer to ``queue_size`` x 6 MB.

Time jumps (``jump_confirm`` frames): a frame off the timeline starts a *candidate* timeline and is held
(counted as pending). Once ``jump_confirm`` frames agree with the candidate, it becomes the timeline:
backwards that is a reset (``resets``, ``on_reset``) and the held frames are matched as usual; forwards
(a stall of every camera, a sim clock that skipped ahead) nothing is reset (``forward_jumps``). Once
``jump_confirm`` frames have arrived on the old timeline instead, the candidate's frames are dropped as
``stamp_outlier``. ``jump_confirm=1`` adopts every jump at once (the behaviour of older versions).
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
import time
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
        jump_confirm: int = 1,
        max_bytes: int = 0,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        """``max_bytes``: bound on the image bytes of all pending frames (0: frame count only);
        ``clock``: monotonic ns, for the time allowed to pass between two frames of the timeline."""
        if not cameras:
            raise ValueError("ApproximateTimeSync: need at least one camera")
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"ApproximateTimeSync: duplicate camera names in {cameras}")
        if slop_ns < 0 or queue_size < 1 or jump_back_ns < 0 or jump_confirm < 1 or max_bytes < 0:
            raise ValueError("ApproximateTimeSync: slop_ns >= 0, queue_size >= 1, jump_back_ns >= 0, "
                             "jump_confirm >= 1, max_bytes >= 0 required")
        self.cameras = list(cameras)
        self.slop_ns = int(slop_ns)
        self.queue_size = int(queue_size)
        self.jump_back_ns = int(jump_back_ns)
        self.on_reset = on_reset
        self.jump_confirm = int(jump_confirm)
        self.max_bytes = int(max_bytes)
        self.clock = clock
        self.drops = DropCounter()
        self.resets = 0
        self.forward_jumps = 0
        self.last_jump: dict | None = None  # {'direction', 'from_ns', 'to_ns'} of the newest adopted jump
        self._frontier: int | None = None  # newest accepted stamp over all cameras
        self._frontier_at = 0  # clock() when it was accepted
        self._candidate: list[CameraFrame] = []  # frames of a new timeline not confirmed yet
        self._candidate_at = 0
        self._against = 0  # frames on the old timeline since the candidate started
        self.pushed = 0
        self.emitted_sets = 0
        self._next_index = 0
        self._clear()

    def _clear(self) -> None:
        self._pending: dict[str, list[CameraFrame]] = {c: [] for c in self.cameras}
        self._stamps: dict[str, list[int]] = {c: [] for c in self.cameras}
        self._last: dict[str, int | None] = {c: None for c in self.cameras}  # newest accepted stamp
        self._bytes = 0  # image bytes of the pending frames (not the candidate's)

    # ------------------------------------------------------------------ public
    def pending_count(self) -> int:
        return sum(len(p) for p in self._pending.values()) + len(self._candidate)

    def pending_bytes(self) -> int:
        return self._bytes + sum(_nbytes(f) for f in self._candidate)

    def pending(self) -> dict[str, list[int]]:
        return {c: list(s) for c, s in self._stamps.items()}

    def reset(self, reason: str = "time_jump_back") -> None:
        """Discard all matching state (not a held candidate timeline); pending frames are counted under
        ``reason``."""
        self.drops.add(reason, sum(len(p) for p in self._pending.values()))
        self._clear()
        self._frontier = None

    def flush(self) -> int:
        """Drop all pending frames (counted 'flushed'); returns how many."""
        n = self.pending_count()
        self.drops.add("flushed", n)
        self._clear()
        self._candidate = []
        return n

    def push(self, frame: CameraFrame) -> list[FrameSet]:
        self.pushed += 1
        if frame.camera not in self._pending:
            self.drops.add("unknown_camera")
            return []
        t, now = int(frame.stamp_ns), self.clock()
        if self._on_timeline(t, self._frontier, self._frontier_at, now):
            if self._candidate:
                self._against += 1
                if self._against >= self.jump_confirm:
                    self.drops.add("stamp_outlier", len(self._candidate))
                    self._candidate = []
            return self._accept(frame, now)
        # off the timeline: a lone outlier or the start of a new one
        if self._candidate and not self._on_timeline(t, int(self._candidate[-1].stamp_ns), self._candidate_at, now):
            self.drops.add("stamp_outlier", len(self._candidate))
            self._candidate = []
        if not self._candidate:
            self._against = 0
        self._candidate.append(frame)
        self._candidate_at = now
        if len(self._candidate) < self.jump_confirm:
            return []
        return self._adopt_candidate(now)

    # ------------------------------------------------------------------ internals
    def _on_timeline(self, t: int, ref: int | None, ref_at: int, now: int) -> bool:
        if ref is None:
            return True
        return ref - self.jump_back_ns <= t <= ref + self.jump_back_ns + max(0, now - ref_at)

    def _adopt_candidate(self, now: int) -> list[FrameSet]:
        frames, self._candidate = self._candidate, []
        first = int(frames[0].stamp_ns)
        jump = {"direction": "back" if self._frontier is not None and first < self._frontier else "forward",
                "from_ns": self._frontier, "to_ns": first}
        self.last_jump = jump
        if jump["direction"] == "back":
            self.resets += 1
            self.reset("time_jump_back")
            if self.on_reset is not None:
                self.on_reset()
        else:
            self.forward_jumps += 1
        out = []
        for f in frames:
            out += self._accept(f, now)
        return out

    def _accept(self, frame: CameraFrame, now: int) -> list[FrameSet]:
        cam = frame.camera
        t = int(frame.stamp_ns)
        last = self._last[cam]
        if last is not None:
            if t == last:
                self.drops.add("duplicate_stamp")
                return []
            if t < last:
                self.drops.add("out_of_order")
                return []
        self._last[cam] = t
        if self._frontier is None or t > self._frontier:
            self._frontier, self._frontier_at = t, now
        self._pending[cam].append(frame)
        self._stamps[cam].append(t)
        self._bytes += _nbytes(frame)
        if len(self._pending[cam]) > self.queue_size:
            self._pop_front(cam, 1, "queue_overflow")
        while self.max_bytes and self._bytes > self.max_bytes:
            fat = max(self.cameras, key=lambda c: sum(_nbytes(f) for f in self._pending[c]))
            self._pop_front(fat, 1, "queue_bytes_overflow")
        out = []
        while True:
            self._drop_stale()
            fs = self._try_match()
            if fs is None:
                break
            out.append(fs)
        return out

    def _pop_front(self, cam: str, n: int, reason: str | None) -> None:
        if n <= 0:
            return
        self._bytes -= sum(_nbytes(f) for f in self._pending[cam][:n])
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


def _nbytes(frame: CameraFrame) -> int:
    return int(getattr(frame.image, "nbytes", 0))
