"""Mask2Former-style instance postprocessing of FAST3DIS outputs (one window, torch, on device).

score_q = sigmoid(objectness_q) * mean mask probability of query q inside its mask (prob > 0.5);
queries with score > threshold are kept (sorted by score, best first); each pixel takes the kept
query of highest mask probability if that probability > mask_threshold. Instances left without any
pixel are dropped, so ``labels`` and ``scores`` always agree: label k >= 1 <-> ``scores[k-1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def instances_from_queries(
    pred_logits: Tensor,
    pred_masks: Tensor,
    out_hw: tuple[int, int],
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    max_instances: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One window: ``pred_logits (Q,)``, ``pred_masks (Q,V,Hm,Wm)`` logits.

    Returns ``labels (V,H,W) int32`` (0 = background), ``scores (N,) float32`` and ``query_index (N,)``
    (which query each instance came from), all on the input device.
    """
    Q, V, Hm, Wm = pred_masks.shape
    H, W = out_hw
    logits = pred_logits.float()
    mask_prob = pred_masks.float().sigmoid()
    inside = mask_prob > mask_threshold
    mask_quality = (mask_prob * inside).sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3)).clamp(min=1)
    score = logits.sigmoid() * mask_quality
    order = torch.argsort(score, descending=True)
    keep = order[score[order] > score_threshold]  # one host sync (data-dependent size)
    if max_instances is not None:
        keep = keep[:max_instances]
    N = int(keep.numel())
    labels = torch.zeros((V, H, W), dtype=torch.int32, device=pred_masks.device)
    if N == 0:
        return labels, score.new_zeros((0,)), keep
    kept = pred_masks[keep].float()  # (N,V,Hm,Wm)
    for v in range(V):  # per view: bounded memory (N x H x W)
        prob = kept[:, v : v + 1]
        if (Hm, Wm) != (H, W):
            prob = F.interpolate(prob, size=(H, W), mode="bilinear", align_corners=False)
        prob = prob[:, 0].sigmoid()  # (N,H,W)
        best, idx = prob.max(dim=0)
        labels[v] = torch.where(best > mask_threshold, idx.to(torch.int32) + 1, torch.zeros_like(labels[v]))
    # drop instances that won no pixel and renumber 1..N' (keeps score order)
    counts = torch.bincount(labels.flatten().long(), minlength=N + 1)[1:]
    present = counts > 0
    remap = torch.zeros(N + 1, dtype=torch.int32, device=labels.device)
    remap[1:][present] = torch.arange(1, int(present.sum()) + 1, dtype=torch.int32, device=labels.device)
    labels = remap[labels.long()]
    return labels, score[keep][present], keep[present]
