"""Lifting, voxel downsampling and PointCloud2 packing."""

import numpy as np
import pytest

from fast3dis_ros.geometry.cameras import project
from fast3dis_ros.geometry.clouds import (
    POINT_DTYPE, POINT_FIELDS, POINT_STEP, confidence_mask, lift_view, pack_rgb, pointcloud_structured,
    structured_to_cloud, unpack_rgb, voxel_downsample,
)
from fast3dis_ros.core.frames import InstanceCloud


def cloud(xyz, rgb=None, inst=None, score=None):
    xyz = np.asarray(xyz, np.float32)
    n = len(xyz)
    return InstanceCloud("map", 5, xyz, np.zeros((n, 3), np.uint8) if rgb is None else np.asarray(rgb, np.uint8),
                         np.zeros(n, np.uint32) if inst is None else np.asarray(inst, np.uint32),
                         np.zeros(n, np.float32) if score is None else np.asarray(score, np.float32))


def test_voxel_downsample_counts_means_majority():
    xyz = [[0.01, 0.01, 0.01], [0.02, 0.03, 0.04], [0.04, 0.02, 0.0],  # voxel (0,0,0)
           [0.11, 0.0, 0.0], [0.12, 0.0, 0.0],  # voxel (1,0,0)
           [-0.01, 0.0, 0.0]]  # voxel (-1,0,0)
    inst = [3, 3, 7, 0, 5, 2]
    score = [0.5, 0.7, 0.9, 0.0, 0.4, 0.1]
    rgb = [[10, 20, 30], [20, 40, 60], [30, 60, 90], [0, 0, 0], [100, 100, 100], [1, 2, 3]]
    out, inv, keys = voxel_downsample(cloud(xyz, rgb, inst, score), 0.1, return_inverse=True)
    assert len(out) == 3
    assert inv.tolist() == [1, 1, 1, 2, 2, 0]  # sorted by key: (-1,0,0) first
    assert np.allclose(out.xyz[1], np.mean(np.asarray(xyz[:3], np.float32), 0))
    assert out.instance.tolist() == [2, 3, 0]  # majority 3; tie 0 vs 5 -> smaller id
    assert out.score[1] == pytest.approx(0.6)  # mean score of the majority instance's points
    assert out.rgb[1].tolist() == [20, 40, 60]


def test_voxel_downsample_many_points():
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 1, (100_000, 3))
    out = voxel_downsample(cloud(xyz), 0.1)
    assert len(out) == 1000
    n_expected = len(np.unique(np.floor(xyz / 0.25).astype(int), axis=0))
    assert len(voxel_downsample(cloud(xyz), 0.25)) == n_expected


def test_lift_view_round_trip_and_filters():
    K = np.array([[50.0, 0, 15.5], [0, 50.0, 11.5], [0, 0, 1]])
    h, w = 24, 32
    depth = np.full((h, w), 2.0, np.float32)
    depth[0, 0] = np.nan
    depth[0, 1] = -1
    labels = np.zeros((h, w), np.int32)
    labels[5:10, 5:10] = 2
    conf = np.ones((h, w), np.float32)
    conf[20:, :] = 0.1
    T = np.eye(4)
    T[:3, 3] = [1, 2, 3]
    c = lift_view(depth, K, T, labels=labels, scores=np.array([0.3, 0.8]), conf=conf, conf_threshold=0.5)
    assert len(c) == (20 * w) - 2
    assert np.allclose(c.xyz[:, 2], 5.0)
    sel = c.instance == 2
    assert sel.sum() == 25 and np.allclose(c.score[sel], 0.8) and np.all(c.score[~sel] == 0)
    uv, _ = project(K, c.xyz[sel] - np.array([1, 2, 3], np.float32))
    assert np.allclose(np.sort(np.unique(np.rint(uv[:, 0]))), np.arange(5, 10))
    only = lift_view(depth, K, T, labels=labels, instances_only=True)
    assert len(only) == 25
    q = confidence_mask(np.arange(10.0), 0.5, "quantile")
    assert q.sum() == 5


