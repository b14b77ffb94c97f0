"""Helpers for the launch tests (launch_testing, run by pytest through launch_testing's plugin).

Each launch test includes the real ``launch/fast3dis.launch.py``, which starts the real node executable
laid out by scripts/setup.sh (``<venv>/lib/fast3dis_ros/fast3dis_node``), on its own ROS domain.
``test_config`` writes a parameter file for a small, fast CPU run; ``FramePublisher`` sends synthetic
images + CameraInfo of the test's cameras from the test process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import yaml
from ros_helpers import ROOT, FramePump, RosContext, unique_domain_id

LAUNCH_FILE = ROOT / "launch" / "fast3dis.launch.py"
CAMS = ["left", "right"]
H, W = 48, 64
SMALL_RUN = {"cameras": CAMS, "window_size": 2, "stride": 1, "checkpoint": "", "model_size": "tiny",
             "seed": 0, "device": "cpu", "score_threshold": 0.0, "sync_slop": 0.02, "diagnostics_period": 0.5,
             "queue_depth": 1, "voxel_size": 0.01}


def test_config(**overrides) -> str:
    """A parameter YAML: the package's defaults + ``SMALL_RUN`` + ``overrides``; returns its path."""
    from fast3dis_ros.ros.params import load_yaml_defaults

    params = load_yaml_defaults(ROOT / "config" / "fast3dis.yaml")
    params.update(SMALL_RUN)
    params.update(overrides)
    f = tempfile.NamedTemporaryFile("w", prefix="fast3dis-launch-", suffix=".yaml", delete=False)
    yaml.safe_dump({"/**": {"ros__parameters": params}}, f)
    f.close()
    return f.name


test_config.__test__ = False  # a helper, not a test


def launch_description(domain_id: int, launch_args: dict, extra_actions=()):
    """[ROS_DOMAIN_ID for every process, the real launch file with ``launch_args``, extras, ReadyToTest]."""
    import launch_testing.actions
    from launch import LaunchDescription
    from launch.actions import IncludeLaunchDescription, SetEnvironmentVariable
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    return LaunchDescription([
        SetEnvironmentVariable("ROS_DOMAIN_ID", str(domain_id)),
        SetEnvironmentVariable("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST"),
        SetEnvironmentVariable("OMP_NUM_THREADS", "1"),
        IncludeLaunchDescription(PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
                                 launch_arguments={k: str(v) for k, v in launch_args.items()}.items()),
        *extra_actions,
        launch_testing.actions.ReadyToTest(),
    ])


def image(k: int, cam: int) -> np.ndarray:
    """Coloured blocks that move a little with k."""
    img = np.full((H, W, 3), 40, np.uint8)
    x = 8 + (k % 8) + 10 * cam
    img[10:30, x:x + 16] = (220, 30, 30)
    img[25:45, 40:60] = (30, 200, 60)
    return img


class FramePublisher(FramePump):
    """Images + CameraInfo of ``CAMS`` on ``<prefix><cam>/image_raw`` / ``camera_info``, 10 Hz stamps
    from ``base_ns``; with ``clock`` also /clock at each frame set's stamp (sim time)."""

    pump_period = 0.3

    def __init__(self, ctx: RosContext, prefix: str = "/", base_ns: int = 1_700_000_000_000_000_000,
                 clock: bool = False):
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import CameraInfo, Image

        q = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        n = ctx.node
        self.ctx = ctx
        self.img = [n.create_publisher(Image, f"{prefix}{c}/image_raw", q) for c in CAMS]
        self.info = [n.create_publisher(CameraInfo, f"{prefix}{c}/camera_info", q) for c in CAMS]
        self.clock = n.create_publisher(Clock, "/clock", q) if clock else None
        self.base_ns = base_ns
        self.k = 0
        self.stamps: list[int] = []

    def wait_matched(self, timeout: float = 60.0) -> bool:
        return self.ctx.spin_until(lambda: all(p.get_subscription_count() > 0 for p in self.img + self.info),
                                   timeout)

    def publish_set(self) -> None:
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import CameraInfo

        from fast3dis_ros.ros.conversions import ns_to_stamp, numpy_to_image

        ns = self.base_ns + self.k * 100_000_000
        stamp = ns_to_stamp(ns)
        if self.clock is not None:
            self.clock.publish(Clock(clock=stamp))
        for i, c in enumerate(CAMS):
            msg = numpy_to_image(image(self.k, i), "rgb8")
            msg.header.stamp, msg.header.frame_id = stamp, f"{c}_optical_frame"
            ci = CameraInfo(width=W, height=H, distortion_model="plumb_bob")
            ci.header = msg.header
            ci.k = [60.0, 0.0, W / 2, 0.0, 60.0, H / 2, 0.0, 0.0, 1.0]
            self.info[i].publish(ci)
            self.img[i].publish(msg)
        self.stamps.append(ns)
        self.k += 1



def new_domain() -> int:
    return unique_domain_id()


def venv_bin(name: str) -> Path:
    import sys

    return Path(sys.prefix) / "bin" / name
