"""The ``ros2`` command line against the ``fast3dis_node`` executable: ``ros2 lifecycle set / get`` and
``ros2 service call`` on the map services (the ROS tooling issue installs the CLI into the venv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("fast3dis_msgs.srv")
pytest.importorskip("ros2lifecycle")  # the ros2 CLI (issue 17 installs it with the project's set-up)
pytest.importorskip("ros2service")

from lifecycle_helpers import CAMS, H, W, Client  # noqa: E402
from ros_helpers import RosContext, RosProcess, ros_env, unique_domain_id  # noqa: E402


def _ros2(dom: int, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    venv = Path(sys.prefix)
    exe = shutil.which("ros2", path=str(venv / "bin")) or "ros2"
    env = ros_env(dom, {"AMENT_PREFIX_PATH": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.timeout(300)
def test_ros2_cli_drives_the_node_and_calls_the_map_services(tmp_path):
    dom = unique_domain_id()
    args = ["-m", "fast3dis_ros.ros.lifecycle", "--ros-args", "-p", "autostart:=false",
            "-p", f"cameras:=[{','.join(CAMS)}]", "-p", "window_size:=2", "-p", "stride:=1", "-p", "device:=cpu",
            "-p", "score_threshold:=0.0", "-p", f"warmup_width:={W}", "-p", f"warmup_height:={H}"]
    with RosContext(dom) as ctx, RosProcess(args, dom, name="fast3dis_cli") as proc:
        cl = Client(ctx)
        assert cl.get_state() == "unconfigured", proc.output()
        for transition in ("configure", "activate"):
            r = _ros2(dom, "lifecycle", "set", "--no-daemon", "--spin-time", "5", "/fast3dis", transition, timeout=120)
            assert r.returncode == 0 and "Transitioning successful" in r.stdout, r.stdout + r.stderr
        r = _ros2(dom, "lifecycle", "get", "--no-daemon", "--spin-time", "5", "/fast3dis")
        assert r.stdout.startswith("active"), r.stdout + r.stderr
        # empty map: a clear refusal
        r = _ros2(dom, "service", "call", "/fast3dis/get_instances", "fast3dis_msgs/srv/GetInstances", "{}")
        assert r.returncode == 0 and "success=False" in r.stdout and "the map is empty" in r.stdout, r.stdout
        # map some frames, then save and query through the CLI
        assert ctx.spin_until(lambda: cl.get_instances().success, 90.0, step=cl.pump(0.3)), proc.output()[-3000:]
        out = tmp_path / "cli_map.pcd"
        r = _ros2(dom, "service", "call", "/fast3dis/save_map", "fast3dis_msgs/srv/SaveMap",
                  f"{{path: '{out}', frame_id: '', per_instance: false}}")
        assert "success=True" in r.stdout and out.is_file(), r.stdout + r.stderr
        r = _ros2(dom, "service", "call", "/fast3dis/save_map", "fast3dis_msgs/srv/SaveMap",
                  "{path: '/no/such/dir/m.ply'}")
        assert "success=False" in r.stdout and "does not exist" in r.stdout, r.stdout
        r = _ros2(dom, "service", "call", "/fast3dis/reset_map", "fast3dis_msgs/srv/ResetMap")
        assert "success=True" in r.stdout and "map cleared" in r.stdout, r.stdout
        r = _ros2(dom, "lifecycle", "set", "--no-daemon", "--spin-time", "5", "/fast3dis", "deactivate")
        assert r.returncode == 0, r.stdout + r.stderr
        assert proc.alive()
