"""The ros2 CLI of the venv (``<venv>/bin/ros2``) on the installed package, as a user runs it:
``ros2 launch fast3dis_ros fast3dis.launch.py`` starts the node, ``ros2 node list`` / ``ros2 param get`` /
``ros2 topic echo`` answer, and a bad ``cameras:=`` makes the launch fail with the node's message."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ros_helpers import RosProcess, require_ros_tools, ros_env, unique_domain_id

require_ros_tools("launch_ros", "ros2cli")

ROS2 = Path(sys.prefix) / "bin" / "ros2"


def _ros2(args, dom, timeout=60):
    return subprocess.run([str(ROS2), *args], env=ros_env(dom), capture_output=True, text=True, timeout=timeout)


def _ros2_until(args, dom, ok, tries=6):
    """A CLI call that may run before discovery found the node ("Node not found"): retried a few times.
    (CI once saw four 0.5 s discovery spins of ``param get`` all miss the node on a loaded runner.)"""
    for _ in range(tries):
        r = _ros2(args, dom)
        if ok(r.stdout):
            break
        time.sleep(1.0)
    return r


@pytest.mark.timeout(180)
def test_bad_cameras_fails_the_launch_with_the_nodes_message():
    dom = unique_domain_id()
    r = _ros2(["launch", "fast3dis_ros", "fast3dis.launch.py", "cameras:=[front,front]",
               "device:=cpu"], dom, timeout=150)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "cannot start: invalid parameters: cameras has duplicates: ['front', 'front']" in out, out[-3000:]
    assert re.search(r"fast3dis node failed to start.*cameras has duplicates", out), out[-3000:]


@pytest.mark.timeout(240)
def test_ros2_launch_node_list_param_get_topic_echo():
    from launch_helpers import test_config

    dom = unique_domain_id()
    cfg = test_config()
    launch = RosProcess([str(ROS2), "launch", "fast3dis_ros", "fast3dis.launch.py", f"config:={cfg}", "cameras:=[a,b]"],
                        dom, name="ros2_launch")
    with launch:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and "ready: 2 cameras" not in launch.output():
            assert launch.alive(), launch.output()[-3000:]
            time.sleep(1.0)
        assert "ready: 2 cameras" in launch.output(), launch.output()[-3000:]
        r = _ros2_until(["node", "list", "--no-daemon", "--spin-time", "3"], dom, lambda o: "/fast3dis" in o.split())
        assert "/fast3dis" in r.stdout.split(), r.stdout + r.stderr
        r = _ros2_until(["param", "get", "--no-daemon", "--spin-time", "3", "/fast3dis", "window_size"], dom, lambda o: o.strip())
        assert r.stdout.strip() == "Integer value is: 2", r.stdout + r.stderr
        r = _ros2_until(["param", "get", "--no-daemon", "--spin-time", "3", "/fast3dis", "cameras"], dom, lambda o: o.strip())
        assert "['a', 'b']" in r.stdout, r.stdout + r.stderr
        r = _ros2(["topic", "echo", "--once", "--no-daemon", "--spin-time", "5", "/diagnostics",
                   "diagnostic_msgs/msg/DiagnosticArray"], dom, timeout=90)
        assert "name: 'fast3dis: sync'" in r.stdout or "name: fast3dis: sync" in r.stdout, r.stdout[-2000:] + r.stderr
