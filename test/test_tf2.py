"""TF through tf2_ros: what the node relies on, checked against hand-computed transforms.

``ros/tf.py``'s ``TfLookup`` over a real ``tf2_ros.Buffer`` (chains, inverse edges, time interpolation,
static + dynamic, unknown frames, extrapolation and the node's tolerance past the newest transform), and
over loopback DDS: ``tf2_ros.StaticTransformBroadcaster`` (latched: a listener that joins later still
gets it) and ``TransformBroadcaster`` into a ``TransformListener``."""

import numpy as np
import pytest
from ros_helpers import require_ros_tools

require_ros_tools("tf2_ros")

from fast3dis_ros.ros.tf import TfLookup, TfLookupError, matrix_to_transform, transform_to_matrix  # noqa: E402

S = 1_000_000_000
T0 = 1_700_000_000 * S


def _rot(axis, deg):
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    if axis == "x":
        return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def _T(R=None, t=(0, 0, 0)):
    T = np.eye(4)
    T[:3, :3] = np.eye(3) if R is None else R
    T[:3, 3] = t
    return T


def _lookup(*edges, static=()):
    """A TfLookup over a bare tf2_ros.Buffer holding ``edges`` = (parent, child, T, stamp_ns)."""
    lk = TfLookup()
    for parent, child, T, stamp in edges:
        lk.buffer.set_transform(matrix_to_transform(T, parent, child, stamp), "test")
    for parent, child, T in static:
        lk.buffer.set_transform_static(matrix_to_transform(T, parent, child, 0), "test")
    return lk


def test_matrix_transform_roundtrip_drops_scale():
    T = _T(_rot("z", 30) @ _rot("x", 20), (1, -2, 3))
    np.testing.assert_allclose(transform_to_matrix(matrix_to_transform(T, "a", "b", 5)), T, atol=1e-12)
    S3 = T.copy()
    S3[:3, :3] *= 2.5  # Sim(3): TF keeps the rotation and the translation
    np.testing.assert_allclose(transform_to_matrix(matrix_to_transform(S3, "a", "b", 5)), T, atol=1e-9)
    with pytest.raises(ValueError, match="finite 4x4"):
        matrix_to_transform(np.full((4, 4), np.nan), "a", "b", 0)


def test_chain_inverse_and_common_ancestor():
    A = _T(_rot("z", 30), (1, 2, 3))  # world <- base
    B = _T(_rot("x", -90) @ _rot("z", -90), (0.1, 0, 0.5))  # base <- cam
    C = _T(_rot("y", 10), (0, 0.2, 0))  # base <- lidar
    lk = _lookup(("world", "base", A, T0), ("base", "cam", B, T0), ("base", "lidar", C, T0))
    np.testing.assert_allclose(lk.lookup("world", "base", T0), A, atol=1e-9)
    np.testing.assert_allclose(lk.lookup("world", "cam", T0), A @ B, atol=1e-9)
    np.testing.assert_allclose(lk.lookup("cam", "world", T0), np.linalg.inv(A @ B), atol=1e-9)
    np.testing.assert_allclose(lk.lookup("cam", "lidar", T0), np.linalg.inv(B) @ C, atol=1e-9)


def test_unknown_and_disconnected_frames_raise_tf_lookup_error():
    lk = _lookup(("world", "base", _T(), T0), ("odom", "other", _T(), T0))
    with pytest.raises(TfLookupError, match="nope"):
        lk.lookup("world", "nope", T0)
    with pytest.raises(LookupError, match="world|other"):
        lk.lookup("world", "other", T0)


