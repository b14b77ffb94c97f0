"""The interface packages built by scripts/build_interfaces.py: import, layout, and a real DDS
round trip between two processes (publisher child process, subscriber here)."""

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

from ros_helpers import ROOT, RosContext, RosProcess, ros_env, unique_domain_id  # noqa: E402

PUBLISHER = r"""
import sys, time
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy, DurabilityPolicy
from geometry_msgs.msg import TransformStamped
from fast3dis_msgs.msg import Instance, InstanceArray
from tf2_msgs.msg import TFMessage

rclpy.init()
node = rclpy.create_node("iface_pub")
qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
pub_i = node.create_publisher(InstanceArray, "/iface_test/instances", qos)
pub_tf = node.create_publisher(TFMessage, "/tf", qos)
arr = InstanceArray()
arr.header.frame_id = "map"
arr.header.stamp.sec, arr.header.stamp.nanosec = 12, 345
for k in range(3):
    i = Instance(id=10 + k, score=0.25 * (k + 1), num_points=100 * k + 1, views_seen=k + 2)
    i.centroid.x, i.centroid.y, i.centroid.z = 1.0 * k, 2.0, -3.5
    i.bbox_min.x, i.bbox_min.y, i.bbox_min.z = -1.0, -2.0, -3.0
    i.bbox_max.x, i.bbox_max.y, i.bbox_max.z = 1.5, 2.5, 3.5 + k
    arr.instances.append(i)
t = TransformStamped()
t.header.frame_id = "map"
t.header.stamp.sec = 7
t.child_frame_id = "cam0_optical_frame"
t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = 0.1, 0.2, 0.3
t.transform.rotation.x, t.transform.rotation.w = 0.6, 0.8
tf = TFMessage(transforms=[t])
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pub_i.publish(arr)
    pub_tf.publish(tf)
    rclpy.spin_once(node, timeout_sec=0.1)
node.destroy_node()
rclpy.shutdown()
"""


def test_import_and_fields():
    from fast3dis_msgs.msg import Instance, InstanceArray
    from tf2_msgs.msg import TFMessage

    assert set(Instance.get_fields_and_field_types()) == {
        "id", "score", "centroid", "bbox_min", "bbox_max", "num_points", "views_seen"}
    assert Instance.get_fields_and_field_types()["centroid"] == "geometry_msgs/Point"
    assert InstanceArray.get_fields_and_field_types() == {
        "header": "std_msgs/Header", "instances": "sequence<fast3dis_msgs/Instance>"}
    assert TFMessage.get_fields_and_field_types() == {"transforms": "sequence<geometry_msgs/TransformStamped>"}


def test_services_of_the_node():
    """The .srv of ~/save_map, ~/reset_map, ~/get_instances (built like the messages)."""
    from fast3dis_msgs.srv import GetInstances, ResetMap, SaveMap

    assert SaveMap.Request.get_fields_and_field_types() == {
        "path": "string", "frame_id": "string", "per_instance": "boolean"}
    assert SaveMap.Response.get_fields_and_field_types() == {
        "success": "boolean", "message": "string", "files": "sequence<string>", "num_points": "uint32"}
    assert ResetMap.Request.get_fields_and_field_types() == {}
    assert set(ResetMap.Response.get_fields_and_field_types()) == {
        "success", "message", "points_cleared", "instances_cleared"}
    req = GetInstances.Request.get_fields_and_field_types()
    assert req == {"ids": "sequence<uint32>", "min_score": "float", "use_box": "boolean", "box_frame": "string",
                   "box_min": "geometry_msgs/Point", "box_max": "geometry_msgs/Point", "with_points": "boolean"}
    res = GetInstances.Response.get_fields_and_field_types()
    assert res["instances"] == "sequence<fast3dis_msgs/Instance>" and res["points"] == "sensor_msgs/PointCloud2"
    share = Path(sys.prefix) / "share" / "fast3dis_msgs" / "srv"
    for name in ("SaveMap", "ResetMap", "GetInstances"):
        assert (share / f"{name}.srv").is_file()


def test_installed_like_a_ros_package():
    # the venv is the ROS prefix: share/<pkg>, ament index entry, generated libraries
    prefix = Path(sys.prefix)
    for pkg, msgs in (("fast3dis_msgs", ["Instance", "InstanceArray"]), ("tf2_msgs", ["TFMessage"])):
        share = prefix / "share" / pkg
        assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / pkg).is_file()
        assert (share / "package.xml").is_file()
        assert list((prefix / "lib").glob(f"lib{pkg}__rosidl_typesupport_fastrtps_c.so"))
        for m in msgs:
            assert (share / "msg" / f"{m}.msg").is_file()


