"""The node's map services: ``~/save_map``, ``~/reset_map``, ``~/get_instances`` (fast3dis_msgs/srv).

Why they never block the engine: the engine thread hands every fused map to ``update`` (a reference
swap under a small lock), and save / query read that immutable snapshot, so a service never waits for
a window and a window never waits for a service. Only a reset touches the live map, through the
node's ``reset_map`` callable (which takes the fusion lock for the few microseconds of the clear).
The services live in their own reentrant callback group, so with a multi-threaded executor they
answer while images are being handled and while another service call (a long save) runs.

Bad requests (unknown ids, empty map, unwritable path, box min > max, unknown frame) get
``success: false`` and a message that says why; the map is untouched. The rules themselves live in
``geometry/map_io.py`` and ``geometry/map_query.py`` (tested without ROS).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rclpy.callback_groups import ReentrantCallbackGroup

from fast3dis_ros.geometry.clouds import empty_cloud, transform_cloud
from fast3dis_ros.geometry.map_io import MapSaveError, save_cloud
from fast3dis_ros.geometry.map_query import InstanceQuery, InstanceQueryError, points_of, query_instances
from fast3dis_ros.core.frames import InstanceCloud, InstanceSummary
from .conversions import cloud_to_pointcloud2, instances_to_msg

__all__ = ["MapSnapshot", "ServiceCall", "MapServices"]


@dataclass(frozen=True)
class MapSnapshot:
    """The newest fused map (copies made by fusion: later windows do not change them)."""

    cloud: InstanceCloud
    instances: list[InstanceSummary]
    stamp_ns: int


@dataclass(frozen=True)
class ServiceCall:
    """One answered call, for /diagnostics."""

    service: str
    wall_time: float
    success: bool
    message: str
    duration_ms: float


class MapServices:
    """Creates the three services on ``node`` and answers them from the newest map snapshot."""

    def __init__(self, node, map_frame: str, reset_map: Callable[[], tuple[int, int]], tf_lookup,
                 history: int = 8) -> None:
        """``reset_map()`` clears the live map and returns (points, instances) dropped; ``tf_lookup`` has
        ``lookup(target, source, stamp_ns) -> T_target_source`` (ros/tf.TfLookup, on tf2_ros)."""
        from fast3dis_msgs.srv import GetInstances, ResetMap, SaveMap

        self.node = node
        self.map_frame = map_frame
        self._reset_map = reset_map
        self._tf = tf_lookup
        self._lock = threading.Lock()
        self._snap = MapSnapshot(empty_cloud(map_frame, 0), [], 0)
        self._calls: deque[ServiceCall] = deque(maxlen=history)
        self.group = ReentrantCallbackGroup()
        self._services = [
            node.create_service(SaveMap, "~/save_map", self._wrap("save_map", self._save), callback_group=self.group),
            node.create_service(ResetMap, "~/reset_map", self._wrap("reset_map", self._reset),
                                callback_group=self.group),
            node.create_service(GetInstances, "~/get_instances", self._wrap("get_instances", self._get),
                                callback_group=self.group),
        ]

    # ------------------------------------------------------------------ snapshot (engine thread)
    def update(self, cloud: InstanceCloud, instances: list[InstanceSummary], stamp_ns: int) -> None:
        snap = MapSnapshot(cloud, list(instances), int(stamp_ns))
        with self._lock:
            self._snap = snap

    def clear(self) -> None:
        self.update(empty_cloud(self.map_frame, 0), [], 0)

    def snapshot(self) -> MapSnapshot:
        with self._lock:
            return self._snap

    def last_calls(self) -> list[ServiceCall]:
        with self._lock:
            return list(self._calls)

    def destroy(self) -> None:
        for s in self._services:
            self.node.destroy_service(s)
        self._services = []

    # ------------------------------------------------------------------ handlers
    def _wrap(self, name: str, handler):
        """Every answer is recorded for diagnostics; an unexpected exception becomes an error response
        (never an exception out of the executor, which would take the node down)."""
        def cb(request, response):
            t0 = time.perf_counter()
            try:
                handler(request, response)
            except Exception as e:
                response.success = False
                response.message = f"internal error: {e!r}"
                self.node.get_logger().error(f"~/{name} failed: {e!r}\n{traceback.format_exc(limit=4)}")
            dt = (time.perf_counter() - t0) * 1000.0
            with self._lock:
                self._calls.append(ServiceCall(name, time.time(), bool(response.success), response.message, dt))
            # rclpy ties a severity to its call site: one call per severity
            if response.success:
                self.node.get_logger().info(f"~/{name}: ok: {response.message}")
            else:
                self.node.get_logger().warning(f"~/{name}: refused: {response.message}")
            return response
        return cb

    def _T_from_map(self, frame: str) -> np.ndarray:
        """T frame <- map (latest); raises ValueError naming the frame when TF cannot give it."""
        if not frame or frame == self.map_frame:
            return np.eye(4)
        try:
            T = np.asarray(self._tf.lookup(frame, self.map_frame, 0), np.float64)
        except Exception as e:
            raise ValueError(f"unknown frame '{frame}': no TF {frame} <- {self.map_frame} ({e})") from e
        if not np.all(np.isfinite(T)):
            raise ValueError(f"TF {frame} <- {self.map_frame} is not finite")
        return T

    def _save(self, req, res) -> None:
        snap = self.snapshot()
        frame = req.frame_id or self.map_frame
        try:
            cloud = snap.cloud
            if len(cloud) and frame != self.map_frame:
                cloud = transform_cloud(cloud, self._T_from_map(frame), frame_id=frame)
            files = save_cloud(cloud, req.path, per_instance=bool(req.per_instance))
        except (MapSaveError, ValueError) as e:
            res.success, res.message = False, str(e)
            return
        res.success = True
        res.files = [str(f) for f in files]
        res.num_points = len(cloud)
        res.message = (f"{len(cloud)} points, {len(snap.instances)} instances in '{frame}' -> {files[0]}"
                       + (f" (+{len(files) - 1} instance files)" if len(files) > 1 else ""))

    def _reset(self, req, res) -> None:
        n_points, n_inst = self._reset_map()
        res.success = True
        res.points_cleared, res.instances_cleared = int(n_points), int(n_inst)
        res.message = f"map cleared: {n_points} points, {n_inst} instances; the next window starts a new map"

    def _get(self, req, res) -> None:
        snap = self.snapshot()
        q = InstanceQuery(ids=[int(i) for i in req.ids], min_score=float(req.min_score))
        try:
            if req.use_box:
                q.box = (np.array([req.box_min.x, req.box_min.y, req.box_min.z]),
                         np.array([req.box_max.x, req.box_max.y, req.box_max.z]))
                q.T_box_map = self._T_from_map(req.box_frame)
            chosen = query_instances(snap.instances, q)
        except (InstanceQueryError, ValueError) as e:
            res.success, res.message = False, str(e)
            return
        msg = instances_to_msg(chosen, self.map_frame, snap.stamp_ns)
        res.header = msg.header
        res.instances = msg.instances
        if req.with_points:
            pts = points_of(snap.cloud, [int(s.id) for s in chosen])
            res.points = cloud_to_pointcloud2(pts, frame_id=self.map_frame, stamp_ns=snap.stamp_ns)
        res.success = True
        res.message = f"{len(chosen)} of {len(snap.instances)} instances" + (
            f", {res.points.width * res.points.height} points" if req.with_points else "")
