"""Lifting, voxel downsampling and PointCloud2 packing."""

import numpy as np
import pytest

from fast3dis_ros.geometry.cameras import project
from fast3dis_ros.geometry.clouds import (
    POINT_DTYPE, POINT_FIELDS, POINT_STEP, bench_pack, confidence_mask, lift_view, pack_rgb, pointcloud_structured,
    structured_to_cloud, unpack_rgb, voxel_downsample,
)
from fast3dis_ros.pipeline.frames import InstanceCloud


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
    from fast3dis_ros.pipeline.fusion import random_prediction

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
