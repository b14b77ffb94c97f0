"""Helpers for the lifecycle / map service tests: a lifecycle node spun by a multi-threaded executor in
this process (own context: its own DDS participant), a scripted predictor with a known two-object scene,
and a client side that publishes camera frames and calls services over DDS."""

from __future__ import annotations

import threading
import time

import numpy as np

from fast3dis_ros.core.frames import WindowPrediction
from ros_helpers import FramePump, RosContext

CAMS = ["left", "right"]
H, W = 24, 32
BASE_NS = 1_700_000_000_000_000_000


class ScriptedPredictor:
    """Two objects seen by every view, from fixed camera poses: instance A (score 0.9) in the left half of
    the image, instance B (score 0.4) in the right half, a flat wall 2 m away. ``delay_s`` makes each
    window slow, ``busy`` is set while a window is being predicted (tests call services then)."""

    score_threshold = 0.0

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.busy = threading.Event()
        self.calls = 0

    def predict(self, window) -> WindowPrediction:
        self.busy.set()
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            self.calls += 1
            return self._scene(window)
        finally:
            self.busy.clear()

    @staticmethod
    def _scene(window) -> WindowPrediction:
        views = window.views
        v = len(views)
        depth = np.full((v, H, W), 2.0, np.float32)
        labels = np.zeros((v, H, W), np.int32)
        labels[:, 4:20, 2:12] = 1
        labels[:, 4:20, 20:30] = 2
        K = np.array([[30.0, 0, (W - 1) / 2], [0, 30.0, (H - 1) / 2], [0, 0, 1]])
        T = np.repeat(np.eye(4)[None], v, 0)
        for i, f in enumerate(views):  # camera pose by camera, the same in every window
            T[i, 0, 3] = -0.05 * CAMS.index(f.camera) if f.camera in CAMS else 0.0
        return WindowPrediction(
            window.index, window.stamp_ns, [f.camera for f in views], [f.frame_id for f in views],
            [int(f.stamp_ns) for f in views], np.full((v, H, W, 3), 100, np.uint8), depth,
            np.ones((v, H, W), np.float32), np.repeat(K[None], v, 0), T, labels,
            np.array([0.9, 0.4], np.float32), depth_scale_metric=True)


NODE_PARAMS = {
    "cameras": CAMS, "window_size": 2, "stride": 1, "device": "cpu", "score_threshold": 0.0,
    "voxel_size": 0.05, "queue_depth": 1, "diagnostics_period": 0.3, "sync_slop": 0.02,
    "warmup_width": W, "warmup_height": H, "publish_tf": False,
}


