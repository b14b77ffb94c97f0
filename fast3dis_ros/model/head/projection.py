"""Camera projection helpers (torch, batched, differentiable) used by the anchor-sampling decoder.

Conventions (docs/ARCHITECTURE.md): OpenCV optical axes (x right, y down, z forward);
``T_cam_world`` maps world points into the camera; ``K`` is in pixels of ``image_size = (H, W)``.
Pixel coordinates: pixel (row i, col j) has its *centre* at ``(u, v) = (j, i)``; the image covers
``u in [-0.5, W - 0.5]``, ``v in [-0.5, H - 0.5]``.

Sampling uses ``F.grid_sample(..., align_corners=False)``: grid x = -1 is the left edge of the left
pixel and +1 the right edge of the right pixel, so ``x = (2u + 1) / W - 1``.  Because of that
convention the same normalised grid addresses the same image location on feature maps of *any*
resolution that cover the whole image (ViT patch maps when H, W are multiples of the patch size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def transform_points(T: Tensor, points: Tensor) -> Tensor:
    """Apply 4x4 transforms ``T (B, V, 4, 4)`` to ``points (B, N, 3)`` -> ``(B, N, V, 3)``."""
    R = T[..., :3, :3]  # (B,V,3,3)
    t = T[..., :3, 3]  # (B,V,3)
    return torch.einsum("bvij,bnj->bnvi", R, points) + t[:, None]


def project(
    points_world: Tensor,
    K: Tensor,
    T_cam_world: Tensor,
    image_size: tuple[int, int] | None = None,
    eps: float = 1e-4,
) -> tuple[Tensor, Tensor, Tensor]:
    """Project world points into every view.

    Args:
        points_world: ``(B, N, 3)`` (e.g. N = Q anchors, or Q * heads * points samples).
        K: ``(B, V, 3, 3)`` intrinsics in pixels of ``image_size``.
        T_cam_world: ``(B, V, 4, 4)`` world -> camera.
        image_size: ``(H, W)``; when None only the depth test is applied.
        eps: minimum camera depth counted as "in front".

    Returns:
        uv ``(B, N, V, 2)`` pixel coordinates (garbage but finite where depth <= eps),
        depth ``(B, N, V)`` camera z, visible ``(B, N, V)`` bool: ``z > eps`` and uv inside the image.
    """
    K = K.to(points_world.dtype)
    T_cam_world = T_cam_world.to(points_world.dtype)
    p_cam = transform_points(T_cam_world, points_world)  # (B,N,V,3)
    z = p_cam[..., 2]
    z_safe = z.clamp_min(eps)
    xy = p_cam[..., :2] / z_safe[..., None]
    uv = torch.einsum("bvij,bnvj->bnvi", K[..., :2, :2], xy) + K[:, None, :, :2, 2]
    visible = z > eps
    if image_size is not None:
        visible = visible & inside_image(uv, image_size)
    return uv, z, visible


def inside_image(uv: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``uv (..., 2)`` inside ``[-0.5, W - 0.5] x [-0.5, H - 0.5]`` (and finite)."""
    H, W = image_size
    u, v = uv[..., 0], uv[..., 1]
    return (u >= -0.5) & (u <= W - 0.5) & (v >= -0.5) & (v <= H - 0.5)


