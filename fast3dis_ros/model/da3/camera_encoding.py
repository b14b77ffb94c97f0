"""DA3's camera encoder (known K + poses -> camera tokens) without host synchronisation.

``CameraEnc.forward`` (DA3 v0.1.1) goes through ``mat_to_quat``, which picks the best-conditioned
quaternion candidate with boolean-mask indexing and builds a constant with ``torch.tensor(0.1).to(
device)``: a data-dependent shape and a host-to-device copy, i.e. two synchronisations per forward
and no CUDA-graph capture of the known-pose path. Below is the same arithmetic in the same order
with ``gather`` for the selection, so the tokens are bit-identical (tested against DA3's encoder).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from depth_anything_3.utils.geometry import affine_inverse


def mat_to_quat(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4), xyzw, real part >= 0 (DA3's)."""
    batch_dim = matrix.shape[:-2]
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = torch.unbind(matrix.reshape(batch_dim + (9,)), dim=-1)
    q_sq = torch.stack(
        [1.0 + m00 + m11 + m22, 1.0 + m00 - m11 - m22, 1.0 - m00 + m11 - m22, 1.0 - m00 - m11 + m22], dim=-1
    )
    q_abs = torch.where(q_sq > 0, torch.sqrt(q_sq), torch.zeros_like(q_sq))
    quat_by_rijk = torch.stack(
        [
            torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    )
    flr = torch.full((), 0.1, dtype=q_abs.dtype, device=q_abs.device)
    candidates = quat_by_rijk / (2.0 * q_abs[..., None].max(flr))
    best = q_abs.argmax(dim=-1)[..., None, None].expand(batch_dim + (1, 4))
    out = torch.gather(candidates, -2, best).squeeze(-2)
    out = torch.cat([out[..., 1:], out[..., :1]], dim=-1)  # [1, 2, 3, 0]: a list index is a host copy
    return torch.where(out[..., 3:4] < 0, -out, out)


def pose_encoding(T_cam_world: torch.Tensor, K: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """DA3's 9-d camera code ``[t_c2w (3), quat_c2w (4), fov_h, fov_w]`` per view, fp32."""
    c2w = affine_inverse(T_cam_world)
    R, t = c2w[:, :, :3, :3], c2w[:, :, :3, 3]
    H, W = image_hw
    fov_h = 2 * torch.atan((H / 2) / K[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2) / K[..., 0, 0])
    return torch.cat([t, mat_to_quat(R), fov_h[..., None], fov_w[..., None]], dim=-1).float()


def encode_cameras(cam_enc: nn.Module, T_cam_world: torch.Tensor, K: torch.Tensor, image_hw) -> torch.Tensor:
    """``cam_enc(T_cam_world, K, image_hw)`` for DA3's ``CameraEnc`` -> (B, V, D) camera tokens."""
    tokens = cam_enc.pose_branch(pose_encoding(T_cam_world, K, tuple(image_hw)))
    tokens = cam_enc.token_norm(tokens)
    tokens = cam_enc.trunk(tokens)
    return cam_enc.trunk_norm(tokens)
