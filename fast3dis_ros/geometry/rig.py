"""Known rig extrinsics (static TF between the cameras of one robot) applied to a window's predicted cameras.

Why: the network's window is up to scale and its cameras drift relative to each other. The cameras of one
frame set sit on one rigid rig whose mounting is known (``/tf_static``: ``base_link -> <cam>_optical_frame``):

* ``rig_scale``: the ratio of known to predicted distances between the cameras of each frame set gives
  the window's metric scale (metres per window unit), without odometry;
* ``rigidify``: the rig pose of each frame set is estimated from its predicted cameras (chordal mean of
  the rotations, mean of the translations) and the cameras are put back on it with the known mounting, so
  their relative poses inside a frame set are exact.

Views are frame-set-major (``pipeline.frames.Window``): a frame set ends where a camera repeats.
"""

from __future__ import annotations

import numpy as np

from fast3dis_ros.core.frames import stack_known
from fast3dis_ros.geometry.cameras import invert_se3

__all__ = ["frame_set_groups", "known_rig_views", "rig_extrinsics_of", "rig_scale", "rigidify"]


def rig_extrinsics_of(views) -> np.ndarray | None:
    """``WindowPrediction.T_rig_cam_known`` for a window's views (``CameraFrame.T_rig_cam``): (V, 4, 4), NaN
    where unknown; None when no view has them."""
    return stack_known([getattr(v, "T_rig_cam", None) for v in views], (4, 4))


def frame_set_groups(cameras: list[str]) -> list[list[int]]:
    """View indices per frame set: a new set starts where a camera repeats."""
    groups: list[list[int]] = []
    seen: set[str] = set()
    for v, c in enumerate(cameras):
        if not groups or c in seen:
            groups.append([])
            seen = set()
        groups[-1].append(v)
        seen.add(c)
    return groups


def known_rig_views(T_rig_cam: np.ndarray | None) -> np.ndarray:
    """Bool per view: its rig extrinsics are known (finite)."""
    if T_rig_cam is None:
        return np.zeros(0, bool)
    T = np.asarray(T_rig_cam, np.float64)
    return np.all(np.isfinite(T.reshape(len(T), -1)), axis=1)


def rig_scale(T_cam_world: np.ndarray, T_rig_cam: np.ndarray, cameras: list[str],
              min_baseline: float = 0.01) -> tuple[float | None, int]:
    """(metres per window unit, pairs used): median over camera pairs of one frame set of the known
    baseline (>= ``min_baseline`` m) over the predicted one. None when no pair qualifies."""
    ok = known_rig_views(T_rig_cam)
    if not ok.any():
        return None, 0
    C = invert_se3(np.asarray(T_cam_world, np.float64))[:, :3, 3]  # predicted camera centres
    t = np.asarray(T_rig_cam, np.float64)[:, :3, 3]
    ratios = []
    for g in frame_set_groups(cameras):
        g = [v for v in g if ok[v]]
        for a in range(len(g)):
            for b in range(a + 1, len(g)):
                known = float(np.linalg.norm(t[g[a]] - t[g[b]]))
                pred = float(np.linalg.norm(C[g[a]] - C[g[b]]))
                if known >= min_baseline and pred > 1e-9:
                    ratios.append(known / pred)
    if not ratios:
        return None, 0
    s = float(np.median(ratios))
    return (s if np.isfinite(s) and s > 0 else None), len(ratios)


def _chordal_mean(Rs: np.ndarray) -> np.ndarray:
    U, _, Vt = np.linalg.svd(Rs.sum(0))
    R = U @ Vt
    if np.linalg.det(R) < 0:
        U[:, -1] *= -1
        R = U @ Vt
    return R


def rigidify(T_cam_world: np.ndarray, T_rig_cam: np.ndarray, cameras: list[str], scale: float) -> np.ndarray:
    """``T_cam_world`` with the cameras of every frame set (>= 2 known views) put on one rig pose with the
    known mounting; ``scale`` (metres per window unit) converts the mounting into window units. Views with
    unknown extrinsics, or alone in their set, keep their predicted pose."""
    T_cw = np.array(T_cam_world, np.float64, copy=True)
    ok = known_rig_views(T_rig_cam)
    if not ok.any() or not scale or scale <= 0:
        return T_cw
    mount = np.array(T_rig_cam, np.float64, copy=True)
    mount[:, :3, 3] /= scale  # window units
    T_wc = invert_se3(T_cw)
    for g in frame_set_groups(cameras):
        g = [v for v in g if ok[v]]
        if len(g) < 2:
            continue
        T_wr = np.stack([T_wc[v] @ invert_se3(mount[v]) for v in g])  # rig pose seen from each camera
        rig = np.eye(4)
        rig[:3, :3] = _chordal_mean(T_wr[:, :3, :3])
        rig[:3, 3] = T_wr[:, :3, 3].mean(0)
        for v in g:
            T_cw[v] = invert_se3(rig @ mount[v])
    return T_cw
