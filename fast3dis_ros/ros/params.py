"""Parameters of the fast3dis node: one table with defaults, descriptions, ranges and validation.

``config/fast3dis.yaml`` holds the same defaults (a test keeps both in step). ``declare_parameters``
declares every entry with a ``ParameterDescriptor`` (description, integer/float range, read-only
for those that only take effect at start-up); ``validate`` gives the reason a value is rejected,
used both at start-up and by the node's set-parameters callback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fast3dis_ros.pipeline.fusion import DEFAULT_INSTANCE_VOTE_WEIGHT, DEFAULT_SUPPORT_WINDOWS

__all__ = ["ParamSpec", "PARAMS", "MODEL_SIZES", "DEVICES", "validate", "validate_all", "declare_parameters",
           "read_parameters", "load_yaml_defaults", "NODE_NAME"]

NODE_NAME = "fast3dis"
MODEL_SIZES = ("tiny", "small", "base", "large", "giant")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    range: tuple[float, float] | None = None  # inclusive
    choices: tuple[str, ...] | None = None
    read_only: bool = True  # True: takes effect at start-up only
    extra: str = ""  # additional_constraints text


PARAMS: list[ParamSpec] = [
    # inputs
    ParamSpec("cameras", ["cam0", "cam1", "cam2"],
              "Camera names, in view order. Each camera <c> gives topics from the templates below and "
              "the TF frame <c>_optical_frame.", extra="non-empty list of unique names"),
    ParamSpec("image_topic", "{camera}/image_raw", "Image topic template; {camera} is replaced by the name. "
              "Relative names follow the node's namespace (namespace robot1: /robot1/cam0/image_raw).",
              extra="must contain {camera}"),
    ParamSpec("camera_info_topic", "{camera}/camera_info", "CameraInfo topic template (relative: in the node's "
              "namespace).", extra="must contain {camera}"),
    ParamSpec("camera_map", "",
              "Streams whose namespace differs from the camera name, as <stream>=<camera> pairs separated by "
              "commas (e.g. 'robot/front=front,robot/left=left'): camera front then reads robot/front/image_raw "
              "etc. Same rule as fast3dis-eval --camera-map (fast3dis_ros/data/camera_identity.py). Empty: the "
              "topics use the camera names.", extra="<stream>=<camera>[,...], cameras from 'cameras'"),
    ParamSpec("use_compressed", False,
              "Read sensor_msgs/CompressedImage (jpeg/png) on compressed_topic instead of Image on image_topic "
              "(one transport per camera, as fast3dis-eval --image-transport: both would give every frame twice)."),
    ParamSpec("compressed_topic", "{camera}/image_raw/compressed", "CompressedImage topic template.",
              extra="must contain {camera}"),
    ParamSpec("sync_slop", 0.05, "Approximate-time sync: max stamp spread within a frame set [s].", (0.0001, 5.0)),
    ParamSpec("sync_queue_size", 10, "Approximate-time sync: frames kept per camera while matching.", (1, 1000)),
    ParamSpec("sync_queue_max_mb", 512.0, "Approximate-time sync: image data kept while matching, all cameras "
              "together [MiB]; beyond it the oldest frame of the camera holding the most is dropped (counted "
              "queue_bytes_overflow).", (1.0, 65536.0)),
    ParamSpec("time_jump_threshold", 1.0, "A stamp more than this far back, or this far ahead plus the time "
              "elapsed since the newest frame, leaves the timeline [s].", (0.01, 3600.0)),
    ParamSpec("time_jump_confirm", 3, "Frames that must agree on a new timeline before it is adopted (a bag "
              "loop, a sim-time reset); frames off the timeline until then are held, and dropped as "
              "stamp_outlier when the old timeline goes on instead. 1: adopt every jump at once.", (1, 100)),
    ParamSpec("time_jump_policy", "reset_map", "What an adopted backward time jump does: 'reset_map' (sync, "
              "window and map start over) or 'keep_map' (sync and window start over, the map is kept, e.g. "
              "a bag that loops over the same scene).", choices=("reset_map", "keep_map")),
    ParamSpec("min_image_side", 16, "Images whose shorter side is below this are rejected (image_too_small) "
              "[px].", (1, 4096)),
    ParamSpec("max_image_aspect", 8.0, "Images whose long side / short side exceeds this are rejected "
              "(image_aspect).", (1.0, 1000.0)),
    ParamSpec("max_distortion_px", 2.0, "CameraInfo K is refused when its distortion model moves the image "
              "border by more than this (images are not undistorted) [px].", (0.0, 1e6)),
    # windowing
    ParamSpec("sync_backend", "fast3dis", "Frame-set grouping: 'fast3dis' (the package's ApproximateTimeSync: same "
              "matching rule as message_filters, plus drop counts by reason and a reset when time jumps back, "
              "e.g. a looping bag) or 'message_filters' (message_filters.ApproximateTimeSynchronizer; its "
              "discards are reported as 'unmatched' only).",
              choices=("fast3dis", "message_filters")),
    ParamSpec("window_size", 8, "Frame sets per inference window (views = window_size x cameras).", (1, 512)),
    ParamSpec("stride", 4, "A new window every `stride` frame sets (stride <= window_size: overlapping windows "
              "share frame sets, which aligns them to the map).", (1, 512), extra="stride <= window_size"),
    # model
    ParamSpec("process_long_edge", 0, "Long image edge at which the network runs [px] (multiple of 14); "
              "0: the model config's process_res (504 for the DA3 models, 70 for tiny).",
              (0, 4096), extra="0 or a multiple of 14 >= 28"),
    ParamSpec("model_size", "tiny", "DA3 backbone size when no checkpoint config says otherwise.",
              choices=MODEL_SIZES),
    ParamSpec("weights", "", "DA3 weights: a local folder (model.safetensors + config.json) or a hub id. "
              "Empty: none (random backbone)."),
    ParamSpec("checkpoint", "bundled", "FAST3DIS checkpoint folder (LoRA + heads + config). 'bundled': the small "
              "tiny checkpoint shipped in the package (trained on synthetic rooms only). Empty with model_size "
              "tiny: a random tiny model (outputs are meaningless; for tests and plumbing)."),
    ParamSpec("seed", 0, "Seed of the random tiny model (when no checkpoint is given).", (0, 2**31 - 1)),
    ParamSpec("backend", "torch", "Engine of the network: torch (checkpoint, device, compile...), onnxruntime "
              "(CPU) or tensorrt (CUDA) on `engine` (fast3dis-export; README 'Deploying on a Jetson').",
              choices=("torch", "onnxruntime", "tensorrt")),
    ParamSpec("engine", "", "Exported model for backend onnxruntime (.onnx) or tensorrt (engine file); its "
              "window shape (views, processing size) is fixed at export."),
    ParamSpec("device", "auto", "Torch device: auto (cuda if available), cpu or cuda.", choices=DEVICES),
    ParamSpec("cuda_graphs", True, "On CUDA, capture the whole forward once per window shape and replay it "
              "(same outputs; 8-view DA3-Large 91 ms instead of 118 ms eager on an H100). Costs one graph's activation "
              "memory per window shape (at most 2 kept)."),
    ParamSpec("compile", False, "torch.compile the network for inference (fused kernels, LoRA folded into the "
              "weights, bf16 DPT head): 8-view DA3-Large 44 ms instead of 91 ms on an H100, outputs move at rounding "
              "level (depth <= 0.08 %), and the first window of each shape compiles for ~40 s."),
    ParamSpec("queue_depth", 2, "Engine input queue length; when full the oldest window is dropped (counted).",
              (1, 64)),
    # post-processing / map
    ParamSpec("score_threshold", 0.5, "Min instance score (objectness x mask quality) to keep an instance.",
              (0.0, 1.0), read_only=False),
    ParamSpec("conf_threshold", 0.0, "Min DA3 depth confidence to lift a pixel into the cloud.", (0.0, 1000.0),
              read_only=False),
    ParamSpec("voxel_size", 0.02, "Voxel size of the running map (map units: metres when metric).", (1e-4, 10.0)),
    ParamSpec("max_map_points", 1_000_000, "Cap on running map points (oldest voxels dropped first).",
              (1000, 50_000_000)),
    ParamSpec("max_points_per_view", 20_000, "Fusion lifts at most about this many pixels per view (a coarser "
              "pixel stride at high processing resolution keeps fusion off the latency path); 0: no cap.",
              (0, 10_000_000), read_only=False),
    ParamSpec("fusion_threads", 2, "Threads fusion uses to lift, look up and sum a window's points (numpy "
              "releases the GIL there; the window cloud comes out sooner). 1: the engine thread only.", (1, 16)),
    ParamSpec("camera_frame", "{camera}_optical_frame",
              "TF child frame template of the estimated camera poses (map -> camera_frame).",
              extra="must contain {camera}"),
    ParamSpec("publish_tf", True, "Publish the estimated camera poses on /tf.", read_only=False),
    ParamSpec("map_frame", "map", "Fixed frame of the outputs (the first window's reference).",
              extra="non-empty, no leading '/'"),
    ParamSpec("use_known_intrinsics", True, "Give CameraInfo K to the network (else it estimates intrinsics).",
              read_only=False),
    ParamSpec("use_known_poses", False,
              "Give camera poses from TF to the network: T known_pose_frame <- image frame_id at the image stamp "
              "(tf2_ros Buffer + TransformListener). Needs K too; a window "
              "uses poses only when every view has one. The map then coincides with known_pose_frame (the "
              "node publishes known_pose_frame -> map_frame when they differ) and camera poses are not "
              "re-published under a frame that is already a pose input (it would get a second TF parent): "
              "set camera_frame to other names to get the fused poses on TF as well."),
    ParamSpec("known_pose_frame", "world",
              "Fixed frame of the input TF tree in which known camera poses are looked up (use_known_poses). "
              "May equal map_frame (e.g. fast3dis-synth bags: map -> <camera>_optical_frame).",
              extra="non-empty, no leading '/'"),
    ParamSpec("use_rig_extrinsics", False,
              "Use the static TF rig_frame <- image frame_id of every camera (its mounting on the robot, "
              "/tf_static) in fusion: each window's metric scale from the known vs predicted distances between "
              "the cameras of one frame set, and those cameras put back on the known rig. The map is then in "
              "metres without odometry."),
    ParamSpec("rig_frame", "base_link", "Frame the cameras' static transforms hang off (use_rig_extrinsics).",
              extra="non-empty, no leading '/'"),
    ParamSpec("condition_on_known_poses", True,
              "With use_known_poses: also condition the network on the poses (DA3's camera encoder). False: "
              "fusion alone places every window on them (scale from the rig, else from the fit of the "
              "predicted cameras), for checkpoints trained without pose conditioning."),
    ParamSpec("link_2d", True,
              "Link window instances to map ids by per-pixel mask overlap on the views shared with earlier "
              "windows (exact whatever the depth and poses), then by voxel overlap; split / merge decisions "
              "are counted in the diagnostics."),
    ParamSpec("instance_vote_weight", DEFAULT_INSTANCE_VOTE_WEIGHT,
              "Weight of a window's instance vote on a map voxel against a background vote, per point: an "
              "object one window's mask missed keeps its voxels (BENCHMARKS 30: map-cloud AP50 8.8 -> 11.1 on "
              "validation scenes, network masks).", (0.01, 1000.0)),
    ParamSpec("support_windows", DEFAULT_SUPPORT_WINDOWS,
              "An instance's published score is its tracker score x min(1, windows that labelled it / this): "
              "objects seen once rank below objects seen again. 0: the tracker score alone.", (0, 1000)),
    # outputs
    ParamSpec("publish_window_cloud", True, "Also publish each window's own cloud on ~/window_cloud.",
              read_only=False),
    ParamSpec("map_publish_period", 0.0, "Least time between two running-map messages on ~/instances_cloud [s]; "
              "0: one per window. The window cloud, instances and markers still go out for every window; a map "
              "held back is replaced by newer ones and the newest goes out when the period is over.",
              (0.0, 3600.0), read_only=False),
    ParamSpec("output_qos_depth", 2, "History depth of the reliable outputs. ~/window_cloud is volatile; the map, "
              "instances and markers are transient local (a late subscriber gets the newest at once).", (1, 100)),
    ParamSpec("diagnostics_period", 1.0, "Period of /diagnostics [s].", (0.05, 60.0), read_only=False),
    ParamSpec("shutdown_timeout", 5.0, "On SIGINT / SIGTERM: how long the node waits for a window in "
              "inference to abort before it leaves anyway (exit 0 either way) [s].", (0.1, 600.0),
              read_only=False),
    # lifecycle (fast3dis_node is a managed node; ros/lifecycle.py)
    ParamSpec("autostart", True, "Lifecycle node: configure and activate at start (behaves like a plain node); "
              "false: wait in 'unconfigured' for a lifecycle manager or `ros2 lifecycle set`."),
    ParamSpec("warmup_width", 640, "Configure warms the model with one window of window_size x cameras views of "
              "warmup_width x warmup_height (first CUDA graph capture; compile when on). 0: no warm-up.",
              (0, 8192)),
    ParamSpec("warmup_height", 480, "Height of the warm-up images [px] (see warmup_width).", (0, 8192)),
]

_BY_NAME = {p.name: p for p in PARAMS}


def _type_ok(spec: ParamSpec, value) -> bool:
    d = spec.default
    if isinstance(d, bool):
        return isinstance(value, bool)
    if isinstance(d, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(d, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(d, str):
        return isinstance(value, str)
    if isinstance(d, list):
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return True


def validate(name: str, value, others: dict | None = None) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name`` (None when it is)."""
    spec = _BY_NAME.get(name)
    if spec is None:
        return None  # not ours (e.g. use_sim_time)
    if not _type_ok(spec, value):
        return f"{name} must be of type {type(spec.default).__name__}, got {type(value).__name__} ({value!r})"
    if spec.range is not None and not (spec.range[0] <= value <= spec.range[1]):
        return f"{name}={value} outside [{spec.range[0]}, {spec.range[1]}]"
    if spec.choices is not None and value not in spec.choices:
        return f"{name}='{value}' not one of {list(spec.choices)}"
    others = others or {}
    if name == "cameras":
        if len(value) == 0:
            return "cameras must not be empty"
        if len(set(value)) != len(value):
            return f"cameras has duplicates: {list(value)}"
        bad = [c for c in value if not _NAME.fullmatch(c)]
        if bad:
            return (f"camera names must start with a letter and hold only [A-Za-z0-9_] (they become topic "
                    f"names and frame ids): {bad}")
    if name in ("image_topic", "camera_info_topic", "compressed_topic", "camera_frame"):
        if "{camera}" not in value:
            return f"{name} '{value}' must contain '{{camera}}'"
        names, why = _expand(name, value, others.get("cameras") or ["cam"])
        if why:
            return why
        for n in names:
            why = _topic_reason(n) if name != "camera_frame" else _frame_reason(n)
            if why:
                return f"{name} '{value}' gives '{n}': {why}"
    if name == "camera_map" and (value or others.get("cameras")):
        from ..data.camera_identity import camera_streams

        try:
            camera_streams(value, others.get("cameras") or [])
        except ValueError as e:
            return f"camera_map: {e}"
    if name in ("map_frame", "known_pose_frame"):
        why = _frame_reason(value)
        if why:
            return f"{name} '{value}': {why}"
    if name == "process_long_edge" and value != 0 and (value % 14 or value < 28):
        return f"process_long_edge={value} must be 0 or a multiple of 14 >= 28 (DA3 patch size)"
    if name in ("stride", "window_size"):
        stride = value if name == "stride" else others.get("stride")
        win = value if name == "window_size" else others.get("window_size")
        if stride is not None and win is not None and stride > win:
            return f"stride={stride} > window_size={win} (windows would skip frame sets)"
    return None


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_FRAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")


