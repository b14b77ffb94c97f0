"""launch_testing: ``bag:=`` plays a ``fast3dis-synth`` bag with ``fast3dis-play`` (no rosbag2 in the venv)
into the launched node, and the live outputs match the offline ``fast3dis-eval --bag`` replay of the same
bag: same windows (stamps), same instance ids, window clouds and final map equal within float tolerance.

The bag plays at rate 0.1 (one frame set a second) so the node drops nothing; the node's own accounting
(/diagnostics) must show no drop, else the comparison would not be meaningful."""

import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import RosContext, read_cloud, require_ros_tools, ros_env

require_ros_tools("launch_testing", "launch_ros", "rosidl_runtime_py", "sensor_msgs_py")

from launch_helpers import launch_description, new_domain, test_config  # noqa: E402

DOMAIN = new_domain()
WORK = Path(tempfile.mkdtemp(prefix="fast3dis-bag-replay-"))
BAG = WORK / "scene_bag"
FRAMES, WINDOW, STRIDE, RATE = 6, 2, 2, 0.1
RUN = {"window_size": WINDOW, "stride": STRIDE, "checkpoint": "bundled", "score_threshold": 0.5,
       "voxel_size": 0.02, "sync_slop": 0.05, "queue_depth": 2}


def _write_bag() -> list[str]:
    from fast3dis_ros.data.bags import write_scene_bag
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene

    scene = generate_scene(SceneConfig(n_cameras=2, n_frames=FRAMES, width=64, height=48, seed=5))
    write_scene_bag(scene, BAG)
    return list(scene.camera_names)


@pytest.mark.launch_test
@pytest.mark.timeout(300)
def generate_test_description():
    cams = _write_bag()
    cfg = test_config(cameras=cams, **RUN)
    return launch_description(DOMAIN, {"config": cfg, "bag": str(BAG), "bag_rate": str(RATE),
                                       "use_sim_time": "true"})


def _offline():
    """``fast3dis-eval --bag`` with the node's settings; its output bag holds what the node would publish."""
    out = WORK / "eval"
    cmd = [sys.executable, "-m", "fast3dis_ros.eval.evaluate", "--bag", str(BAG), "--out", str(out),
           "--window-size", str(WINDOW), "--stride", str(STRIDE), "--slop-ms", str(RUN["sync_slop"] * 1000),
           "--score-threshold", str(RUN["score_threshold"]), "--voxel-size", str(RUN["voxel_size"]),
           "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ros_env(0, {"OMP_NUM_THREADS": "1"}))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from fast3dis_ros.eval.output_bag import read_output_bag

    return read_output_bag(out / "output_bag")


def _stamp(m):
    return m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec


class TestBagReplayMatchesOffline(unittest.TestCase):
    def test_live_outputs_equal_offline_replay(self, proc_output):
        from diagnostic_msgs.msg import DiagnosticArray
        from fast3dis_msgs.msg import InstanceArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        n_windows = FRAMES // STRIDE  # windows end at frame sets 2, 4, 6
        got = {"window": [], "map": [], "inst": [], "diag": []}
        with RosContext(DOMAIN, "replay_probe") as ctx:
            q = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
            for key, typ, topic in (("window", PointCloud2, "/fast3dis/window_cloud"),
                                    ("map", PointCloud2, "/fast3dis/instances_cloud"),
                                    ("inst", InstanceArray, "/fast3dis/instances"),
                                    ("diag", DiagnosticArray, "/diagnostics")):
                ctx.node.create_subscription(typ, topic, lambda m, k=key: got[k].append(m), q)
            ok = ctx.spin_until(lambda: len(got["inst"]) >= n_windows and len(got["map"]) >= n_windows, 200)
            self.assertTrue(ok, f"live: {[(k, len(v)) for k, v in got.items()]}")
            ctx.spin_for(1.5)  # diagnostics after the last window
        proc_output.assertWaitFor("played", timeout=30)  # the player finished the bag
        engine = [{kv.key: kv.value for kv in st.values} for d in got["diag"] for st in d.status
                  if st.name == "fast3dis: engine"][-1]
        self.assertEqual(int(engine["processed"]), n_windows, engine)
        self.assertFalse(any(int(v) for k, v in engine.items() if k.startswith("drop")), engine)

        off = _offline()
        off_win = [m for _, m in off["/fast3dis/window_cloud"]]
        off_inst = [m for _, m in off["/fast3dis/instances"]]
        off_map = [m for _, m in off["/fast3dis/instances_cloud"]]
        self.assertEqual([_stamp(m) for m in got["window"]], [_stamp(m) for m in off_win])  # same windows
        self.assertEqual([[i.id for i in m.instances] for m in got["inst"]],
                         [[i.id for i in m.instances] for m in off_inst])  # same ids
        for live, ref in list(zip(got["window"], off_win)) + [(got["map"][-1], off_map[-1])]:
            a = read_cloud(live)
            b = np.frombuffer(np.asarray(ref.data, np.uint8).tobytes(), a.dtype)
            self.assertEqual(len(a), len(b))
            for f in ("x", "y", "z", "score"):
                np.testing.assert_allclose(a[f], b[f], atol=1e-4, rtol=1e-4, err_msg=f)
            np.testing.assert_array_equal(a["instance"], b["instance"])
            np.testing.assert_array_equal(a["rgb"].view(np.uint32), b["rgb"].view(np.uint32))
