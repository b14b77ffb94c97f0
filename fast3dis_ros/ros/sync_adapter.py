"""Frame-set grouping back ends of the node (parameter ``sync_backend``).

- ``fast3dis`` (default): the package's ``pipeline.sync.ApproximateTimeSync``, built by the
  ``PipelineRunner`` itself. It does what message_filters cannot: every discarded frame is counted by
  reason (diagnostics, accounting identities) and a stamp that jumps back (a looping bag, a restarted
  clock) resets the queues and the map instead of leaving frames unmatched.
- ``message_filters``: ``message_filters.ApproximateTimeSynchronizer`` fed through one ``SimpleFilter``
  per camera. It does not count what it discards, so ``drops`` reports ``unmatched`` = frames pushed minus
  frames emitted (frames still in its queues are included) and ``resets`` stays 0.

Both give the runner ``push(frame) -> list[FrameSet]``, ``flush``, ``pushed``, ``emitted_sets``,
``pending_count``, ``drops`` and ``resets``.
"""

from __future__ import annotations

import threading

from fast3dis_ros.core.frames import CameraFrame, FrameSet

__all__ = ["SYNC_BACKENDS", "make_synchronizer", "MessageFiltersSync"]

SYNC_BACKENDS = ("fast3dis", "message_filters")


class _Counts:
    def __init__(self, owner: MessageFiltersSync):
        self._owner = owner

    def as_dict(self) -> dict[str, int]:
        o = self._owner
        return {"unmatched": max(0, o.pushed - o.emitted_frames)}

    def total(self) -> int:
        return sum(self.as_dict().values())


class _Stamped:
    """What message_filters needs of a message: ``header.stamp`` (builtin_interfaces/Time)."""

    __slots__ = ("header", "frame")

    def __init__(self, frame: CameraFrame):
        from std_msgs.msg import Header

        from fast3dis_ros.ros.conversions import ns_to_stamp

        self.header = Header(stamp=ns_to_stamp(frame.stamp_ns), frame_id=frame.frame_id)
        self.frame = frame


class MessageFiltersSync:
    backend = "message_filters"

    def __init__(self, cameras: list[str], slop_ns: int, queue_size: int = 10):
        import message_filters as mf

        self.cameras = list(cameras)
        self._inputs = {c: mf.SimpleFilter() for c in self.cameras}
        self._sync = mf.ApproximateTimeSynchronizer([self._inputs[c] for c in self.cameras], queue_size,
                                                    slop_ns / 1e9)
        self._sync.registerCallback(self._on_set)
        self._out: list[FrameSet] = []
        self._lock = threading.Lock()
        self._next = 0
        self.pushed = 0
        self.emitted_frames = 0
        self.emitted_sets = 0
        self.resets = 0  # message_filters has no time-jump reset; a jump back just leaves frames unmatched
        self.drops = _Counts(self)

    def pending_count(self) -> int:
        """message_filters does not expose its queues: frames waiting there count as ``unmatched``."""
        return 0

    def flush(self) -> list[FrameSet]:
        """Nothing to flush from outside message_filters; what it still holds stays ``unmatched``."""
        return []

    def _on_set(self, *msgs) -> None:
        frames = [m.frame for m in msgs]
        self._out.append(FrameSet(self._next, max(f.stamp_ns for f in frames), frames))
        self._next += 1
        self.emitted_sets += 1
        self.emitted_frames += len(frames)

    def push(self, frame: CameraFrame) -> list[FrameSet]:
        with self._lock:
            self.pushed += 1
            inp = self._inputs.get(frame.camera)
            if inp is None:
                return []
            inp.signalMessage(_Stamped(frame))
            out, self._out = self._out, []
            return out


def make_synchronizer(cameras: list[str], slop_ns: int, queue_size: int = 10, backend: str = "fast3dis"):
    """The synchroniser for ``PipelineRunner(sync=...)``: None for 'fast3dis' (the runner builds its own
    ApproximateTimeSync, wired to its time-jump reset), a ``MessageFiltersSync`` for 'message_filters'."""
    if backend not in SYNC_BACKENDS:
        raise ValueError(f"unknown sync backend '{backend}' (one of {list(SYNC_BACKENDS)})")
    if backend == "message_filters":
        return MessageFiltersSync(cameras, slop_ns, queue_size)
    return None
