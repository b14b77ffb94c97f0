"""Similarity (Sim(3)) alignment: Umeyama from point correspondences and camera-set alignment.

A Sim(3) is stored as a 4x4 float64 matrix ``[[s R, t], [0, 1]]`` mapping points of frame b to frame a
(``T_a_b``); ``sim3_decompose`` splits it back into (s, R, t).
"""

from __future__ import annotations

import numpy as np

from fast3dis_ros.geometry.cameras import camera_center
from fast3dis_ros.geometry.rotations import nearest_rotation

__all__ = [
    "umeyama",
    "sim3_matrix",
    "sim3_decompose",
    "sim3_inverse",
    "rotation_mean",
    "rotation_angle_deg",
    "is_degenerate",
    "align_cameras",
]


def sim3_matrix(s: float, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = float(s) * np.asarray(R, dtype=np.float64)
    T[:3, 3] = np.asarray(t, dtype=np.float64)
    return T


def sim3_decompose(T: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(s, R, t) of a Sim(3) matrix (s > 0 from the cube root of det of the 3x3 block)."""
    T = np.asarray(T, dtype=np.float64)
    A = T[:3, :3]
    s = float(np.cbrt(np.linalg.det(A)))
    if not s > 0:
        raise ValueError(f"not a Sim(3): det of the linear block is {s**3:.3g}")
    return s, A / s, T[:3, 3].copy()


def sim3_inverse(T: np.ndarray) -> np.ndarray:
    s, R, t = sim3_decompose(T)
    Ri = R.T / s
    out = np.eye(4)
    out[:3, :3] = Ri
    out[:3, 3] = -Ri @ t
    return out


def rotation_mean(Rs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Chordal L2 mean of rotations (N, 3, 3): projection of their (weighted) sum onto SO(3)."""
    Rs = np.asarray(Rs, dtype=np.float64).reshape(-1, 3, 3)
    w = np.ones(len(Rs)) if weights is None else np.asarray(weights, dtype=np.float64)
    return nearest_rotation(np.einsum("n,nij->ij", w, Rs))


def rotation_angle_deg(R_a: np.ndarray, R_b: np.ndarray) -> float:
    """Geodesic angle between two rotations, in degrees."""
    c = (np.trace(np.asarray(R_a).T @ np.asarray(R_b)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def umeyama(
    src: np.ndarray,
    dst: np.ndarray,
    with_scale: bool = True,
    weights: np.ndarray | None = None,
    fixed_scale: float | None = None,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares (s, R, t) with ``dst ~= s R src + t`` (Umeyama 1991).

    ``src``, ``dst``: (N, 3), N >= 3 and not all collinear for a unique rotation (the caller checks
    with ``is_degenerate``). ``with_scale=False`` gives s = 1; ``fixed_scale`` imposes a known s.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    if src.shape != dst.shape:
        raise ValueError(f"umeyama: shape mismatch {src.shape} vs {dst.shape}")
    if len(src) < 1:
        raise ValueError("umeyama: no correspondences")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("umeyama: weights must be non-negative with positive sum")
    w = w / w.sum()
    mu_s = w @ src
    mu_d = w @ dst
    xs = src - mu_s
    xd = dst - mu_d
    cov = (xd * w[:, None]).T @ xs  # (3, 3) = sum w d s^T
    # Not nearest_rotation(cov): the scale below needs the singular values S with the same sign fix D.
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1.0
    R = U @ D @ Vt
    if fixed_scale is not None:
        s = float(fixed_scale)
    elif with_scale:
        var_s = float(w @ np.sum(xs**2, axis=1))
        if var_s <= 1e-300:
            raise ValueError("umeyama: source points coincide, scale undefined")
        s = float(np.sum(S * np.diag(D)) / var_s)
    else:
        s = 1.0
    t = mu_d - s * R @ mu_s
    return s, R, t


def is_degenerate(pts: np.ndarray, rel_tol: float = 1e-3, abs_tol: float = 1e-9) -> bool:
    """True when fewer than 3 points or the points are (nearly) collinear/coincident.

    Uses the singular values of the centred points: second / first < rel_tol, or first < abs_tol.
    """
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
    if len(pts) < 3:
        return True
    sv = np.linalg.svd(pts - pts.mean(0), compute_uv=False)
    return bool(sv[0] < abs_tol or sv[1] < rel_tol * sv[0])


def align_cameras(
    T_cam_world_a: np.ndarray,
    T_cam_world_b: np.ndarray,
    scale: float | None = None,
    with_scale: bool = True,
    info: dict | None = None,
) -> np.ndarray:
    """Sim(3) ``T_a_b`` mapping world b onto world a from the same cameras seen in both.

    ``T_cam_world_a[i]`` and ``T_cam_world_b[i]`` are the (rigid, 4x4) extrinsics of the same physical
    view expressed in world a and world b. Model: ``c_a = s R c_b + t`` for camera centres and
    ``R_cam_world_b = R_cam_world_a R`` for orientations.

    Strategy (``info['method']`` tells which one ran):
    - ``'umeyama'``: >= 3 non-collinear centres: Umeyama on the centres (scale from the centres unless
      ``scale`` is given, in which case that scale is imposed; ``with_scale=False`` forces s = 1).
    - ``'orientation'``: degenerate centres (1 or 2 views, or collinear): R is the chordal mean of the
      per-view ``R_cam_world_a^T R_cam_world_b``; s is ``scale`` if given (e.g. the median depth ratio
      of the shared views), else the ratio of centre spreads when there are >= 2 distinct centres,
      else 1 (``info['scale_source']`` says which); t then matches the mean centres.
    """
    A = np.asarray(T_cam_world_a, dtype=np.float64).reshape(-1, 4, 4)
    B = np.asarray(T_cam_world_b, dtype=np.float64).reshape(-1, 4, 4)
    if len(A) != len(B) or len(A) == 0:
        raise ValueError(f"align_cameras: need the same non-zero number of views, got {len(A)}, {len(B)}")
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(B))):
        raise ValueError("align_cameras: non-finite extrinsics")
    ca = camera_center(A)
    cb = camera_center(B)
    info = {} if info is None else info
    if not is_degenerate(cb) and not is_degenerate(ca):
        s, R, t = umeyama(cb, ca, with_scale=with_scale, fixed_scale=scale)
        info.update(method="umeyama", scale_source="given" if scale is not None else
                    ("centres" if with_scale else "fixed"))
    else:
        Rs = np.einsum("nji,njk->nik", A[:, :3, :3], B[:, :3, :3])  # R_a^T R_b per view
        R = rotation_mean(Rs)
        if scale is not None:
            s, src = float(scale), "given"
        elif with_scale and len(cb) >= 2:
            sb = np.sqrt(np.sum((cb - cb.mean(0)) ** 2))
            sa = np.sqrt(np.sum((ca - ca.mean(0)) ** 2))
            if sb > 1e-9 and sa > 1e-9:
                s, src = float(sa / sb), "centres"
            else:
                s, src = 1.0, "unit"
        else:
            s, src = 1.0, "unit"
        t = ca.mean(0) - s * R @ cb.mean(0)
        info.update(method="orientation", scale_source=src)
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"align_cameras: invalid scale {s}")
    info["scale"] = float(s)
    return sim3_matrix(s, R, t)