def test_packing_layout_and_bytes():
    assert POINT_STEP == 24 and POINT_DTYPE.itemsize == 24
    assert POINT_FIELDS == [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("rgb", 12, 7, 1),
                            ("instance", 16, 6, 1), ("score", 20, 7, 1)]
    for name, off, code, _ in POINT_FIELDS:
        assert POINT_DTYPE.fields[name][1] == off
        assert POINT_DTYPE.fields[name][0] == np.dtype("<f4" if code == 7 else "<u4")
    c = cloud([[1.0, -2.0, 3.5], [0, 0, 0]], [[255, 128, 1], [0, 0, 0]], [42, 0], [0.25, 0])
    arr = pointcloud_structured(c)
    b = arr.tobytes()
    assert len(b) == 48
    assert np.frombuffer(b[0:12], "<f4").tolist() == [1.0, -2.0, 3.5]
    assert np.frombuffer(b[12:16], "<u4")[0] == 0x00FF8001
    assert b[12:16] == bytes([0x01, 0x80, 0xFF, 0x00])  # little endian B G R 0
    assert np.frombuffer(b[16:20], "<u4")[0] == 42
    assert np.frombuffer(b[20:24], "<f4")[0] == 0.25
    assert np.array_equal(pack_rgb(c.rgb).view("<u4"), np.frombuffer(b, "<u4").reshape(2, 6)[:, 3])
    back = structured_to_cloud(arr)
    assert np.array_equal(back.xyz, c.xyz) and np.array_equal(back.rgb, c.rgb)
    assert np.array_equal(back.instance, c.instance) and np.array_equal(back.score, c.score)
    assert np.array_equal(unpack_rgb(pack_rgb(c.rgb)), c.rgb)
    assert len(pointcloud_structured(cloud(np.zeros((0, 3))))) == 0


def test_bench_pack_runs(capsys):
    from fast3dis_ros.bench.pack import bench_pack

    ms = bench_pack(10_000, repeats=2)
    assert ms > 0 and "bench_pack" in capsys.readouterr().out


def test_packing_into_reused_buffer():
    rng = np.random.default_rng(1)
    c = cloud(rng.standard_normal((100, 3)), rng.integers(0, 256, (100, 3)), rng.integers(0, 9, 100),
              rng.random(100))
    buf = np.empty(200 * POINT_STEP, np.uint8)
    a = pointcloud_structured(c, out=buf)
    assert a.tobytes() == pointcloud_structured(c).tobytes()
    with pytest.raises(ValueError, match="too small"):
        pointcloud_structured(c, out=np.empty(10, np.uint8))


def test_lift_prediction_matches_lift_view_per_view():
    from fast3dis_ros.geometry.cameras import invert_se3
    from fast3dis_ros.geometry.clouds import lift_prediction, packed_voxel_keys, pack_voxel_keys, voxel_keys
    from fast3dis_ros.bench.integrate import random_prediction

    rng = np.random.default_rng(2)
    p = random_prediction(rng, 3, 25, 33, 0, n_instances=5)
    p.depth[1, 3:5, 4:9] = np.nan
    p.depth[2, 0, :] = -1
    p.depth_conf = rng.uniform(0, 2, p.depth.shape).astype(np.float32)
    p.labels[0, 0, :4] = [-3, 9, 0, 5]  # negative and out-of-range labels
    T = np.diag([2.0, 2.0, 2.0, 1.0])
    T[:3, 3] = [1, -2, 0.5]
    for stride in (1, 2, 3):
        c = lift_prediction(p, T, conf_threshold=0.5, min_score=0.5, pixel_stride=stride)
        parts = []
        for v in range(3):
            lab = p.labels[v]
            low = np.concatenate([[False], p.scores < 0.5])
            lab = np.where(low[np.clip(lab, 0, len(p.scores))], 0, lab)
            parts.append(lift_view(p.depth[v], p.K[v], T @ invert_se3(p.T_cam_world[v]), rgb=p.images[v], labels=lab,
                                   scores=p.scores, conf=p.depth_conf[v], conf_threshold=0.5, pixel_stride=stride))
        assert len(c) == sum(len(q) for q in parts)
        assert np.allclose(c.xyz, np.concatenate([q.xyz for q in parts]), atol=1e-5)
        for name in ("rgb", "instance", "score"):
            assert np.array_equal(getattr(c, name), np.concatenate([getattr(q, name) for q in parts]))
        assert np.array_equal(packed_voxel_keys(c.xyz, 0.07), pack_voxel_keys(voxel_keys(c.xyz, 0.07)))
    with pytest.raises(ValueError, match="packable"):
        packed_voxel_keys(np.array([[1e9, 0, 0]], np.float32), 0.01)


