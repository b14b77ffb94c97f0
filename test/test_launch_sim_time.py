"""launch_testing: ``use_sim_time:=true`` with a /clock publisher. The launched node's clock follows
/clock (its /diagnostics are stamped in bag time, not wall time) and frames stamped in that time still
give clouds."""

import unittest

import pytest
from ros_helpers import RosContext, read_cloud, require_ros_tools

require_ros_tools("launch_testing", "launch_ros", "sensor_msgs_py")

from launch_helpers import FramePublisher, launch_description, new_domain, test_config  # noqa: E402

DOMAIN = new_domain()
SIM_START_NS = 1_000 * 1_000_000_000  # 1000 s: far from wall time (~1.7e9 s)


@pytest.mark.launch_test
@pytest.mark.timeout(240)
def generate_test_description():
    return launch_description(DOMAIN, {"config": test_config(), "use_sim_time": "true"})


class TestSimTime(unittest.TestCase):
    def test_node_clock_follows_clock_topic(self):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        from fast3dis_ros.ros.conversions import stamp_to_ns

        diag, clouds = [], []
        with RosContext(DOMAIN, "sim_time_probe") as ctx:
            q = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            ctx.node.create_subscription(DiagnosticArray, "/diagnostics", diag.append, q)
            ctx.node.create_subscription(PointCloud2, "/fast3dis/window_cloud", clouds.append, q)
            pub = FramePublisher(ctx, base_ns=SIM_START_NS, clock=True)
            self.assertTrue(pub.wait_matched(120), "the launched node never subscribed to the camera topics")
            n_at_start = len(diag)

            def sim_stamped():
                return any(stamp_to_ns(d.header.stamp) >= SIM_START_NS for d in diag[n_at_start:])

            ok = ctx.spin_until(lambda: sim_stamped() and clouds, timeout=90, step=pub.pump())
            stamps = [stamp_to_ns(d.header.stamp) for d in diag[-5:]]
            self.assertTrue(ok, f"{len(clouds)} clouds; diagnostics stamps {stamps}")
        last_clock = pub.stamps[-1]
        for d in diag[n_at_start:]:
            s = stamp_to_ns(d.header.stamp)
            # sim time: 0 before the first /clock message, then never past the newest /clock we sent
            self.assertTrue(s == 0 or SIM_START_NS <= s <= last_clock, s)
        read_cloud(clouds[-1])
        self.assertIn(stamp_to_ns(clouds[-1].header.stamp), set(pub.stamps))
