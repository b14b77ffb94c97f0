"""The window's own outputs before the map update: ``MapFusion.begin`` / ``commit``, ``lift_window``,
threaded fusion, and ``PipelineRunner(on_window=...)`` ordering. Every comparison is on real values."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fast3dis_ros.geometry.cameras import invert_se3
from fast3dis_ros.geometry.clouds import lift_view, pack_voxel_keys, packed_voxel_keys, voxel_keys
from fast3dis_ros.core.frames import CameraFrame
from fast3dis_ros.bench.integrate import random_prediction
from fast3dis_ros.pipeline.fusion import MapFusion, lift_window
from fast3dis_ros.pipeline.runner import PipelineRunner, count_nonfinite

import test_fusion as tf  # noqa: E402  (the synthetic sphere scene of test_fusion)


def _awkward_prediction(seed: int, views: int = 6, h: int = 37, w: int = 53):
    """Random depth with NaN / inf / zero / negative pixels, low confidences, per-view K, negative labels
    and labels past the score list."""
    rng = np.random.default_rng(seed)
    p = random_prediction(rng, views, h, w, 0, n_instances=7, depth_range=(0.5, 6.0))
    p.depth[0, :3, :5] = np.nan
    p.depth[1, 4:9, 10:20] = np.inf
    p.depth[2, -3:] = 0.0
    p.depth[3, 10, :] = -1.0
    p.depth_conf = rng.uniform(0.0, 2.0, p.depth.shape).astype(np.float32)
    p.depth_conf[4, 5:8, 5:8] = np.nan
    p.K = p.K.copy()
    p.K[1, 0, 0] *= 1.1  # one view with other intrinsics
    p.labels[0, :2, :2] = -3
    p.labels[5, -4:, -4:] = 12  # past the 7 scores: follows the last score
    p.scores = np.array([0.9, 0.2, 0.6, 0.1, 0.95, 0.3, 0.05], np.float32)
    return p


def _threads(k=2):
    pool = ThreadPoolExecutor(k)

    def run(fns):
        futs = [pool.submit(f) for f in fns]
        return [f.result() for f in futs]

    return run, pool


def _lift_view_reference(p, T, stride, conf, conf_mode, min_score):
    """The window lifted view by view with ``lift_view`` (an independent per-view implementation), labels of
    low-score instances -> 0 as fusion wants them: (xyz (N, 3) float32, rgb (N, 3), label (N,))."""
    low = np.concatenate([[False], p.scores < min_score]) if min_score > 0 else np.zeros(len(p.scores) + 1, bool)
    parts = []
    for v in range(p.depth.shape[0]):
        lab = np.where(low[np.clip(p.labels[v], 0, len(p.scores))], 0, p.labels[v])
        parts.append(lift_view(p.depth[v], p.K[v], T @ invert_se3(p.T_cam_world[v]), rgb=p.images[v], labels=lab,
                               conf=p.depth_conf[v], conf_threshold=conf, conf_mode=conf_mode, pixel_stride=stride))
    return (np.concatenate([c.xyz for c in parts]), np.concatenate([c.rgb for c in parts]),
            np.concatenate([c.instance for c in parts]).astype(np.int64))


@pytest.mark.parametrize("seed,stride,conf,min_score,parts", [(0, 1, 0.0, 0.0, 1), (1, 2, 0.5, 0.5, 2),
                                                               (2, 3, 1.0, 0.25, 3), (3, 2, 0.0, 0.96, 2)])
def test_lift_window_points_in_map_with_their_voxel_keys(seed, stride, conf, min_score, parts):
    """Every view's kept pixels in map as (3, N) rows of float32 values, window labels with low-score
    instances -> 0, each point's packed voxel key; worker threads change nothing."""
    p = _awkward_prediction(seed)
    rng = np.random.default_rng(seed + 100)
    T = tf.rand_sim3(seed)
    T[:3, 3] = rng.uniform(-1, 1, 3)
    run, pool = _threads()
    try:
        X, C, L, keys = lift_window(p, T, stride, 0.05, conf_threshold=conf, min_score=min_score, run=run,
                                    parts=parts)
    finally:
        pool.shutdown()
    serial = lift_window(p, T, stride, 0.05, conf_threshold=conf, min_score=min_score)
    assert all(np.array_equal(a, b) for a, b in zip((X, C, L, keys), serial))
    xyz, rgb, lab = _lift_view_reference(p, T, stride, conf, "abs", min_score)
    assert X.shape == (3, len(xyz)) and len(xyz) > 100 and X.dtype == np.float64 and L.dtype == np.int64
    assert np.array_equal(X, X.astype(np.float32).astype(np.float64))  # float32 values, as in the cloud
    assert np.allclose(X.T, xyz, rtol=1e-6, atol=1e-5)
    assert np.array_equal(C.T, rgb) and np.array_equal(L, lab)
    assert np.array_equal(keys, pack_voxel_keys(voxel_keys(X.T.astype(np.float32), 0.05)))
    if min_score > 0:
        assert (L == 0).sum() > (np.asarray(p.labels)[:, ::stride, ::stride] <= 0).sum() * 0.5