class LifecycleNodeThread:
    """A ``Fast3disLifecycleNode`` in its own context, spun by a 4-thread executor in a daemon thread."""

    def __init__(self, domain_id: int, predictor=None, namespace: str = "", params: dict | None = None,
                 overrides: dict | None = None):
        import rclpy
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.parameter import Parameter

        from fast3dis_ros.ros.lifecycle import Fast3disLifecycleNode

        self.rclpy = rclpy
        self.context = rclpy.context.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        values = {**NODE_PARAMS, **(params or {}), **(overrides or {})}
        self.node = Fast3disLifecycleNode(
            predictor=predictor, context=self.context, namespace=namespace,
            parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self.error: Exception | None = None  # an exception that escaped a callback (a node bug)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception as e:  # the context shut down (close()), or a callback raised: keep it for the test
            if self.context.ok():
                self.error = e
                import traceback

                traceback.print_exc()

    def close(self) -> None:
        try:
            self.node.shutdown()
            self.executor.shutdown(timeout_sec=2.0)
            self.node.destroy_node()
        finally:
            if self.context.ok():
                self.rclpy.shutdown(context=self.context)
        self.thread.join(5.0)

    def __enter__(self) -> LifecycleNodeThread:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Client(FramePump):
    """The test side: frame publishers for one namespace, service / lifecycle clients, output subscribers."""

    pump_period = 0.2

    def __init__(self, ctx: RosContext, ns: str = ""):
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image

        self.ctx = ctx
        self.ns = ns.rstrip("/")
        n = ctx.node
        q = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.img_pubs = [n.create_publisher(Image, f"{self.ns}/{c}/image_raw", q) for c in CAMS]
        self.info_pubs = [n.create_publisher(CameraInfo, f"{self.ns}/{c}/camera_info", q) for c in CAMS]
        self.k = 0
        self._clients: dict = {}

    @property
    def node_path(self) -> str:
        return f"{self.ns}/fast3dis"

    def publish_set(self) -> None:
        from sensor_msgs.msg import CameraInfo

        from fast3dis_ros.ros.conversions import ns_to_stamp, numpy_to_image

        stamp = ns_to_stamp(BASE_NS + self.k * 100_000_000)
        for i, c in enumerate(CAMS):
            msg = numpy_to_image(np.full((H, W, 3), 90 + 20 * i, np.uint8), "rgb8")
            msg.header.stamp, msg.header.frame_id = stamp, f"{c}_optical_frame"
            ci = CameraInfo(width=W, height=H, distortion_model="plumb_bob")
            ci.header = msg.header
            ci.k = [30.0, 0.0, (W - 1) / 2, 0.0, 30.0, (H - 1) / 2, 0.0, 0.0, 1.0]
            self.info_pubs[i].publish(ci)
            self.img_pubs[i].publish(msg)
        self.k += 1

    def image_subscribers(self) -> int:
        return sum(p.get_subscription_count() for p in self.img_pubs)

    # ------------------------------------------------------------------ services
    def call(self, srv_type, name: str, request, timeout: float = 20.0):
        """Call a service over DDS; returns (response, seconds) or raises AssertionError."""
        cli = self._clients.get(name)
        if cli is None:
            # one client per service, kept: a fresh client's first request can go out before the server's
            # response writer has matched it (the answer is then lost), so it waits a moment once
            cli = self._clients[name] = self.ctx.node.create_client(srv_type, name)
            assert self.ctx.spin_until(cli.service_is_ready, 20.0), f"service {name} not available"
            self.ctx.spin_for(0.3)
        assert self.ctx.spin_until(cli.service_is_ready, 20.0), f"service {name} not available"
        t0 = time.monotonic()
        fut = cli.call_async(request)
        assert self.ctx.spin_until(fut.done, timeout), f"no answer from {name} in {timeout} s"
        return fut.result(), time.monotonic() - t0

    def change_state(self, label: str) -> bool:
        """A transition by label through the standard lifecycle_msgs/ChangeState service (what
        ``ros2 lifecycle set`` calls)."""
        from lifecycle_msgs.srv import ChangeState

        req = ChangeState.Request()
        req.transition.label = label
        res, _ = self.call(ChangeState, f"{self.node_path}/change_state", req, timeout=60.0)
        return bool(res.success)

    def get_state(self) -> str:
        from lifecycle_msgs.srv import GetState

        res, _ = self.call(GetState, f"{self.node_path}/get_state", GetState.Request())
        return res.current_state.label

    def get_instances(self, **kw):
        from fast3dis_msgs.srv import GetInstances

        req = GetInstances.Request()
        for k, v in kw.items():
            if k in ("box_min", "box_max"):
                p = getattr(req, k)
                p.x, p.y, p.z = (float(c) for c in v)
            else:
                setattr(req, k, v)
        return self.call(GetInstances, f"{self.node_path}/get_instances", req)[0]

    def save_map(self, path: str, frame_id: str = "", per_instance: bool = False):
        from fast3dis_msgs.srv import SaveMap

        return self.call(SaveMap, f"{self.node_path}/save_map",
                         SaveMap.Request(path=path, frame_id=frame_id, per_instance=per_instance))[0]

    def reset_map(self):
        from fast3dis_msgs.srv import ResetMap

        return self.call(ResetMap, f"{self.node_path}/reset_map", ResetMap.Request())[0]
