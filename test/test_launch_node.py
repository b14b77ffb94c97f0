"""launch_testing: the real launch file starts the real node; frames in -> clouds, InstanceArray and TF out.

Run by pytest through launch_testing's plugin (``make test`` runs it). The node is the executable
scripts/setup.sh lays out in ``<venv>/lib/fast3dis_ros``; the test process publishes two cameras' images
and CameraInfo, reads every PointCloud2 with sensor_msgs_py as well, and looks the camera poses up
through a tf2_ros listener."""

import unittest

import numpy as np
import pytest
from ros_helpers import RosContext, read_cloud, require_ros_tools

require_ros_tools("launch_testing", "launch_ros", "tf2_ros", "sensor_msgs_py")

from launch_helpers import CAMS, FramePublisher, launch_description, new_domain, test_config  # noqa: E402

DOMAIN = new_domain()


@pytest.mark.launch_test
@pytest.mark.timeout(240)
def generate_test_description():
    return launch_description(DOMAIN, {"config": test_config(), "large_clouds_profile": "true"})


class TestFramesInResultsOut(unittest.TestCase):
    def test_clouds_instances_and_tf(self, proc_output):
        from fast3dis_msgs.msg import InstanceArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        from fast3dis_ros.ros.conversions import stamp_to_ns
        from fast3dis_ros.ros.tf import TfLookup

        got = {"map": [], "window": [], "inst": []}
        with RosContext(DOMAIN, "launch_probe") as ctx:
            q = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            for key, typ, topic in (("map", PointCloud2, "/fast3dis/instances_cloud"),
                                    ("window", PointCloud2, "/fast3dis/window_cloud"),
                                    ("inst", InstanceArray, "/fast3dis/instances")):
                ctx.node.create_subscription(typ, topic, lambda m, k=key: got[k].append(m), q)
            tf = TfLookup(ctx.node)
            pub = FramePublisher(ctx)
            self.assertTrue(pub.wait_matched(120), "the launched node never subscribed to the camera topics")

            def poses_on_tf():
                return all(tf.buffer.can_transform("map", f"{c}_optical_frame", _time(0)) for c in CAMS)

            ok = ctx.spin_until(lambda: all(got.values()) and poses_on_tf(), timeout=90, step=pub.pump())
            self.assertTrue(ok, f"missing outputs: {[k for k, v in got.items() if not v]}, tf frames: "
                                f"{tf.buffer.all_frames_as_string()}")
        proc_output.assertWaitFor("ready: 2 cameras", timeout=1)
        for pc in got["map"] + got["window"]:
            arr = read_cloud(pc)  # == sensor_msgs_py.point_cloud2.read_points
            self.assertEqual(pc.header.frame_id, "map")
            self.assertIn(stamp_to_ns(pc.header.stamp), set(pub.stamps))
            self.assertGreater(len(arr), 0)
            self.assertTrue(np.isfinite(arr["x"]).all())
        ia = got["inst"][-1]
        self.assertEqual(ia.header.frame_id, "map")
        self.assertIn(stamp_to_ns(ia.header.stamp), set(pub.stamps))
        T = tf.lookup("map", "left_optical_frame", 0)
        self.assertTrue(np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-6))


def _time(ns):
    from rclpy.time import Time

    return Time(nanoseconds=ns)
