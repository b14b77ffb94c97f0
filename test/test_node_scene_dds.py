"""The node as its own process (bundled tiny checkpoint, CPU) over real DDS on loopback, fed a rendered
synthetic scene: 3 cameras x 10 frames at 112x84 (Image + CameraInfo, and in the known-pose test the
ground-truth poses on /tf), window 4 / stride 2 -> 4 windows. Checks the clouds, instance messages and
TF that come back against the scene's ground truth.

Measured with the bundled checkpoint, scene seed 0 (CPU, 2 cores), estimated poses: camera-centre ATE
after a Sim(3) (Umeyama) = 0.65 m RMSE, i.e. 0.32 of the GT camera-trajectory extent (2.0 m) and 0.09 of
the room extent (7.0 m). The tiny model's poses are weak: collapsing every camera onto one point would
give 0.33 of the trajectory extent (ATE 0.657 m, 1.7% worse), and relative rotations are no better than
all-identity; so the test bounds the measured relative ATE (0.30-0.33) and requires it below 0.995 x the
collapse ATE, while the exact check is that the published TF equals an in-process replay of the same frame
sets through the same pipeline.

Known poses (use_known_poses, GT on /tf as world -> <cam>_optical_frame, camera_frame {camera}_fused):
the first window's published poses equal GT to 1e-9 m; later windows are aligned by MapFusion on their
shared views; both windows are metric (pose-conditioned), so the alignment uses scale 1 and every
window's poses equal GT (before that fix a depth-ratio scale of 0.56 / 0.38 moved cameras by up to 0.49 m).
"""

import time

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("fast3dis_msgs.msg")
pytest.importorskip("tf2_msgs.msg")

from ros_helpers import RosContext, RosProcess, read_cloud, unique_domain_id, wait_for_subscribers  # noqa: E402

