"""QoS profiles of the fast3dis node (see docs/ARCHITECTURE.md, "Conventions").

Every publisher and subscription of the node takes the standard ``qos_overrides`` parameters
(``overridable``), e.g. ``-p qos_overrides./fast3dis/instances_cloud.publisher.durability:=volatile``.
"""

from __future__ import annotations

from rclpy.qos import (
    QoSPolicyKind,
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)

from rclpy.qos_overriding_options import QoSOverridingOptions

__all__ = ["sensor_qos", "camera_info_qos", "output_qos", "latched_qos", "map_qos", "overridable"]


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


def map_qos(depth: int = 2) -> QoSProfile:
    """The running map, instances and markers: reliable + transient local (REP 2003 maps), so RViz, Nav2 or a
    map saver that starts late gets the newest map at once instead of waiting for the next window. Depth
    as the other outputs (``output_qos_depth``): with depth 1 a reliable writer drops a sample that a slow
    live subscriber has not acknowledged yet when the next window's comes; a late subscriber with depth 1
    keeps the newest of the cached ones."""
    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def overridable() -> QoSOverridingOptions:
    """Declare ``qos_overrides.<topic>.<publisher|subscription>.{history,depth,reliability,durability}``
    parameters for an entity (read at creation, like in rclcpp)."""
    return QoSOverridingOptions([QoSPolicyKind.HISTORY, QoSPolicyKind.DEPTH, QoSPolicyKind.RELIABILITY,
                                 QoSPolicyKind.DURABILITY])
