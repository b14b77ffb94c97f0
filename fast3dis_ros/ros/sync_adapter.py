"""Approximate-time grouping of CameraFrames into FrameSets, through message_filters when it exists.

Both back ends offer ``push(frame) -> list[FrameSet]``, ``drops.as_dict()`` and ``backend``:

- ``message_filters``: ``message_filters.ApproximateTimeSynchronizer`` fed through one
  ``SimpleFilter`` per camera (a real ROS 2 install). It does not count what it discards, so
  ``drops`` reports ``unmatched`` = frames pushed minus frames emitted minus those still queued (an
  upper bound: frames still waiting in its queues are included).
- ``project``: ``fast3dis_ros.pipeline.sync.ApproximateTimeSync`` (same matching rule, fully
  accounted drops by reason, time-jump reset). Used where message_filters is missing, or on request.
"""

from __future__ import annotations

import threading

from fast3dis_ros.core.frames import CameraFrame, FrameSet

__all__ = ["make_synchronizer", "MessageFiltersSync", "HAVE_MESSAGE_FILTERS"]

try:  # pragma: no cover - a real ROS install only
    import message_filters as _mf

    HAVE_MESSAGE_FILTERS = True
except ImportError:
    _mf = None
    HAVE_MESSAGE_FILTERS = False


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

    def __init__(self, cameras: list[str], slop_ns: int, queue_size: int = 10, mf_module=None):
        mf = mf_module or _mf
        if mf is None:
            raise ImportError("message_filters is not installed")
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


def make_synchronizer(cameras: list[str], slop_ns: int, queue_size: int = 10, backend: str = "auto"):
    """``backend``: 'auto' (message_filters if importable, else the project's), 'message_filters'
    or 'project'."""
    if backend not in ("auto", "message_filters", "project"):
        raise ValueError(f"unknown sync backend '{backend}'")
    if backend == "message_filters" or (backend == "auto" and HAVE_MESSAGE_FILTERS):
        return MessageFiltersSync(cameras, slop_ns, queue_size)
    from fast3dis_ros.pipeline.sync import ApproximateTimeSync

    s = ApproximateTimeSync(cameras, int(slop_ns), int(queue_size))
    s.backend = "project"
    return s
