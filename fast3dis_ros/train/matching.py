"""Hungarian matching between predicted queries and ground-truth instances (Mask2Former style).

Cost per (query, instance) pair, on a shared random set of pixels (all pixels of all views when
``V * Hm * Wm <= num_points``):
``cost_mask * BCE + cost_dice * dice + cost_score * focal_score + cost_anchor * L1(anchor, centroid)``,
the last term only when the targets carry ``centroids_norm`` and the outputs ``anchors_norm``.

Batched: the costs of every sample (and, with `HungarianMatcher.match_layers`, of every decoder layer)
are computed on the device on padded targets ``(B, G, ...)`` in a few batched matmuls; the small cost
tensor ``(L, B, Q, G)`` then goes to the CPU in *one* transfer (the only host sync of the loss), where
scipy's ``linear_sum_assignment`` solves each ``(Q, G_b)`` block. Results are identical to matching each
sample on its own (padded columns are dropped before the assignment).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn


def pairwise_sigmoid_ce(inputs: Tensor, targets: Tensor) -> Tensor:
    """inputs ``(..., Q, N)`` logits, targets ``(..., G, N)`` in {0,1} -> mean BCE ``(..., Q, G)``.

    Uses ``BCE(x, 1) = softplus(-x)``, ``BCE(x, 0) = softplus(x)``."""
    n = inputs.shape[-1]
    pos = F.softplus(-inputs)
    neg = F.softplus(inputs)
    t = targets.transpose(-1, -2)
    return (pos @ t + neg @ (1 - t)) / max(n, 1)


def pairwise_dice(inputs: Tensor, targets: Tensor) -> Tensor:
    """inputs ``(..., Q, N)`` logits, targets ``(..., G, N)`` -> ``1 - (2|p t| + 1) / (|p| + |t| + 1)``."""
    p = inputs.sigmoid()
    num = 2 * p @ targets.transpose(-1, -2)
    den = p.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]
    return 1 - (num + 1) / (den + 1)


def focal_score_cost(logits: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Deformable-DETR focal classification cost for the positive class, same shape as ``logits``."""
    p = logits.sigmoid()
    neg = (1 - alpha) * p**gamma * (-(1 - p + 1e-8).log())
    pos = alpha * (1 - p) ** gamma * (-(p + 1e-8).log())
    return pos - neg


def sample_flat_points(num_pixels: int, num_points: int, device) -> Tensor | None:
    """Random flat pixel indices (``None`` = use all pixels)."""
    if num_pixels <= num_points:
        return None
    return torch.randint(num_pixels, (num_points,), device=device)


def pad_targets(targets: list[dict]) -> dict:
    """List of per-sample ``{"masks": (G_b, V, h, w)[, "centroids_norm", "centroid_valid"]}`` -> padded dict
    ``masks (B, G, V, h, w)``, ``valid (B, G)`` bool, ``counts`` (python list of G_b) [+ padded centroids]."""
    B = len(targets)
    counts = [int(t["masks"].shape[0]) for t in targets]
    G = max(counts) if counts else 0
    m0 = targets[0]["masks"]
    dev = m0.device
    masks = torch.zeros((B, G, *m0.shape[1:]), dtype=m0.dtype, device=dev)
    valid = torch.zeros((B, G), dtype=torch.bool, device=dev)
    out = {"masks": masks, "valid": valid, "counts": counts}
    has_c = all("centroids_norm" in t for t in targets)
    if has_c:
        out["centroids_norm"] = torch.zeros((B, G, 3), dtype=targets[0]["centroids_norm"].dtype, device=dev)
        out["centroid_valid"] = torch.zeros((B, G), dtype=torch.bool, device=dev)
    for b, t in enumerate(targets):
        g = counts[b]
        if g:
            masks[b, :g] = t["masks"]
            valid[b, :g] = True
            if has_c:
                out["centroids_norm"][b, :g] = t["centroids_norm"]
                out["centroid_valid"][b, :g] = t.get("centroid_valid", torch.ones(g, dtype=torch.bool, device=dev))
    return out


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
    def cost(self, out: dict, tgt: dict, idx: Tensor | None) -> Tensor:
        """Cost ``(B, Q, G)`` of one layer ``out`` against padded targets ``tgt`` (see `pad_targets`);
        ``idx``: flat pixel indices shared by the batch (None = all pixels)."""
        logits, masks = out["pred_logits"], out["pred_masks"]
        B, Q = logits.shape
        pm = masks.flatten(2).float()  # (B, Q, N)
        tm = tgt["masks"].flatten(2).to(pm.dtype)  # (B, G, N)
        if tm.shape[-1] != pm.shape[-1]:
            raise ValueError(f"target masks {tuple(tgt['masks'].shape)} do not match predictions {tuple(masks.shape)}")
        if idx is not None:
            pm, tm = pm[..., idx], tm[..., idx]
        C = self.cost_mask * pairwise_sigmoid_ce(pm, tm) + self.cost_dice * pairwise_dice(pm, tm)
        C = C + self.cost_score * focal_score_cost(logits.float(), self.alpha, self.gamma)[..., None]
        if self.cost_anchor > 0 and "anchors_norm" in out and "centroids_norm" in tgt:
            cent = tgt["centroids_norm"].float()
            d = torch.cdist(out["anchors_norm"].float(), cent, p=1) * tgt["centroid_valid"][:, None].float()
            C = C + self.cost_anchor * d
        return torch.nan_to_num(C, nan=1e6, posinf=1e6, neginf=-1e6)

    @torch.no_grad()
    def match_layers(self, layers: list[dict], tgt: dict) -> list[list[tuple[Tensor, Tensor]]]:
        """Match every layer of ``layers`` against padded targets with one device->host transfer.

        Returns ``[layer][b] -> (pred_idx, gt_idx)`` as int64 CPU tensors (sorted by pred_idx)."""
        counts = tgt["counts"]
        B = len(counts)
        G = max(counts) if counts else 0
        empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        if G == 0:
            return [[empty for _ in range(B)] for _ in layers]
        N = int(np.prod(tgt["masks"].shape[2:]))
        idx = sample_flat_points(N, self.num_points, tgt["masks"].device)
        C = torch.stack([self.cost(o, tgt, idx) for o in layers]).cpu().numpy()  # (L,B,Q,G): the one sync
        res = []
        for Cl in C:
            lres = []
            for b in range(B):
                g = counts[b]
                if g == 0:
                    lres.append(empty)
                    continue
                r, c = linear_sum_assignment(Cl[b, :, :g])
                lres.append((torch.as_tensor(np.asarray(r), dtype=torch.int64),
                             torch.as_tensor(np.asarray(c), dtype=torch.int64)))
            res.append(lres)
        return res

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict] | dict) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits (B, Q)``, ``pred_masks (B, Q, V, Hm, Wm)``, optional ``anchors_norm (B, Q, 3)``.
            targets: per batch element ``{"masks": (N_gt, V, Hm, Wm)}`` (+ optional ``centroids_norm
              (N_gt, 3)`` and ``centroid_valid (N_gt,)``), or a padded dict (`pad_targets`).
        Returns per batch element ``(pred_idx, gt_idx)`` on the device of the predictions.
        """
        tgt = targets if isinstance(targets, dict) else pad_targets(targets)
        dev = outputs["pred_logits"].device
        return [(r.to(dev), c.to(dev)) for r, c in self.match_layers([outputs], tgt)[0]]
