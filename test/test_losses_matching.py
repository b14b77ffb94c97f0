"""Hungarian matcher, SetCriterion terms, overlap schedule, gradients, and a small overfit run."""

import math
import time

import pytest
import torch

from fast3dis_ros.model.head.config import InstanceHeadConfig
from fast3dis_ros.model.head.instance_head import InstanceHead
from fast3dis_ros.model.config import Fast3disConfig, LossConfig
from fast3dis_ros.train.losses import (
    SetCriterion,
    dice_loss,
    overlap_penalty,
    supcon_loss,
    targets_from_instance_maps,
)
from fast3dis_ros.train.matching import HungarianMatcher
from fast3dis_ros.model.schedule import WarmupDecaySchedule

from test_instance_head import H, W, make_scene


def gt_masks(G, V=2, h=8, w=10, seed=0):
    """G disjoint random-rectangle-ish masks (G, V, h, w)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, G + 1, (V, h, w), generator=g)
    return torch.stack([(ids == i + 1).float() for i in range(G)])


def test_perfect_predictions_give_zero_mask_losses_and_recover_permutation():
    torch.manual_seed(0)
    Q, G, V = 6, 3, 2
    gt = gt_masks(G, V)
    perm = torch.tensor([4, 0, 2])  # gt i <- query perm[i]
    masks = torch.full((1, Q, V, 8, 10), -20.0)
    logits = torch.full((1, Q), -8.0)
    for i, q in enumerate(perm):
        masks[0, q] = gt[i] * 40 - 20
        logits[0, q] = 8.0
    # distractor queries: random masks
    for q in [1, 3, 5]:
        masks[0, q] = torch.randn(V, 8, 10) * 5
    out = {"pred_logits": logits, "pred_masks": masks}
    matcher = HungarianMatcher()
    (pi, gi), = matcher(out, [{"masks": gt}])
    mapping = dict(zip(gi.tolist(), pi.tolist()))
    assert mapping == {0: 4, 1: 0, 2: 2}
    crit = SetCriterion(LossConfig(weight_contrastive=0.0))
    losses = crit(out, [{"masks": gt}], step=0)
    assert losses["loss_mask"] < 1e-6
    assert losses["loss_dice"] < 1e-6
    assert losses["loss_obj"] < 1e-4
    assert losses["loss_overlap"] > 0.1  # the random distractors overlap the GT-like masks
    for q in [1, 3, 5]:
        masks[0, q] = -20.0
    losses = crit({"pred_logits": logits, "pred_masks": masks}, [{"masks": gt}], step=0)
    assert losses["loss_overlap"] < 1e-6  # disjoint saturated masks
    assert losses["loss_mask"] < 1e-6 and losses["loss_dice"] < 1e-6


def test_matcher_on_sampled_points_and_empty_targets():
    torch.manual_seed(0)
    Q, G, V = 5, 2, 3
    gt = gt_masks(G, V, 40, 50)
    masks = torch.randn(2, Q, V, 40, 50)
    masks[0, 3] = gt[0] * 40 - 20
    masks[0, 1] = gt[1] * 40 - 20
    out = {"pred_logits": torch.zeros(2, Q), "pred_masks": masks}
    matcher = HungarianMatcher(num_points=500)  # 6000 pixels -> sampled
    empty = {"masks": torch.zeros(0, V, 40, 50)}
    res = matcher(out, [{"masks": gt}, empty])
    assert dict(zip(res[0][1].tolist(), res[0][0].tolist())) == {0: 3, 1: 1}
    assert res[1][0].numel() == 0 and res[1][1].numel() == 0
    assert res[1][0].dtype == torch.int64
    # criterion with no GT at all: finite, objectness pushes all logits down
    crit = SetCriterion()
    masks.requires_grad_(True)
    logits = torch.zeros(2, Q, requires_grad=True)
    losses = crit({"pred_logits": logits, "pred_masks": masks, "mask_features": torch.randn(2, V, 4, 40, 50)}, [empty, empty])
    assert torch.isfinite(losses["total"])
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_contrastive"] == 0
    losses["total"].backward()
    assert (logits.grad > 0).all()


def test_dice_near_zero_and_one():
    t = (torch.rand(3, 100) > 0.5).float()
    assert dice_loss(t * 40 - 20, t).max() < 1e-6
    assert dice_loss(-(t * 40 - 20), t).min() > 0.9


def test_overlap_penalty_zero_when_disjoint_and_monotonic():
    V, h, w = 1, 10, 10
    vals = []
    for k in range(0, 11, 2):  # overlap of k columns
        a = torch.zeros(V, h, w)
        b = torch.zeros(V, h, w)
        a[..., :5 + k // 2] = 1
        b[..., 5 - (k - k // 2):] = 1
        m = torch.stack([a, b])[None] * 40 - 20  # (1,2,V,h,w)
        vals.append(overlap_penalty(m, conf=torch.rand(1, V, h, w) + 0.5).item())
    assert vals[0] < 1e-6
    assert all(b > a for a, b in zip(vals, vals[1:]))
    # confidence weighting: overlap on high-confidence pixels costs more
    a = torch.zeros(1, 4, 4)
    a[..., :2] = 1
    b = torch.zeros(1, 4, 4)
    b[..., 1:3] = 1  # overlap on column 1
    m = torch.stack([a, b])[None] * 40 - 20
    conf_lo = torch.ones(1, 1, 4, 4)
    conf_hi = conf_lo.clone()
    conf_hi[..., 1] = 5.0
    assert overlap_penalty(m, conf_hi) > overlap_penalty(m, conf_lo)
    assert math.isclose(overlap_penalty(m, conf_lo).item(), 4 / 16, rel_tol=1e-4)


def test_overlap_weight_schedule():
    s = WarmupDecaySchedule(max_weight=2.0, floor=0.2, warmup=100, total=1100, decay="cosine")
    crit = SetCriterion(LossConfig(overlap=s))
    assert crit.overlap_weight(0) == 0.0
    assert math.isclose(crit.overlap_weight(50), 1.0)
    assert math.isclose(crit.overlap_weight(100), 2.0)
    assert math.isclose(crit.overlap_weight(600), 0.2 + 1.8 * 0.5)  # cosine midpoint
    assert math.isclose(crit.overlap_weight(1100), 0.2)
    assert math.isclose(crit.overlap_weight(10**6), 0.2)
    lin = WarmupDecaySchedule(max_weight=2.0, floor=0.2, warmup=100, total=1100, decay="linear")
    assert math.isclose(lin(350), 2.0 - 1.8 * 0.25)
    assert WarmupDecaySchedule.from_dict(lin.to_dict()) == lin
    assert LossConfig.from_dict(LossConfig(overlap=lin).to_dict()).overlap == lin


def test_contrastive_lower_for_separated_embeddings():
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(16)
    centers = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    sep = torch.nn.functional.normalize(centers[labels] + 0.05 * torch.randn(64, 16), dim=-1)
    rnd = torch.nn.functional.normalize(torch.randn(64, 16), dim=-1)
    assert supcon_loss(sep, labels, 0.1) < 0.5 * supcon_loss(rnd, labels, 0.1)
    assert supcon_loss(sep, torch.arange(64), 0.1) is None  # no positives anywhere


def test_targets_from_instance_maps():
    inst = torch.zeros(1, 2, 8, 8, dtype=torch.int64)
    inst[0, 0, :4, :4] = 7
    inst[0, 1, 4:, 4:] = 7
    inst[0, 1, :4, 4:] = 3
    t = targets_from_instance_maps(inst, (4, 4))
    assert t[0]["ids"].tolist() == [3, 7]
    assert t[0]["masks"].shape == (2, 2, 4, 4)
    assert t[0]["masks"][1, 0, :2, :2].all() and t[0]["masks"][1, 1, 2:, 2:].all()
    assert t[0]["masks"].sum() == 12


def _synthetic_targets(out, G=3, seed=0):
    """GT masks from a few boxes in the point map (same object = same 3D box in every view)."""
    pts = out["points"][0]  # (V,3,hm,wm)
    c = out["scene_center"][0]
    s = out["scene_scale"][0]
    p = (pts - c[None, :, None, None]) / s
    masks = []
    x = p[:, 0]
    edges = torch.quantile(x.flatten(), torch.linspace(0.1, 0.9, G + 1))
    for i in range(G):
        masks.append(((x >= edges[i]) & (x < edges[i + 1]) & (p[:, 1] < 0.3)).float())
    return [{"masks": torch.stack(masks)}]


def test_gradients_flow_to_all_head_parameters():
    torch.manual_seed(0)
    cfg = InstanceHeadConfig.tiny()
    head = InstanceHead(cfg)
    with torch.no_grad():  # several last layers are zero-initialised (which blocks gradients upstream at step 0)
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    feats, pts, conf, K, T = make_scene(1, 3)
    out = head(feats, pts, conf, K, T, (H, W))
    targets = _synthetic_targets(out)
    crit = SetCriterion(LossConfig(overlap=WarmupDecaySchedule(1.0, 0.1, 10, 100)))
    losses = crit(out, targets, step=10)
    for k in ("loss_obj", "loss_mask", "loss_dice", "loss_anchor", "loss_overlap", "loss_contrastive", "loss_obj_0", "total"):
        assert k in losses and torch.isfinite(losses[k]), k
    losses["total"].backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_overfit_one_sample():
    torch.manual_seed(0)
    t0 = time.time()
    cfg = InstanceHeadConfig.tiny()
    head = InstanceHead(cfg)
    feats, pts, conf, K, T = make_scene(1, 2, seed=3)
    with torch.no_grad():
        targets = _synthetic_targets(head(feats, pts, conf, K, T, (H, W)))
    crit = SetCriterion(LossConfig(num_points=4096, overlap=WarmupDecaySchedule(0.5, 0.5, 0, 0)))
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    hist = []
    for _ in range(30):
        out = head(feats, pts, conf, K, T, (H, W))
        loss = crit(out, targets, step=100)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(loss.item())
    assert all(math.isfinite(v) for v in hist)
    print("overfit total loss:", [round(v, 3) for v in hist])
    assert min(hist[-5:]) < 0.5 * hist[0], (hist[0], hist[-5:])
    assert time.time() - t0 < 120


# ---------------------------------------------------------------------------------- one loss config
def test_loss_config_round_trips_and_unknown_keys_raise():
    cfg = LossConfig(weight_mask=3.0, cost_dice=4.0, overlap=WarmupDecaySchedule(0.5, 0.05, 3, 30, "linear"))
    assert LossConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="weight_msk"):
        LossConfig.from_dict({"weight_msk": 3.0})
    with pytest.raises(ValueError, match="no fields"):
        Fast3disConfig.from_dict({**Fast3disConfig.tiny().to_dict(), "loss": {"mask_bec": 5.0}})


def test_legacy_loss_keys_of_old_checkpoints_set_the_same_weights():
    """The bundled checkpoint's config.json was written with the old ``LossWeights`` names."""
    old = {"objectness": 3.0, "mask_bce": 6.0, "mask_dice": 7.0, "contrastive": 0.5, "overlap": 2.0, "depth": 0.0}
    cfg = LossConfig.from_dict(old)
    assert (cfg.weight_obj, cfg.weight_mask, cfg.weight_dice, cfg.weight_contrastive) == (3.0, 6.0, 7.0, 0.5)
    assert (cfg.overlap.max_weight, cfg.overlap.floor) == (2.0, pytest.approx(0.2))
    with pytest.raises(ValueError, match="both"):
        LossConfig.from_dict({"objectness": 1.0, "weight_obj": 2.0})
    with pytest.raises(ValueError, match="geometry_loss_weight"):
        LossConfig.from_dict({"depth": 1.0})


def test_build_criterion_uses_the_config_weights_and_fits_the_schedule_to_the_run():
    from fast3dis_ros.train.loop import build_criterion

    cfg = Fast3disConfig.tiny()
    cfg.loss = LossConfig(weight_dice=1.5, overlap=WarmupDecaySchedule(2.0, 0.4, 5000, 90000, "linear"))
    crit = build_criterion(cfg, total_steps=200)
    assert isinstance(crit, SetCriterion) and crit.cfg.weight_dice == 1.5
    assert (crit.cfg.overlap.max_weight, crit.cfg.overlap.floor, crit.cfg.overlap.decay) == (2.0, 0.4, "linear")
    assert (crit.cfg.overlap.warmup, crit.cfg.overlap.total) == (20, 200)
    assert crit.overlap_weight(20) == 2.0 and crit.overlap_weight(200) == pytest.approx(0.4)
