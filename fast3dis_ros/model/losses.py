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
(SupCon) loss: up to ``contrastive_points`` foreground pixels sampled from all views, embedded with
the L2-normalised per-pixel mask features; positives = pixels of the same GT instance in any view;
temperature ``contrastive_temperature``.

Aux-layer losses get the suffix ``_<i>`` (i = index into ``aux_outputs``). ``total`` is the weighted
sum; ``overlap_weight`` is reported (detached) too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .matching import HungarianMatcher
from .schedule import WarmupDecaySchedule


@dataclass
class CriterionConfig:
    weight_obj: float = 2.0
    weight_mask: float = 5.0
    weight_dice: float = 5.0
    weight_anchor: float = 1.0
    weight_contrastive: float = 1.0
    overlap: WarmupDecaySchedule = field(default_factory=WarmupDecaySchedule)
    overlap_on_aux: bool = True
    overlap_objectness_weighted: bool = False  # sum_q sigmoid(obj_q) * sigmoid(m_qp) instead of sum_q sigmoid(m_qp)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    contrastive_points: int = 1024
    contrastive_temperature: float = 0.1
    deep_supervision: bool = True
    # matcher costs
    cost_score: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    cost_anchor: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CriterionConfig":
        d = dict(d)
        if isinstance(d.get("overlap"), dict):
            d["overlap"] = WarmupDecaySchedule.from_dict(d["overlap"])
        return cls(**d)


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


