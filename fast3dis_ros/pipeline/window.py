"""Sliding windows over synchronised frame sets, plus stale-camera detection.

``SlidingWindow(window_size, stride)``: after the ``window_size``-th frame set, and then after every
``stride`` more, ``push`` returns a Window of the newest ``window_size`` sets (consecutive windows share
``window_size - stride`` sets when ``stride < window_size``; with ``stride > window_size`` some sets are
never windowed). ``max_views`` caps the views per window: only the newest
``max(1, max_views // n_cameras)`` sets of the window are kept.

Frame sets leaving the buffer are reported through ``on_evict(frame_set, windowed)`` so that callers can
account for every set (``windowed`` False: the set was never part of an emitted window).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from fast3dis_ros.core.frames import FrameSet, Window

__all__ = ["SlidingWindow", "SyncWatchdog"]


class SlidingWindow:
    def __init__(
        self,
        window_size: int,
        stride: int,
        max_views: int | None = None,
        on_evict: Callable[[FrameSet, bool], None] | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if window_size < 1 or stride < 1:
            raise ValueError(f"SlidingWindow: window_size ({window_size}) and stride ({stride}) must be >= 1")
        if max_views is not None and max_views < 1:
            raise ValueError("SlidingWindow: max_views must be >= 1 or None")
        self.window_size = int(window_size)
        self.stride = int(stride)
        self.max_views = max_views
        self.on_evict = on_evict
        self.clock = clock
        self._buf: deque[tuple[FrameSet, list[bool]]] = deque()
        self._since_emit = 0
        self._emitted_any = False
        self._next_index = 0
        self.pushed = 0

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def buffered(self) -> list[FrameSet]:
        return [fs for fs, _ in self._buf]

    def _evict_one(self) -> None:
        fs, flag = self._buf.popleft()
        if self.on_evict is not None:
            self.on_evict(fs, flag[0])

    def _make(self, entries: list[tuple[FrameSet, list[bool]]]) -> Window:
        if self.max_views is not None:
            n_cams = max(1, len(entries[-1][0].frames))
            keep = max(1, self.max_views // n_cams)
            entries = entries[-keep:]
        for _, flag in entries:
            flag[0] = True
        w = Window(self._next_index, [fs for fs, _ in entries], created_ns=self.clock())
        self._next_index += 1
        self._since_emit = 0
        self._emitted_any = True
        return w

    def push(self, frame_set: FrameSet) -> Window | None:
        self.pushed += 1
        self._buf.append((frame_set, [False]))
        self._since_emit += 1
        while len(self._buf) > self.window_size:
            self._evict_one()
        if len(self._buf) < self.window_size:
            return None
        if not self._emitted_any or self._since_emit >= self.stride:
            return self._make(list(self._buf))
        return None

    def flush(self) -> Window | None:
        """Window of the newest (up to ``window_size``) buffered sets if any of them was never windowed
        (end of a replay: nothing is left unprocessed); else None. The buffer is kept."""
        if any(not flag[0] for _, flag in self._buf):
            return self._make(list(self._buf))
        return None

    def reset(self) -> None:
        """Forget the buffer (e.g. after a time jump); buffered sets are reported via ``on_evict``."""
        while self._buf:
            self._evict_one()
        self._since_emit = 0
        self._emitted_any = False


class SyncWatchdog:
    """Reports cameras that have been silent for more than ``timeout_ns`` (receipt time, injectable clock).

    A camera that stops publishing stalls the synchroniser without any error; the node calls
    ``observe`` for every received frame and ``silent()`` periodically (diagnostics)."""

    def __init__(self, cameras: list[str], timeout_ns: int, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.cameras = list(cameras)
        self.timeout_ns = int(timeout_ns)
        self.clock = clock
        start = clock()
        self._last: dict[str, int] = {c: start for c in self.cameras}
        self._seen: dict[str, bool] = {c: False for c in self.cameras}

    def observe(self, camera: str, now_ns: int | None = None) -> None:
        if camera in self._last:
            self._last[camera] = self.clock() if now_ns is None else int(now_ns)
            self._seen[camera] = True

    def silent(self, now_ns: int | None = None) -> dict[str, int]:
        """{camera: ns since its last frame (or since start if never seen)} for silent cameras."""
        now = self.clock() if now_ns is None else int(now_ns)
        return {c: now - t for c, t in self._last.items() if now - t > self.timeout_ns}

    def status(self, now_ns: int | None = None) -> dict[str, dict]:
        now = self.clock() if now_ns is None else int(now_ns)
        return {c: {"seen": self._seen[c], "age_ns": now - self._last[c],
                    "silent": now - self._last[c] > self.timeout_ns} for c in self.cameras}

    def reset(self) -> None:
        now = self.clock()
        self._last = {c: now for c in self.cameras}
