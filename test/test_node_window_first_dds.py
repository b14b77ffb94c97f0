"""The node's outputs over real DDS (loopback, own domain) with a ground-truth stand-in predictor:
``~/window_cloud`` goes out from ``MapFusion.begin`` (before the map update) and must carry exactly the
aligned, id-matched window cloud of an offline fusion of the same predictions; ``map_publish_period``
throttles ``~/instances_cloud`` without losing the newest map."""

import time

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("fast3dis_msgs.msg")

from ros_helpers import RosContext, read_cloud, unique_domain_id  # noqa: E402

W, H, CAMS, N_FRAMES, WIN, STRIDE = 84, 63, 2, 6, 2, 1
BASE_NS = 1_700_000_000_000_000_000
PERIOD_NS = 100_000_000


def _stamp(f: int, c: int) -> int:
    return BASE_NS + f * PERIOD_NS + c * 1_000_000


@pytest.fixture(scope="module")
def scene():
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene

    return generate_scene(SceneConfig(n_cameras=CAMS, n_frames=N_FRAMES, width=W, height=H, seed=3))


class GtPredictor:
    """The scene's ground truth for the views of a window (world = camera of the window's first view)."""

    score_threshold = 0.5

    def __init__(self, scene):
        from fast3dis_ros.ros.bench_node import _gt_prediction

        self._gt = _gt_prediction
        self.lookup = {(v.camera, _stamp(f, c)): v for f, fr in enumerate(scene.frames) for c, v in enumerate(fr)}

    def predict(self, w):
        vs = w.views
        return self._gt([self.lookup[(v.camera, int(v.stamp_ns))] for v in vs], w.index, [int(v.stamp_ns) for v in vs])


def _offline(scene):
    """The same predictions through a MapFusion with the node's defaults (what the node must publish)."""
    from fast3dis_ros.pipeline.fusion import MapFusion
    from fast3dis_ros.pipeline.runner import PipelineRunner
    from fast3dis_ros.core.frames import CameraFrame

    out = []
    fusion = MapFusion(voxel_size=0.02, max_points=1_000_000, min_score=0.5, max_points_per_view=20_000)
    r = PipelineRunner(scene.camera_names, GtPredictor(scene).predict, slop_ns=50_000_000, window_size=WIN,
                       stride=STRIDE, fusion=fusion, sync_mode=True, on_fusion=lambda res, p: out.append(res))
    for f, fr in enumerate(scene.frames):
        for c, v in enumerate(fr):
            r.feed(CameraFrame(v.camera, _stamp(f, c), v.rgb, f"{v.camera}_optical_frame"))
    r.flush()
    return out


class _Run:
    """A Fast3disNode and a subscriber in one context (the node publishes from its engine thread; the test
    spins the executor, which also runs the node's timers)."""

    def __init__(self, scene, **params):
        from fast3dis_msgs.msg import InstanceArray
        from rclpy.parameter import Parameter
        from sensor_msgs.msg import PointCloud2

        from fast3dis_ros.ros.node import Fast3disNode
        from fast3dis_ros.ros.qos import output_qos

        self.scene = scene
        self.ctx = RosContext(unique_domain_id())
        ov = [Parameter("cameras", value=list(scene.camera_names)), Parameter("window_size", value=WIN),
              Parameter("stride", value=STRIDE), Parameter("sync_slop", value=0.05)]
        ov += [Parameter(k, value=v) for k, v in params.items()]
        self.node = Fast3disNode(predictor=GtPredictor(scene), context=self.ctx.context, parameter_overrides=ov)
        self.ctx.executor.add_node(self.node)
        self.got = {"window": [], "map": [], "inst": []}
        n = self.ctx.node
        for key, typ, topic in (("window", PointCloud2, "/fast3dis/window_cloud"),
                                ("map", PointCloud2, "/fast3dis/instances_cloud"),
                                ("inst", InstanceArray, "/fast3dis/instances")):
            n.create_subscription(typ, topic, lambda m, k=key: self.got[k].append((time.monotonic(), m)),
                                  output_qos(50))
        ok = self.ctx.spin_until(lambda: all(p.get_subscription_count() >= 1 for p in
                                             (self.node.pub_window, self.node.pub_map, self.node.pub_instances)), 20)
        assert ok, "subscriptions never matched"

    def feed_all(self):
        from fast3dis_ros.ros.conversions import ns_to_stamp, numpy_to_image

        for f, fr in enumerate(self.scene.frames):
            for c, v in enumerate(fr):
                m = numpy_to_image(v.rgb, "rgb8")
                m.header.stamp = ns_to_stamp(_stamp(f, c))
                m.header.frame_id = f"{v.camera}_optical_frame"
                self.node._on_image(m, v.camera)  # the node's Image subscription callback
            assert self.node.runner.engine.wait_idle(30.0)
            self.ctx.spin_for(0.05)

    def close(self):
        self.node.shutdown()
        self.ctx.executor.remove_node(self.node)
        self.node.destroy_node()
        self.ctx.close()


