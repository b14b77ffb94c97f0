"""Rotation matrix <-> unit quaternion, numpy, batched over leading dimensions.

Quaternions are in ROS order ``(x, y, z, w)`` (``geometry_msgs/Quaternion``, tf2, scipy's
``as_quat``), NOT the ``(w, x, y, z)`` order of transforms3d / Eigen's coefficient constructor; the
``_xyzw`` in every name says so. Rotations are active and right-handed: ``R @ p`` rotates the point
``p``, as ``T_parent_child[:3, :3]`` maps child coordinates to the parent frame.

- :func:`matrix_from_quat_xyzw` normalises its input (any non-zero scale of a quaternion gives the
  same rotation); a zero or non-finite quaternion raises ``ValueError``.
- :func:`quat_xyzw_from_matrix` first replaces each 3x3 block by its nearest rotation
  (:func:`nearest_rotation`: SVD, the closest proper rotation in the Frobenius norm), so a Sim(3)
  block ``s R`` gives the quaternion of ``R``, a reflection gives the nearest proper rotation and
  accumulated round-off is removed. It then uses Shepperd's method (the branch of the largest of
  ``w, |x|, |y|, |z|``), which stays accurate near 180-degree turns where ``w`` alone would lose digits.
  The result has unit norm and ``w >= 0`` (``q`` and ``-q`` are the same rotation; ``w >= 0`` picks
  the one with angle in [0, pi]); for exact 180-degree turns (``w == 0``) the largest of ``x, y, z``
  is positive. Non-finite input raises ``ValueError``.

``fast3dis_ros/model/da3/camera_encoding.py`` keeps its own torch copy on purpose: it reproduces
Depth Anything 3's arithmetic bit for bit.
"""

from __future__ import annotations

import numpy as np

__all__ = ["matrix_from_quat_xyzw", "quat_xyzw_from_matrix", "nearest_rotation"]


def nearest_rotation(M: np.ndarray) -> np.ndarray:
    """Closest proper rotation (det +1, Frobenius norm) to each 3x3 matrix of ``M`` (..., 3, 3).

    ``U diag(1, 1, det(U V^T)) V^T`` from the SVD ``M = U S V^T``: removes scale (Sim(3)), shear and
    round-off; a reflection (det < 0) goes to the nearest rotation. Not meaningful for a (near)
    rank-deficient matrix, which has no unique nearest rotation."""
    M = np.asarray(M, np.float64)
    if M.shape[-2:] != (3, 3):
        raise ValueError(f"expected (..., 3, 3) matrices, got shape {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError("non-finite rotation matrix")
    U, _, Vt = np.linalg.svd(M)
    d = np.sign(np.linalg.det(U @ Vt))
    U[..., :, 2] *= np.where(d == 0, 1.0, d)[..., None]
    return U @ Vt


def matrix_from_quat_xyzw(q_xyzw) -> np.ndarray:
    """(..., 3, 3) rotation matrices of quaternions (..., 4) in ROS order (x, y, z, w).

    The quaternions need not be unit: each is normalised (``2 / |q|^2`` in the formula). Raises
    ``ValueError`` for a zero (``|q|^2 < 1e-12``) or non-finite one."""
    q = np.asarray(q_xyzw, np.float64)
    if q.shape[-1:] != (4,):
        raise ValueError(f"expected (..., 4) quaternions (x, y, z, w), got shape {q.shape}")
    x, y, z, w = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    n = x * x + y * y + z * z + w * w
    if not np.all(n >= 1e-12) or not np.all(np.isfinite(n)):  # `>=` is False for NaN
        raise ValueError("zero or non-finite quaternion")
    s = 2.0 / n
    R = np.empty(q.shape[:-1] + (3, 3))
    R[..., 0, 0] = 1 - s * (y * y + z * z)
    R[..., 0, 1] = s * (x * y - z * w)
    R[..., 0, 2] = s * (x * z + y * w)
    R[..., 1, 0] = s * (x * y + z * w)
    R[..., 1, 1] = 1 - s * (x * x + z * z)
    R[..., 1, 2] = s * (y * z - x * w)
    R[..., 2, 0] = s * (x * z - y * w)
    R[..., 2, 1] = s * (y * z + x * w)
    R[..., 2, 2] = 1 - s * (x * x + y * y)
    return R


def quat_xyzw_from_matrix(R: np.ndarray) -> np.ndarray:
    """(..., 4) unit quaternions (x, y, z, w), ``w >= 0``, of 3x3 blocks (..., 3, 3).

    Each block is projected onto SO(3) first (:func:`nearest_rotation`), then converted with
    Shepperd's method; see the module docstring for the sign convention."""
    R = nearest_rotation(R)
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    tr = m00 + m11 + m22
    # Row k is 4 c_k (x, y, z, w) with c_k = x, y, z, w for k = 0..3: each row is exact where its
    # c_k is large, and 4 c_k^2 = 1 + 2 m_kk - tr (k < 3), 1 + tr (k = 3) says which c_k is largest.
    cand = np.stack([
        np.stack([1 + m00 - m11 - m22, m01 + m10, m02 + m20, m21 - m12], -1),
        np.stack([m01 + m10, 1 - m00 + m11 - m22, m12 + m21, m02 - m20], -1),
        np.stack([m02 + m20, m12 + m21, 1 - m00 - m11 + m22, m10 - m01], -1),
        np.stack([m21 - m12, m02 - m20, m10 - m01, 1 + tr], -1),
    ], -2)
    k = np.argmax(np.stack([m00, m11, m22, tr], -1), -1)
    q = np.take_along_axis(cand, k[..., None, None], -2)[..., 0, :]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., 3:] < 0, -q, q)
