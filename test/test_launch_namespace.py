"""launch_testing: ``namespace:=robot1`` moves every topic of the node. With relative input templates
(``{camera}/image_raw``) the node listens on /robot1/<cam>/..., publishes on /robot1/fast3dis/...,
and nothing appears under the un-namespaced names. (/tf and /diagnostics are global by ROS convention.)"""

import unittest

import pytest
from ros_helpers import RosContext, read_cloud, require_ros_tools

require_ros_tools("launch_testing", "launch_ros", "sensor_msgs_py")

from launch_helpers import CAMS, FramePublisher, launch_description, new_domain, test_config  # noqa: E402

DOMAIN = new_domain()
NS = "robot1"


@pytest.mark.launch_test
@pytest.mark.timeout(240)
def generate_test_description():
    cfg = test_config(image_topic="{camera}/image_raw", camera_info_topic="{camera}/camera_info")
    return launch_description(DOMAIN, {"config": cfg, "namespace": NS})


class TestNamespace(unittest.TestCase):
    def test_every_topic_moves(self):
        from fast3dis_msgs.msg import InstanceArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        got = {"cloud": [], "inst": []}
        with RosContext(DOMAIN, "ns_probe") as ctx:
            q = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            ctx.node.create_subscription(PointCloud2, f"/{NS}/fast3dis/window_cloud", got["cloud"].append, q)
            ctx.node.create_subscription(InstanceArray, f"/{NS}/fast3dis/instances", got["inst"].append, q)
            pub = FramePublisher(ctx, prefix=f"/{NS}/")
            self.assertTrue(pub.wait_matched(120), f"no subscriber on /{NS}/<cam>/image_raw")
            ok = ctx.spin_until(lambda: all(got.values()), timeout=90, step=pub.pump())
            self.assertTrue(ok, f"missing: {[k for k, v in got.items() if not v]}")
            names = {(ns, n) for n, ns in ctx.node.get_node_names_and_namespaces()}
            topics = dict(ctx.node.get_topic_names_and_types())
        self.assertIn((f"/{NS}", "fast3dis"), names)
        for c in CAMS:  # inputs moved
            self.assertNotIn(f"/{c}/image_raw", topics)
        node_topics = [t for t in topics if "fast3dis" in t.split("/")[1:-1] or t.startswith("/fast3dis")]
        self.assertTrue(node_topics and all(t.startswith(f"/{NS}/") for t in node_topics), node_topics)
        self.assertIn(f"/{NS}/fast3dis/instances_cloud", topics)
        read_cloud(got["cloud"][-1])
