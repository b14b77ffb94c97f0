"""rviz/fast3dis.foxglove.json against the node: every topic it shows is one the node (default
parameters) publishes or subscribes, with the right type; the map cloud is coloured by a field the cloud
has; the panels the layout tree names are the ones configured."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("fast3dis_msgs.srv")

from lifecycle_helpers import ScriptedPredictor  # noqa: E402
from ros_helpers import ROOT, node_in_own_context  # noqa: E402

LAYOUT = ROOT / "rviz" / "fast3dis.foxglove.json"


def _leaves(tree) -> list[str]:
    if isinstance(tree, str):
        return [tree]
    return _leaves(tree["first"]) + _leaves(tree["second"])


def _layout_topics(cfg: dict) -> dict[str, str]:
    """topic -> panel kind, from every panel that names a topic."""
    out = {}
    for pid, panel in cfg["configById"].items():
        kind = pid.split("!")[0]
        for t in panel.get("topics", {}):
            out[t] = kind
        if panel.get("imageMode", {}).get("imageTopic"):
            out[panel["imageMode"]["imageTopic"]] = kind
        if panel.get("topicToRender"):
            out[panel["topicToRender"]] = kind
    return out


@pytest.fixture
def node():
    import rclpy

    from fast3dis_ros.ros.lifecycle import Fast3disLifecycleNode

    with node_in_own_context(Fast3disLifecycleNode, ScriptedPredictor(),
                             [rclpy.parameter.Parameter("warmup_width", value=0)]) as n:
        yield n


def test_layout_matches_the_node(node):
    from lifecycle_msgs.msg import State

    from fast3dis_ros.geometry.clouds import POINT_FIELDS

    cfg = json.loads(LAYOUT.read_text())
    assert sorted(_leaves(cfg["layout"])) == sorted(cfg["configById"])
    node.trigger_configure()
    node.trigger_activate()
    assert node._state_machine.current_state[0] == State.PRIMARY_STATE_ACTIVE
    name, ns = node.get_name(), node.get_namespace()
    pubs = dict(node.get_publisher_names_and_types_by_node(name, ns))
    subs = dict(node.get_subscriber_names_and_types_by_node(name, ns))
    expected_type = {"3D": ("sensor_msgs/msg/PointCloud2", "visualization_msgs/msg/MarkerArray"),
                     "Image": ("sensor_msgs/msg/Image",),
                     "DiagnosticSummary": ("diagnostic_msgs/msg/DiagnosticArray",),
                     "DiagnosticStatusPanel": ("diagnostic_msgs/msg/DiagnosticArray",)}
    topics = _layout_topics(cfg)
    assert {"/fast3dis/instances_cloud", "/fast3dis/markers", "/diagnostics", "/cam0/image_raw"} <= set(topics)
    for topic, kind in topics.items():
        types = pubs.get(topic) or subs.get(topic)
        assert types, f"layout shows {topic}, which the node neither publishes nor subscribes"
        assert types[0] in expected_type[kind], (topic, types, kind)
    # images: one panel per default camera
    cams = node.get_parameter("cameras").value
    assert sorted(t for t, k in topics.items() if k == "Image") == sorted(f"/{c}/image_raw" for c in cams)
    # map cloud coloured by instance id, a field the cloud carries; 3D view follows the map frame
    view = cfg["configById"]["3D!fast3dis_map"]
    mc = view["topics"]["/fast3dis/instances_cloud"]
    assert mc["colorField"] == "instance" and "instance" in [f[0] for f in POINT_FIELDS]
    assert mc["colorMode"] == "colormap" and mc["visible"]
    assert view["followTf"] == node.get_parameter("map_frame").value
    assert view["layers"]["grid"]["frameId"] == node.get_parameter("map_frame").value
    # the diagnostics detail panel selects the status the node publishes for lifecycle + service calls
    st = node._interface_status()
    panel = cfg["configById"]["DiagnosticStatusPanel!fast3dis_interface"]
    assert (panel["selectedName"], panel["selectedHardwareId"]) == (st.name, st.hardware_id)
    assert cfg["configById"]["DiagnosticSummary!fast3dis"]["hardwareIdFilter"] == st.hardware_id