def test_lift_window_quantile_confidence_and_empty():
    p = _awkward_prediction(5)
    T = tf.rand_sim3(5)
    X, C, L, keys = lift_window(p, T, 2, 0.1, conf_threshold=0.3, conf_mode="quantile")
    xyz, rgb, lab = _lift_view_reference(p, T, 2, 0.3, "quantile", 0.0)
    assert np.allclose(X.T, xyz, rtol=1e-6, atol=1e-5) and np.array_equal(L, lab) and np.array_equal(C.T, rgb)
    p.depth[:] = np.nan
    X, C, L, keys = lift_window(p, T, 2, 0.1)
    assert X.shape == C.shape == (3, 0) and len(L) == len(keys) == 0


def _sequence():
    """Windows of the sphere scene: overlapping (shared views), a rescaled one, and one that is all NaN."""
    S = tf.rand_sim3(4)
    preds = [tf.make_pred(0, [0, 1]), tf.make_pred(1, [1, 2], S_world_map=S), tf.make_pred(2, [2, 3]),
             tf.make_pred(3, [3, 4], S_world_map=tf.rand_sim3(9))]
    preds[2].depth[1, :5] = np.nan
    empty = tf.make_pred(4, [4, 5])
    empty.depth[:] = np.nan
    return preds + [empty, tf.make_pred(5, [5, 6])]


def _same_cloud(a, b):
    return (len(a) == len(b) and np.array_equal(a.xyz, b.xyz) and np.array_equal(a.rgb, b.rgb)
            and np.array_equal(a.instance, b.instance) and np.array_equal(a.score, b.score))


def _by_key(cloud, voxel):
    o = np.argsort(packed_voxel_keys(cloud.xyz, voxel), kind="stable")
    return cloud.xyz[o], cloud.rgb[o], cloud.instance[o], cloud.score[o]


@pytest.mark.parametrize("max_points", [1_000_000, 900])
def test_begin_commit_equals_integrate_and_threads_change_nothing(max_points):
    kw = dict(voxel_size=0.05, max_points=max_points, min_score=0.3)
    one, two, split = MapFusion(workers=1, **kw), MapFusion(workers=2, **kw), MapFusion(workers=3, **kw)
    for p in _sequence():
        r1, r2 = one.integrate(p), two.integrate(p)
        pending = split.begin(p)
        w = pending.window
        r3 = split.commit(pending)
        # the window part of begin() is what the full result carries
        assert w.window_cloud is r3.window_cloud and w.id_map == r3.id_map and w.align_method == r3.align_method
        assert np.array_equal(w.T_map_cam, r3.T_map_cam) and np.array_equal(w.T_map_window, r3.T_map_window)
        for r in (r2, r3):
            assert r.id_map == r1.id_map and r.align_method == r1.align_method
            assert np.array_equal(r.T_map_window, r1.T_map_window)
            assert _same_cloud(r.window_cloud, r1.window_cloud)
            assert _same_cloud(r.map_cloud, r1.map_cloud)
            assert [(i.id, i.n_points, i.views_seen) for i in r.instances] == \
                   [(i.id, i.n_points, i.views_seen) for i in r1.instances]
            for a, b in zip(r.instances, r1.instances):
                assert np.array_equal(a.centroid, b.centroid) and np.array_equal(a.bbox_min, b.bbox_min)
        assert len(one.map) <= max_points
    assert len(r1.window_cloud) > 0 and len(r1.map_cloud) == len(one.map) == len(two.map)
    assert len(one.map) == max_points or len(one.map) > len(r1.window_cloud)
    if max_points < 10_000:
        assert one.map.evicted > 0 and one.map.evicted == two.map.evicted


def test_window_cloud_is_in_map_frame_before_the_map_update():
    """begin(): the window cloud is already aligned (a window given in a rescaled, rotated world lands on
    the map's voxels) while the map still holds the earlier windows only."""
    S = tf.rand_sim3(21)
    f = MapFusion(voxel_size=0.05, min_score=0.3)
    r0 = f.integrate(tf.make_pred(0, [0, 1]))
    n_before = float(f.map._n[:len(f.map)].sum())
    vox_before = set(packed_voxel_keys(r0.map_cloud.xyz, 0.05).tolist())
    pending = f.begin(tf.make_pred(1, [1, 2], S_world_map=S))
    w = pending.window
    assert w.align_method == "shared_views" and abs(w.scale - 1 / sim3_scale(S)) < 1e-3 * w.scale
    assert float(f.map._n[:len(f.map)].sum()) == n_before  # no point of this window in the map yet
    keys = packed_voxel_keys(w.window_cloud.xyz, 0.05)
    overlap = np.isin(keys, list(vox_before)).mean()
    assert overlap > 0.3, overlap  # frame set 1 is in both windows: same surfaces, same voxels
    ids0 = set(np.unique(r0.map_cloud.instance).tolist()) - {0}
    assert set(np.unique(w.window_cloud.instance).tolist()) - {0} <= ids0 | set(w.id_map.values())
    assert ids0 & set(np.unique(w.window_cloud.instance).tolist())  # stable ids already in the window cloud
    r = f.commit(pending)
    assert float(f.map._n[:len(f.map)].sum()) > n_before and r.window_cloud is w.window_cloud


