"""Clustering baseline: the "lift features, then cluster in 3D" paradigm that FAST3DIS replaces.

Per valid pixel we build one point with its world position and a feature vector sampled (bilinear,
pixel-centre aligned) from per-view feature maps (V, C, h, w) -- e.g. the pixel decoder's mask
features or any backbone features. The embedding clustered by HDBSCAN (the ``hdbscan`` library) is

    [ w_xyz * (xyz - centre) / rms_xyz ,  w_feat * (PCA_d(l2norm(f)) - mean) / rms_feat ]

so each block has unit RMS norm before weighting (``w_xyz`` / ``w_feat`` set their relative
importance). To keep ~100k points within seconds, HDBSCAN runs on a random subsample of at most
``max_points`` points and the labels reach the other points by nearest neighbour in the same
embedding (``propagate="nn"``, scipy cKDTree) or ``hdbscan.approximate_predict``
(``propagate="approximate"``). Noise -> label 0. Cluster k (label k+1) is scored by the mean HDBSCAN
membership probability of its clustered members (``score="probability"``) or by its persistence
(``score="persistence"``, normalised to [0, 1] by the maximum).
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["sample_features", "embed_points", "cluster_instances", "cluster_window"]


def sample_features(features: np.ndarray, view: np.ndarray, rows: np.ndarray, cols: np.ndarray, H: int, W: int, mode: str = "bilinear") -> np.ndarray:
    """Sample per-view feature maps (V, C, h, w) at pixels (view, row, col) of an (H, W) grid.
    Pixel centres are aligned (align_corners=False). Returns (N, C) float32."""
    f = np.asarray(features, dtype=np.float32)
    V, C, h, w = f.shape
    y = (rows + 0.5) * (h / H) - 0.5
    x = (cols + 0.5) * (w / W) - 0.5
    if mode == "nearest" or (h, w) == (H, W):
        yi = np.clip(np.round(y).astype(np.int64), 0, h - 1)
        xi = np.clip(np.round(x).astype(np.int64), 0, w - 1)
        return f[view, :, yi, xi]
    y = np.clip(y, 0, h - 1)
    x = np.clip(x, 0, w - 1)
    y0 = np.floor(y).astype(np.int64)
    x0 = np.floor(x).astype(np.int64)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (y - y0).astype(np.float32)[:, None]
    wx = (x - x0).astype(np.float32)[:, None]
    ft = np.ascontiguousarray(f.transpose(0, 2, 3, 1))  # (V, h, w, C)
    return (
        ft[view, y0, x0] * (1 - wy) * (1 - wx)
        + ft[view, y0, x1] * (1 - wy) * wx
        + ft[view, y1, x0] * wy * (1 - wx)
        + ft[view, y1, x1] * wy * wx
    )


def embed_points(xyz: np.ndarray, feats: np.ndarray, fit_idx: np.ndarray, w_xyz: float = 1.0, w_feat: float = 1.0, pca_dim: int = 8, seed: int = 0) -> np.ndarray:
    """Joint embedding of points (see module doc); normalisation and PCA are fitted on ``fit_idx``."""
    from sklearn.decomposition import PCA

    xyz = np.asarray(xyz, dtype=np.float64)
    centre = np.median(xyz[fit_idx], axis=0)
    xc = xyz - centre
    rms = np.sqrt(np.mean(np.sum(xc[fit_idx] ** 2, 1))) or 1.0
    parts = [(w_xyz / rms) * xc]
    if feats is not None and feats.shape[1] > 0 and w_feat > 0:
        f = np.asarray(feats, dtype=np.float32)
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)
        d = int(min(pca_dim, f.shape[1], len(fit_idx)))
        if d < f.shape[1]:
            pca = PCA(n_components=d, random_state=seed, svd_solver="randomized" if len(fit_idx) > 2000 else "full").fit(f[fit_idx])
            fz = pca.transform(f)
        else:
            fz = f - f[fit_idx].mean(0)
        frms = np.sqrt(np.mean(np.sum(fz[fit_idx] ** 2, 1))) or 1.0
        parts.append((w_feat / frms) * fz)
    return np.concatenate(parts, 1).astype(np.float32)


def cluster_instances(
    points_world: np.ndarray,
    features: np.ndarray | None,
    valid: np.ndarray,
    *,
    w_xyz: float = 1.0,
    w_feat: float = 1.0,
    pca_dim: int = 8,
    max_points: int = 20000,
    min_cluster_size: int = 200,
    min_samples: int | None = 10,
    cluster_selection_epsilon: float = 0.0,
    cluster_selection_method: str = "eom",
    score: str = "probability",
    propagate: str = "nn",
    nn_candidates: int = 8,
    feature_sampling: str = "bilinear",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """HDBSCAN instance clustering of lifted pixels.

    points_world (V, H, W, 3) world points per pixel; features (V, C, h, w) per-view feature maps
    (any resolution; None = cluster on xyz only); valid (V, H, W) bool.
    Returns ``labels`` (V, H, W) int32 (0 = noise / invalid, k = instance k scored ``scores[k-1]``,
    ids shared across views), ``scores`` (K,) float32, and ``timing`` (ms per stage + counts).
    ``min_cluster_size`` / ``min_samples`` are HDBSCAN's, applied to the clustered subsample (at most
    ``max_points`` points). ``propagate="nn"``: each remaining point takes the label of the nearest
    subsample point in the joint embedding, searched among its ``nn_candidates`` nearest subsample
    points in xyz (a 3D kd-tree query; exact NN in the high-dimensional embedding is several times
    slower); ``"approximate"``: ``hdbscan.approximate_predict``.
    """
    import hdbscan

    t0 = time.perf_counter()
    timing: dict = {}
    pts = np.asarray(points_world)
    V, H, W = pts.shape[:3]
    valid = np.asarray(valid, dtype=bool) & np.all(np.isfinite(pts), axis=-1)
    view, rows, cols = np.nonzero(valid)
    n = len(view)
    labels_out = np.zeros((V, H, W), dtype=np.int32)
    timing.update(n_points=int(n), n_clustered=0, n_clusters=0)
    if n == 0:
        timing["total_ms"] = (time.perf_counter() - t0) * 1e3
        return labels_out, np.zeros(0, np.float32), timing
    xyz = pts[view, rows, cols].astype(np.float64)
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    t = time.perf_counter()
    feats = None
    if features is not None:
        feats = sample_features(features, view, rows, cols, H, W, mode=feature_sampling)
    timing["features_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    emb = embed_points(xyz, feats, sub, w_xyz=w_xyz, w_feat=w_feat, pca_dim=pca_dim, seed=seed)
    timing["embed_ms"] = (time.perf_counter() - t) * 1e3
    mcs = max(2, int(min_cluster_size))
    ms = None if min_samples is None else max(1, int(min_samples))
    t = time.perf_counter()
    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=mcs,
        min_samples=ms,
        cluster_selection_epsilon=float(cluster_selection_epsilon),
        cluster_selection_method=cluster_selection_method,
        prediction_data=(propagate == "approximate"),
        core_dist_n_jobs=1,
    ).fit(emb[sub])
    timing["hdbscan_ms"] = (time.perf_counter() - t) * 1e3
    sub_lab = clusterer.labels_.astype(np.int64)  # -1 = noise
    K = int(sub_lab.max()) + 1 if sub_lab.size else 0
    t = time.perf_counter()
    lab = np.full(n, -1, dtype=np.int64)
    lab[sub] = sub_lab
    rest = np.setdiff1d(np.arange(n), sub, assume_unique=True)
    if rest.size and K > 0:
        if propagate == "approximate":
            lab[rest], _ = hdbscan.approximate_predict(clusterer, emb[rest])
        elif propagate == "nn":
            from scipy.spatial import cKDTree

            k = int(min(nn_candidates, len(sub)))
            _, cand = cKDTree(xyz[sub]).query(xyz[rest], k=k)
            cand = cand.reshape(len(rest), k)
            best = np.empty(len(rest), dtype=np.int64)
            for s0 in range(0, len(rest), 65536):  # chunks bound the (chunk, k, D) temporary
                c = cand[s0 : s0 + 65536]
                d2 = np.sum((emb[sub][c] - emb[rest[s0 : s0 + 65536]][:, None, :]) ** 2, axis=-1)
                best[s0 : s0 + 65536] = c[np.arange(len(c)), np.argmin(d2, axis=1)]
            lab[rest] = sub_lab[best]
        else:
            raise ValueError(f"propagate must be 'nn' or 'approximate', got {propagate!r}")
    timing["propagate_ms"] = (time.perf_counter() - t) * 1e3
    if score == "probability":
        prob = clusterer.probabilities_
        scores = np.array([prob[sub_lab == k].mean() for k in range(K)], dtype=np.float32)
    elif score == "persistence":
        pers = np.asarray(clusterer.cluster_persistence_, dtype=np.float64)
        scores = (pers / pers.max() if pers.size and pers.max() > 0 else pers).astype(np.float32)
    else:
        raise ValueError(f"score must be 'probability' or 'persistence', got {score!r}")
    labels_out[view, rows, cols] = (lab + 1).astype(np.int32)
    timing.update(n_clustered=int(len(sub)), n_clusters=K, min_cluster_size_used=mcs, min_samples_used=ms)
    timing["total_ms"] = (time.perf_counter() - t0) * 1e3
    return labels_out, scores, timing


def cluster_window(depth: np.ndarray, K: np.ndarray, T_cam_world: np.ndarray, features: np.ndarray | None, valid: np.ndarray | None = None, **params):
    """Convenience for a ``WindowPrediction``: lift (V, H, W) depth with K (V, 3, 3) and
    T_cam_world (V, 4, 4), then ``cluster_instances``. ``valid`` defaults to depth > 0."""
    from fast3dis_ros.eval.metrics import backproject_depth

    depth = np.asarray(depth)
    pts = backproject_depth(depth, K, np.linalg.inv(np.asarray(T_cam_world, dtype=np.float64)))
    ok = np.isfinite(depth) & (depth > 0) if valid is None else np.asarray(valid, dtype=bool)
    return cluster_instances(pts, features, ok, **params)
