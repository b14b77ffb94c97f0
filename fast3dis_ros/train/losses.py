"""`SetCriterion` for FAST3DIS (Mask2Former-style set loss + multi-view terms).

Per decoder layer (final + every ``aux_outputs`` entry, each matched on its own):

* ``loss_obj``   sigmoid focal loss on objectness (matched queries = 1, others 0), sum / num_masks;
* ``loss_mask``  BCE and ``loss_dice`` dice on matched masks, on ``num_points`` pixels per mask
  chosen among all views with Mask2Former's uncertainty sampling (all pixels when few);
* ``loss_anchor`` L1 (normalised scene units) between a matched query's anchor and the
  confidence-weighted 3D centroid of its GT instance (needs ``points``/``point_conf``/``scene_*``
  in the outputs, as `InstanceHead` gives);
* ``loss_overlap`` confidence-weighted spatial overlap penalty
  ``sum_p c_p * relu(sum_q sigmoid(m_qp) - 1) / sum_p c_p`` over all pixels p of all views,
  ``c_p`` = point confidence divided by its per-sample mean (1 when unknown); weighted by the
  schedule `overlap_weight(step)` (`schedule.WarmupDecaySchedule`).

Once per sample (final mask features): ``loss_contrastive``, a multi-view supervised contrastive
(SupCon, Khosla et al. "L_out") loss: up to ``contrastive_points`` foreground pixels sampled from all
views *without replacement, with probability proportional to 1 / (pixel area of their instance)*
(instance-balanced: every visible instance contributes about the same number of anchors, small ones
included, and an instance seen in several views gets positives across views), embedded with the
L2-normalised per-pixel mask features; positives = pixels of the same GT instance in any view;
temperature ``contrastive_temperature``. The reported value is the SupCon loss *minus its lower bound*
``mean_i log |P(i)|`` (``|P(i)|`` = number of positives of anchor i): 0 for perfectly separated
instances, gradients unchanged. (Before this change the raw SupCon value was reported; its floor of
~log(#points / #instances) ~ 5 nats made it look stuck at ~6.)

Matching is batched (`matching.HungarianMatcher.match_layers`): every layer's cost matrices are built on
the device and moved to the CPU together, once per call. Targets may be a list of per-sample dicts or
a padded dict ``{"masks": (B, G, V, h, w), "valid": (B, G), "counts": [G_b]}`` (`matching.pad_targets`,
built in the DataLoader workers by `fast3dis_ros.train.data.TargetCollate`).

Aux-layer losses get the suffix ``_<i>`` (i = index into ``aux_outputs``). ``total`` is the weighted
sum; ``overlap_weight`` is reported (detached) too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fast3dis_ros.train.matching import HungarianMatcher, pad_targets
from fast3dis_ros.model.config import LossConfig


# ----------------------------------------------------------------------------- elementary losses
def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (RetinaNet), not reduced."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row dice loss ``1 - (2|p t| + 1) / (|p| + |t| + 1)`` for ``(M, N)`` -> ``(M,)``."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)


def overlap_penalty(mask_logits: Tensor, conf: Tensor | None = None, query_weights: Tensor | None = None) -> Tensor:
    """Confidence-weighted overlap: ``mean_b [ sum_p c_p relu(sum_q w_q sigmoid(m_qp) - 1) / sum_p c_p ]``.

    mask_logits ``(B, Q, V, H, W)``; conf ``(B, V, H, W)`` or None (uniform); query_weights ``(B, Q)``
    or None (all 1). ``c_p = conf_p / mean(conf)`` per sample. 0 for disjoint (saturated) masks.
    """
    prob = mask_logits.sigmoid()
    if query_weights is not None:
        prob = prob * query_weights[:, :, None, None, None]
    excess = F.relu(prob.sum(1) - 1.0)  # (B,V,H,W)
    if conf is None:
        return excess.flatten(1).mean(1).mean()
    c = conf.to(excess.dtype).clamp_min(0)
    c = c / c.flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return ((c * excess).flatten(1).sum(1) / c.flatten(1).sum(1).clamp_min(1e-12)).mean()


def supcon_loss(emb: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor | None:
    """Supervised contrastive loss (Khosla et al.) on L2-normalised ``emb (N, C)`` with ``labels (N,)``.
    Anchors without positives are skipped; returns None when no anchor has one."""
    n = emb.shape[0]
    if n < 2:
        return None
    sim = emb @ emb.T / temperature
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(1)
    ok = n_pos > 0
    if not ok.any():
        return None
    mean_log_pos = log_prob.masked_fill(~pos, 0.0).sum(1)[ok] / n_pos[ok]
    return -mean_log_pos.mean()


def instance_id_map(masks: Tensor) -> Tensor:
    """``(G, V, H, W)`` masks -> ``(V, H, W)`` int64 ids: first instance covering a pixel, -1 = none."""
    if masks.shape[0] == 0:
        return torch.full(masks.shape[1:], -1, dtype=torch.int64, device=masks.device)
    m = masks > 0.5
    ids = m.float().argmax(0)
    return torch.where(m.any(0), ids, torch.full_like(ids, -1))


def targets_from_instance_maps(instance: Tensor, mask_size: tuple[int, int]) -> list[dict]:
    """Instance-id images ``(B, V, H, W)`` (0 = background, same id = same object in every view)
    -> per-sample ``{"masks": (N_gt, V, Hm, Wm) float, "ids": (N_gt,)}`` at ``mask_size`` (nearest)."""
    B, V = instance.shape[:2]
    small = F.interpolate(instance.flatten(0, 1)[:, None].float(), size=mask_size, mode="nearest")
    small = small.view(B, V, *mask_size).long()
    out = []
    for b in range(B):
        ids = torch.unique(small[b])
        ids = ids[ids > 0]
        masks = (small[b][None] == ids[:, None, None, None]).float()
        out.append({"masks": masks, "ids": ids})
    return out


# ----------------------------------------------------------------------------- batched helpers
def padded_id_map(masks: Tensor, valid: Tensor | None = None) -> Tensor:
    """Padded masks ``(B, G, V, h, w)`` -> ``(B, V, h, w)`` int64 index of the first instance covering a
    pixel, -1 = none (batched `instance_id_map`)."""
    m = masks > 0.5
    if valid is not None:
        m = m & valid[:, :, None, None, None]
    if m.shape[1] == 0:
        return torch.full((m.shape[0], *m.shape[2:]), -1, dtype=torch.int64, device=m.device)
    ids = m.to(torch.uint8).argmax(1)
    return torch.where(m.any(1), ids, torch.full_like(ids, -1))


def sample_balanced_points(ids: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Sample up to ``n`` foreground positions per row of ``ids (B, N)`` (-1 = background) without
    replacement, with probability proportional to 1 / area of the pixel's instance (weighted
    reservoir keys ``log(u) * area``). Returns indices ``(B, n')`` and valid ``(B, n')`` (False where a row
    has fewer than ``n`` foreground pixels), ``n' = min(n, N)``. No host sync."""
    B, N = ids.shape
    n = min(int(n), N)
    fg = ids >= 0
    safe = ids.clamp_min(0)
    area = torch.zeros(B, N + 1, dtype=torch.float32, device=ids.device)
    area.scatter_add_(1, safe, fg.float())
    pix_area = area.gather(1, safe).clamp_min(1.0)
    u = torch.rand(B, N, device=ids.device).clamp_min(1e-12)
    key = torch.where(fg, torch.log(u) * pix_area, torch.full_like(u, -float("inf")))
    idx = key.topk(n, dim=1).indices
    return idx, fg.gather(1, idx)