def test_msg_copies_match_interface_source():
    for name in ("Instance.msg", "InstanceArray.msg"):
        assert filecmp.cmp(ROOT / "msg" / name, ROOT / "interfaces" / "fast3dis_msgs" / "msg" / name, shallow=False)


def test_build_script_is_idempotent():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_interfaces.py"), "--venv", sys.prefix],
                       capture_output=True, text=True, timeout=120, env=ros_env(0))
    assert r.returncode == 0, r.stderr
    assert "already importable, skipped" in r.stdout


@pytest.mark.timeout(60)
def test_dds_roundtrip_between_processes():
    from fast3dis_msgs.msg import InstanceArray
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from tf2_msgs.msg import TFMessage

    dom = unique_domain_id()
    got: dict = {}
    with RosContext(dom) as ctx, RosProcess(["-c", PUBLISHER, "40"], dom, name="iface_pub") as pub:
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        ctx.node.create_subscription(InstanceArray, "/iface_test/instances", lambda m: got.setdefault("i", m), qos)
        ctx.node.create_subscription(TFMessage, "/tf", lambda m: got.setdefault("tf", m), qos)
        ok = ctx.spin_until(lambda: ("i" in got and "tf" in got) or not pub.alive(), timeout=45)
        assert ok and "i" in got and "tf" in got, f"nothing received; publisher output:\n{pub.output()}"

    arr = got["i"]
    assert arr.header.frame_id == "map" and (arr.header.stamp.sec, arr.header.stamp.nanosec) == (12, 345)
    assert [i.id for i in arr.instances] == [10, 11, 12]
    i2 = arr.instances[2]
    assert i2.score == pytest.approx(0.75) and i2.num_points == 201 and i2.views_seen == 4
    assert (i2.centroid.x, i2.centroid.y, i2.centroid.z) == (2.0, 2.0, -3.5)
    assert (i2.bbox_min.x, i2.bbox_max.z) == (-1.0, 5.5)
    (t,) = got["tf"].transforms
    assert t.header.frame_id == "map" and t.child_frame_id == "cam0_optical_frame" and t.header.stamp.sec == 7
    assert (t.transform.translation.z, t.transform.rotation.x, t.transform.rotation.w) == (0.3, 0.6, 0.8)


def test_build_failure_shows_cmake_log(tmp_path, monkeypatch, capsys):
    """A broken interface package fails loudly: non-zero exit naming the step, cmake output shown."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_interfaces", ROOT / "scripts" / "build_interfaces.py")
    bi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bi)
    pkg = tmp_path / "src" / "broken_msgs"
    (pkg / "msg").mkdir(parents=True)
    (pkg / "msg" / "Bad.msg").write_text("no_such_pkg/NoSuchType field\n")
    (pkg / "package.xml").write_text((ROOT / "interfaces" / "fast3dis_msgs" / "package.xml").read_text()
                                     .replace("<name>fast3dis_msgs</name>", "<name>broken_msgs</name>"))
    (pkg / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(broken_msgs)\nfind_package(ament_cmake REQUIRED)\n"
        "find_package(rosidl_default_generators REQUIRED)\nfind_package(no_such_pkg REQUIRED)\n"
        "rosidl_generate_interfaces(${PROJECT_NAME} \"msg/Bad.msg\")\nament_package()\n")
    monkeypatch.setattr(bi, "SRC", tmp_path / "src")
    monkeypatch.setattr(bi, "BUILD", tmp_path / "build")
    prefix = tmp_path / "prefix"  # never installs into the real venv
    with pytest.raises(SystemExit) as e:
        _build_into(bi, prefix, "broken_msgs")
    assert "broken_msgs: cmake configure failed" in str(e.value)
    assert "no_such_pkg" in capsys.readouterr().err


def _build_into(bi, prefix, pkg):
    # configure against the venv but install elsewhere: patch venv_env/cmake prefix only for install
    orig_run = bi.run_logged

    def run_logged(cmd, logf, env, cwd):
        cmd = [c.replace(f"-DCMAKE_INSTALL_PREFIX={sys.prefix}", f"-DCMAKE_INSTALL_PREFIX={prefix}") for c in cmd]
        return orig_run(cmd, logf, env, cwd)

    bi.run_logged = run_logged
    try:
        return bi.build(Path(sys.prefix), pkg, 1)
    finally:
        bi.run_logged = orig_run
