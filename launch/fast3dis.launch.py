"""Launch the fast3dis node (and optionally a bag replay and RViz).

  ros2 launch fast3dis_ros fast3dis.launch.py cameras:="[front,left,right]" \
      weights:=/models/DA3-LARGE checkpoint:=/models/fast3dis_large
  ros2 launch fast3dis_ros fast3dis.launch.py bag:=run.mcap use_sim_time:=true rviz:=true

Arguments override the values of ``config`` (default: the installed config/fast3dis.yaml).

``bag:=`` is played with ``ros2 bag play --clock`` where rosbag2 is installed, else with the package's
pure-Python player ``fast3dis-play`` (same topics, recorded QoS and stamps, /clock), which waits until the
node subscribes to the cameras' image and CameraInfo topics before it starts.

``large_clouds_profile`` (default true) points FASTDDS_DEFAULT_PROFILES_FILE (Fast DDS 3, Kilted; the
older FASTRTPS_DEFAULT_PROFILES_FILE is deprecated there and not set) at the installed
config/fastdds_large_clouds.xml for every process this file starts (node, bag replay, RViz): a 64 MB
shared-memory segment, so the multi-MB clouds reach local subscribers through shared memory instead of
UDP loopback (docs/BENCHMARKS.md section 13). It replaces a profile file set in the environment; pass
``large_clouds_profile:=false`` to keep yours. Processes started elsewhere that publish large messages
(camera drivers: 640x480 rgb8 is 0.9 MB) need the same variable; subscribers need it only for what they
publish themselves (the gain is on the sending side; README, "Large clouds over DDS").
"""

import importlib.util
import os
import shutil

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, ExecuteProcess, OpaqueFunction, RegisterEventHandler,
                            SetEnvironmentVariable)
from launch.event_handlers import OnProcessExit, OnProcessIO
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _parse_list(text):
    """'[a,b]' / 'a,b' / "['a', 'b']" -> ['a', 'b']"""
    return [c.strip().strip("'\"") for c in text.strip().strip("[]").split(",") if c.strip()]


