"""QoS profiles of the fast3dis node (see docs/ARCHITECTURE.md, "Conventions")."""

from __future__ import annotations

from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)

__all__ = ["sensor_qos", "camera_info_qos", "output_qos", "latched_qos"]


def sensor_qos(depth: int = 5) -> QoSProfile:
    """Camera images: best effort, keep last ``depth``, volatile (REP 2003 sensor data). A reliable
    publisher (rosbag2 play, most drivers) matches it too."""
    q = QoSProfile(**{k: getattr(qos_profile_sensor_data, k) for k in ("reliability", "durability", "history")},
                   depth=depth)
    return q


def camera_info_qos(depth: int = 5) -> QoSProfile:
    """CameraInfo: same as images (drivers publish both with sensor-data QoS)."""
    return sensor_qos(depth)


def output_qos(depth: int = 2) -> QoSProfile:
    """Results: reliable, keep last ``depth`` (small: a late consumer wants the newest map only)."""
    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def latched_qos() -> QoSProfile:
    """Static things: reliable, transient local, depth 1."""
    return QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
