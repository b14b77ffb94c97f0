"""TF for fast3dis_ros: 4x4 matrix <-> TransformStamped, and broadcasters.

``TFBroadcaster`` / ``StaticTFBroadcaster`` use ``tf2_ros`` when it is importable (a real ROS 2
install). Where it is not (the PyPI venv) they publish ``tf2_msgs/TFMessage`` themselves with the
same topics and QoS as tf2_ros: ``/tf`` (reliable, volatile, depth 100) and ``/tf_static``
(reliable, transient local, depth 1, all static transforms re-sent in one message).
"""

from __future__ import annotations

import threading

import numpy as np
from geometry_msgs.msg import TransformStamped

from fast3dis_ros.geometry.rotations import matrix_from_quat_xyzw, quat_xyzw_from_matrix
from fast3dis_ros.ros.conversions import ns_to_stamp

try:  # pragma: no cover - exercised on a real ROS install only
    import tf2_ros as _tf2_ros

    HAVE_TF2_ROS = True
except ImportError:
    _tf2_ros = None
    HAVE_TF2_ROS = False

__all__ = [
    "HAVE_TF2_ROS",
    "matrix_to_transform",
    "transform_to_matrix",
    "TFBroadcaster",
    "StaticTFBroadcaster",
]


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


class _Broadcaster:
    """tf2_ros' broadcaster named by ``_TF2_CLASS`` when available, else a ``TFMessage`` publisher on
    ``_TOPIC`` (reliable, depth ``_DEPTH``, durability ``_DURABILITY``). With ``_LATCH_ALL`` every call
    publishes all transforms seen so far, keyed by child frame (what tf2_ros does for static ones)."""

    _TF2_CLASS: str
    _TOPIC: str
    _DEPTH: int
    _DURABILITY: str
    _LATCH_ALL: bool

    def __init__(self, node, force_fallback: bool = False):
        self.uses_tf2_ros = HAVE_TF2_ROS and not force_fallback
        self._lock = threading.Lock()
        self._by_child: dict[str, TransformStamped] = {}
        if self.uses_tf2_ros:  # pragma: no cover
            self._impl = getattr(_tf2_ros, self._TF2_CLASS)(node)
            self._pub = None
        else:
            from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
            from tf2_msgs.msg import TFMessage

            self._msg_type = TFMessage
            qos = QoSProfile(depth=self._DEPTH, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=getattr(DurabilityPolicy, self._DURABILITY))
            self._pub = node.create_publisher(TFMessage, self._TOPIC, qos)

    def send(self, transforms: list[TransformStamped] | TransformStamped) -> None:
        transforms = [transforms] if isinstance(transforms, TransformStamped) else list(transforms)
        if self.uses_tf2_ros:  # pragma: no cover
            self._impl.sendTransform(transforms)
            return
        if self._LATCH_ALL:
            with self._lock:
                for t in transforms:
                    self._by_child[t.child_frame_id] = t
                transforms = list(self._by_child.values())
        self._pub.publish(self._msg_type(transforms=transforms))


class TFBroadcaster(_Broadcaster):
    """Dynamic transforms on /tf (tf2_ros.TransformBroadcaster when available)."""

    _TF2_CLASS, _TOPIC, _DEPTH, _DURABILITY, _LATCH_ALL = "TransformBroadcaster", "/tf", 100, "VOLATILE", False


class StaticTFBroadcaster(_Broadcaster):
    """Static transforms on /tf_static, latched (tf2_ros.StaticTransformBroadcaster when available).

    Like tf2_ros, every call re-publishes all static transforms seen so far (keyed by child frame),
    so a late subscriber gets all of them from the one latched message.
    """

    _TF2_CLASS, _TOPIC, _DEPTH, _DURABILITY, _LATCH_ALL = (
        "StaticTransformBroadcaster", "/tf_static", 1, "TRANSIENT_LOCAL", True)