# ------------------------------------------------------------------ lift_prediction_arrays: the one lifting
def _two_view_window():
    """Two 3x4 views with hand-checkable geometry: K with f = 2, c = (1.5, 1); view 0 is the world camera at
    depth 2 everywhere; view 1 sits at world z = -1 (T_cam_world translates by +1 in z) at depth 4. Pixel
    (u, v) of a view at depth d is the camera point ((u - 1.5) d / 2, (v - 1) d / 2, d)."""
    from fast3dis_ros.core.frames import WindowPrediction

    V, H, W = 2, 3, 4
    K = np.array([[2.0, 0, 1.5], [0, 2.0, 1.0], [0, 0, 1]])
    T_cw = np.repeat(np.eye(4)[None], V, 0)
    T_cw[1, 2, 3] = 1.0  # X_cam = X_world + (0, 0, 1)
    depth = np.stack([np.full((H, W), 2.0), np.full((H, W), 4.0)]).astype(np.float32)
    images = np.arange(V * H * W * 3, dtype=np.uint8).reshape(V, H, W, 3)
    labels = np.zeros((V, H, W), np.int32)
    labels[0, 0, :2] = 1
    labels[0, 2, 3] = 2
    labels[1, 1, 1:3] = 3
    return WindowPrediction(0, 0, ["a", "b"], ["a", "b"], [0, 0], images, depth, np.ones((V, H, W), np.float32),
                            np.repeat(K[None], V, 0), T_cw, labels, np.array([0.9, 0.2, 0.7], np.float32))


def _sim3_rot_z90(s=2.0, t=(1.0, 0.0, 0.0)):
    """x' = s Rz(90) x + t, Rz(90): (x, y, z) -> (-y, x, z)."""
    T = np.eye(4)
    T[:3, :3] = s * np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]])
    T[:3, 3] = t
    return T


def _expected_points(pred, views, T_out, keep):
    """Reference: per view, row-major pixels with ``keep[v, y, x]``, unprojected and transformed by hand."""
    out = []
    for v in views:
        K = pred.K[v]
        for y in range(pred.depth.shape[1]):
            for x in range(pred.depth.shape[2]):
                if keep[v, y, x]:
                    d = float(pred.depth[v, y, x])
                    cam = np.array([(x - K[0, 2]) * d / K[0, 0], (y - K[1, 2]) * d / K[1, 1], d, 1.0])
                    world = np.linalg.inv(pred.T_cam_world[v]) @ cam
                    out.append((T_out @ world)[:3])
    return np.array(out, np.float32).reshape(-1, 3)


def test_lift_arrays_known_points_colours_labels():
    from fast3dis_ros.geometry.clouds import lift_prediction_arrays

    p = _two_view_window()
    T = _sim3_rot_z90()
    xyz, rgb, lab = lift_prediction_arrays(p, T)
    assert xyz.shape == (24, 3) and xyz.dtype == np.float32 and rgb.dtype == np.uint8 and lab.dtype == np.int64
    # view 0, pixel (u=3, v=2), depth 2: camera (1.5, 1, 2) = world -> 2 * (-1, 1.5, 2) + (1, 0, 0)
    assert xyz[11].tolist() == [-1.0, 3.0, 4.0]
    # view 1, pixel (u=0, v=0), depth 4: camera (-3, -2, 4), world (-3, -2, 3) -> 2 * (2, -3, 3) + (1, 0, 0)
    assert xyz[12].tolist() == [5.0, -6.0, 6.0]
    assert np.allclose(xyz, _expected_points(p, [0, 1], T, np.ones((2, 3, 4), bool)), atol=1e-6)
    assert np.array_equal(rgb, p.images.reshape(-1, 3))  # view-major, row-major pixel order
    assert np.array_equal(lab, p.labels.reshape(-1))
    # identity output frame: view 0's points are its camera points
    xyz0, _, _ = lift_prediction_arrays(p, views=[0])
    assert xyz0[11].tolist() == [1.5, 1.0, 2.0]