def _expand(name: str, template: str, cameras) -> tuple[list[str], str | None]:
    """The names a ``{camera}`` template gives for ``cameras`` (or why it cannot be expanded)."""
    try:
        return [template.format(camera=c) for c in cameras], None
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        return [], (f"{name} '{template}' is not a valid template ({type(e).__name__}: {e}); the only "
                    "placeholder is {camera}")


def _topic_reason(topic: str) -> str | None:
    from rclpy.exceptions import InvalidTopicNameException
    from rclpy.validate_topic_name import validate_topic_name

    try:
        validate_topic_name(topic)
    except InvalidTopicNameException as e:
        return str(e).splitlines()[0]
    return None


def _frame_reason(frame: str) -> str | None:
    """Why ``frame`` is not a valid tf2 frame id (non-empty, no leading '/', no spaces), or None."""
    if not _FRAME.fullmatch(frame or ""):
        return "a frame id must be non-empty, must not start with '/' and may only hold [A-Za-z0-9_./-]"
    return None


def validate_all(values: dict) -> list[str]:
    """Every reason the parameter set is refused, each once (a pair rule such as stride <= window_size is
    found from both of its parameters)."""
    return list(dict.fromkeys(r for n, v in values.items() if (r := validate(n, v, values))))


def declare_parameters(node) -> None:
    """Declare every parameter with its descriptor (ranges, constraints) on ``node``.

    Start-up-only parameters are not declared read-only: a lifecycle node takes them while unconfigured,
    and the node's set-parameters callback refuses them at run time with the reason
    (``ros/runtime_params.py``); their constraints text says "start-up only"."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    for p in PARAMS:
        constraints = p.extra or (f"one of {list(p.choices)}" if p.choices else "")
        if p.read_only:
            constraints = (constraints + "; " if constraints else "") + "start-up only (set before configure)"
        desc = ParameterDescriptor(name=p.name, description=p.description, read_only=False,
                                   additional_constraints=constraints)
        if p.range is not None:
            if isinstance(p.default, int) and not isinstance(p.default, bool):
                desc.integer_range = [IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]), step=0)]
            else:
                desc.floating_point_range = [FloatingPointRange(from_value=float(p.range[0]),
                                                                to_value=float(p.range[1]), step=0.0)]
        node.declare_parameter(p.name, p.default, desc)


def read_parameters(node) -> dict:
    out = {}
    for p in PARAMS:
        v = node.get_parameter(p.name).value
        if isinstance(p.default, list):
            v = list(v)
        elif isinstance(p.default, float):
            v = float(v)
        out[p.name] = v
    return out


def render_yaml() -> str:
    """config/fast3dis.yaml as generated from ``PARAMS`` (descriptions as comments)."""
    import json
    import textwrap

    lines = ["# Defaults of the fast3dis node. Generated from fast3dis_ros/ros/params.py (which also holds the",
             "# ranges); test/test_params.py checks both agree. Regenerate:",
             "#   python -c 'from fast3dis_ros.ros.params import render_yaml; print(render_yaml(), end=\"\")' "
             "> config/fast3dis.yaml",
             "# Use: --ros-args --params-file config/fast3dis.yaml",
             "/**:", "  ros__parameters:"]
    for p in PARAMS:
        doc = p.description
        if p.range:
            doc += f" Range [{p.range[0]}, {p.range[1]}]."
        if p.choices:
            doc += f" One of {list(p.choices)}."
        doc += "" if p.read_only else " Can be changed at run time."
        lines += ["    # " + ln for ln in textwrap.wrap(doc, 100)]
        v = p.default
        if isinstance(v, bool):
            vs = "true" if v else "false"
        elif isinstance(v, (str, list)):
            vs = json.dumps(v).replace('", "', '", "')
        else:
            vs = repr(v)
        lines.append(f"    {p.name}: {vs}")
    return "\n".join(lines) + "\n"


def load_yaml_defaults(path) -> dict:
    """The ``ros__parameters`` of the node in a ROS 2 parameter YAML (``/**`` or the node name)."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    for key in (f"/**/{NODE_NAME}", NODE_NAME, f"/{NODE_NAME}", "/**"):
        if key in doc and "ros__parameters" in doc[key]:
            return dict(doc[key]["ros__parameters"])
    raise KeyError(f"{path}: no '{NODE_NAME}:' or '/**:' section with ros__parameters")