# ----------------------------------------------------------------------------- criterion
class SetCriterion(nn.Module):
    """forward(outputs, targets, step=0) -> dict of named losses + ``total`` (see module docstring)."""

    def __init__(self, cfg: CriterionConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or CriterionConfig()
        c = self.cfg
        self.matcher = HungarianMatcher(c.cost_score, c.cost_mask, c.cost_dice, c.cost_anchor, c.num_points, c.focal_alpha, c.focal_gamma)

    def overlap_weight(self, step: int) -> float:
        """Overlap-penalty weight at ``step`` (definition: `schedule.WarmupDecaySchedule`)."""
        return self.cfg.overlap(step)

    # ---- targets
    def prepare_targets(self, outputs: dict, targets: list[dict]) -> list[dict]:
        """Resize masks to the prediction size (nearest) and add ``centroids_norm``/``centroid_valid``."""
        hm, wm = outputs["pred_masks"].shape[-2:]
        dtype = outputs["pred_masks"].dtype
        out = []
        for b, t in enumerate(targets):
            m = t["masks"].to(dtype)
            if m.shape[-2:] != (hm, wm):
                G, V = m.shape[:2]
                m = F.interpolate(m.reshape(G * V, 1, *m.shape[-2:]), size=(hm, wm), mode="nearest").view(G, V, hm, wm)
            t = dict(t, masks=m)
            if "points" in outputs and "scene_center" in outputs:
                pts = outputs["points"][b].to(dtype)  # (V,3,hm,wm)
                conf = outputs.get("point_conf")
                w = m * (conf[b].to(dtype)[None] if conf is not None else 1.0)  # (G,V,hm,wm)
                wsum = w.flatten(1).sum(1)
                cent = torch.einsum("gvhw,vchw->gc", w, pts) / wsum.clamp_min(1e-12)[:, None]
                t["centroids_norm"] = ((cent - outputs["scene_center"][b]) / outputs["scene_scale"][b]).detach()
                t["centroid_valid"] = wsum > 0
            out.append(t)
        return out

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

    def layer_losses(self, out: dict, targets: list[dict], num_masks: float, step: int, with_overlap: bool) -> dict:
        c = self.cfg
        logits, masks = out["pred_logits"], out["pred_masks"]
        B, Q = logits.shape
        indices = self.matcher(out, targets)
        # objectness
        tgt_obj = torch.zeros_like(logits)
        for b, (pi, _) in enumerate(indices):
            tgt_obj[b, pi] = 1.0
        losses = {"loss_obj": sigmoid_focal_loss(logits, tgt_obj, c.focal_alpha, c.focal_gamma).sum() / num_masks}
        # masks
        src = torch.cat([masks[b, pi].flatten(1) for b, (pi, _) in enumerate(indices)])
        tgt = torch.cat([targets[b]["masks"][gi].flatten(1) for b, (_, gi) in enumerate(indices)]).to(src.dtype)
        if src.shape[0] == 0:
            zero = masks.sum() * 0.0
            losses["loss_mask"], losses["loss_dice"] = zero, zero
        else:
            idx = self._point_indices(src)
            if idx is not None:
                src, tgt = src.gather(1, idx), tgt.gather(1, idx)
            losses["loss_mask"] = F.binary_cross_entropy_with_logits(src, tgt, reduction="none").mean(1).sum() / num_masks
            losses["loss_dice"] = dice_loss(src, tgt).sum() / num_masks
        # anchors
        if "anchors_norm" in out and targets and "centroids_norm" in targets[0]:
            a = torch.cat([out["anchors_norm"][b, pi] for b, (pi, _) in enumerate(indices)])
            g = torch.cat([targets[b]["centroids_norm"][gi] for b, (_, gi) in enumerate(indices)]).to(a.dtype)
            v = torch.cat([targets[b]["centroid_valid"][gi] for b, (_, gi) in enumerate(indices)])
            if v.any():
                losses["loss_anchor"] = (a[v] - g[v]).abs().sum(-1).sum() / v.sum().clamp_min(1)
            else:
                losses["loss_anchor"] = out["anchors_norm"].sum() * 0.0
        # overlap
        if with_overlap:
            qw = logits.sigmoid() if c.overlap_objectness_weighted else None
            losses["loss_overlap"] = overlap_penalty(masks, out.get("point_conf"), qw)
        return losses

    def contrastive(self, mask_features: Tensor, targets: list[dict]) -> Tensor:
        c = self.cfg
        vals = []
        for b, t in enumerate(targets):
            ids = instance_id_map(t["masks"]).flatten()  # (V*H*W,)
            fg = torch.nonzero(ids >= 0).squeeze(1)
            if fg.numel() < 2:
                continue
            if fg.numel() > c.contrastive_points:
                fg = fg[torch.randperm(fg.numel(), device=fg.device)[: c.contrastive_points]]
            f = mask_features[b]  # (V,C,H,W)
            emb = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])[fg]
            l = supcon_loss(F.normalize(emb.float(), dim=-1), ids[fg], c.contrastive_temperature)
            if l is not None:
                vals.append(l)
        if not vals:
            return mask_features.sum() * 0.0
        return torch.stack(vals).mean()

    def forward(self, outputs: dict, targets: list[dict], step: int = 0) -> dict:
        c = self.cfg
        targets = self.prepare_targets(outputs, targets)
        num_masks = max(float(sum(int(t["masks"].shape[0]) for t in targets)), 1.0)
        w_ov = self.overlap_weight(step)
        weights = {
            "loss_obj": c.weight_obj,
            "loss_mask": c.weight_mask,
            "loss_dice": c.weight_dice,
            "loss_anchor": c.weight_anchor,
            "loss_overlap": w_ov,
        }
        shared = {k: outputs[k] for k in ("point_conf",) if k in outputs}
        losses = self.layer_losses(outputs, targets, num_masks, step, with_overlap=True)
        total = sum(weights[k] * v for k, v in losses.items())
        if c.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                la = self.layer_losses({**shared, **aux}, targets, num_masks, step, with_overlap=c.overlap_on_aux)
                total = total + sum(weights[k] * v for k, v in la.items())
                losses.update({f"{k}_{i}": v for k, v in la.items()})
        if "mask_features" in outputs and c.weight_contrastive > 0:
            losses["loss_contrastive"] = self.contrastive(outputs["mask_features"], targets)
            total = total + c.weight_contrastive * losses["loss_contrastive"]
        losses["overlap_weight"] = torch.tensor(w_ov)
        losses["total"] = total
        return losses