W, H, N_FRAMES, WIN, STRIDE = 112, 84, 10, 4, 2
BASE_NS = 1_700_000_000_000_000_000
PERIOD_NS = 100_000_000
FIELDS = [("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("rgb", 12, 7), ("instance", 16, 6), ("score", 20, 7)]


@pytest.fixture(scope="module")
def scene():
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene

    return generate_scene(SceneConfig(n_cameras=3, n_frames=N_FRAMES, width=W, height=H, seed=0))


def _stamp(fi):
    return BASE_NS + fi * PERIOD_NS


def _window_stamps():
    """Newest frame set stamp of each window: windows end at sets WIN-1, WIN-1+STRIDE, ..."""
    return [_stamp(e) for e in range(WIN - 1, N_FRAMES, STRIDE)]


def _node_args(cams, *extra):
    return ["-m", "fast3dis_ros.ros.node", "--ros-args",
            "-p", f"cameras:=[{','.join(cams)}]", "-p", f"window_size:={WIN}", "-p", f"stride:={STRIDE}",
            "-p", "checkpoint:=bundled", "-p", "device:=cpu", "-p", "process_long_edge:=70",
            "-p", "sync_slop:=0.02", "-p", "queue_depth:=16", "-p", "output_qos_depth:=20",
            "-p", "diagnostics_period:=1.0", *extra]


class _Harness:
    def __init__(self, ctx, scene):
        from fast3dis_msgs.msg import InstanceArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from tf2_msgs.msg import TFMessage

        self.scene = scene
        self.cams = list(scene.camera_names)
        n = ctx.node
        q = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.img_pubs = [n.create_publisher(Image, f"/{c}/image_raw", q) for c in self.cams]
        self.info_pubs = [n.create_publisher(CameraInfo, f"/{c}/camera_info", q) for c in self.cams]
        self.tf_pub = n.create_publisher(TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.got = {k: [] for k in ("map", "window", "inst", "tf")}
        for key, typ, topic in (("map", PointCloud2, "/fast3dis/instances_cloud"),
                                ("window", PointCloud2, "/fast3dis/window_cloud"),
                                ("inst", InstanceArray, "/fast3dis/instances"),
                                ("tf", TFMessage, "/tf")):
            n.create_subscription(typ, topic, lambda m, k=key: self.got[k].append(m), q)
        self.k = 0
        self.next_pub = 0.0

    def publish_gt_tf(self, parent="world"):
        from fast3dis_ros.ros.tf import matrix_to_transform
        from tf2_msgs.msg import TFMessage

        for fi, fr in enumerate(self.scene.frames):
            self.tf_pub.publish(TFMessage(transforms=[
                matrix_to_transform(v.T_world_cam, parent, f"{v.camera}_optical_frame", _stamp(fi)) for v in fr]))

    def publish_infos(self, k):
        from fast3dis_ros.ros.conversions import ns_to_stamp
        from sensor_msgs.msg import CameraInfo

        for i, v in enumerate(self.scene.frames[k]):
            ci = CameraInfo(width=W, height=H, distortion_model="plumb_bob")
            ci.header.stamp, ci.header.frame_id = ns_to_stamp(_stamp(k)), f"{v.camera}_optical_frame"
            ci.k = [float(x) for x in v.K.reshape(-1)]
            ci.p = [float(v.K[0, 0]), 0.0, float(v.K[0, 2]), 0.0, 0.0, float(v.K[1, 1]), float(v.K[1, 2]), 0.0,
                    0.0, 0.0, 1.0, 0.0]
            self.info_pubs[i].publish(ci)

    def publish_set(self):
        from fast3dis_ros.ros.conversions import ns_to_stamp, numpy_to_image

        stamp = ns_to_stamp(_stamp(self.k))
        self.publish_infos(self.k)
        for i, v in enumerate(self.scene.frames[self.k]):
            fid = f"{v.camera}_optical_frame"
            msg = numpy_to_image(v.rgb, "rgb8")
            msg.header.stamp, msg.header.frame_id = stamp, fid
            self.img_pubs[i].publish(msg)
        self.k += 1

    def pump(self, period=0.3):
        def step():
            now = time.monotonic()
            if self.k < N_FRAMES and now >= self.next_pub:
                self.publish_set()
                self.next_pub = now + period
        return step

    def run(self, ctx, node, gt_tf=False, timeout=50.0):
        for p in self.img_pubs + self.info_pubs:
            assert wait_for_subscribers(ctx, p, 1, timeout=40), f"node never subscribed:\n{node.output()[-3000:]}"
        # CameraInfo first: an image whose CameraInfo has not arrived yet is processed without K, and a
        # window is pose-conditioned only when every view has K and a pose
        for _ in range(3):
            self.publish_infos(0)
            ctx.spin_for(0.1)
        if gt_tf:
            # the node's TF listener (plus our own /tf subscription) must be matched before volatile /tf is sent
            assert wait_for_subscribers(ctx, self.tf_pub, 2, timeout=20), node.output()[-3000:]
            self.publish_gt_tf()
            ctx.spin_for(0.5)
        n_win = len(_window_stamps())
        ok = ctx.spin_until(lambda: (len(self.got["map"]) >= n_win and len(self.got["inst"]) >= n_win)
                            or not node.alive(), timeout=timeout, step=self.pump())
        ctx.spin_for(0.5)  # the last window's TF / window cloud
        assert ok and node.alive(), (f"got {[(k, len(v)) for k, v in self.got.items()]} after {self.k} frame sets;"
                                     f" node output:\n{node.output()[-4000:]}")


def _check_common(h):
    """Cloud layout/frame/stamps and instance id consistency across windows."""
    from fast3dis_ros.ros.conversions import stamp_to_ns

    expected = _window_stamps()
    assert [stamp_to_ns(m.header.stamp) for m in h.got["map"]] == expected
    assert [stamp_to_ns(m.header.stamp) for m in h.got["inst"]] == expected
    assert [stamp_to_ns(m.header.stamp) for m in h.got["window"]] == expected
    for pc in h.got["map"] + h.got["window"]:
        assert pc.header.frame_id == "map"
        assert [(f.name, f.offset, f.datatype) for f in pc.fields] == FIELDS
        assert pc.point_step == 24 and pc.height == 1 and pc.row_step == 24 * pc.width and not pc.is_bigendian
        assert pc.width > 0
        arr = read_cloud(pc)
        assert len(arr) == pc.width and np.isfinite(arr["x"]).all() and np.isfinite(arr["z"]).all()
    seen: set[int] = set()
    for pc, ia in zip(h.got["map"], h.got["inst"]):
        assert ia.header.frame_id == "map"
        ids = [i.id for i in ia.instances]
        assert len(ids) == len(set(ids)) and all(i > 0 for i in ids)
        # an id lives in InstanceArray exactly while the running map holds points with it
        cloud_ids = set(np.unique(read_cloud(pc)["instance"]).tolist()) - {0}
        assert set(ids) == cloud_ids
        for i in ia.instances:
            assert i.num_points > 0 and 0.0 <= i.score <= 1.0
            assert i.bbox_min.x <= i.centroid.x <= i.bbox_max.x and i.bbox_min.z <= i.centroid.z <= i.bbox_max.z
        new = set(ids) - seen
        assert not seen or not new or min(new) > max(seen), f"new ids {sorted(new)} not above {sorted(seen)}"
        seen |= set(ids)
    assert seen, "no instance was ever published"
    assert {i.id for i in h.got["inst"][-1].instances} <= seen
    return seen


def _tf_by_child(h, parent="map"):
    """child -> stamp -> 4x4 (the last one received for that stamp)."""
    from fast3dis_ros.ros.conversions import stamp_to_ns
    from fast3dis_ros.ros.tf import transform_to_matrix

    out = {}
    for m in h.got["tf"]:
        for t in m.transforms:
            if t.header.frame_id == parent:
                out.setdefault(t.child_frame_id, {})[stamp_to_ns(t.header.stamp)] = transform_to_matrix(t)
    return out


def _gt(scene):
    return {(v.camera, _stamp(fi)): v.T_world_cam for fi, fr in enumerate(scene.frames) for v in fr}


@pytest.mark.timeout(90)
def test_scene_estimated_poses_over_dds(scene):
    from fast3dis_ros.geometry.align import umeyama
    from fast3dis_ros.model.checkpoint import BUNDLED_CHECKPOINT
    from fast3dis_ros.inference.predictor import Predictor
    from fast3dis_ros.data.synthetic import scene_frame_sets
    from fast3dis_ros.pipeline.fusion import MapFusion
    from fast3dis_ros.pipeline.runner import PipelineRunner

    t0 = time.monotonic()
    dom = unique_domain_id()
    with RosContext(dom) as ctx, RosProcess(_node_args(scene.camera_names), dom, name="fast3dis_scene") as node:
        h = _Harness(ctx, scene)
        h.run(ctx, node)
    elapsed = time.monotonic() - t0
    ids = _check_common(h)

    # TF map -> <cam>_optical_frame for every view of every window, stamped with the view's stamp
    tf = _tf_by_child(h)
    assert set(tf) == {f"{c}_optical_frame" for c in scene.camera_names}
    for c in scene.camera_names:
        assert set(tf[f"{c}_optical_frame"]) == {_stamp(fi) for fi in range(N_FRAMES)}
    est = {(c, s): T for c in scene.camera_names for s, T in tf[f"{c}_optical_frame"].items()}

    # exact: the same frame sets through the same pipeline in this process give the same poses
    pred = Predictor.from_checkpoint(str(BUNDLED_CHECKPOINT), device="cpu", process_size=70, score_threshold=0.5)
    ref = {}

    def keep(res, p):
        for v in range(len(p.cameras)):
            ref[(p.cameras[v], int(p.view_stamps_ns[v]))] = res.T_map_cam[v]  # last window's estimate wins

    runner = PipelineRunner(scene.camera_names, pred.predict, slop_ns=20_000_000, window_size=WIN, stride=STRIDE,
                            fusion=MapFusion(voxel_size=0.02, min_score=0.5), sync_mode=True, on_fusion=keep)
    for fs in scene_frame_sets(scene, start_ns=BASE_NS):
        for f in fs.frames:
            runner.feed(f)
    runner.flush()
    assert set(ref) == set(est)
    for k in ref:
        np.testing.assert_allclose(est[k][:3, :3], ref[k][:3, :3], atol=2e-3, err_msg=str(k))
        np.testing.assert_allclose(est[k][:3, 3], ref[k][:3, 3], atol=2e-3 * max(1.0, np.abs(ref[k][:3, 3]).max()))

    # loose: camera centres agree with GT after a Sim(3)
    gt = _gt(scene)
    keys = sorted(est)
    A = np.stack([est[k][:3, 3] for k in keys])
    B = np.stack([gt[k][:3, 3] for k in keys])
    s, R, t = umeyama(A, B)
    ate = float(np.sqrt(np.mean(np.sum(((s * (R @ A.T)).T + t - B) ** 2, axis=1))))
    extent = float(np.linalg.norm(B.max(0) - B.min(0)))
    # every camera collapsed onto one point (the best Sim(3) then puts it at the GT centroid)
    collapse = float(np.sqrt(np.mean(np.sum((B - B.mean(0)) ** 2, axis=1))))
    assert np.isfinite(s) and s > 0
    # measured: ATE 0.646 m = 0.321 of the extent, 0.983 of the collapse ATE (0.657 m). The tiny model's
    # poses are weak, so the margin is small, but identical or scrambled poses fail these bounds.
    assert 0.30 <= ate / extent <= 0.33, f"relative ATE {ate / extent:.3f} (ATE {ate:.3f} m, extent {extent:.2f} m)"
    assert ate < 0.995 * collapse, (ate, collapse)
    print(f"estimated poses over DDS: {len(keys)} views, Sim(3) ATE {ate:.3f} m = {ate / extent:.3f} of the "
          f"trajectory extent {extent:.2f} m (scale {s:.3f}); ids {sorted(ids)}; {elapsed:.1f} s")


@pytest.mark.timeout(90)
def test_scene_known_poses_over_dds(scene):
    from fast3dis_ros.ros.conversions import stamp_to_ns
    from fast3dis_ros.ros.tf import transform_to_matrix

    t0 = time.monotonic()
    dom = unique_domain_id()
    args = _node_args(scene.camera_names, "-p", "use_known_poses:=true", "-p", "known_pose_frame:=world",
                      "-p", "camera_frame:=\"{camera}_fused\"")
    with RosContext(dom) as ctx, RosProcess(args, dom, name="fast3dis_scene_known") as node:
        h = _Harness(ctx, scene)
        h.run(ctx, node, gt_tf=True)
        log = node.output()
    elapsed = time.monotonic() - t0
    assert "no TF world" not in log, log[-3000:]
    _check_common(h)

    # the node never gives the input camera frames a second parent
    node_tfs = [t for m in h.got["tf"] for t in m.transforms if t.header.frame_id != "world"]
    assert all(not t.child_frame_id.endswith("_optical_frame") for t in node_tfs)
    # world -> map: the map is the known frame (identity), one per window
    w2m = [transform_to_matrix(t) for m in h.got["tf"] for t in m.transforms
           if t.header.frame_id == "world" and t.child_frame_id == "map"]
    assert len(w2m) == len(_window_stamps())
    np.testing.assert_allclose(w2m[0], np.eye(4), atol=1e-9)
    # fused camera poses map -> <cam>_fused for every view, compared with GT
    tf = _tf_by_child(h)
    assert set(tf) == {f"{c}_fused" for c in scene.camera_names}
    gt = _gt(scene)
    for c in scene.camera_names:
        assert set(tf[f"{c}_fused"]) == {_stamp(fi) for fi in range(N_FRAMES)}
    # one TFMessage of map -> <cam>_fused per window (all its views)
    per_window = [[t for t in m.transforms if t.header.frame_id == "map"] for m in h.got["tf"]]
    per_window = [w for w in per_window if w]
    assert len(per_window) == len(_window_stamps()) and all(len(w) == WIN * len(scene.camera_names)
                                                            for w in per_window)
    errs = []
    for w in per_window:
        e = 0.0
        for t in w:
            T, G = transform_to_matrix(t), gt[(t.child_frame_id[: -len("_fused")], stamp_to_ns(t.header.stamp))]
            e = max(e, float(np.abs(T[:3, 3] - G[:3, 3]).max()), float(np.abs(T[:3, :3] - G[:3, :3]).max()))
        errs.append(e)
    err_first, err_all = errs[0], max(errs)
    w2m_err = max(float(np.abs(T - np.eye(4)).max()) for T in w2m)
    print(f"known poses over DDS: max pose error first window {err_first:.2e}, all windows {err_all:.2e} "
          f"(per window {[f'{e:.2e}' for e in errs]}), world->map max deviation from identity {w2m_err:.2e}; {elapsed:.1f} s")
    # first window: its world is the known frame, anchored as map
    assert err_first < 1e-6
    # later windows: MapFusion aligns two metric (pose-conditioned) windows with scale 1, so they stay exact
    assert err_all < 1e-4 and w2m_err < 1e-4, (errs, w2m_err)


@pytest.mark.timeout(90)
def test_scene_rig_extrinsics_over_dds(scene):
    """use_rig_extrinsics: the node reads base_link <- <cam>_optical_frame from /tf_static (latched, sent
    before the node starts) and puts every frame set's cameras back on that rig, in metres: the fused
    poses it publishes have the rig's relative poses exactly (the network's own are off by centimetres
    and arbitrary units)."""
    from tf2_ros import StaticTransformBroadcaster

    from fast3dis_ros.ros.tf import matrix_to_transform

    dom = unique_domain_id()
    args = _node_args(scene.camera_names, "-p", "use_rig_extrinsics:=true", "-p", "camera_frame:=\"{camera}_fused\"")
    with RosContext(dom) as ctx:
        static = StaticTransformBroadcaster(ctx.node)
        static.sendTransform([matrix_to_transform(scene.T_rig_cam[c], "base_link", f"{c}_optical_frame", BASE_NS)
                              for c in scene.camera_names])
        with RosProcess(args, dom, name="fast3dis_scene_rig") as node:
            h = _Harness(ctx, scene)
            h.run(ctx, node)
            log = node.output()
    assert "no static TF" not in log, log[-3000:]
    _check_common(h)
    tf = _tf_by_child(h)
    cams = scene.camera_names
    assert set(tf) == {f"{c}_fused" for c in cams}
    n = 0
    for fi in range(N_FRAMES):
        st = _stamp(fi)
        for c in cams[1:]:
            rel = np.linalg.inv(tf[f"{cams[0]}_fused"][st]) @ tf[f"{c}_fused"][st]
            want = np.linalg.inv(scene.T_rig_cam[cams[0]]) @ scene.T_rig_cam[c]
            np.testing.assert_allclose(rel, want, atol=1e-5, err_msg=f"{c} at frame {fi}")
            n += 1
    assert n == N_FRAMES * (len(cams) - 1)