def supcon_loss_batched(emb: Tensor, labels: Tensor, valid: Tensor, temperature: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Batched SupCon on ``emb (B, P, C)`` (L2-normalised), ``labels (B, P)``, ``valid (B, P)``.

    Returns ``(loss, floor, has)``: per-sample means over anchors with >= 1 positive of
    ``-mean_{p in P(i)} log softmax_i(p)`` and of its lower bound ``log |P(i)|`` (both ``(B,)``, 0 for
    samples without such an anchor) and ``has (B,)`` bool (the sample has one). No host sync."""
    B, P, _ = emb.shape
    sim = emb @ emb.transpose(1, 2) / temperature
    eye = torch.eye(P, dtype=torch.bool, device=emb.device)[None]
    col_ok = valid[:, None, :] & ~eye
    sim = sim.masked_fill(~col_ok, -1e4)  # finite: exp underflows to 0, no inf*0 in the positives' sum
    lse = torch.logsumexp(sim, dim=2)
    pos = ((labels[:, :, None] == labels[:, None, :]) & col_ok).to(sim.dtype)
    n_pos = pos.sum(2)
    ok = valid & (n_pos > 0)
    per = lse - (sim * pos).sum(2) / n_pos.clamp_min(1)
    floor = torch.log(n_pos.clamp_min(1))
    w = ok.to(sim.dtype)
    cnt = w.sum(1).clamp_min(1.0)
    return (per * w).sum(1) / cnt, (floor * w).sum(1) / cnt, ok.any(1)


# ----------------------------------------------------------------------------- criterion
class SetCriterion(nn.Module):
    """forward(outputs, targets, step=0) -> dict of named losses + ``total`` (see module docstring)."""

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or LossConfig()
        c = self.cfg
        self.matcher = HungarianMatcher(c.cost_score, c.cost_mask, c.cost_dice, c.cost_anchor, c.num_points, c.focal_alpha, c.focal_gamma)

    def overlap_weight(self, step: int) -> float:
        """Overlap-penalty weight at ``step`` (definition: `schedule.WarmupDecaySchedule`)."""
        return self.cfg.overlap(step)

    # ---- targets
    def prepare_targets(self, outputs: dict, targets: list[dict] | dict) -> dict:
        """Padded targets on the prediction device: masks resized to the prediction size (nearest),
        ``centroids_norm``/``centroid_valid`` added when the outputs carry points."""
        hm, wm = outputs["pred_masks"].shape[-2:]
        dtype = outputs["pred_masks"].dtype
        dev = outputs["pred_masks"].device
        if isinstance(targets, dict):
            t = dict(targets)
            if "counts" not in t:
                t["counts"] = [int(x) for x in t["valid"].sum(1).tolist()]
        else:
            t = pad_targets(targets)
        m = t["masks"].to(dev, non_blocking=True).to(dtype)
        valid = t["valid"].to(dev, non_blocking=True)
        if m.shape[-2:] != (hm, wm):
            B, G, V = m.shape[:3]
            m = F.interpolate(m.reshape(B * G * V, 1, *m.shape[-2:]), size=(hm, wm), mode="nearest").view(B, G, V, hm, wm)
        m = m * valid[:, :, None, None, None].to(dtype)
        t["masks"], t["valid"] = m, valid
        if "points" in outputs and "scene_center" in outputs:
            pts = outputs["points"].to(dtype)  # (B,V,3,hm,wm)
            conf = outputs.get("point_conf")
            w = m * (conf.to(dtype)[:, None] if conf is not None else 1.0)  # (B,G,V,hm,wm)
            wsum = w.flatten(2).sum(2)
            cent = torch.einsum("bgvhw,bvchw->bgc", w, pts) / wsum.clamp_min(1e-12)[..., None]
            t["centroids_norm"] = ((cent - outputs["scene_center"][:, None]) / outputs["scene_scale"][:, None, None]).detach()
            t["centroid_valid"] = (wsum > 0) & valid
        return t

    # ---- per-layer losses
    def _point_indices(self, pred: Tensor) -> Tensor | None:
        """Uncertainty-based flat pixel indices ``(M, num_points)`` (Mask2Former), None = all pixels."""
        c = self.cfg
        M, N = pred.shape
        if N <= c.num_points:
            return None
        with torch.no_grad():
            n_over = int(c.num_points * c.oversample_ratio)
            cand = torch.randint(N, (M, n_over), device=pred.device)
            unc = -pred.gather(1, cand).abs()
            n_imp = int(c.importance_sample_ratio * c.num_points)
            top = unc.topk(n_imp, dim=1).indices
            idx = cand.gather(1, top)
            rnd = torch.randint(N, (M, c.num_points - n_imp), device=pred.device)
            return torch.cat([idx, rnd], dim=1)

    @staticmethod
    def _flat_indices(indices: list[tuple[Tensor, Tensor]], device) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample (pred_idx, gt_idx) -> flat (batch, pred, gt) index tensors on ``device`` (one copy)."""
        bi = torch.cat([torch.full_like(pi.cpu(), b) for b, (pi, _) in enumerate(indices)]) if indices else torch.zeros(0, dtype=torch.int64)
        qi = torch.cat([pi.cpu() for pi, _ in indices]) if indices else torch.zeros(0, dtype=torch.int64)
        gi = torch.cat([g.cpu() for _, g in indices]) if indices else torch.zeros(0, dtype=torch.int64)
        flat = torch.stack([bi, qi, gi])
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        else:
            flat = flat.to(device)
        return flat[0], flat[1], flat[2]

    def layer_losses(self, out: dict, targets: dict, num_masks: float, step: int, with_overlap: bool,
                     indices: list[tuple[Tensor, Tensor]] | None = None) -> dict:
        c = self.cfg
        logits, masks = out["pred_logits"], out["pred_masks"]
        B, Q = logits.shape
        if indices is None:
            indices = self.matcher.match_layers([out], targets)[0]
        bi, qi, gi = self._flat_indices(indices, logits.device)
        # objectness
        tgt_obj = torch.zeros_like(logits)
        tgt_obj[bi, qi] = 1.0
        losses = {"loss_obj": sigmoid_focal_loss(logits, tgt_obj, c.focal_alpha, c.focal_gamma).sum() / num_masks}
        # masks
        if bi.numel() == 0:
            zero = masks.sum() * 0.0
            losses["loss_mask"], losses["loss_dice"] = zero, zero
        else:
            src = masks[bi, qi].flatten(1)
            tgt = targets["masks"][bi, gi].flatten(1).to(src.dtype)
            idx = self._point_indices(src)
            if idx is not None:
                src, tgt = src.gather(1, idx), tgt.gather(1, idx)
            losses["loss_mask"] = F.binary_cross_entropy_with_logits(src, tgt, reduction="none").mean(1).sum() / num_masks
            losses["loss_dice"] = dice_loss(src, tgt).sum() / num_masks
        # anchors
        if "anchors_norm" in out and "centroids_norm" in targets:
            a = out["anchors_norm"][bi, qi]
            g = targets["centroids_norm"][bi, gi].to(a.dtype)
            v = targets["centroid_valid"][bi, gi].to(a.dtype)
            # with a caller's global normaliser (targets["num_masks"]) the anchors share it: a per-batch
            # count would differ between a batch and its shards over ranks / micro-steps
            den = float(targets["num_masks"]) if "num_masks" in targets else v.sum().clamp_min(1.0)
            losses["loss_anchor"] = ((a - g).abs().sum(-1) * v).sum() / den
        # overlap
        if with_overlap:
            qw = logits.sigmoid() if c.overlap_objectness_weighted else None
            losses["loss_overlap"] = overlap_penalty(masks, out.get("point_conf"), qw)
        return losses

    def contrastive(self, mask_features: Tensor, targets: list[dict] | dict) -> Tensor:
        """Instance-balanced multi-view SupCon minus its floor (module docstring), mean over samples with
        at least one anchor that has a positive; batched, no host sync."""
        c = self.cfg
        if not isinstance(targets, dict):
            targets = pad_targets(targets)
        B, V, C = mask_features.shape[:3]
        masks = targets["masks"]
        if masks.shape[-2:] != mask_features.shape[-2:]:
            G = masks.shape[1]
            masks = F.interpolate(masks.float().reshape(B * G * V, 1, *masks.shape[-2:]), size=mask_features.shape[-2:],
                                  mode="nearest").view(B, G, V, *mask_features.shape[-2:])
        ids = padded_id_map(masks, targets.get("valid")).flatten(1)  # (B, V*h*w)
        idx, ok = sample_balanced_points(ids, c.contrastive_points)
        f = mask_features.permute(0, 1, 3, 4, 2).reshape(B, -1, C)  # (B, V*h*w, C)
        emb = f.gather(1, idx[..., None].expand(-1, -1, C))
        emb = F.normalize(emb.float(), dim=-1)
        lab = ids.gather(1, idx)
        loss, floor, has = supcon_loss_batched(emb, lab, ok, c.contrastive_temperature)
        w = has.float()
        return ((loss - floor) * w).sum() / w.sum().clamp_min(1.0) + mask_features.sum() * 0.0

    def forward(self, outputs: dict, targets: list[dict] | dict, step: int = 0) -> dict:
        c = self.cfg
        tgt = self.prepare_targets(outputs, targets)
        # a caller may pass the normaliser of a larger batch (train/loop.py: a step split over ranks/micro-steps)
        num_masks = float(tgt["num_masks"]) if "num_masks" in tgt else max(float(sum(tgt["counts"])), 1.0)
        w_ov = self.overlap_weight(step)
        weights = {
            "loss_obj": c.weight_obj,
            "loss_mask": c.weight_mask,
            "loss_dice": c.weight_dice,
            "loss_anchor": c.weight_anchor,
            "loss_overlap": w_ov,
        }
        shared = {k: outputs[k] for k in ("point_conf",) if k in outputs}
        aux = list(outputs.get("aux_outputs", [])) if c.deep_supervision else []
        layers = [outputs] + [{**shared, **a} for a in aux]
        all_idx = self.matcher.match_layers(layers, tgt)  # one host sync for every layer
        losses = self.layer_losses(outputs, tgt, num_masks, step, with_overlap=True, indices=all_idx[0])
        total = sum(weights[k] * v for k, v in losses.items())
        for i, la_out in enumerate(layers[1:]):
            la = self.layer_losses(la_out, tgt, num_masks, step, with_overlap=c.overlap_on_aux, indices=all_idx[i + 1])
            total = total + sum(weights[k] * v for k, v in la.items())
            losses.update({f"{k}_{i}": v for k, v in la.items()})
        if "mask_features" in outputs and c.weight_contrastive > 0:
            losses["loss_contrastive"] = self.contrastive(outputs["mask_features"], tgt)
            total = total + c.weight_contrastive * losses["loss_contrastive"]
        losses["overlap_weight"] = torch.tensor(w_ov)
        losses["total"] = total
        return losses
