"""ros/tf_buffer.py without DDS: TFMessage-like objects fed directly (chains, inverse edges, time
interpolation, static + dynamic, extrapolation errors, bounded memory); plus one loopback check of
TfListener (transient-local /tf_static reaches a late subscriber)."""

from types import SimpleNamespace as NS

import numpy as np
import pytest

from fast3dis_ros.geometry.rotations import matrix_from_quat_xyzw, quat_xyzw_from_matrix
from fast3dis_ros.ros.tf_buffer import TfBuffer, TfLookupError, slerp

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


def _ts(parent, child, T, stamp_ns):
    """A TransformStamped look-alike (duck typing is all TfBuffer needs)."""
    q = quat_xyzw_from_matrix(T[:3, :3])
    return NS(header=NS(frame_id=parent, stamp=NS(sec=stamp_ns // S, nanosec=stamp_ns % S)), child_frame_id=child,
              transform=NS(translation=NS(x=T[0, 3], y=T[1, 3], z=T[2, 3]),
                           rotation=NS(x=q[0], y=q[1], z=q[2], w=q[3])))


def _msg(*ts):
    return NS(transforms=list(ts))


def _inv(T):
    return np.linalg.inv(T)


def test_direct_chain_and_inverse():
    b = TfBuffer()
    A = _T(_rot("z", 30), (1, 2, 3))  # world <- base
    B = _T(_rot("x", -90) @ _rot("z", -90), (0.1, 0, 0.5))  # base <- cam
    C = _T(_rot("y", 10), (0, 0.2, 0))  # base <- lidar
    assert b.add_message(_msg(_ts("world", "base", A, T0))) == 1
    b.add_message(_msg(_ts("base", "cam", B, T0), _ts("base", "lidar", C, T0)))
    np.testing.assert_allclose(b.lookup("world", "base", T0), A, atol=1e-12)
    np.testing.assert_allclose(b.lookup("world", "cam", T0), A @ B, atol=1e-12)  # chain through the parent
    np.testing.assert_allclose(b.lookup("cam", "world", T0), _inv(A @ B), atol=1e-12)  # inverse edges
    np.testing.assert_allclose(b.lookup("cam", "lidar", T0), _inv(B) @ C, atol=1e-12)  # via common ancestor
    np.testing.assert_allclose(b.lookup("cam", "cam", T0), np.eye(4))
    assert b.frames() == {"world", "base", "cam", "lidar"}


def test_unknown_and_disconnected_frames_raise_clear_errors():
    b = TfBuffer()
    b.add_message(_msg(_ts("world", "base", _T(), T0), _ts("odom", "other", _T(), T0)))
    with pytest.raises(TfLookupError, match="frame 'nope' does not exist"):
        b.lookup("world", "nope", T0)
    with pytest.raises(LookupError, match="no TF path between 'world' and 'other'"):
        b.lookup("world", "other", T0)


def test_time_interpolation_linear_translation_and_slerp():
    b = TfBuffer()
    Ta = _T(_rot("z", 0), (0, 0, 0))
    Tb = _T(_rot("z", 90), (2, -4, 1))
    b.add_message(_msg(_ts("map", "cam", Tb, T0 + S)))  # out of order on purpose
    b.add_message(_msg(_ts("map", "cam", Ta, T0)))
    for a in (0.0, 0.25, 0.5, 1.0):
        T = b.lookup("map", "cam", T0 + int(a * S))
        np.testing.assert_allclose(T[:3, 3], a * Tb[:3, 3], atol=1e-9)
        np.testing.assert_allclose(T[:3, :3], _rot("z", 90 * a), atol=1e-9)  # slerp: constant angular rate
    # interpolation happens per edge before composing a chain
    b.add_message(_msg(_ts("world", "map", _T(t=(10, 0, 0)), T0), _ts("world", "map", _T(t=(20, 0, 0)), T0 + S)))
    T = b.lookup("world", "cam", T0 + S // 2)
    np.testing.assert_allclose(T, _T(t=(15, 0, 0)) @ _T(_rot("z", 45), (1, -2, 0.5)), atol=1e-9)
    # latest common time (stamp 0)
    np.testing.assert_allclose(b.lookup("world", "cam", 0), _T(t=(20, 0, 0)) @ Tb, atol=1e-9)


def test_slerp_takes_the_short_way():
    q0 = np.array([0, 0, 0, 1.0])
    q1 = -quat_xyzw_from_matrix(_rot("z", 20))  # same rotation, other hemisphere
    np.testing.assert_allclose(matrix_from_quat_xyzw(slerp(q0, q1, 0.5)), _rot("z", 10), atol=1e-12)


def test_static_and_dynamic_mix():
    b = TfBuffer()
    B = _T(_rot("x", -90), (0.1, 0, 0.5))  # static base <- cam, stamp irrelevant
    b.add_message(_msg(_ts("base", "cam", B, 0)), static=True)
    for k in range(5):
        b.add_message(_msg(_ts("odom", "base", _T(t=(k, 0, 0)), T0 + k * S // 10)))
    T = b.lookup("odom", "cam", T0 + 25 * S // 100)  # between k=2 and k=3
    np.testing.assert_allclose(T, _T(t=(2.5, 0, 0)) @ B, atol=1e-9)
    # static alone: any time
    np.testing.assert_allclose(b.lookup("base", "cam", 123), B, atol=1e-12)
    np.testing.assert_allclose(b.lookup("cam", "base", 0), _inv(B), atol=1e-12)


def test_extrapolation_errors_and_tolerance():
    b = TfBuffer()
    for k in range(3):
        b.add_message(_msg(_ts("map", "cam", _T(t=(k, 0, 0)), T0 + k * S)))
    with pytest.raises(TfLookupError, match=r"extrapolation into the future .* by 500.0 ms > tolerance 0.0 ms"):
        b.lookup("map", "cam", T0 + 2 * S + S // 2)
    with pytest.raises(TfLookupError, match="extrapolation into the past"):
        b.lookup("cam", "map", T0 - S // 10, tolerance_ns=S // 20)
    # within the tolerance: the end entry is used (no extrapolation of motion)
    np.testing.assert_allclose(b.lookup("map", "cam", T0 + 2 * S + S // 2, tolerance_ns=S)[:3, 3], (2, 0, 0))
    np.testing.assert_allclose(b.lookup("map", "cam", T0 - S // 10, tolerance_ns=S // 5)[:3, 3], (0, 0, 0))
    assert not b.can_transform("map", "cam", T0 + 10 * S)
    assert b.can_transform("map", "cam", T0 + S)


def test_bounded_memory_by_count_and_by_cache_time():
    b = TfBuffer(cache_time_s=1.0, max_history=50)
    for k in range(500):  # 100 Hz for 5 s
        b.add_message(_msg(_ts("map", "cam", _T(t=(k, 0, 0)), T0 + k * S // 100)))
    assert b.history_len("cam") == 50  # count cap (cache time would allow 101)
    b2 = TfBuffer(cache_time_s=1.0, max_history=10_000)
    for k in range(500):
        b2.add_message(_msg(_ts("map", "cam", _T(t=(k, 0, 0)), T0 + k * S // 100)))
    assert b2.history_len("cam") == 101  # [newest - 1 s, newest]
    with pytest.raises(TfLookupError, match="past"):
        b2.lookup("map", "cam", T0)
    np.testing.assert_allclose(b2.lookup("map", "cam", T0 + 4 * S)[:3, 3], (400, 0, 0), atol=1e-9)
    # same stamp twice: replaced, not duplicated
    b2.add_message(_msg(_ts("map", "cam", _T(t=(-1, 0, 0)), T0 + 499 * S // 100)))
    assert b2.history_len("cam") == 101
    np.testing.assert_allclose(b2.lookup("map", "cam", 0)[:3, 3], (-1, 0, 0))


def test_reparenting_replaces_history_and_bad_transforms_are_rejected():
    b = TfBuffer()
    b.add_message(_msg(_ts("map", "cam", _T(t=(1, 0, 0)), T0)))
    b.add_message(_msg(_ts("world", "cam", _T(t=(2, 0, 0)), T0 + S)))
    assert b.parent_changes == 1 and b.history_len("cam") == 1
    np.testing.assert_allclose(b.lookup("world", "cam", T0 + S)[:3, 3], (2, 0, 0))
    bad = _ts("map", "x", _T(), T0)
    bad.transform.rotation = NS(x=0.0, y=0.0, z=0.0, w=0.0)
    nan = _ts("map", "y", _T(), T0)
    nan.transform.translation.x = float("nan")
    assert b.add_message(_msg(bad, nan, _ts("a", "a", _T(), T0))) == 0 and b.rejected == 3
    # leading slashes are ignored, as in tf2
    b.add_message(_msg(_ts("/odom", "/base", _T(t=(0, 3, 0)), T0)))
    np.testing.assert_allclose(b.lookup("odom", "/base", T0)[:3, 3], (0, 3, 0))


def test_listener_over_loopback_dds_gets_latched_static_and_dynamic():
    pytest.importorskip("rclpy")
    pytest.importorskip("tf2_msgs.msg")
    from ros_helpers import RosContext, unique_domain_id

    from fast3dis_ros.ros.tf import StaticTFBroadcaster, TFBroadcaster, matrix_to_transform
    from fast3dis_ros.ros.tf_buffer import TfListener, TfLookup

    B = _T(_rot("x", -90), (0.1, 0, 0.5))
    with RosContext(unique_domain_id()) as ctx:
        StaticTFBroadcaster(ctx.node, force_fallback=True).send(matrix_to_transform(B, "base", "cam", 0))
        dyn = TFBroadcaster(ctx.node, force_fallback=True)
        ctx.spin_for(0.3)
        buf = TfBuffer()
        TfListener(ctx.node, buf)  # joins after the static transform was sent: transient local delivers it
        lk = TfLookup(ctx.node, force_fallback=True)
        assert not lk.uses_tf2_ros

        def step():
            dyn.send([matrix_to_transform(_T(t=(1, 0, 0)), "odom", "base", T0),
                      matrix_to_transform(_T(t=(3, 0, 0)), "odom", "base", T0 + S)])

        ok = ctx.spin_until(lambda: buf.can_transform("odom", "cam", T0 + S // 2)
                            and lk.buffer.can_transform("odom", "cam", T0 + S // 2), timeout=15, step=step)
        assert ok, buf.frames()
        np.testing.assert_allclose(buf.lookup("odom", "cam", T0 + S // 2), _T(t=(2, 0, 0)) @ B, atol=1e-6)
        np.testing.assert_allclose(lk.lookup("odom", "cam", T0 + S // 2), _T(t=(2, 0, 0)) @ B, atol=1e-6)


def test_fallback_broadcasters_topics_qos_and_static_latching():
    """Both fallbacks publish TFMessage; /tf: reliable, volatile, depth 100, each call as given; /tf_static:
    reliable, transient local, depth 1, every call re-sends all static transforms (newest per child)."""
    pytest.importorskip("rclpy")
    pytest.importorskip("tf2_msgs.msg")
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, ReliabilityPolicy

    from fast3dis_ros.ros.tf import StaticTFBroadcaster, TFBroadcaster, matrix_to_transform

    class Node:
        def __init__(self):
            self.pubs = []

        def create_publisher(self, msg_type, topic, qos):
            pub = NS(msg_type=msg_type, topic=topic, qos=qos, sent=[])
            pub.publish = pub.sent.append
            self.pubs.append(pub)
            return pub

    def children(msg):
        return [(t.child_frame_id, t.transform.translation.x) for t in msg.transforms]

    node = Node()
    dyn, static = TFBroadcaster(node, force_fallback=True), StaticTFBroadcaster(node, force_fallback=True)
    assert not dyn.uses_tf2_ros and not static.uses_tf2_ros
    (pd, ps) = node.pubs
    assert pd.msg_type.__name__ == ps.msg_type.__name__ == "TFMessage"
    assert (pd.topic, pd.qos.depth, pd.qos.durability) == ("/tf", 100, DurabilityPolicy.VOLATILE)
    assert (ps.topic, ps.qos.depth, ps.qos.durability) == ("/tf_static", 1, DurabilityPolicy.TRANSIENT_LOCAL)
    for q in (pd.qos, ps.qos):
        assert q.reliability == ReliabilityPolicy.RELIABLE and q.history == HistoryPolicy.KEEP_LAST
    a, b, a2 = (matrix_to_transform(_T(t=(x, 0, 0)), "base", c, 0) for x, c in ((1, "a"), (2, "b"), (3, "a")))
    for br in (dyn, static):
        br.send(a)
        br.send([b])
        br.send(iter([a2]))
    assert [children(m) for m in pd.sent] == [[("a", 1)], [("b", 2)], [("a", 3)]]
    assert [children(m) for m in ps.sent] == [[("a", 1)], [("a", 1), ("b", 2)], [("a", 3), ("b", 2)]]
