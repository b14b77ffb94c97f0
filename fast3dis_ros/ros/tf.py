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

from .conversions import ns_to_stamp

try:  # pragma: no cover - exercised on a real ROS install only
    import tf2_ros as _tf2_ros

    HAVE_TF2_ROS = True
except ImportError:
    _tf2_ros = None
    HAVE_TF2_ROS = False

__all__ = [
    "HAVE_TF2_ROS",
    "quat_from_matrix",
    "matrix_from_quat",
    "matrix_to_transform",
    "transform_to_matrix",
    "TFBroadcaster",
    "StaticTFBroadcaster",
]


def _nearest_rotation(R: np.ndarray) -> tuple[np.ndarray, float]:
    """Closest rotation (SVD) and the mean scale factor (1 for SE(3); Sim(3) scale otherwise)."""
    U, S, Vt = np.linalg.svd(R)
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt)) or 1.0
    return U @ D @ Vt, float(S.mean())


def quat_from_matrix(R: np.ndarray) -> np.ndarray:
    """(x, y, z, w) unit quaternion (ROS order) of a 3x3 rotation (projected onto SO(3) first)."""
    R, _ = _nearest_rotation(np.asarray(R, np.float64)[:3, :3])
    try:
        from transforms3d.quaternions import mat2quat

        w, x, y, z = mat2quat(R)
    except ImportError:  # pragma: no cover - transforms3d is a pinned dependency
        w = np.sqrt(max(0.0, 1.0 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
        x = np.copysign(np.sqrt(max(0.0, 1.0 + R[0, 0] - R[1, 1] - R[2, 2])) / 2, R[2, 1] - R[1, 2])
        y = np.copysign(np.sqrt(max(0.0, 1.0 - R[0, 0] + R[1, 1] - R[2, 2])) / 2, R[0, 2] - R[2, 0])
        z = np.copysign(np.sqrt(max(0.0, 1.0 - R[0, 0] - R[1, 1] + R[2, 2])) / 2, R[1, 0] - R[0, 1])
    q = np.array([x, y, z, w], np.float64)
    q /= np.linalg.norm(q)
    if q[3] < 0:  # canonical hemisphere
        q = -q
    return q


def matrix_from_quat(q_xyzw) -> np.ndarray:
    x, y, z, w = (float(v) for v in q_xyzw)
    n = x * x + y * y + z * z + w * w
    if n < 1e-12:
        raise ValueError("zero quaternion")
    s = 2.0 / n
    return np.array([
        [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
        [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
        [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)],
    ])


def matrix_to_transform(T: np.ndarray, parent: str, child: str, stamp_ns: int) -> TransformStamped:
    """TransformStamped parent <- child from ``T_parent_child`` (4x4). A Sim(3) scale in the
    rotation block is removed (TF carries rigid motions only); translation is kept as is."""
    T = np.asarray(T, np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"transform {parent} <- {child} must be a finite 4x4 matrix, got shape {T.shape}")
    q = quat_from_matrix(T[:3, :3])
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
    T[:3, :3] = matrix_from_quat((r.x, r.y, r.z, r.w))
    T[:3, 3] = (t.x, t.y, t.z)
    return T


class TFBroadcaster:
    """Dynamic transforms on /tf (tf2_ros.TransformBroadcaster when available)."""

    def __init__(self, node, force_fallback: bool = False):
        self.uses_tf2_ros = HAVE_TF2_ROS and not force_fallback
        if self.uses_tf2_ros:  # pragma: no cover
            self._impl = _tf2_ros.TransformBroadcaster(node)
            self._pub = None
        else:
            from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
            from tf2_msgs.msg import TFMessage

            self._msg_type = TFMessage
            qos = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
            self._pub = node.create_publisher(TFMessage, "/tf", qos)

    def send(self, transforms: list[TransformStamped] | TransformStamped) -> None:
        if isinstance(transforms, TransformStamped):
            transforms = [transforms]
        if self.uses_tf2_ros:  # pragma: no cover
            self._impl.sendTransform(list(transforms))
        else:
            self._pub.publish(self._msg_type(transforms=list(transforms)))


class StaticTFBroadcaster:
    """Static transforms on /tf_static, latched (tf2_ros.StaticTransformBroadcaster when available).

    Like tf2_ros, every call re-publishes all static transforms seen so far (keyed by child frame),
    so a late subscriber gets all of them from the one latched message.
    """

    def __init__(self, node, force_fallback: bool = False):
        self.uses_tf2_ros = HAVE_TF2_ROS and not force_fallback
        self._lock = threading.Lock()
        self._by_child: dict[str, TransformStamped] = {}
        if self.uses_tf2_ros:  # pragma: no cover
            self._impl = _tf2_ros.StaticTransformBroadcaster(node)
            self._pub = None
        else:
            from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
            from tf2_msgs.msg import TFMessage

            self._msg_type = TFMessage
            qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
            self._pub = node.create_publisher(TFMessage, "/tf_static", qos)

    def send(self, transforms: list[TransformStamped] | TransformStamped) -> None:
        if isinstance(transforms, TransformStamped):
            transforms = [transforms]
        if self.uses_tf2_ros:  # pragma: no cover
            self._impl.sendTransform(list(transforms))
            return
        with self._lock:
            for t in transforms:
                self._by_child[t.child_frame_id] = t
            msg = self._msg_type(transforms=list(self._by_child.values()))
        self._pub.publish(msg)