def test_lift_arrays_drops_invalid_depth_and_low_confidence():
    from fast3dis_ros.geometry.clouds import lift_prediction_arrays

    p = _two_view_window()
    p.depth[0, 0, 0], p.depth[0, 0, 1], p.depth[0, 1, 0] = np.nan, np.inf, 0.0
    p.depth[1, 2, 3] = -1.0
    p.depth_conf[1, 0, :] = 0.2
    keep = np.isfinite(p.depth) & (p.depth > 0)
    xyz, rgb, lab = lift_prediction_arrays(p, _sim3_rot_z90())
    assert len(xyz) == keep.sum() == 20
    assert np.allclose(xyz, _expected_points(p, [0, 1], _sim3_rot_z90(), keep), atol=1e-6)
    assert np.array_equal(rgb, p.images[keep]) and np.array_equal(lab, p.labels[keep])
    p.depth_conf[0, 2, :] = 0.5  # at the threshold: kept
    keep &= p.depth_conf >= 0.5
    xyz, rgb, _ = lift_prediction_arrays(p, _sim3_rot_z90(), conf_threshold=0.5)
    assert len(xyz) == keep.sum() == 16 and np.array_equal(rgb, p.images[keep])
    # quantile: per view (view 1 keeps its 8 high-confidence pixels, view 0's constant map keeps all)
    _, rgb, _ = lift_prediction_arrays(p, conf_threshold=0.3, conf_mode="quantile")
    q = np.stack([p.depth_conf[v] >= np.quantile(p.depth_conf[v], 0.3) for v in range(2)])
    assert np.array_equal(rgb, p.images[q & np.isfinite(p.depth) & (p.depth > 0)])
    assert len(lift_prediction_arrays(p, min_depth=3.0)[0]) == 11  # view 1 (depth 4) minus its -1 pixel


def test_lift_arrays_labels_min_score_and_instances_only():
    from fast3dis_ros.geometry.clouds import lift_prediction_arrays

    p = _two_view_window()
    p.labels[1, 2, 0] = -4  # negative: background
    p.labels[1, 2, 1] = 9  # past the 3 scores: follows the last score (0.7)
    _, _, lab = lift_prediction_arrays(p, min_score=0.5)
    expect = np.maximum(p.labels, 0).reshape(-1)
    expect[expect == 2] = 0  # instance 2 scores 0.2
    assert np.array_equal(lab, expect) and 9 in lab
    _, _, lab = lift_prediction_arrays(p, min_score=0.8)  # 3 (0.7) and 9 (after the last) drop too
    assert sorted(set(lab.tolist())) == [0, 1]
    # instances only: pixels labelled > 0 before the score filter (low-score ones stay, as background)
    xyz, rgb, lab = lift_prediction_arrays(p, _sim3_rot_z90(), min_score=0.5, instances_only=True)
    fg = p.labels > 0
    assert len(xyz) == fg.sum() == 6 and np.array_equal(rgb, p.images[fg])
    assert lab.tolist() == [1, 1, 0, 3, 3, 9]
    assert np.allclose(xyz, _expected_points(p, [0, 1], _sim3_rot_z90(), fg), atol=1e-6)


