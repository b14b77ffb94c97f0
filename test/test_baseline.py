"""HDBSCAN clustering baseline on lifted features (fast3dis_ros.eval.baseline)."""

import numpy as np
import pytest

from fast3dis_ros.eval.baseline import cluster_instances, cluster_window, sample_features
from fast3dis_ros.eval.metrics import instance_ap


def _three_blobs(V=2, H=36, W=48, C=12, seed=0):
    """Pixels in three vertical stripes per view; stripe k lies in a 3D blob around centre k and has
    feature vector f_k (+ noise) in a 4x lower-resolution feature map."""
    rng = np.random.default_rng(seed)
    stripe = np.arange(W) * 3 // W  # 0, 1, 2
    gt = np.broadcast_to(stripe[None, None, :] + 1, (V, H, W)).astype(np.int32)
    centres = np.array([[0.0, 0.0, 3.0], [2.0, 0.0, 3.0], [0.0, 2.0, 5.0]])
    pts = centres[gt - 1] + rng.normal(0, 0.1, (V, H, W, 3))
    h, w = H // 4, W // 4
    fstripe = np.arange(w) * 3 // w
    fc = rng.normal(0, 1, (3, C))
    feats = fc[fstripe][None, None] + rng.normal(0, 0.05, (V, h, w, C))
    return pts, feats.transpose(0, 3, 1, 2).astype(np.float32), gt


def _agreement_up_to_permutation(pred, gt):
    agree = 0
    for g in np.unique(gt):
        ids, cnt = np.unique(pred[gt == g], return_counts=True)
        agree += cnt.max()
    # the mapping must be one-to-one
    maj = [np.bincount(pred[gt == g]).argmax() for g in np.unique(gt)]
    assert len(set(maj)) == len(maj) and 0 not in maj
    return agree / gt.size


@pytest.mark.parametrize("propagate,max_points", [("nn", 100000), ("nn", 1200), ("approximate", 1200)])
def test_hdbscan_separates_three_blobs(propagate, max_points):
    pts, feats, gt = _three_blobs()
    valid = np.ones(gt.shape, bool)
    labels, scores, timing = cluster_instances(pts, feats, valid, min_cluster_size=150, min_samples=10, max_points=max_points, propagate=propagate)
    assert labels.shape == gt.shape and labels.dtype == np.int32
    assert timing["n_clusters"] == 3 and scores.shape == (3,) and scores.dtype == np.float32
    assert np.all((scores > 0) & (scores <= 1))
    assert timing["n_clustered"] == min(max_points, gt.size)
    assert _agreement_up_to_permutation(labels.ravel(), gt.ravel()) > 0.98
    res = instance_ap([(labels.ravel(), scores, gt.ravel())])
    assert res["AP50"] == pytest.approx(1.0) and res["AP25"] == pytest.approx(1.0)


def test_invalid_pixels_are_zero_and_persistence_scores():
    pts, feats, gt = _three_blobs()
    valid = np.ones(gt.shape, bool)
    valid[:, :5] = False
    pts[0, 10, 10] = np.nan  # non-finite points are dropped too
    labels, scores, timing = cluster_instances(pts, feats, valid, min_cluster_size=30, min_samples=5, score="persistence")
    assert (labels[~valid] == 0).all() and labels[0, 10, 10] == 0
    assert timing["n_points"] == valid.sum() - 1
    assert scores.max() == pytest.approx(1.0)
    empty, s0, t0 = cluster_instances(pts, feats, np.zeros(gt.shape, bool))
    assert (empty == 0).all() and s0.shape == (0,) and t0["n_points"] == 0


def test_cluster_window_lifts_depth():
    V, H, W = 2, 24, 36
    depth = np.full((V, H, W), 2.0, np.float32)
    depth[:, :, W // 2 :] = 6.0  # two depth layers -> two clusters in xyz alone
    K = np.tile(np.array([[30.0, 0, W / 2], [0, 30.0, H / 2], [0, 0, 1]]), (V, 1, 1))
    T = np.tile(np.eye(4), (V, 1, 1))
    labels, scores, _ = cluster_window(depth, K, T, None, min_cluster_size=50, min_samples=5)
    gt = np.where(depth > 3, 2, 1)
    assert instance_ap([(labels.ravel(), scores, gt.ravel())])["AP50"] == pytest.approx(1.0)


def test_sample_features_bilinear_alignment():
    f = np.arange(4, dtype=np.float32).reshape(1, 1, 1, 4)  # one row: 0 1 2 3
    rows = np.zeros(8, np.int64)
    cols = np.arange(8)
    out = sample_features(f, np.zeros(8, np.int64), rows, cols, 1, 8)[:, 0]
    # pixel centres of the 8-wide grid map to x = (c + 0.5) / 2 - 0.5 in the 4-wide map (clamped)
    np.testing.assert_allclose(out, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0])