def pixel_to_grid(uv: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Pixel coords (centre convention above) -> ``grid_sample`` coords for ``align_corners=False``."""
    H, W = image_size
    # per-axis python scalars, not ``new_tensor``: a host-to-device copy cannot be graph-captured
    return torch.stack([(uv[..., 0] + 0.5) * (2.0 / W), (uv[..., 1] + 0.5) * (2.0 / H)], dim=-1) - 1.0


def grid_to_pixel(grid: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Inverse of `pixel_to_grid`."""
    H, W = image_size
    return torch.stack([(grid[..., 0] + 1.0) * (W / 2.0), (grid[..., 1] + 1.0) * (H / 2.0)], dim=-1) - 0.5


def pixel_grid(H: int, W: int, device=None, dtype=torch.float32) -> Tensor:
    """``(H, W, 2)`` pixel-centre coordinates ``(u, v)`` of an H x W image."""
    v, u = torch.meshgrid(
        torch.arange(H, device=device, dtype=dtype), torch.arange(W, device=device, dtype=dtype), indexing="ij"
    )
    return torch.stack([u, v], dim=-1)


def rigid_inverse(T: Tensor) -> Tensor:
    """Inverse of rigid ``(..., 4, 4)`` transforms as ``[R^T | -R^T t]``: exact for SE(3) up to fp rounding,
    elementwise (no ``linalg.inv``: exportable to ONNX / TensorRT, no solver launch on the GPU)."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    top = torch.cat([Rt, -Rt @ t], dim=-1)
    return torch.cat([top, T[..., 3:, :]], dim=-2)


def inverse_3x3(M: Tensor) -> Tensor:
    """Closed-form inverse of ``(..., 3, 3)`` matrices (adjugate / determinant), for camera intrinsics.

    Valid for any invertible 3x3 (no assumption on K's zero pattern); matches ``torch.linalg.inv`` to
    fp32 rounding on intrinsics (test/test_export_ops.py) and, unlike it, exports to ONNX opset 18."""
    a, b, c = M[..., 0, 0], M[..., 0, 1], M[..., 0, 2]
    d, e, f = M[..., 1, 0], M[..., 1, 1], M[..., 1, 2]
    g, h, i = M[..., 2, 0], M[..., 2, 1], M[..., 2, 2]
    co = [e * i - f * h, f * g - d * i, d * h - e * g]  # cofactors of the first row
    det = a * co[0] + b * co[1] + c * co[2]
    adj = torch.stack(
        [
            torch.stack([co[0], c * h - b * i, b * f - c * e], dim=-1),
            torch.stack([co[1], a * i - c * g, c * d - a * f], dim=-1),
            torch.stack([co[2], b * g - a * h, a * e - b * d], dim=-1),
        ],
        dim=-2,
    )
    return adj / det[..., None, None]


def unproject_depth(depth: Tensor, K: Tensor, T_cam_world: Tensor) -> Tensor:
    """Lift per-view depth maps to world points.

    Args:
        depth: ``(B, V, H, W)`` camera z (same units as the translation of ``T_cam_world``).
        K: ``(B, V, 3, 3)`` in pixels of (H, W).  T_cam_world: ``(B, V, 4, 4)``.
    Returns:
        ``(B, V, 3, H, W)`` world points (the ``points_world`` layout of `InstanceHead`).
    """
    B, V, H, W = depth.shape
    dtype = depth.dtype
    uv1 = torch.cat([pixel_grid(H, W, depth.device, dtype), depth.new_ones(H, W, 1)], dim=-1)  # (H,W,3)
    rays = torch.einsum("bvij,hwj->bvhwi", inverse_3x3(K.to(dtype)), uv1)
    p_cam = rays * depth[..., None]
    T_world_cam = rigid_inverse(T_cam_world.to(dtype))  # extrinsics are rigid (DA3 poses, given TF)
    p_world = torch.einsum("bvij,bvhwj->bvhwi", T_world_cam[..., :3, :3], p_cam) + T_world_cam[:, :, None, None, :3, 3]
    return p_world.permute(0, 1, 4, 2, 3).contiguous()


def sample_views(value: Tensor, grid: Tensor, padding_mode: str = "border") -> Tensor:
    """Bilinear sampling of per-view maps at per-view grid points (``align_corners=False``).

    Args:
        value: ``(B, V, G, C, h, w)`` (G = attention heads / groups, each samples its own channels).
        grid: ``(B, V, G, N, 2)`` normalised coords (see `pixel_to_grid`).
    Returns:
        ``(B, V, G, N, C)``.
    """
    B, V, G, C, h, w = value.shape
    N = grid.shape[3]
    # sample in the grid's precision (>= float32): half-precision grids are off by pixels
    sdtype = torch.promote_types(value.dtype, grid.dtype)
    out = F.grid_sample(
        value.reshape(B * V * G, C, h, w).to(sdtype),
        grid.reshape(B * V * G, N, 1, 2).to(sdtype),
        mode="bilinear",
        padding_mode=padding_mode,
        align_corners=False,
    )  # (BVG, C, N, 1)
    return out.view(B, V, G, C, N).transpose(-1, -2).to(value.dtype)


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` restricted to ``mask``; masked entries get exactly 0, and a slice with
    no unmasked entry is all zeros (no NaN in forward or backward)."""
    mask = mask.expand_as(logits)
    neg_inf = torch.finfo(logits.dtype).min
    filled = logits.masked_fill(~mask, neg_inf)
    m = filled.amax(dim=dim, keepdim=True).detach()
    e = torch.exp(filled - m) * mask.to(logits.dtype)  # masked -> exp(very negative) = 0, finite
    den = e.sum(dim=dim, keepdim=True)
    return e / den.clamp_min(torch.finfo(logits.dtype).tiny)