def _node(context, *args, **kwargs):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    overrides = {"use_sim_time": get("use_sim_time").lower() in ("1", "true", "yes")}
    if get("cameras"):
        overrides["cameras"] = _parse_list(get("cameras"))
    for name in ("weights", "checkpoint", "device", "model_size"):
        if get(name):
            overrides[name] = get(name)
    overrides["autostart"] = get("autostart").lower() in ("1", "true", "yes")
    node = Node(
        package="fast3dis_ros",
        executable="fast3dis_node",
        name="fast3dis",
        namespace=get("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[get("config"), overrides],
        arguments=["--ros-args", "--log-level", get("log_level")],
    )
    actions = [node, *_fail_when_node_cannot_start(node)]
    bag = get("bag")
    if bag:
        actions.append(_bag_player(bag, get("bag_rate"), _input_topics(get("config"), overrides, get("namespace"))))
    return actions


def _fail_when_node_cannot_start(node):
    """Event handlers that make the launch fail (exit status 1) with the node's own message when the node
    exits with an error, e.g. ``cannot start: invalid parameters: cameras has duplicates: [...]``, instead of
    the launch idling on with no node."""
    reasons, last = [], [""]

    def remember(event):
        for line in event.text.decode(errors="replace").splitlines():
            if "cannot start:" in line:
                reasons.append(line.split("cannot start:", 1)[1].strip())
            elif line.strip():
                last[0] = line.strip()

    def on_exit(event, context):
        if event.returncode is not None and event.returncode > 0:
            why = reasons[0] if reasons else (last[0] or "see its log above")
            raise RuntimeError(f"fast3dis node failed to start (exit code {event.returncode}): {why}")

    return [RegisterEventHandler(OnProcessIO(target_action=node, on_stdout=remember, on_stderr=remember)),
            RegisterEventHandler(OnProcessExit(target_action=node, on_exit=on_exit))]


def have_ros2_bag() -> bool:
    """rosbag2's CLI verb is installed (a ROS 2 install; not in the PyPI venv)."""
    return shutil.which("ros2") is not None and importlib.util.find_spec("ros2bag") is not None


def _input_topics(config, overrides, namespace):
    """The node's image + CameraInfo topics (from the parameter file and the overrides), for the player's
    ``--wait-for``. Relative templates resolve in the node's namespace."""
    params = {}
    try:
        with open(config) as f:
            doc = yaml.safe_load(f) or {}
        for key in ("/**", "fast3dis", "/fast3dis", "/**/fast3dis"):
            params.update((doc.get(key) or {}).get("ros__parameters", {}))
    except (OSError, yaml.YAMLError):
        pass
    params.update(overrides)
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    topics = []
    for cam in params.get("cameras", []):
        for key, default in (("image_topic", "/{camera}/image_raw"), ("camera_info_topic", "/{camera}/camera_info")):
            t = params.get(key, default).format(camera=cam)
            topics.append(t if t.startswith("/") else f"{ns}/{t}")
    return topics


def _bag_player(bag, rate, wait_for):
    if have_ros2_bag():
        cmd = ["ros2", "bag", "play", bag, "--clock"]
        if rate and rate != "1.0":
            cmd += ["--rate", rate]
        return ExecuteProcess(cmd=cmd, output="screen")
    args = [bag, "--rate", rate or "1.0"]
    if wait_for:
        args += ["--wait-for", *wait_for]
    return Node(package="fast3dis_ros", executable="fast3dis-play", name="fast3dis_play", output="screen",
                arguments=args)


def generate_launch_description():
    share = get_package_share_directory("fast3dis_ros")
    dds_profile = os.path.join(share, "config", "fastdds_large_clouds.xml")
    use_dds_profile = IfCondition(LaunchConfiguration("large_clouds_profile"))
    return LaunchDescription([
        DeclareLaunchArgument("cameras", default_value="",
                              description="Camera names, e.g. [front,left,right] (empty: from config)"),
        DeclareLaunchArgument("config", default_value=os.path.join(share, "config", "fast3dis.yaml"),
                              description="Parameter YAML of the node"),
        DeclareLaunchArgument("weights", default_value="",
                              description="DA3 weights: local folder or hub id (empty: from config)"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="FAST3DIS checkpoint folder (empty: from config)"),
        DeclareLaunchArgument("model_size", default_value="",
                              description="tiny|small|base|large|giant (empty: from config)"),
        DeclareLaunchArgument("device", default_value="", description="auto|cpu|cuda (empty: from config)"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="Use /clock (set true when replaying a bag)"),
        DeclareLaunchArgument("bag", default_value="",
                              description="rosbag2 to replay with `ros2 bag play --clock`, or fast3dis-play where "
                                          "rosbag2 is not installed (empty: none)"),
        DeclareLaunchArgument("bag_rate", default_value="1.0", description="Replay rate of the bag"),
        DeclareLaunchArgument("rviz", default_value="false", description="Start RViz with rviz/fast3dis.rviz"),
        DeclareLaunchArgument("namespace", default_value="",
                              description="Namespace of the node: inputs ({camera}/image_raw) and outputs follow it"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="Configure and activate the lifecycle node at start (false: wait for "
                                          "a lifecycle manager or `ros2 lifecycle set /fast3dis configure`)"),
        DeclareLaunchArgument("log_level", default_value="info", description="Log level of the node"),
        DeclareLaunchArgument("large_clouds_profile", default_value="true",
                              description="Start the node, bag replay and RViz with the Fast DDS profile "
                                          "config/fastdds_large_clouds.xml (64 MB shared-memory segment per "
                                          "process, for multi-MB clouds); replaces a profile file set in the "
                                          "environment. Processes started elsewhere that publish large "
                                          "messages (camera drivers) need the same variable"),
        # before any process is started, so the node (and bag replay, RViz) inherit them
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", dds_profile, condition=use_dds_profile),
        OpaqueFunction(function=_node),
        Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            arguments=["-d", os.path.join(share, "rviz", "fast3dis.rviz")],
            parameters=[{"use_sim_time": LaunchConfiguration("use_sim_time")}],
            condition=IfCondition(LaunchConfiguration("rviz")),
            output="log",
        ),
    ])