def sim3_scale(S):
    from fast3dis_ros.geometry.align import sim3_decompose

    return sim3_decompose(S)[0]


def test_begin_commit_protocol():
    f = MapFusion(voxel_size=0.05)
    p0, p1 = tf.make_pred(0, [0, 1]), tf.make_pred(1, [1, 2])
    a = f.begin(p0)
    with pytest.raises(RuntimeError):
        f.begin(p1)  # the map holds a's empty rows: a must be committed first
    other = MapFusion(voxel_size=0.05).begin(p0)
    with pytest.raises(RuntimeError):
        f.commit(other)
    r = f.commit(a)
    with pytest.raises(RuntimeError):
        f.commit(a)  # once only
    b = f.begin(p1)
    f.reset()  # a time jump between begin and commit: the pending window is gone with the map
    with pytest.raises(RuntimeError):
        f.commit(b)
    assert len(f.map) == 0 and f.integrate(p1).align_method == "first" and len(r.map_cloud) > 0


@pytest.mark.parametrize("sync_mode", [True, False])
def test_runner_on_window_runs_between_begin_and_commit(sync_mode):
    events, lock = [], threading.Lock()
    fusion = MapFusion(voxel_size=0.05, min_score=0.3)
    preds = {}

    def predict(w):
        sets = [int(fs.frames[0].stamp_ns) - 1000 for fs in w.frame_sets]
        p = tf.make_pred(w.index, sets)
        preds[w.index] = p
        return p

    def on_window(win, pred):
        with lock:
            events.append(("window", win.window_index, float(fusion.map._n[:len(fusion.map)].sum()),
                           win.window_cloud))
        if win.window_index == 1:
            raise RuntimeError("a failing publisher")  # must not stop the map update

    def on_fusion(res, pred):
        with lock:
            events.append(("fusion", res.window_index, float(fusion.map._n[:len(fusion.map)].sum()),
                           res.window_cloud))

    errors = []
    r = PipelineRunner(["a", "b"], predict, slop_ns=5, window_size=2, stride=1, fusion=fusion, sync_mode=sync_mode,
                       on_window=on_window, on_fusion=on_fusion, on_error=lambda w, e: errors.append(str(e)))
    img = np.zeros((4, 4, 3), np.uint8)
    for k in range(5):
        for cam in ("a", "b"):
            r.feed(CameraFrame(cam, 1000 + k, img))
        if not sync_mode:
            r.engine.wait_idle(30.0)
    r.flush()
    r.stop(5.0)
    kinds = [(e[0], e[1]) for e in events]
    assert kinds == [(k, i) for i in range(4) for k in ("window", "fusion")]
    folded = 0.0
    for i in range(4):
        (_, _, n_w, cloud_w), (_, _, n_f, cloud_f) = events[2 * i], events[2 * i + 1]
        assert n_w == folded and n_f > n_w  # on_window: this window's points are not in the map yet
        assert cloud_w is cloud_f and len(cloud_w) > 0
        folded = n_f
    assert errors == ["a failing publisher"]
    acc = r.accounting()
    assert acc["frame_sets"]["dropped"] == {} and acc["frame_sets"]["processed"] == 5
    assert acc["fusion"]["window_e2e_ms"]["count"] == 4


def test_count_nonfinite_and_deferred_depth_count():
    a = np.ones((3, 5, 7), np.float32)
    assert count_nonfinite(a) == 0
    a[0, 1, 2], a[1, 0, :3], a[2, 4, 4] = np.nan, np.inf, -np.inf
    assert count_nonfinite(a) == 5 and count_nonfinite(np.zeros(0)) == 0
    big = np.full(10, 3e38, np.float32)  # a float32 sum would overflow; float64 does not
    assert count_nonfinite(big) == 0
    # the runner counts them after the window's outputs, for dropped windows too
    fusion = MapFusion(voxel_size=0.05)

    def predict(w):
        p = tf.make_pred(w.index, [0, 1])
        p.depth[0, :2, :3] = np.nan
        if w.index == 1:
            p.T_cam_world[:] = np.nan  # dropped: nonfinite_prediction
        return p

    r = PipelineRunner(["a", "b"], predict, slop_ns=5, window_size=2, stride=2, fusion=fusion, sync_mode=True)
    img = np.zeros((4, 4, 3), np.uint8)
    for k in range(4):
        for cam in ("a", "b"):
            r.feed(CameraFrame(cam, 1000 + k, img))
    r.flush()
    acc = r.accounting()
    assert acc["fusion"]["events"]["nonfinite_depth_px"] == 2 * 6
    assert acc["frame_sets"]["dropped"] == {"nonfinite_prediction": 2} and acc["frame_sets"]["processed"] == 2
