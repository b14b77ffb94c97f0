"""Node parameters: table <-> config YAML, validation, descriptors, run-time callback, start-up errors;
plus the static launch/rviz files (the launch package itself is not installable here)."""

import ast
import subprocess
import sys

import pytest

pytest.importorskip("rclpy")

from ros_helpers import ROOT, in_process_node, ros_env, unique_domain_id  # noqa: E402

from fast3dis_ros.ros import params as P  # noqa: E402


def test_yaml_matches_table():
    text = (ROOT / "config" / "fast3dis.yaml").read_text()
    assert text == P.render_yaml(), "config/fast3dis.yaml is stale: regenerate it (see its header)"
    d = P.load_yaml_defaults(ROOT / "config" / "fast3dis.yaml")
    assert d == {p.name: p.default for p in P.PARAMS}
    assert P.validate_all(d) == []


@pytest.mark.parametrize("name,value,pattern", [
    ("stride", 9, "stride=9 > window_size=8"),
    ("window_size", 0, "outside"),
    ("score_threshold", 1.5, "outside"),
    ("score_threshold", "high", "must be of type float"),
    ("cameras", [], "must not be empty"),
    ("cameras", ["a", "a"], "duplicates"),
    ("cameras", ["a b"], "A-Za-z0-9_"),
    ("image_topic", "/image_raw", "must contain"),
    ("model_size", "huge", "not one of"),
    ("device", "tpu", "not one of"),
    ("process_long_edge", 500, "multiple of 14"),
    ("map_frame", "/map", "must be non-empty"),
    ("use_compressed", 1, "must be of type bool"),
])
def test_validate_rejects_with_reason(name, value, pattern):
    defaults = {p.name: p.default for p in P.PARAMS}
    reason = P.validate(name, value, {**defaults, name: value})
    assert reason is not None and pattern in reason, reason


def test_validate_accepts_defaults_and_ints_for_floats():
    assert P.validate("sync_slop", 1) is None
    assert P.validate("process_long_edge", 518) is None
    assert P.validate("use_sim_time", True) is None  # not ours


@pytest.fixture
def node():
    yield from in_process_node()


def test_descriptors_and_runtime_callback(node):
    from rclpy.parameter import Parameter

    d = node.describe_parameters(["window_size", "score_threshold", "cameras"])
    assert d[0].integer_range[0].from_value == 1 and d[0].integer_range[0].to_value == 512
    assert "start-up only" in d[0].additional_constraints  # refused at run time by the callback, with a reason
    assert d[1].floating_point_range[0].to_value == 1.0 and "start-up only" not in d[1].additional_constraints
    assert "Camera names" in d[2].description
    ok = node.set_parameters([Parameter("score_threshold", value=0.25)])[0]
    assert ok.successful and node.runner.fusion.min_score == 0.25 and node.predictor.score_threshold == 0.25
    bad = node.set_parameters([Parameter("score_threshold", value=3.0)])[0]
    assert not bad.successful and bad.reason
    ro = node.set_parameters([Parameter("window_size", value=4)])[0]
    assert not ro.successful and "window_size is start-up only" in ro.reason and "restart the node" in ro.reason
    assert node.set_parameters([Parameter("publish_window_cloud", value=False)])[0].successful
    assert node.p["publish_window_cloud"] is False
    assert node.get_parameter("use_sim_time").value is False


def _run_node(*ros_args, timeout=60):
    return subprocess.run([sys.executable, "-m", "fast3dis_ros.ros.node", "--ros-args", *ros_args],
                          capture_output=True, text=True, timeout=timeout, env=ros_env(unique_domain_id()),
                          cwd=str(ROOT))


def test_start_up_rejects_inconsistent_parameters():
    r = _run_node("-p", "window_size:=2", "-p", "stride:=3")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "stride=3 > window_size=2" in r.stdout + r.stderr


def test_start_up_rejects_out_of_range():
    r = _run_node("-p", "queue_depth:=0")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "queue_depth" in r.stdout + r.stderr


def test_start_up_needs_checkpoint_for_big_models():
    r = _run_node("-p", "model_size:=large")
    assert r.returncode == 2 and "needs a FAST3DIS checkpoint" in r.stdout + r.stderr, r.stdout + r.stderr


# ----------------------------------------------------------------------------- launch + rviz files
def _launch_args():
    tree = ast.parse((ROOT / "launch" / "fast3dis.launch.py").read_text())
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == \
                "DeclareLaunchArgument":
            names[node.args[0].value] = {kw.arg: kw.value for kw in node.keywords}
    return tree, names


def test_launch_file_declares_arguments():
    tree, args = _launch_args()
    assert {"cameras", "config", "weights", "checkpoint", "use_sim_time", "bag", "rviz"} <= set(args)
    for name, kws in args.items():
        assert "description" in kws, f"launch argument {name} has no description"
    funcs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in funcs
    src = (ROOT / "launch" / "fast3dis.launch.py").read_text()
    assert "'fast3dis_node'" in src or '"fast3dis_node"' in src
    assert "--clock" in src and "rviz2" in src


def test_rviz_config_parses():
    import yaml

    cfg = yaml.safe_load((ROOT / "rviz" / "fast3dis.rviz").read_text())
    displays = cfg["Visualization Manager"]["Displays"]
    by_class = {d["Class"]: d for d in displays}
    by_topic = {d["Topic"]["Value"]: d for d in displays if "Topic" in d}
    pc = by_topic["/fast3dis/instances_cloud"]
    assert pc["Class"] == "rviz_default_plugins/PointCloud2" and pc["Enabled"]
    assert pc["Color Transformer"] == "Intensity" and pc["Channel Name"] == "instance"
    assert by_topic["/fast3dis/markers"]["Class"] == "rviz_default_plugins/MarkerArray"
    assert by_topic["/fast3dis/window_cloud"]["Channel Name"] == "rgb"
    assert "rviz_default_plugins/TF" in by_class
    assert cfg["Visualization Manager"]["Global Options"]["Fixed Frame"] == "map"


def test_package_xml():
    from catkin_pkg.package import parse_package

    pkg = parse_package(str(ROOT / "package.xml"))
    pkg.validate()
    assert pkg.package_format == 3 and pkg.name == "fast3dis_ros"
    assert pkg.get_build_type() == "ament_python"
    deps = {d.name for d in pkg.exec_depends}
    assert {"rclpy", "sensor_msgs", "geometry_msgs", "std_msgs", "visualization_msgs", "diagnostic_msgs",
            "tf2_ros", "tf2_msgs", "message_filters", "launch", "launch_ros", "rosgraph_msgs", "rosidl_runtime_py",
            "fast3dis_msgs"} <= deps
    # declared only where code uses it: images are converted by the package's numpy converters (no
    # cv_bridge); sensor_msgs_py is the tests' reference PointCloud2 reader
    assert "cv_bridge" not in deps and "sensor_msgs_py" not in deps
    assert {"launch_testing", "launch_testing_ros", "sensor_msgs_py"} <= {d.name for d in pkg.test_depends}
    iface = parse_package(str(ROOT / "interfaces" / "fast3dis_msgs" / "package.xml"))
    iface.validate()
    assert "rosidl_interface_packages" in [g.name for g in iface.member_of_groups]
