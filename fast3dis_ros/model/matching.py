"""Hungarian matching between predicted queries and ground-truth instances (Mask2Former style).

Cost per (query, instance) pair, on a shared random set of pixels (all pixels of all views when
``V * Hm * Wm <= num_points``):
``cost_mask * BCE + cost_dice * dice + cost_score * focal_score + cost_anchor * L1(anchor, centroid)``,
the last term only when the targets carry ``centroids_norm`` and the outputs ``anchors_norm``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn


def pairwise_sigmoid_ce(inputs: Tensor, targets: Tensor) -> Tensor:
    """inputs ``(Q, N)`` logits, targets ``(G, N)`` in {0,1} -> mean BCE ``(Q, G)``."""
    n = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / max(n, 1)


def pairwise_dice(inputs: Tensor, targets: Tensor) -> Tensor:
    """inputs ``(Q, N)`` logits, targets ``(G, N)`` -> ``1 - (2|p t| + 1) / (|p| + |t| + 1)`` ``(Q, G)``."""
    p = inputs.sigmoid()
    num = 2 * p @ targets.T
    den = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def focal_score_cost(logits: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Deformable-DETR focal classification cost for the positive class, ``(Q,)``."""
    p = logits.sigmoid()
    neg = (1 - alpha) * p**gamma * (-(1 - p + 1e-8).log())
    pos = alpha * (1 - p) ** gamma * (-(p + 1e-8).log())
    return pos - neg


def sample_flat_points(num_pixels: int, num_points: int, device) -> Tensor | None:
    """Random flat pixel indices (``None`` = use all pixels)."""
    if num_pixels <= num_points:
        return None
    return torch.randint(num_pixels, (num_points,), device=device)


class HungarianMatcher(nn.Module):
    """Returns, per batch element, ``(pred_idx, gt_idx)`` int64 tensors (sorted by pred_idx)."""

    def __init__(
        self,
        cost_score: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        cost_anchor: float = 1.0,
        num_points: int = 12544,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.cost_score, self.cost_mask, self.cost_dice, self.cost_anchor = cost_score, cost_mask, cost_dice, cost_anchor
        self.num_points, self.alpha, self.gamma = num_points, alpha, gamma

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits (B, Q)``, ``pred_masks (B, Q, V, Hm, Wm)``, optional ``anchors_norm (B, Q, 3)``.
            targets: per batch element ``{"masks": (N_gt, V, Hm, Wm)}`` (+ optional ``centroids_norm
              (N_gt, 3)`` and ``centroid_valid (N_gt,)``).
        """
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        B, Q = logits.shape
        out = []
        for b in range(B):
            tgt = targets[b]["masks"]
            G = tgt.shape[0]
            dev = logits.device
            if G == 0:
                out.append((torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.int64, device=dev)))
                continue
            pm = masks[b].flatten(1).float()  # (Q, N)
            tm = tgt.to(pm.dtype).flatten(1)
            if tm.shape[1] != pm.shape[1]:
                raise ValueError(f"target masks {tuple(tgt.shape)} do not match predictions {tuple(masks[b].shape)}")
            idx = sample_flat_points(pm.shape[1], self.num_points, dev)
            if idx is not None:
                pm, tm = pm[:, idx], tm[:, idx]
            C = self.cost_mask * pairwise_sigmoid_ce(pm, tm) + self.cost_dice * pairwise_dice(pm, tm)
            C = C + self.cost_score * focal_score_cost(logits[b].float(), self.alpha, self.gamma)[:, None]
            if self.cost_anchor > 0 and "anchors_norm" in outputs and "centroids_norm" in targets[b]:
                cent = targets[b]["centroids_norm"].float()
                valid = targets[b].get("centroid_valid", torch.ones(G, dtype=torch.bool, device=dev))
                d = torch.cdist(outputs["anchors_norm"][b].float(), cent, p=1) * valid[None].float()
                C = C + self.cost_anchor * d
            C = torch.nan_to_num(C, nan=1e6, posinf=1e6, neginf=-1e6).cpu().numpy()
            r, c = linear_sum_assignment(C)
            r = torch.as_tensor(np.asarray(r), dtype=torch.int64, device=dev)
            c = torch.as_tensor(np.asarray(c), dtype=torch.int64, device=dev)
            out.append((r, c))
        return out
