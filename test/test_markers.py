"""pipeline/markers.py: one ROS-free marker description behind the node's and the output bag's MarkerArray."""

import math

import numpy as np
import pytest

from fast3dis_ros.pipeline import markers as mk
from fast3dis_ros.core.frames import InstanceSummary


def _instances():
    return [
        InstanceSummary(7, 0.9, np.array([1.0, 2, 3]), np.array([0.5, 1.5, 2.5]), np.array([1.5, 2.5, 3.5]), 120, 4),
        InstanceSummary(9, float("nan"), np.zeros(3), -np.ones(3), np.ones(3), 10, 1),
        InstanceSummary(11, 0.5, np.zeros(3), np.array([0.0, 0.0, np.inf]), np.ones(3), 5, 1),  # skipped
        InstanceSummary(12, 0.25, np.zeros(3), np.zeros(3), np.zeros(3), 3, 1),  # degenerate box
    ]


def test_instance_markers_description():
    d = mk.instance_markers(_instances(), ns="fast3dis", min_size=1e-3, text_height=0.1)
    assert [(m["ns"], m["type"], m["action"], m["id"]) for m in d] == [
        ("fast3dis", mk.ARROW, mk.DELETEALL, 0),
        ("fast3dis/boxes", mk.CUBE, mk.ADD, 7), ("fast3dis/labels", mk.TEXT_VIEW_FACING, mk.ADD, 7),
        ("fast3dis/boxes", mk.CUBE, mk.ADD, 9), ("fast3dis/labels", mk.TEXT_VIEW_FACING, mk.ADD, 9),
        ("fast3dis/boxes", mk.CUBE, mk.ADD, 12), ("fast3dis/labels", mk.TEXT_VIEW_FACING, mk.ADD, 12),
    ]
    clear, box, label = d[0], d[1], d[2]
    assert clear["scale"] == (0.0, 0.0, 0.0) and clear["color"] == (0.0, 0.0, 0.0, 0.0) and clear["text"] == ""
    assert box["position"] == (1.0, 2.0, 3.0) and box["scale"] == pytest.approx((1.0, 1.0, 1.0))
    assert box["orientation"] == (0.0, 0.0, 0.0, 1.0) and box["text"] == ""
    assert box["color"] == (*mk.instance_color(7), mk.BOX_ALPHA)
    assert label["position"] == pytest.approx((1.0, 2.0, 3.6)) and label["scale"] == (0.0, 0.0, 0.1)
    assert label["color"] == (*mk.instance_color(7), mk.LABEL_ALPHA) and label["text"] == "7 (0.90)"
    assert d[4]["text"] == "9"  # non-finite score: id only
    assert d[5]["scale"] == (1e-3, 1e-3, 1e-3)  # min_size
    for m in d:  # plain Python numbers, ready for any message type
        for k in ("position", "orientation", "scale", "color"):
            assert all(type(v) is float for v in m[k]), (k, m)
        assert type(m["id"]) is int and type(m["type"]) is int and type(m["action"]) is int
    assert mk.instance_markers([]) == d[:1]


def test_instance_color():
    c = mk.instance_color(7)
    assert c == mk.instance_color(7) != mk.instance_color(8)
    assert all(0.0 <= v <= 1.0 for v in c) and len(c) == 3
    hues = sorted((i * 0.618033988749895) % 1.0 for i in range(1, 11))
    assert min(b - a for a, b in zip(hues, hues[1:])) > 0.05  # well separated
    assert not any(math.isnan(v) for v in mk.instance_color(-3))


def test_constants_match_visualization_msgs_and_output_bag(tmp_path):
    pytest.importorskip("rosbags")
    from fast3dis_ros.eval.output_bag import OutputBagWriter, make_typestore

    ts, _ = make_typestore(register_instances=False)
    M = ts.types["visualization_msgs/msg/Marker"]
    assert (M.ARROW, M.CUBE, M.TEXT_VIEW_FACING, M.ADD, M.DELETEALL) == (
        mk.ARROW, mk.CUBE, mk.TEXT_VIEW_FACING, mk.ADD, mk.DELETEALL)
    inst = _instances()
    desc = mk.instance_markers(inst, ns="q", text_height=0.2)
    w = OutputBagWriter(tmp_path / "o")
    ma = w.marker_array(inst, "map", 1_000_000_042, ns="q", text_height=0.2)
    assert len(ma.markers) == len(desc)
    for m, d in zip(ma.markers, desc):
        _same(m, d)
        assert m.header.frame_id == "map" and (m.header.stamp.sec, m.header.stamp.nanosec) == (1, 42)


def _same(m, d):
    p, q, s, c = m.pose.position, m.pose.orientation, m.scale, m.color
    assert (m.ns, m.id, m.type, m.action, m.text) == (d["ns"], d["id"], d["type"], d["action"], d["text"])
    assert (p.x, p.y, p.z) == d["position"] and (q.x, q.y, q.z, q.w) == d["orientation"]
    assert (s.x, s.y, s.z) == d["scale"]
    assert (c.r, c.g, c.b, c.a) == pytest.approx(d["color"], abs=1e-7)  # float32 colour fields


def test_node_markers_follow_the_description():
    pytest.importorskip("rclpy")
    from visualization_msgs.msg import Marker

    from fast3dis_ros.ros import conversions as cv

    assert (Marker.ARROW, Marker.CUBE, Marker.TEXT_VIEW_FACING, Marker.ADD, Marker.DELETEALL) == (
        mk.ARROW, mk.CUBE, mk.TEXT_VIEW_FACING, mk.ADD, mk.DELETEALL)
    assert cv.instance_color is mk.instance_color  # one colour function
    inst = _instances()
    desc = mk.instance_markers(inst, ns="n", min_size=0.5, text_height=0.3)
    ma = cv.instances_to_markers(inst, "odom", 7, ns="n", min_size=0.5, text_height=0.3)
    assert len(ma.markers) == len(desc)
    for m, d in zip(ma.markers, desc):
        _same(m, d)
        assert m.header.frame_id == "odom" and m.header.stamp.nanosec == 7