def _stamps(msgs):
    from fast3dis_ros.ros.conversions import stamp_to_ns

    return [stamp_to_ns(m.header.stamp) for _, m in msgs]


@pytest.mark.timeout(120)
def test_window_cloud_first_and_exact_over_dds(scene):

    ref = _offline(scene)
    assert len(ref) == (N_FRAMES - WIN) // STRIDE + 1 and ref[1].align_method == "shared_views"
    run = _Run(scene)
    try:
        run.feed_all()
        n = len(ref)
        assert run.ctx.spin_until(lambda: all(len(v) >= n for v in run.got.values()), 20), \
            {k: len(v) for k, v in run.got.items()}
    finally:
        run.close()
    expected = [r.stamp_ns for r in ref]
    assert _stamps(run.got["window"]) == expected and _stamps(run.got["map"]) == expected
    assert _stamps(run.got["inst"]) == expected
    for r, (_, wmsg), (_, mmsg), (_, ia) in zip(ref, run.got["window"], run.got["map"], run.got["inst"]):
        assert wmsg.header.frame_id == "map" and mmsg.header.frame_id == "map"
        w = read_cloud(wmsg)
        # the window cloud on the wire is the aligned (map frame), id-matched window cloud, to the bit
        assert len(w) == len(r.window_cloud) > 100
        assert np.array_equal(np.stack([w["x"], w["y"], w["z"]], 1), r.window_cloud.xyz)
        assert np.array_equal(w["instance"], r.window_cloud.instance)
        assert np.array_equal(w["score"], r.window_cloud.score)
        m = read_cloud(mmsg)
        assert len(m) == len(r.map_cloud) and np.array_equal(m["instance"], r.map_cloud.instance)
        assert np.array_equal(np.stack([m["x"], m["y"], m["z"]], 1), r.map_cloud.xyz)
        ids = {i.id for i in ia.instances}
        assert ids == {s.id for s in r.instances} and set(np.unique(w["instance"]).tolist()) - {0} <= ids
    # ids are stable: later windows reuse the first window's ids
    first = set(np.unique(ref[0].window_cloud.instance).tolist()) - {0}
    assert first and first & (set(np.unique(ref[-1].window_cloud.instance).tolist()) - {0})


@pytest.mark.timeout(120)
def test_map_publish_period_throttles_and_flushes_the_newest_map(scene):

    from rclpy.parameter import Parameter

    ref = _offline(scene)
    n = len(ref)
    run = _Run(scene, map_publish_period=60.0)
    try:
        run.feed_all()
        assert run.ctx.spin_until(lambda: len(run.got["window"]) >= n and len(run.got["inst"]) >= n, 20)
        run.ctx.spin_for(0.5)
        # one map per period: the first window's; the others are held back (the newest one pending)
        assert _stamps(run.got["map"]) == [ref[0].stamp_ns]
        assert _stamps(run.got["window"]) == [r.stamp_ns for r in ref]
        assert run.node.diag.maps_published == 1
        t_set = time.monotonic()
        res = run.node.set_parameters([Parameter("map_publish_period", value=0.3)])
        assert res[0].successful
        # the map timer sends the newest pending map once the (new) period is over; nothing is re-sent
        assert run.ctx.spin_until(lambda: len(run.got["map"]) >= 2, 10)
        run.ctx.spin_for(1.0)
    finally:
        run.close()
    assert _stamps(run.got["map"]) == [ref[0].stamp_ns, ref[-1].stamp_ns]
    assert run.got["map"][1][0] - t_set < 5.0
    last = read_cloud(run.got["map"][1][1])
    assert len(last) == len(ref[-1].map_cloud) and np.array_equal(last["instance"], ref[-1].map_cloud.instance)