def test_time_interpolation_and_latest_common_time():
    Tb = _T(_rot("z", 90), (2, -4, 1))
    lk = _lookup(("map", "cam", Tb, T0 + S), ("map", "cam", _T(), T0))  # out of order on purpose
    for a in (0.0, 0.25, 0.5, 1.0):
        T = lk.lookup("map", "cam", T0 + int(a * S))
        np.testing.assert_allclose(T[:3, 3], a * Tb[:3, 3], atol=1e-6)
        np.testing.assert_allclose(T[:3, :3], _rot("z", 90 * a), atol=1e-6)  # slerp: constant angular rate
    for T, s in ((_T(t=(10, 0, 0)), T0), (_T(t=(20, 0, 0)), T0 + S)):
        lk.buffer.set_transform(matrix_to_transform(T, "world", "map", s), "test")
    np.testing.assert_allclose(lk.lookup("world", "cam", T0 + S // 2),
                               _T(t=(15, 0, 0)) @ _T(_rot("z", 45), (1, -2, 0.5)), atol=1e-6)
    np.testing.assert_allclose(lk.lookup("world", "cam", 0), _T(t=(20, 0, 0)) @ Tb, atol=1e-6)


def test_static_and_dynamic_mix():
    B = _T(_rot("x", -90), (0.1, 0, 0.5))
    lk = _lookup(*[("odom", "base", _T(t=(k, 0, 0)), T0 + k * S // 10) for k in range(5)],
                 static=[("base", "cam", B)])
    np.testing.assert_allclose(lk.lookup("odom", "cam", T0 + 25 * S // 100), _T(t=(2.5, 0, 0)) @ B, atol=1e-6)
    np.testing.assert_allclose(lk.lookup("base", "cam", 123), B, atol=1e-9)  # static: any time


def test_extrapolation_and_the_nodes_tolerance():
    lk = _lookup(*[("map", "cam", _T(t=(k, 0, 0)), T0 + k * S) for k in range(3)])
    with pytest.raises(TfLookupError, match="extrapolation into the future"):
        lk.lookup("map", "cam", T0 + 2 * S + S // 2)
    # within the tolerance past the newest transform: that transform is used (no motion extrapolated)
    np.testing.assert_allclose(lk.lookup("map", "cam", T0 + 2 * S + S // 2, tolerance_ns=S)[:3, 3], (2, 0, 0))
    with pytest.raises(TfLookupError, match=r"500.0 ms from the requested stamp; tolerance 100.0 ms"):
        lk.lookup("map", "cam", T0 + 2 * S + S // 2, tolerance_ns=S // 10)
    with pytest.raises(TfLookupError, match="extrapolation into the past"):  # before the oldest: never
        lk.lookup("map", "cam", T0 - S // 10, tolerance_ns=S)


@pytest.mark.timeout(60)
def test_tf2_ros_broadcasters_to_listener_over_loopback_dds():
    from ros_helpers import RosContext, unique_domain_id
    from tf2_ros import StaticTransformBroadcaster, TransformBroadcaster

    B = _T(_rot("x", -90), (0.1, 0, 0.5))
    dom = unique_domain_id()
    with RosContext(dom, "tf_pub") as pub, RosContext(dom, "tf_sub") as sub:
        StaticTransformBroadcaster(pub.node).sendTransform(matrix_to_transform(B, "base", "cam", 0))
        dyn = TransformBroadcaster(pub.node)
        pub.spin_for(0.5)
        lk = TfLookup(sub.node)  # joins after the static transform went out: transient local delivers it

        def step():
            dyn.sendTransform([matrix_to_transform(_T(t=(1, 0, 0)), "odom", "base", T0),
                               matrix_to_transform(_T(t=(3, 0, 0)), "odom", "base", T0 + S)])
            pub.spin_for(0.02)

        ok = sub.spin_until(lambda: lk.buffer.can_transform_core("odom", "cam", _time(T0 + S // 2))[0], 30, step)
        assert ok, lk.buffer.all_frames_as_string()
        np.testing.assert_allclose(lk.lookup("odom", "cam", T0 + S // 2), _T(t=(2, 0, 0)) @ B, atol=1e-6)


def _time(ns):
    from rclpy.time import Time

    return Time(nanoseconds=ns)
