"""Ground-truth instance maps -> per-sample set-prediction targets.

``build_targets(instance, mask_hw)`` turns a batch of instance-id maps ``(B, V, H, W)`` (int, ids
consistent across the views of a sample, 0 = background / ignore) into one dict per sample::

    {"masks": (N_gt, V, Hm, Wm) bool, "ids": (N_gt,) int64, "labels": (N_gt,) int64 zeros,
     "area": (N_gt,) float pixel fraction at the mask resolution}

at the decoder's mask resolution ``(Hm, Wm)``. Down-sampling uses area voting: a mask cell belongs to
an instance when that instance covers at least ``min_cover`` of the cell's full-resolution pixels
(0.5 = majority); instances that vanish at the mask resolution fall back to nearest sampling so small
objects are not silently dropped, and instances still smaller than ``min_pixels`` cells in total are
removed. ``labels`` are all 0 (class-agnostic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["build_targets", "downsample_instance_masks"]


def downsample_instance_masks(
    masks: torch.Tensor, mask_hw: tuple[int, int], min_cover: float = 0.5
) -> torch.Tensor:
    """(N, V, H, W) bool -> (N, V, Hm, Wm) bool by area coverage >= ``min_cover``, nearest fallback."""
    N, V, H, W = masks.shape
    Hm, Wm = int(mask_hw[0]), int(mask_hw[1])
    if (H, W) == (Hm, Wm):
        return masks.bool()
    flat = masks.reshape(N * V, 1, H, W).float()
    if N * V == 0:
        return torch.zeros(N, V, Hm, Wm, dtype=torch.bool, device=masks.device)
    if H % Hm == 0 and W % Wm == 0:
        cover = F.avg_pool2d(flat, kernel_size=(H // Hm, W // Wm))
    else:
        cover = F.adaptive_avg_pool2d(flat, (Hm, Wm))
    out = (cover >= min_cover).reshape(N, V, Hm, Wm)
    empty = ~out.flatten(1).any(1)
    if bool(empty.any()):
        near = F.interpolate(flat, size=(Hm, Wm), mode="nearest").reshape(N, V, Hm, Wm) > 0.5
        # still nothing: keep the cell of maximum coverage in every view the instance is visible in
        amax = cover.reshape(N, V, -1)
        best = torch.zeros_like(out).reshape(N, V, -1)
        best.scatter_(2, amax.argmax(-1, keepdim=True), (amax.amax(-1, keepdim=True) > 0))
        best = best.reshape(N, V, Hm, Wm)
        fallback = torch.where(near.flatten(1).any(1)[:, None, None, None], near, best)
        out = torch.where(empty[:, None, None, None], fallback, out)
    return out


def build_targets(
    instance: torch.Tensor,
    mask_hw: tuple[int, int],
    *,
    min_pixels: int = 1,
    min_cover: float = 0.5,
    ignore_ids: tuple[int, ...] = (0,),
    max_instances: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Per-sample targets from ``instance (B, V, H, W)`` (or ``(V, H, W)`` for one sample).

    ``max_instances`` keeps the largest ones (by pixel count) when a scene has more instances than
    queries. Ids are returned sorted ascending (before any truncation).
    """
    if instance.dim() == 3:
        instance = instance[None]
    if instance.dim() != 4:
        raise ValueError(f"instance must be (B,V,H,W) or (V,H,W), got {tuple(instance.shape)}")
    instance = instance.long()
    out: list[dict[str, torch.Tensor]] = []
    for inst in instance:  # (V, H, W)
        ids = torch.unique(inst)
        keep = torch.ones_like(ids, dtype=torch.bool)
        for ig in ignore_ids:
            keep &= ids != ig
        keep &= ids >= 0
        ids = ids[keep]
        full = inst[None] == ids[:, None, None, None]  # (N, V, H, W)
        masks = downsample_instance_masks(full, mask_hw, min_cover)
        npx = masks.flatten(1).sum(1)
        sel = npx >= min_pixels
        ids, masks, npx = ids[sel], masks[sel], npx[sel]
        if max_instances is not None and ids.numel() > max_instances:
            order = torch.argsort(npx, descending=True)[:max_instances].sort().values
            ids, masks, npx = ids[order], masks[order], npx[order]
        total = float(masks.shape[1] * masks.shape[2] * masks.shape[3]) if masks.dim() == 4 else 1.0
        out.append(
            {
                "masks": masks,
                "ids": ids,
                "labels": torch.zeros_like(ids),
                "area": npx.float() / max(total, 1.0),
            }
        )
    return out