def test_lift_arrays_views_subset_order_and_stride():
    from fast3dis_ros.geometry.clouds import lift_prediction_arrays

    p = _two_view_window()
    T = _sim3_rot_z90()
    both = lift_prediction_arrays(p, T, views=[1, 0])
    one, zero = lift_prediction_arrays(p, T, views=[1]), lift_prediction_arrays(p, T, views=[0])
    for a, b, c in zip(both, one, zero):
        assert np.array_equal(a, np.concatenate([b, c]))  # the listed order, each view as when lifted alone
    assert np.allclose(one[0], _expected_points(p, [1], T, np.ones((2, 3, 4), bool)), atol=1e-6)
    assert all(len(a) == 0 for a in lift_prediction_arrays(p, T, views=[]))
    # stride 2: pixels (0, 0), (2, 0), (0, 2), (2, 2) of each view
    xyz, rgb, _ = lift_prediction_arrays(p, T, pixel_stride=2, views=[1])
    keep = np.zeros((2, 3, 4), bool)
    keep[1, ::2, ::2] = True
    assert np.array_equal(rgb, p.images[keep])
    assert np.allclose(xyz, _expected_points(p, [1], T, keep), atol=1e-6)


def test_lift_arrays_per_view_intrinsics():
    from fast3dis_ros.geometry.clouds import lift_prediction_arrays

    p = _two_view_window()
    p.K = p.K.copy()
    p.K[1, 0, 0], p.K[1, 1, 2] = 4.0, 0.5
    xyz, _, _ = lift_prediction_arrays(p, _sim3_rot_z90())
    assert np.allclose(xyz, _expected_points(p, [0, 1], _sim3_rot_z90(), np.ones((2, 3, 4), bool)), atol=1e-6)


def test_lift_arrays_rows_layout_voxel_keys_and_threads():
    """``layout="rows"`` is the same points as (3, N) rows (float64 holding the float32 values), the keys are
    ``packed_voxel_keys`` of the float32 points, and worker groups / blocks change nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from fast3dis_ros.geometry import clouds
    from fast3dis_ros.geometry.clouds import lift_prediction_arrays, packed_voxel_keys
    from fast3dis_ros.bench.integrate import random_prediction

    p = random_prediction(np.random.default_rng(4), 5, 30, 41, n_instances=6)
    p.depth[2, 4:9, :] = np.nan
    T = _sim3_rot_z90(1.5, (0.3, -2.0, 1.0))
    xyz, rgb, lab = lift_prediction_arrays(p, T, pixel_stride=2, min_score=0.5)
    X, C, L, keys = lift_prediction_arrays(p, T, pixel_stride=2, min_score=0.5, layout="rows", voxel_size=0.05)
    assert X.shape == (3, len(xyz)) and X.dtype == np.float64 and C.shape == (3, len(xyz))
    assert np.array_equal(X, xyz.T.astype(np.float64)) and np.array_equal(C, rgb.T) and np.array_equal(L, lab)
    assert np.array_equal(keys, packed_voxel_keys(xyz, 0.05))
    assert np.array_equal(lift_prediction_arrays(p, T, pixel_stride=2, min_score=0.5, voxel_size=0.05)[3], keys)
    with ThreadPoolExecutor(2) as pool:
        def run(fns):
            return [f.result() for f in [pool.submit(f) for f in fns]]

        for parts in (2, 3, 7):
            got = lift_prediction_arrays(p, T, pixel_stride=2, min_score=0.5, layout="rows", voxel_size=0.05,
                                         run=run, parts=parts)
            assert all(np.array_equal(a, b) for a, b in zip(got, (X, C, L, keys)))
    old = clouds._BLOCK_PIXELS
    try:
        clouds._BLOCK_PIXELS = 1  # one view per block
        got = lift_prediction_arrays(p, T, pixel_stride=2, min_score=0.5, layout="rows", voxel_size=0.05)
        assert all(np.array_equal(a, b) for a, b in zip(got, (X, C, L, keys)))
    finally:
        clouds._BLOCK_PIXELS = old
    far = np.eye(4)
    far[0, 3] = 1e6
    with pytest.raises(ValueError, match="packable"):
        lift_prediction_arrays(p, far, voxel_size=0.01)
    with pytest.raises(ValueError, match="layout"):
        lift_prediction_arrays(p, layout="columns")
