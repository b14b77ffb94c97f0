"""TF for fast3dis_ros on tf2_ros: 4x4 matrix <-> TransformStamped, and pose look-ups.

TF goes in and out through ``tf2_ros`` itself (``TransformBroadcaster``, ``StaticTransformBroadcaster``,
``Buffer`` + ``TransformListener``), as on any ROS 2 install; in the project's venv scripts/setup.sh builds
it from ../shared/ros2_sources. What this module adds is the numpy side:

- ``matrix_to_transform`` / ``transform_to_matrix``: ``T_parent_child`` (4x4) <-> TransformStamped;
- ``TfLookup``: ``lookup(target, source, stamp_ns, tolerance_ns) -> T_target_source`` over a
  ``tf2_ros.Buffer``. tf2 interpolates inside a frame's history and refuses to extrapolate; the node's
  pose look-up allows a stamp up to ``tolerance_ns`` (its sync slop) past the newest transform, where the
  newest one is used (a camera image that arrives just before its pose on /tf).
"""

from __future__ import annotations

import numpy as np
from geometry_msgs.msg import TransformStamped

from fast3dis_ros.geometry.rotations import matrix_from_quat_xyzw, quat_xyzw_from_matrix
from fast3dis_ros.ros.conversions import ns_to_stamp, stamp_to_ns

__all__ = ["TfLookupError", "TfLookup", "matrix_to_transform", "transform_to_matrix"]


class TfLookupError(LookupError):
    """A transform that cannot be given: unknown frame, no path, or extrapolation beyond the tolerance."""


def matrix_to_transform(T: np.ndarray, parent: str, child: str, stamp_ns: int) -> TransformStamped:
    """TransformStamped parent <- child from ``T_parent_child`` (4x4). A Sim(3) scale in the
    rotation block is removed (TF carries rigid motions only); translation is kept as is."""
    T = np.asarray(T, np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"transform {parent} <- {child} must be a finite 4x4 matrix, got shape {T.shape}")
    q = quat_xyzw_from_matrix(T[:3, :3])
    msg = TransformStamped()
    msg.header.frame_id = parent
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.child_frame_id = child
    msg.transform.translation.x, msg.transform.translation.y, msg.transform.translation.z = (
        float(v) for v in T[:3, 3]
    )
    r = msg.transform.rotation
    r.x, r.y, r.z, r.w = (float(v) for v in q)
    return msg


def transform_to_matrix(msg: TransformStamped) -> np.ndarray:
    t, r = msg.transform.translation, msg.transform.rotation
    T = np.eye(4)
    T[:3, :3] = matrix_from_quat_xyzw((r.x, r.y, r.z, r.w))
    T[:3, 3] = (t.x, t.y, t.z)
    return T


class TfLookup:
    """``tf2_ros.Buffer`` (+ a ``TransformListener`` on ``node`` when given) with numpy look-ups."""

    def __init__(self, node=None, cache_time_s: float = 10.0, buffer=None):
        import tf2_ros
        from rclpy.duration import Duration

        self.buffer = buffer if buffer is not None else tf2_ros.Buffer(cache_time=Duration(seconds=cache_time_s))
        self._listener = tf2_ros.TransformListener(self.buffer, node) if node is not None else None

    def lookup(self, target_frame: str, source_frame: str, stamp_ns: int, tolerance_ns: int = 0) -> np.ndarray:
        """``T_target_source`` at ``stamp_ns`` (0: the latest common time); raises ``TfLookupError``."""
        import tf2_ros
        from rclpy.time import Time

        try:
            return transform_to_matrix(self.buffer.lookup_transform(target_frame, source_frame,
                                                                    Time(nanoseconds=int(stamp_ns))))
        except tf2_ros.ExtrapolationException as e:
            if tolerance_ns <= 0 or stamp_ns <= 0:
                raise TfLookupError(str(e)) from e
            try:
                latest = self.buffer.lookup_transform(target_frame, source_frame, Time())
            except tf2_ros.TransformException as e2:  # pragma: no cover - the first call already found a path
                raise TfLookupError(str(e2)) from e2
            gap = int(stamp_ns) - stamp_to_ns(latest.header.stamp)
            if 0 < gap <= tolerance_ns:
                return transform_to_matrix(latest)
            raise TfLookupError(f"{e} (newest {target_frame} <- {source_frame} is {gap / 1e6:.1f} ms from the "
                                f"requested stamp; tolerance {tolerance_ns / 1e6:.1f} ms)") from e
        except tf2_ros.TransformException as e:
            raise TfLookupError(str(e)) from e
