"""fast3dis node: camera images in, instance-labelled map out.

Thin by design (docs/ARCHITECTURE.md): parameters in, frames to ``PipelineRunner``, messages out.

Inputs (sensor-data QoS), per camera ``c`` in ``cameras``:
  ``image_topic`` (sensor_msgs/Image) or, with ``use_compressed``, ``compressed_topic`` (CompressedImage)
  instead (one transport per camera: both would hand every frame over twice), ``camera_info_topic``
  (CameraInfo); ``{camera}`` in the templates is the camera's
  stream from ``camera_map`` (``robot/front=front``; ``data/camera_identity.py``), else its name.
Outputs (reliable, depth ``output_qos_depth``), all in ``map_frame``, stamped with the window's newest
frame set stamp:
  ``~/instances_cloud`` (PointCloud2 x y z rgb instance score: running map), ``~/window_cloud``
  (this window), ``~/instances`` (fast3dis_msgs/InstanceArray), ``~/markers`` (MarkerArray),
  TF ``map_frame -> camera_frame`` per view (stamped with the view's stamp), ``/diagnostics``.

Known poses (``use_known_poses``): each image's pose ``known_pose_frame <- header.frame_id`` is looked
up at its stamp (tf2_ros when importable, else ``ros/tf_buffer.py`` on /tf + /tf_static; tolerance
``sync_slop``). Windows whose views all have K and a pose are pose-conditioned and the map is then
``known_pose_frame`` itself: the node publishes ``known_pose_frame -> map_frame`` (when the names
differ and ``map_frame`` is not already in the TF tree) and does not re-publish a camera pose under a
frame that is one of its pose inputs (that frame would get a second parent, and the node would read
its own output back as input).

Order per window (engine thread): as soon as the window is aligned, voxelised and its instances matched
(``MapFusion.begin``), ``~/window_cloud`` and the TF poses go out; then the map is updated
(``MapFusion.commit``) and ``~/instances``, ``~/markers`` and ``~/instances_cloud`` follow. With
``map_publish_period`` > 0 the running map is sent at most once per period (the newest pending map goes
out from a steady timer when the period is over).

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

from ..data.camera_identity import camera_streams
from ..pipeline.frames import CameraFrame
from . import params as P
from .conversions import (
    ImageConversionError,
    camera_info_to_K,
    cloud_to_pointcloud2,
    compressed_to_rgb,
    image_to_rgb,
    instances_to_markers,
    instances_to_msg,
    stamp_to_ns,
)
from .diagnostics import DiagnosticsBuilder
from .qos import camera_info_qos, output_qos, sensor_qos
from .tf import TFBroadcaster, matrix_to_transform
from .tf_buffer import TfLookup, TfLookupError

__all__ = ["Fast3disNode", "main", "make_predictor"]

THROTTLE_S = 5.0


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def make_predictor(p: dict):
    """Predictor from the parameters: checkpoint ('bundled' = the packaged tiny one) > random tiny model
    (model_size 'tiny', empty checkpoint)."""
    from ..model.predictor import Predictor

    device = resolve_device(p["device"])
    kw = {"score_threshold": p["score_threshold"], "cuda_graphs": p["cuda_graphs"], "compile": p["compile"]}
    if p["process_long_edge"]:
        kw["process_size"] = p["process_long_edge"]
    if p["backend"] != "torch":  # the same Predictor pre/post-processing around an exported engine
        from ..deploy.backends import engine_predictor

        kw = {k: kw[k] for k in ("score_threshold", "process_size") if k in kw}
        return engine_predictor(p["backend"], p["engine"], **kw), f"{p['backend']} engine {p['engine']}"
    checkpoint = p["checkpoint"]
    if checkpoint == "bundled" and p["model_size"] != "tiny":
        raise ValueError(
            f"model_size '{p['model_size']}' needs a FAST3DIS checkpoint (parameter 'checkpoint'): the bundled "
            "one is the tiny configuration")
    if checkpoint == "bundled":
        from ..model.checkpoint import BUNDLED_CHECKPOINT

        checkpoint = str(BUNDLED_CHECKPOINT)
    if checkpoint:
        return Predictor.from_checkpoint(checkpoint, device=device, da3_weights=p["weights"] or None, **kw), \
            f"checkpoint {checkpoint}"
    if p["model_size"] == "tiny" and not p["weights"]:
        return Predictor.random_tiny(seed=p["seed"], device=device, **kw), \
            f"RANDOM tiny model (seed {p['seed']}): outputs are meaningless, for plumbing/tests only"
    raise ValueError(
        f"model_size '{p['model_size']}'{' with weights ' + p['weights'] if p['weights'] else ''} needs a "
        "FAST3DIS checkpoint (parameter 'checkpoint'): DA3 weights alone have no instance head")


class Fast3disNode(Node):
    def __init__(self, predictor=None, **node_kwargs):
        super().__init__(P.NODE_NAME, **node_kwargs)
        P.declare_parameters(self)
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
        self._loggers: dict = {}
        self.diag = DiagnosticsBuilder(self.get_name(), self.cameras)

        # model + pipeline (loading happens here, before any subscription exists)
        if predictor is None:
            predictor, what = make_predictor(self.p)
        else:
            what = type(predictor).__name__
        self.predictor = predictor
        self.get_logger().info(f"model: {what}")
        from ..pipeline.fusion import MapFusion
        from ..pipeline.runner import PipelineRunner

        fusion = MapFusion(voxel_size=self.p["voxel_size"], max_points=self.p["max_map_points"],
                           min_score=self.p["score_threshold"], conf_threshold=self.p["conf_threshold"],
                           use_known_poses=self.p["use_known_poses"], map_frame=self.map_frame,
                           max_points_per_view=self.p["max_points_per_view"], workers=self.p["fusion_threads"])
        from .sync_adapter import make_synchronizer

        sync = None  # the runner's own ApproximateTimeSync (with time-jump reset)
        if self.p["sync_backend"] == "message_filters":
            sync = make_synchronizer(self.cameras, int(self.p["sync_slop"] * 1e9), self.p["sync_queue_size"],
                                     backend="message_filters")
        self.runner = PipelineRunner(
            self.cameras, predictor.predict, slop_ns=int(self.p["sync_slop"] * 1e9), sync=sync,
            sync_queue_size=self.p["sync_queue_size"], window_size=self.p["window_size"], stride=self.p["stride"],
            fusion=fusion, queue_depth=self.p["queue_depth"], on_fusion=self._on_fusion, on_window=self._on_window,
            on_error=self._on_engine_error, on_oom=self._on_oom,
        )

        # outputs
        oq = output_qos(self.p["output_qos_depth"])
        self.pub_map = self.create_publisher(PointCloud2, "~/instances_cloud", oq)
        self.pub_window = self.create_publisher(PointCloud2, "~/window_cloud", oq)
        from fast3dis_msgs.msg import InstanceArray

        self.pub_instances = self.create_publisher(InstanceArray, "~/instances", oq)
        self.pub_markers = self.create_publisher(MarkerArray, "~/markers", oq)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # running map throttle (map_publish_period): engine thread and map timer share this state
        self._map_lock = threading.Lock()
        self._map_pending = None  # (cloud, stamp) not published yet
        self._map_last_pub = -float("inf")  # time.monotonic() of the last map message
        self._map_timer = None
        self._map_timer_tick = 0.0
        self.tf = TFBroadcaster(self) if self.p["publish_tf"] else None

        # known poses from TF (tf2_ros when importable, else the node's own /tf + /tf_static buffer)
        self._tf_buffer = None
        self.known_pose_frame = self.p["known_pose_frame"]
        self._pose_input_frames: set[str] = set()  # frames looked up as pose inputs: never re-published
        self._publish_known_to_map: bool | None = None  # decided at the first pose-conditioned window
        if self.p["use_known_poses"]:
            self._tf_buffer = TfLookup(self)
            self.get_logger().info(
                f"known poses: {self.known_pose_frame} <- <image frame_id> from TF "
                f"({'tf2_ros' if self._tf_buffer.uses_tf2_ros else 'fast3dis_ros.ros.tf_buffer'})")

        # inputs
        sq, iq = sensor_qos(), camera_info_qos()
        self._subs = []
        streams = camera_streams(self.p["camera_map"], self.cameras)  # camera -> topic namespace (camera_map)
        for cam in self.cameras:  # one image transport per camera: raw, or compressed with use_compressed
            if self.p["use_compressed"]:
                topic = self.p["compressed_topic"].format(camera=streams[cam])
                self._subs.append(self.create_subscription(CompressedImage, topic,
                                                           lambda m, c=cam: self._on_compressed(m, c), sq))
            else:
                topic = self.p["image_topic"].format(camera=streams[cam])
                self._subs.append(self.create_subscription(Image, topic, lambda m, c=cam: self._on_image(m, c), sq))
            info_topic = self.p["camera_info_topic"].format(camera=streams[cam])
            self._subs.append(self.create_subscription(CameraInfo, info_topic,
                                                       lambda m, c=cam: self._on_info(m, c), iq))
            self.get_logger().info(f"camera '{cam}': {topic}, {info_topic}")

        self.add_on_set_parameters_callback(self._on_set_parameters)
        # wall-clock timer: diagnostics keep flowing even while sim time is paused
        self._diag_timer = self.create_timer(self.p["diagnostics_period"], self._publish_diagnostics,
                                             clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.get_logger().info(
            f"ready: {len(self.cameras)} cameras, window {self.p['window_size']} sets / stride {self.p['stride']}, "
            f"outputs in '{self.map_frame}'")

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
        key = (cam, w, h, tuple(info.k), info.width, info.height)
        hit = self._K_cache.get(cam)
        if hit is None or hit[0] != key:
            K, why = camera_info_to_K(info, (w, h))
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
        K = self._intrinsics(cam, w, h)
        frame_id = header.frame_id or self.p["camera_frame"].format(camera=cam)
        T_world_cam = self._known_pose(cam, frame_id, stamp) if self._tf_buffer is not None else None
        frame = CameraFrame(cam, stamp, rgb, frame_id=frame_id, K=K, T_world_cam=T_world_cam)
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
        if self._closing:
            return
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
        if self._closing:
            return
        t0 = time.perf_counter()
        stamp = int(result.stamp_ns)
        mf = self.map_frame
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
            self.tf.send([t for _, t in tfs])

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
        from ..geometry.align import sim3_inverse

        T_known_map = sim3_inverse(np.asarray(result.T_map_window, np.float64))
        self.tf.send([matrix_to_transform(T_known_map, self.known_pose_frame, self.map_frame, result.stamp_ns)])

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        try:
            acc = self.runner.accounting()
            frames = acc.get("frames", {})
            eng = acc.get("windows", {}).get("engine", {})
            sets = acc.get("frame_sets", {})
            backend = getattr(self.runner.sync, "backend", "project")
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
            outputs = {"map_points": len(self.runner.fusion.map), "sync_resets": acc.get("sync_resets", 0),
                       # frame accounting: pushed == in_sets + pending + sum(sync drops)
                       "frames_pushed": frames.get("pushed", 0), "frames_in_sets": frames.get("in_sets", 0),
                       "frames_pending": frames.get("pending", 0),
                       "frame_sets_dropped": sum(sets.get("dropped", {}).values()),
                       "silent_cameras": ",".join(sorted(self.runner.silent_cameras())),
                       **{f"fusion_{k}": v for k, v in acc.get("fusion", {}).get("events", {}).items()}}
            self.pub_diag.publish(self.diag.build(self.get_clock().now().to_msg(), sync, engine, outputs))
        except Exception as e:
            self._warn("diag", f"diagnostics failed: {e!r}")

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, params) -> SetParametersResult:
        new = dict(self.p)
        for prm in params:
            if prm.name in new:
                new[prm.name] = prm.value
        for prm in params:
            reason = P.validate(prm.name, prm.value, new)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
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
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, timeout: float = 2.0) -> None:
        self._closing = True
        try:
            self.runner.stop(timeout)
        except Exception as e:  # pragma: no cover
            self.get_logger().warning(f"engine stop: {e!r}")


def main(args=None) -> int:
    rclpy.init(args=args)
    node = None
    rc = 0
    try:
        node = Fast3disNode()
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    except rclpy.executors.ExternalShutdownException:
        pass
    except (ValueError, FileNotFoundError, ImportError) as e:
        rclpy.logging.get_logger(P.NODE_NAME).fatal(f"cannot start: {e}")
        rc = 2
    except Exception as e:
        # rclpy's InvalidParameterValueException & co. at declare time; a checkpoint whose weights do not fit
        # its configuration (model.checkpoint.CheckpointMismatchError names the keys and shapes)
        if "Parameter" in type(e).__name__ or type(e).__name__ == "CheckpointMismatchError":
            rclpy.logging.get_logger(P.NODE_NAME).fatal(f"cannot start: {e}")
            rc = 2
        else:
            raise
    finally:
        if node is not None:
            node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
