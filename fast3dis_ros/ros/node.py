"""fast3dis node: camera images in, instance-labelled map out.

Thin by design (docs/ARCHITECTURE.md): parameters in, frames to ``PipelineRunner``, messages out.

Inputs (sensor-data QoS), per camera ``c`` in ``cameras``:
  ``image_topic`` (sensor_msgs/Image) or, with ``use_compressed``, ``compressed_topic`` (CompressedImage)
  instead (one transport per camera: both would hand every frame over twice), ``camera_info_topic``
  (CameraInfo); ``{camera}`` in the templates is the camera's
  stream from ``camera_map`` (``robot/front=front``; ``data/camera_identity.py``), else its name.
Outputs (reliable, depth ``output_qos_depth``; the map, instances and markers transient local, i.e. latched;
every entity takes ``qos_overrides`` parameters), all in ``map_frame``, stamped with the window's newest
frame set stamp:
  ``~/instances_cloud`` (PointCloud2 x y z rgb instance score: running map), ``~/window_cloud``
  (this window), ``~/instances`` (fast3dis_msgs/InstanceArray), ``~/markers`` (MarkerArray),
  TF ``map_frame -> camera_frame`` per view (stamped with the view's stamp; ``tf2_ros.TransformBroadcaster``),
  ``/diagnostics``.

Known poses (``use_known_poses``): each image's pose ``known_pose_frame <- header.frame_id`` is looked
up at its stamp (``tf2_ros.Buffer`` + ``TransformListener``; tolerance ``sync_slop``). Windows whose views
all have K and a pose are pose-conditioned and the map is then ``known_pose_frame`` itself: the node
publishes ``known_pose_frame -> map_frame`` (when the names differ and ``map_frame`` is not already in
the TF tree) and does not re-publish a camera pose under a frame that is one of its pose inputs (that
frame would get a second parent, and the node would read its own output back as input).

Order per window (engine thread): as soon as the window is aligned, voxelised and its instances matched
(``MapFusion.begin``), ``~/window_cloud`` and the TF poses go out; then the map is updated
(``MapFusion.commit``) and ``~/instances``, ``~/markers`` and ``~/instances_cloud`` follow. With
``map_publish_period`` > 0 the running map is sent at most once per period (the newest pending map goes
out from a steady timer when the period is over).

Services ``~/save_map``, ``~/reset_map``, ``~/get_instances``: ``ros/map_services.py``. The managed (lifecycle)
variant and the ``fast3dis_node`` executable: ``ros/lifecycle.py``, which drives this class's stages
(``_configure``, ``_create_inputs``, ``_destroy_inputs``, ``_teardown``).

Threads: subscription callbacks only convert and hand frames over (sync + windowing are cheap);
inference, fusion and publishing run on the engine's worker thread. Nothing raises out of a callback:
bad input is logged (throttled) and counted in diagnostics.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from visualization_msgs.msg import MarkerArray

from fast3dis_ros.core.frames import CameraFrame
from fast3dis_ros.data.camera_identity import camera_streams
from fast3dis_ros.geometry.clouds import empty_cloud
from fast3dis_ros.pipeline.frame_guard import FrameGeometryGuard
from fast3dis_ros.ros import params as P
from fast3dis_ros.ros.cli_params import with_command_line
from fast3dis_ros.ros.conversions import (
    ImageConversionError,
    camera_info_to_K,
    cloud_to_pointcloud2,
    compressed_to_rgb,
    image_to_rgb,
    instances_to_markers,
    instances_to_msg,
    stamp_to_ns,
)
from fast3dis_ros.ros.diagnostics import DiagnosticsBuilder, interface_status
from fast3dis_ros.ros.map_services import MapServices
from fast3dis_ros.ros.qos import camera_info_qos, map_qos, output_qos, overridable, sensor_qos
from fast3dis_ros.ros.runtime_params import START_UP_REASON, refusal
from fast3dis_ros.ros.tf import TfLookup, TfLookupError, matrix_to_transform

__all__ = ["Fast3disNode", "main", "make_predictor"]

THROTTLE_S = 5.0


def make_predictor(p: dict):
    """Predictor from the node's parameters through the one factory (``inference/factory.py``); returns
    ``(predictor, description)``. 'bundled' = the packaged tiny checkpoint; an empty checkpoint = a
    random tiny network (plumbing only)."""
    from fast3dis_ros.inference.factory import PredictorSpec, build_predictor

    spec = PredictorSpec(checkpoint=p["checkpoint"], weights=p["weights"], model_size=p["model_size"],
                         seed=p["seed"], device=p["device"], score_threshold=p["score_threshold"],
                         process_size=p["process_long_edge"] or None, cuda_graphs=p["cuda_graphs"],
                         compile=p["compile"], backend=p["backend"], engine=p["engine"])
    pred, info = build_predictor(spec)
    return pred, info["description"]


class Fast3disNode(Node):
    """The plain node: configured and active from construction (``ros/lifecycle.py`` drives the same stages,
    ``_configure`` / ``_create_inputs`` / ``_destroy_inputs`` / ``_teardown``, through lifecycle transitions)."""

    def __init__(self, predictor=None, command_line: list[str] | None = None, **node_kwargs):
        """``command_line``: the process arguments; their ``-p`` values override ``--params-file``
        (``ros/cli_params.py``)."""
        super().__init__(P.NODE_NAME, **with_command_line(command_line, node_kwargs, P.NODE_NAME))
        P.declare_parameters(self)
        self._configure(predictor)
        self._create_inputs()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._log_ready()

    def _log_ready(self) -> None:
        """The start-up line (plain node; lifecycle autostart once active): launch files and tests wait for it."""
        self.get_logger().info(
            f"ready: {len(self.cameras)} cameras, window {self.p['window_size']} sets / stride {self.p['stride']}, "
            f"outputs in '{self.map_frame}'")

    # ------------------------------------------------------------------ stages (plain node: all in __init__)
    def _configure(self, predictor=None) -> None:
        """Validate the parameters, load the model, build the pipeline, outputs and map services (no
        subscription yet). Raises ValueError (bad parameters) or the model loader's error."""
        self.p = P.read_parameters(self)
        reasons = P.validate_all(self.p)
        if reasons:
            raise ValueError("invalid parameters: " + "; ".join(reasons))
        self.cameras: list[str] = list(self.p["cameras"])
        self.map_frame = self.p["map_frame"]
        self._lock = threading.Lock()
        self._info: dict[str, CameraInfo] = {}
        self._K_cache: dict[tuple, tuple] = {}
        self._closing = False
        self._close_lock = threading.Lock()  # held while the engine thread publishes; shutdown takes it
        self._loggers: dict = {}
        self._subs = []
        self._stamp_outliers_logged = 0
        self.geometry = FrameGeometryGuard(self.p["min_image_side"], self.p["max_image_aspect"])
        self.diag = DiagnosticsBuilder(self.get_name(), self.cameras)

        # model + pipeline (loading happens here, before any subscription exists)
        if predictor is None:
            self.get_logger().info("loading model ...")
            predictor, what = make_predictor(self.p)
        else:
            what = type(predictor).__name__
        self.predictor = predictor
        self.get_logger().info(f"model: {what}")
        from fast3dis_ros.pipeline.fusion import MapFusion
        from fast3dis_ros.pipeline.runner import PipelineRunner

        fusion = MapFusion(voxel_size=self.p["voxel_size"], max_points=self.p["max_map_points"],
                           min_score=self.p["score_threshold"], conf_threshold=self.p["conf_threshold"],
                           use_known_poses=self.p["use_known_poses"], map_frame=self.map_frame,
                           max_points_per_view=self.p["max_points_per_view"], workers=self.p["fusion_threads"],
                           use_rig=self.p["use_rig_extrinsics"], link_2d=self.p["link_2d"],
                           instance_vote_weight=self.p["instance_vote_weight"],
                           support_windows=self.p["support_windows"])
        if hasattr(predictor, "condition_on_poses"):
            predictor.condition_on_poses = bool(self.p["condition_on_known_poses"])
        from fast3dis_ros.ros.sync_adapter import make_synchronizer

        # 'fast3dis': None = the runner's own ApproximateTimeSync (drop reasons, time-jump reset)
        sync = make_synchronizer(self.cameras, int(self.p["sync_slop"] * 1e9), self.p["sync_queue_size"],
                                 backend=self.p["sync_backend"])
        self.runner = PipelineRunner(
            self.cameras, predictor.predict, slop_ns=int(self.p["sync_slop"] * 1e9), sync=sync,
            sync_queue_size=self.p["sync_queue_size"], window_size=self.p["window_size"], stride=self.p["stride"],
            fusion=fusion, queue_depth=self.p["queue_depth"], on_fusion=self._on_fusion, on_window=self._on_window,
            on_error=self._on_engine_error, on_oom=self._on_oom,
            jump_back_ns=int(self.p["time_jump_threshold"] * 1e9), jump_confirm=self.p["time_jump_confirm"],
            reset_map_on_time_jump=self.p["time_jump_policy"] == "reset_map", on_time_jump=self._on_time_jump,
            sync_max_bytes=int(self.p["sync_queue_max_mb"] * 2**20),
        )

        # outputs: the map, instances and markers are latched (a late subscriber gets the newest at once,
        # REP 2003); the window cloud is volatile. All take the standard qos_overrides parameters (which
        # edit the profile in place: one profile object per entity).
        depth = self.p["output_qos_depth"]
        self.pub_map = self.create_publisher(PointCloud2, "~/instances_cloud", map_qos(depth),
                                             qos_overriding_options=overridable())
        self.pub_window = self.create_publisher(PointCloud2, "~/window_cloud", output_qos(depth),
                                                qos_overriding_options=overridable())
        from fast3dis_msgs.msg import InstanceArray

        self.pub_instances = self.create_publisher(InstanceArray, "~/instances", map_qos(depth),
                                                   qos_overriding_options=overridable())
        self.pub_markers = self.create_publisher(MarkerArray, "~/markers", map_qos(depth),
                                                 qos_overriding_options=overridable())
        if getattr(self, "pub_diag", None) is None:  # a lifecycle node has it from construction
            self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # running map throttle (map_publish_period): engine thread and map timer share this state
        self._map_lock = threading.Lock()
        self._map_pending = None  # (cloud, stamp) not published yet
        self._map_last_pub = -float("inf")  # time.monotonic() of the last map message
        self._map_timer = None
        self._map_timer_tick = 0.0
        # ~/reset_map vs the engine thread: a result fused before a reset must not be published after it
        self._reset_lock = threading.Lock()
        self._map_epoch = 0  # += 1 per reset (under the fusion lock)
        self._window_epoch = 0  # epoch in which the engine's current window was fused
        self.tf = None
        if self.p["publish_tf"]:
            from tf2_ros import TransformBroadcaster

            self.tf = TransformBroadcaster(self)

        # known poses from TF (tf2_ros.Buffer + TransformListener on /tf and /tf_static)
        self._tf_buffer = None
        self.known_pose_frame = self.p["known_pose_frame"]
        self._pose_input_frames: set[str] = set()  # frames looked up as pose inputs: never re-published
        self._publish_known_to_map: bool | None = None  # decided at the first pose-conditioned window
        self._rig: dict[str, np.ndarray] = {}  # frame_id -> T rig_frame <- frame_id (static: looked up once)
        if self.p["use_known_poses"] or self.p["use_rig_extrinsics"]:
            self._tf_buffer = TfLookup(self)
        if self.p["use_known_poses"]:
            self.get_logger().info(f"known poses: {self.known_pose_frame} <- <image frame_id> from TF (tf2_ros)")
        if self.p["use_rig_extrinsics"]:
            self.get_logger().info(f"rig extrinsics: {self.p['rig_frame']} <- <image frame_id> from /tf_static")

        # ~/save_map, ~/reset_map, ~/get_instances: own callback group, answered from the map snapshot
        self.map_services = MapServices(self, self.map_frame, reset_map=self._reset_map,
                                        tf_lookup=self._tf_buffer or TfLookup(self))
        # wall-clock timer: diagnostics keep flowing even while sim time is paused
        if getattr(self, "_diag_timer", None) is None:
            self._diag_timer = self.create_timer(self.p["diagnostics_period"], self._publish_diagnostics,
                                                 clock=Clock(clock_type=ClockType.STEADY_TIME))
        self._configured = True

    def _create_inputs(self) -> None:
        """Subscriptions (sensor-data QoS, qos_overrides accepted); relative topic templates follow the
        node's namespace. One image transport per camera: raw, or compressed with ``use_compressed``;
        ``{camera}`` is the camera's stream from ``camera_map``."""
        # qos_overrides edit the profile in place: a new profile object per subscription
        streams = camera_streams(self.p["camera_map"], self.cameras)  # camera -> topic namespace (camera_map)
        for cam in self.cameras:
            # CameraInfo first: the executor serves ready subscriptions in creation order, so an image and its
            # CameraInfo that arrive together give the image its K (test_launch_bag_replay.py)
            info_topic = self.p["camera_info_topic"].format(camera=streams[cam])
            self._subs.append(self.create_subscription(CameraInfo, info_topic,
                                                       lambda m, c=cam: self._on_info(m, c), camera_info_qos(),
                                                       qos_overriding_options=overridable()))
            if self.p["use_compressed"]:
                topic = self.p["compressed_topic"].format(camera=streams[cam])
                self._subs.append(self.create_subscription(CompressedImage, topic,
                                                           lambda m, c=cam: self._on_compressed(m, c), sensor_qos(),
                                                           qos_overriding_options=overridable()))
            else:
                topic = self.p["image_topic"].format(camera=streams[cam])
                self._subs.append(self.create_subscription(Image, topic, lambda m, c=cam: self._on_image(m, c),
                                                           sensor_qos(), qos_overriding_options=overridable()))
            self.get_logger().info(f"camera '{cam}': {self.resolve_topic_name(topic)}, "
                                   f"{self.resolve_topic_name(info_topic)}")

    def _destroy_inputs(self) -> None:
        """Stop input: no new frame reaches the pipeline (windows already queued still finish)."""
        for s in getattr(self, "_subs", []):
            self.destroy_subscription(s)
        self._subs = []

    def _teardown(self, timeout: float = 2.0) -> None:
        """Undo ``_configure`` (also a partial one): stop the engine, drop the model, the map, publishers,
        services and timers."""
        self._closing = True
        self._destroy_inputs()
        if getattr(self, "runner", None) is not None:
            try:
                self.runner.stop(timeout)
            except Exception as e:  # pragma: no cover
                self.get_logger().warning(f"engine stop: {e!r}")
        if getattr(self, "map_services", None) is not None:
            self.map_services.destroy()
        for name in ("pub_map", "pub_window", "pub_instances", "pub_markers"):
            pub = getattr(self, name, None)
            if pub is not None:
                self.destroy_publisher(pub)
                setattr(self, name, None)
        if getattr(self, "_map_timer", None) is not None:
            self.destroy_timer(self._map_timer)
            self._map_timer = None
        self.runner = self.predictor = self.map_services = None
        self._configured = False

    # ------------------------------------------------------------------ input callbacks
    def _warn(self, key: str, msg: str) -> None:
        # rclpy throttles per (logger object, call site): one cached child logger per kind of problem
        lg = self._loggers.get(key)
        if lg is None:
            lg = self._loggers[key] = self.get_logger().get_child(key)
        lg.warning(msg, throttle_duration_sec=THROTTLE_S)

    def _on_info(self, msg: CameraInfo, cam: str) -> None:
        self.diag.info_rate[cam].tick()
        with self._lock:
            self._info[cam] = msg

    def _intrinsics(self, cam: str, w: int, h: int) -> np.ndarray | None:
        if not self.p["use_known_intrinsics"]:
            self.diag.k_status[cam] = "not used (use_known_intrinsics false)"
            return None
        with self._lock:
            info = self._info.get(cam)
        if info is None:
            self.diag.k_status[cam] = "no CameraInfo yet: network estimates K"
            return None
        key = (cam, w, h, tuple(info.k), info.width, info.height, info.distortion_model, tuple(info.d))
        hit = self._K_cache.get(cam)
        if hit is None or hit[0] != key:
            K, why = camera_info_to_K(info, (w, h), max_distortion_px=self.p["max_distortion_px"])
            self._K_cache[cam] = hit = (key, K, why)
            if K is None:
                self._warn(f"k_{cam}", f"{cam}: CameraInfo unusable ({why}); the network estimates K")
        _, K, why = hit
        self.diag.k_status[cam] = ("ok" + (f" ({why})" if why else "")) if K is not None else f"invalid: {why}"
        return K

    def _feed(self, cam: str, header, rgb: np.ndarray) -> None:
        stamp = stamp_to_ns(header.stamp)
        if stamp <= 0:
            self.diag.input_errors[cam].add("zero_stamp")
            self._warn(f"stamp_{cam}", f"{cam}: image without stamp (header.stamp = 0): dropped")
            return
        h, w = rgb.shape[:2]
        verdict = self.geometry.check(cam, h, w)
        if not verdict.accept:
            self.diag.input_errors[cam].add(verdict.reason)
            self._warn(f"geom_{cam}_{verdict.reason}", f"{cam}: image rejected ({verdict.reason}): {verdict.detail}")
            return
        if verdict.reason:  # a new resolution, sustained: the camera's geometry follows
            self.get_logger().warning(f"{cam}: {verdict.reason}: {verdict.detail}")
        K = self._intrinsics(cam, w, h)
        frame_id = header.frame_id or self.p["camera_frame"].format(camera=cam)
        T_world_cam = self._known_pose(cam, frame_id, stamp) if self.p["use_known_poses"] else None
        T_rig_cam = self._rig_extrinsics(cam, frame_id) if self.p["use_rig_extrinsics"] else None
        frame = CameraFrame(cam, stamp, rgb, frame_id=frame_id, K=K, T_world_cam=T_world_cam, T_rig_cam=T_rig_cam)
        self.runner.feed(frame)

    def _on_image(self, msg: Image, cam: str) -> None:
        if self._closing:
            return
        self.diag.image_rate[cam].tick()
        try:
            rgb = image_to_rgb(msg)
            self._feed(cam, msg.header, rgb)
        except ImageConversionError as e:
            self.diag.input_errors[cam].add("bad_image")
            self._warn(f"img_{cam}_{e.kind}", f"{cam}: image rejected: {e}")
        except Exception as e:  # never let a callback kill the node
            self.diag.input_errors[cam].add("internal_error")
            self._warn(f"err_{cam}", f"{cam}: failed to handle image: {e!r}\n{traceback.format_exc(limit=3)}")

    def _on_compressed(self, msg: CompressedImage, cam: str) -> None:
        if self._closing:
            return
        self.diag.image_rate[cam].tick()
        try:
            self._feed(cam, msg.header, compressed_to_rgb(msg))
        except ImageConversionError as e:
            self.diag.input_errors[cam].add("bad_compressed_image")
            self._warn(f"cimg_{cam}_{e.kind}", f"{cam}: compressed image rejected: {e}")
        except Exception as e:
            self.diag.input_errors[cam].add("internal_error")
            self._warn(f"err_{cam}", f"{cam}: failed to handle compressed image: {e!r}")

    def _known_pose(self, cam: str, frame_id: str, stamp_ns: int) -> np.ndarray | None:
        """T known_pose_frame <- frame_id at the image stamp (None, logged and shown in diagnostics, if TF
        cannot give it: the window then falls back to estimated poses)."""
        self._pose_input_frames.add(frame_id)
        try:
            T = self._tf_buffer.lookup(self.known_pose_frame, frame_id, stamp_ns,
                                       tolerance_ns=int(self.p["sync_slop"] * 1e9))
            if not np.all(np.isfinite(T)):
                raise TfLookupError("non-finite transform")
            return T
        except (TfLookupError, ValueError) as e:
            self.diag.input_errors[cam].add("no_known_pose")
            self._warn(f"pose_{cam}", f"{cam}: no TF {self.known_pose_frame} <- {frame_id} at {stamp_ns} ns: {e}")
            return None

    def _on_time_jump(self, jump: dict | None, map_reset: bool) -> None:
        """An adopted backward time jump (sustained: ``time_jump_confirm`` frames): logged at WARN and
        shown in the sync status."""
        span = ""
        if jump and jump.get("from_ns") is not None:
            span = f" by {(jump['from_ns'] - jump['to_ns']) / 1e9:.1f} s"
        what = f"time jumped back{span}: {'window and map reset' if map_reset else 'window reset, map kept'}"
        self.diag.time_jump = (time.monotonic(), what)
        self.get_logger().warning(f"{what} (time_jump_policy {self.p['time_jump_policy']})")

    def _rig_extrinsics(self, cam: str, frame_id: str) -> np.ndarray | None:
        """T rig_frame <- frame_id (static, cached once found; None, logged and counted, while TF lacks it)."""
        T = self._rig.get(frame_id)
        if T is not None:
            return T
        try:
            T = self._tf_buffer.lookup(self.p["rig_frame"], frame_id, 0)
            if not np.all(np.isfinite(T)):
                raise TfLookupError("non-finite transform")
        except (TfLookupError, ValueError) as e:
            self.diag.input_errors[cam].add("no_rig_extrinsics")
            self._warn(f"rig_{cam}", f"{cam}: no static TF {self.p['rig_frame']} <- {frame_id}: {e}")
            return None
        self._rig[frame_id] = T
        return T

    # ------------------------------------------------------------------ engine thread
    def _on_engine_error(self, window, exc) -> None:
        self.diag.node_errors.add("engine")
        self._last_engine_error = f"window {getattr(window, 'index', '?')}: {exc!r}"
        self._warn("engine", f"inference failed on {self._last_engine_error}")

    def _on_oom(self) -> None:
        """Out of memory in predict: free the CUDA cache before the engine retries with fewer views."""
        self.diag.node_errors.add("oom")
        self._warn("oom", "out of GPU memory: retrying the window with fewer views (then dropping it)")
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass

    def _on_window(self, window, pred) -> None:
        """The window's own outputs, before the map update (``MapFusion.begin``): its cloud, already aligned
        into ``map_frame`` with global instance ids, and the camera poses on TF."""
        self._window_epoch = self._map_epoch  # called under the runner's fusion lock, like a reset
        with self._close_lock:
            if not self._closing:
                self._publish_window(window, pred)

    def _publish_window(self, window, pred) -> None:
        t0 = time.perf_counter()
        try:
            if self.p["publish_window_cloud"]:
                self.pub_window.publish(cloud_to_pointcloud2(window.window_cloud, frame_id=self.map_frame,
                                                             stamp_ns=int(window.stamp_ns)))
            if self.tf is not None:
                self._publish_tf(window, pred)
        except Exception as e:
            self._publish_failed(f"window {window.window_index}", e, with_traceback=True)
            return
        self.diag.last_window_publish_ms = (time.perf_counter() - t0) * 1000.0

    def _on_fusion(self, result, pred) -> None:
        """After the map update: instances, markers, then the running map (throttled by map_publish_period)."""
        with self._close_lock:
            if not self._closing:
                self._publish_results(result)

    def _publish_results(self, result) -> None:
        t0 = time.perf_counter()
        stamp = int(result.stamp_ns)
        mf = self.map_frame
        with self._reset_lock:
            if self._window_epoch != self._map_epoch:
                return  # fused before a ~/reset_map: the cleared map stays the newest
            self.map_services.update(result.map_cloud, result.instances, stamp)
            try:
                self.pub_instances.publish(instances_to_msg(result.instances, mf, stamp))
                self.pub_markers.publish(instances_to_markers(result.instances, mf, stamp))
                self._offer_map(result.map_cloud, stamp)
            except Exception as e:
                self._publish_failed(f"window {result.window_index}", e, with_traceback=True)
                return
        self.diag.last_publish_ms = (time.perf_counter() - t0) * 1000.0
        self.diag.output_rate.tick()

    # ------------------------------------------------------------------ running map (~/instances_cloud)
    def _offer_map(self, cloud, stamp: int) -> None:
        """Publish the running map now, or (``map_publish_period`` > 0 and the last one went out less than a
        period ago) keep it as the pending map that the map timer publishes when the period is over. Only
        the newest pending map is kept: a skipped map is superseded, never lost at the end."""
        with self._map_lock:
            period = float(self.p["map_publish_period"])
            now = time.monotonic()
            if period > 0.0 and now - self._map_last_pub < period:
                self._map_pending = (cloud, stamp)
                self._ensure_map_timer(period)
                return
            self._map_pending = None
            self._publish_map_locked(cloud, stamp, now)

    def _reset_map(self) -> tuple[int, int]:
        """~/reset_map: clear the map and the instance ids (the next window starts a new map) and publish the
        empty map, instances and markers (latched: late subscribers see the cleared state). Returns the
        points and instances dropped."""
        with self._reset_lock:
            with self.runner._fusion_lock:
                n_points = len(self.runner.fusion.map)
                n_inst = len(self.map_services.snapshot().instances)
                self.runner.fusion.reset()
                self._map_epoch += 1
            self.map_services.clear()
            stamp = self.get_clock().now().nanoseconds
            with self._map_lock:
                self._map_pending = None
                self._publish_map_locked(empty_cloud(self.map_frame, stamp), stamp, time.monotonic())
            self.pub_instances.publish(instances_to_msg([], self.map_frame, stamp))
            self.pub_markers.publish(instances_to_markers([], self.map_frame, stamp))
        self.get_logger().info(f"map reset: {n_points} points, {n_inst} instances dropped")
        return n_points, n_inst

    def _publish_map_locked(self, cloud, stamp: int, now: float) -> None:
        self.pub_map.publish(cloud_to_pointcloud2(cloud, frame_id=self.map_frame, stamp_ns=stamp))
        self._map_last_pub = now
        self.diag.maps_published += 1

    def _on_map_timer(self) -> None:
        try:
            with self._map_lock:
                pend = self._map_pending
                if pend is None or self._closing:
                    return
                period = float(self.p["map_publish_period"])
                now = time.monotonic()
                if period > 0.0 and now - self._map_last_pub < period:
                    return  # published by a window meanwhile: wait for the next tick
                self._map_pending = None
                self._publish_map_locked(pend[0], pend[1], now)
        except Exception as e:
            self._publish_failed("the pending map", e)

    def _publish_failed(self, what: str, e: Exception, with_traceback: bool = False) -> None:
        """Count a failed publish (diagnostics) and warn (throttled by ``_warn``); the node keeps running."""
        self.diag.node_errors.add("publish")
        tb = f"\n{traceback.format_exc(limit=4)}" if with_traceback else ""
        self._warn("publish", f"publishing {what} failed: {e!r}{tb}")

    def _ensure_map_timer(self, period: float) -> None:
        """A steady-clock timer that flushes the pending map; re-created when the period changes (call with
        ``_map_lock`` held)."""
        tick = max(0.01, period / 4.0) if period > 0 else 0.05  # at most a quarter period late
        if self._map_timer is not None and abs(self._map_timer_tick - tick) < 1e-9:
            return
        if self._map_timer is not None:
            self.destroy_timer(self._map_timer)
        self._map_timer = self.create_timer(tick, self._on_map_timer, clock=Clock(clock_type=ClockType.STEADY_TIME))
        self._map_timer_tick = tick

    def _publish_tf(self, result, pred) -> None:
        """TF of the window's views (``result``: a WindowResult or FusionResult)."""
        tfs = []
        T = np.asarray(result.T_map_cam)
        if self._tf_buffer is not None and pred.depth_scale_metric:
            self._publish_known_frame(result)
        for v in range(T.shape[0]):
            if not np.all(np.isfinite(T[v])):
                continue
            child = self.p["camera_frame"].format(camera=pred.cameras[v])
            if child in self._pose_input_frames:
                continue  # a pose input already has its parent in the input TF tree
            tfs.append((int(pred.view_stamps_ns[v]), matrix_to_transform(T[v], self.map_frame, child,
                                                                          pred.view_stamps_ns[v])))
        tfs.sort(key=lambda x: x[0])
        if tfs:
            self.tf.sendTransform([t for _, t in tfs])

    def _publish_known_frame(self, result) -> None:
        """known_pose_frame -> map_frame for a pose-conditioned window (its world is known_pose_frame, so
        T_known_map = inverse of the window's Sim(3) T_map_window; identity when the map was anchored on
        known poses; a Sim(3) scale is dropped, TF is rigid)."""
        if self.known_pose_frame == self.map_frame:
            return
        if self._publish_known_to_map is None:
            # someone else already relates the two frames (e.g. map -> odom with known_pose_frame odom):
            # publishing would give map_frame a second parent
            taken = True
            try:
                self._tf_buffer.lookup(self.known_pose_frame, self.map_frame, 0)
            except Exception:
                taken = False
            self._publish_known_to_map = not taken
            if taken:
                self.get_logger().warning(
                    f"'{self.map_frame}' is already in the TF tree with '{self.known_pose_frame}': not publishing "
                    f"{self.known_pose_frame} -> {self.map_frame} (set map_frame to a new name to get it)")
        if not self._publish_known_to_map:
            return
        from fast3dis_ros.geometry.align import sim3_inverse

        T_known_map = sim3_inverse(np.asarray(result.T_map_window, np.float64))
        self.tf.sendTransform([matrix_to_transform(T_known_map, self.known_pose_frame, self.map_frame,
                                                   result.stamp_ns)])

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        try:
            acc = self.runner.accounting()
            frames = acc.get("frames", {})
            eng = acc.get("windows", {}).get("engine", {})
            sets = acc.get("frame_sets", {})
            backend = getattr(self.runner.sync, "backend", "fast3dis")
            sync = {"backend": backend, "frame_sets": sets.get("received", 0),
                    "drops": frames.get("dropped", {})}
            em = eng.get("engine_ms", {})
            engine = {
                "windows_emitted": acc.get("windows", {}).get("emitted", 0),
                "processed": eng.get("processed", 0), "errors": eng.get("errors", 0),
                "oom_retried": eng.get("oom_retried", 0),
                "queue_len": eng.get("queue_len", 0), "queue_depth": self.p["queue_depth"],
                "engine_ms_p50": em.get("p50", 0.0), "engine_ms_max": em.get("max", 0.0),
                "e2e_ms_p50": acc.get("fusion", {}).get("e2e_ms", {}).get("p50", 0.0),
                "window_e2e_ms_p50": acc.get("fusion", {}).get("window_e2e_ms", {}).get("p50", 0.0),
                "frame_sets_processed": sets.get("processed", 0), "frame_sets_in_flight": sets.get("in_flight", 0),
                "drops": {**eng.get("drops", {}), **{f"sets_{k}": v for k, v in sets.get("dropped", {}).items()}},
            }
            err = getattr(self, "_last_engine_error", None)
            if err and eng.get("errors", 0) and not eng.get("processed", 0):
                engine["error"] = f"inference failing: {err}"
            sync["pending_bytes"] = frames.get("pending_bytes", 0)
            engine["nonfinite_windows_in_a_row"] = acc.get("nonfinite_windows_in_a_row", 0)
            outliers = frames.get("dropped", {}).get("stamp_outlier", 0)
            if outliers > self._stamp_outliers_logged:
                self.get_logger().warning(f"{outliers - self._stamp_outliers_logged} image(s) with a stamp off the "
                                          "timeline dropped (stamp_outlier)")
                self._stamp_outliers_logged = outliers
            outputs = {"map_points": len(self.runner.fusion.map), "sync_resets": acc.get("sync_resets", 0),
                       # frame accounting: pushed == in_sets + pending + sum(sync drops)
                       "frames_pushed": frames.get("pushed", 0), "frames_in_sets": frames.get("in_sets", 0),
                       "frames_pending": frames.get("pending", 0),
                       "frame_sets_dropped": sum(sets.get("dropped", {}).values()),
                       "silent_cameras": ",".join(sorted(self.runner.silent_cameras())),
                       **{f"fusion_{k}": v for k, v in acc.get("fusion", {}).get("events", {}).items()},
                       **{f"linking_{k}": v for k, v in acc.get("fusion", {}).get("linking", {}).items()
                          if v is not None}}
            arr = self.diag.build(self.get_clock().now().to_msg(), sync, engine, outputs)
            arr.status.append(self._interface_status())
            self.pub_diag.publish(arr)
        except Exception as e:
            self._warn("diag", f"diagnostics failed: {e!r}")

    def _interface_status(self):
        """Lifecycle state and the last map service calls (one DiagnosticStatus)."""
        services = getattr(self, "map_services", None)
        return interface_status(self.get_name(), self._lifecycle_state_label(),
                                services.last_calls() if services is not None else [])

    _is_lifecycle = False  # ros/lifecycle.py: True

    def _lifecycle_state_label(self) -> str:
        return "active (plain node)"

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, params) -> SetParametersResult:
        """Run-time parameters (``runtime_params.RUNTIME``) apply at once; start-up-only ones are refused
        with the reason while the node is configured (a lifecycle node takes them when unconfigured)."""
        configured = getattr(self, "_configured", False)
        current = self.p if configured else P.read_parameters(self)
        new = dict(current)
        for prm in params:
            if prm.name in new:
                new[prm.name] = prm.value
        for prm in params:
            reason = P.validate(prm.name, prm.value, new)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            if configured and prm.name in START_UP_REASON and prm.value != current.get(prm.name):
                return SetParametersResult(successful=False, reason=refusal(prm.name, self._is_lifecycle))
        if not configured:
            return SetParametersResult(successful=True)
        for prm in params:
            if prm.name in self.p:
                self.p[prm.name] = new[prm.name]
            if prm.name == "score_threshold":
                self.runner.fusion.min_score = float(prm.value)
                if hasattr(self.predictor, "score_threshold"):
                    self.predictor.score_threshold = float(prm.value)
            elif prm.name == "conf_threshold":
                self.runner.fusion.conf_threshold = float(prm.value)
            elif prm.name == "map_publish_period":
                with self._map_lock:  # a held-back map goes out on the new period's schedule
                    if self._map_timer is not None or self._map_pending is not None:
                        self._ensure_map_timer(float(prm.value))
            elif prm.name == "max_points_per_view":  # read by fusion at the next window
                self.runner.fusion.max_points_per_view = int(prm.value)
            elif prm.name == "publish_tf":
                if prm.value and self.tf is None:
                    from tf2_ros import TransformBroadcaster
                    self.tf = TransformBroadcaster(self)
                elif not prm.value:
                    self.tf = None  # the engine thread reads it once per window
            elif prm.name == "diagnostics_period":
                self.destroy_timer(self._diag_timer)
                self._diag_timer = self.create_timer(float(prm.value), self._publish_diagnostics,
                                                     clock=Clock(clock_type=ClockType.STEADY_TIME))
            # use_known_intrinsics and publish_window_cloud are read from self.p per image / window,
            # shutdown_timeout from self.p at shutdown
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop publishing (waits for a publish in progress), abort the forward in flight
        (``model.interrupt``) and join the inference thread; True when it ended within ``timeout``
        (default ``shutdown_timeout``). Nothing to stop when never configured or cleaned up (lifecycle)."""
        with self._close_lock:
            self._closing = True
        if getattr(self, "runner", None) is None:
            return True
        from ..model.interrupt import abort_forwards, release

        worker = self.runner.engine.thread
        abort_forwards(worker)
        try:
            stopped = self.runner.stop(self.p["shutdown_timeout"] if timeout is None else timeout)
        except Exception as e:  # pragma: no cover
            self.get_logger().warning(f"engine stop: {e!r}")
            return False
        if stopped:
            release(worker)
        return stopped


def main(args=None, exit_process: bool = True) -> int:
    """Run the plain node; exit codes and the shutdown order: ``ros/process_control.py``."""
    from rclpy.executors import SingleThreadedExecutor

    from .process_control import serve

    return serve(lambda argv: Fast3disNode(command_line=argv), SingleThreadedExecutor, args, exit_process,
                 P.NODE_NAME)


if __name__ == "__main__":
    sys.exit(main())
