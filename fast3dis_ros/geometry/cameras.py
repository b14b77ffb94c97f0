"""Pinhole camera helpers (numpy), OpenCV optical axes (x right, y down, z forward).

Transforms are 4x4 float64 named ``T_<to>_<from>``; extrinsics are ``T_cam_world``.
All functions are pure numpy and accept batched inputs where noted.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "project",
    "unproject",
    "unproject_depth",
    "pixel_grid",
    "scale_K",
    "invert_se3",
    "transform_points",
    "camera_center",
    "check_K",
    "check_rotation",
    "check_se3",
    "is_rotation",
]


def transform_points(T: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 4x4 (possibly Sim(3)) transform to (..., 3) points."""
    T = np.asarray(T, dtype=np.float64)
    pts = np.asarray(pts)
    dt = np.result_type(pts.dtype, np.float32)
    out = np.empty(pts.shape[:-1] + (3,), dt)
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    # per-row expression: (N, 3) @ (3, 3) matmul is ~6x slower in numpy for large N
    for i in range(3):
        out[..., i] = x * T[i, 0] + y * T[i, 1] + z * T[i, 2] + T[i, 3]
    return out


def invert_se3(T: np.ndarray) -> np.ndarray:
    """Inverse of an SE(3) (or batched (..., 4, 4)) rigid transform, using R^T (no general inverse)."""
    T = np.asarray(T, dtype=np.float64)
    R = T[..., :3, :3]
    t = T[..., :3, 3]
    Rt = np.swapaxes(R, -1, -2)
    out = np.zeros_like(T)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", Rt, t)
    out[..., 3, 3] = 1.0
    return out


def camera_center(T_cam_world: np.ndarray) -> np.ndarray:
    """World position of the camera centre(s) for (..., 4, 4) extrinsics."""
    return invert_se3(T_cam_world)[..., :3, 3]


def project(K: np.ndarray, pts_cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project (N, 3) camera-frame points to pixels. Returns (uv (N, 2), z (N,)).

    Points with z <= 0 get uv = nan.
    """
    K = np.asarray(K, dtype=np.float64)
    p = np.asarray(pts_cam, dtype=np.float64)
    z = p[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        x = p[..., 0] / z
        y = p[..., 1] / z
    uv = np.stack([K[0, 0] * x + K[0, 1] * y + K[0, 2], K[1, 1] * y + K[1, 2]], axis=-1)
    uv[z <= 0] = np.nan
    return uv, z


def unproject(K: np.ndarray, uv: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Lift pixels (N, 2) with z-depth (N,) to (N, 3) camera-frame points (z = depth)."""
    K = np.asarray(K, dtype=np.float64)
    uv = np.asarray(uv, dtype=np.float64)
    d = np.asarray(depth, dtype=np.float64)
    fx, fy, cx, cy, s = K[0, 0], K[1, 1], K[0, 2], K[1, 2], K[0, 1]
    y = (uv[..., 1] - cy) / fy
    x = (uv[..., 0] - cx - s * y) / fx
    return np.stack([x * d, y * d, d], axis=-1)


def pixel_grid(h: int, w: int) -> np.ndarray:
    """(H, W, 2) pixel-centre coordinates (u, v) with integer pixel centres (OpenCV convention)."""
    v, u = np.mgrid[0:h, 0:w]
    return np.stack([u, v], axis=-1).astype(np.float64)


def unproject_depth(K: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Lift a full (H, W) depth map to (H, W, 3) camera-frame points."""
    h, w = depth.shape
    return unproject(K, pixel_grid(h, w), depth)


def scale_K(K: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Intrinsics for an image resized from ``src_hw`` to ``dst_hw`` (H, W).

    Uses the pixel-centre-consistent mapping u' = (u + 0.5) * sx - 0.5 (same as cv2.resize).
    Works on (..., 3, 3).
    """
    K = np.array(K, dtype=np.float64, copy=True)
    sy = dst_hw[0] / src_hw[0]
    sx = dst_hw[1] / src_hw[1]
    K[..., 0, 0] *= sx
    K[..., 0, 1] *= sx
    K[..., 1, 1] *= sy
    K[..., 0, 2] = (K[..., 0, 2] + 0.5) * sx - 0.5
    K[..., 1, 2] = (K[..., 1, 2] + 0.5) * sy - 0.5
    return K


def is_rotation(R: np.ndarray, atol: float = 1e-5) -> bool:
    R = np.asarray(R, dtype=np.float64)
    return bool(
        R.shape == (3, 3)
        and np.all(np.isfinite(R))
        and np.allclose(R @ R.T, np.eye(3), atol=atol)
        and abs(np.linalg.det(R) - 1.0) < atol * 10
    )


def check_rotation(R: np.ndarray, atol: float = 1e-5, name: str = "R") -> np.ndarray:
    """Raise ValueError (with the reason) unless R is a proper 3x3 rotation."""
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (3, 3):
        raise ValueError(f"{name}: expected shape (3, 3), got {R.shape}")
    if not np.all(np.isfinite(R)):
        raise ValueError(f"{name}: contains non-finite values")
    err = np.abs(R @ R.T - np.eye(3)).max()
    if err > atol:
        raise ValueError(f"{name}: not orthonormal (max |R R^T - I| = {err:.3g})")
    det = np.linalg.det(R)
    if det < 0:
        raise ValueError(f"{name}: improper rotation (det = {det:.3g}, a reflection)")
    return R


def check_se3(T: np.ndarray, atol: float = 1e-5, name: str = "T") -> np.ndarray:
    """Raise ValueError unless T is a finite 4x4 rigid transform with last row [0 0 0 1]."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise ValueError(f"{name}: expected shape (4, 4), got {T.shape}")
    if not np.all(np.isfinite(T)):
        raise ValueError(f"{name}: contains non-finite values")
    if not np.allclose(T[3], [0, 0, 0, 1], atol=atol):
        raise ValueError(f"{name}: last row must be [0, 0, 0, 1], got {T[3].tolist()}")
    check_rotation(T[:3, :3], atol=atol, name=f"{name} rotation")
    return T


def check_K(K: np.ndarray, name: str = "K") -> np.ndarray:
    """Raise ValueError unless K is a finite 3x3 pinhole matrix with positive focal lengths."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"{name}: expected shape (3, 3), got {K.shape}")
    if not np.all(np.isfinite(K)):
        raise ValueError(f"{name}: contains non-finite values")
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise ValueError(f"{name}: focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}")
    if not np.allclose(K[2], [0, 0, 1]) or K[1, 0] != 0:
        raise ValueError(f"{name}: not upper-triangular with last row [0, 0, 1]")
    return K
