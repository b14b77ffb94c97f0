"""Evaluation metrics: class-agnostic 3D instance AP, 2D mask AP, depth and pose accuracy.

Everything here is numpy (+ scipy for nearest neighbours); no torch, no ROS.

3D instance AP (ScanNet-style)
------------------------------
``InstanceAPEvaluator`` is a class-agnostic port of ``evaluate_matches`` in ScanNet's benchmark script
``BenchmarkScripts/3d_evaluation/evaluate_semantic_instance.py`` (the script behind Mask3D/OpenMask3D
numbers). Per scene, predictions are point-index sets on a common point set with a confidence, GT
instances are the non-zero ids of ``gt_labels`` (0 = void: background / unlabelled). For one IoU
threshold ``th``:

1. IoU(pred, gt) = |p & g| / (|g| + |p| - |p & g|); "matches" means IoU **>** th (strict, as ScanNet).
2. GT loop (GT in ascending id; for each GT its overlapping predictions in descending score, ties in
   prediction order -- ScanNet uses file order, we sort by score so the loop is the greedy-by-score
   matching): the first not-yet-used prediction that matches becomes the GT's true positive (the
   prediction is marked used); every further matching unused prediction is a false positive carrying
   the lower of the two scores (the TP keeps the higher). A GT with no match is a "hard false negative".
3. Prediction loop: a prediction that matches no GT at all is a false positive, unless the fraction of
   its points on void (gt 0) or on GT instances smaller than ``min_region_size`` exceeds ``th`` (then
   it is ignored, as ScanNet ignores predictions on walls/floor/unannotated points).
4. (y_true, y_score) and the hard false negatives are pooled over all scenes; precision/recall are
   taken at every distinct score (``np.unique`` of the ascending scores: at threshold index ``i``,
   everything from the first occurrence of that score upward is "predicted positive"), a final point
   (precision 1, recall 0) is appended, and AP = sum_k precision_k * step_k with the ScanNet step widths
   ``convolve([r_0, r_0, r_1, ..., r_n, 0], [-0.5, 0, 0.5], 'valid')`` (a trapezoid-like integration
   over recall, no monotone interpolation of precision). AP is NaN when no scene has GT; 0 when GT
   exists but no prediction.

AP is the mean over the IoU thresholds, AP50 / AP25 the values at 0.5 / 0.25. Note: ScanNet's code
uses ``np.arange(0.5, 0.95, 0.05)`` = 0.50..0.90 (9 thresholds) for "AP 0.5:0.95"; that is the default
here (``iou_thresholds="scannet"``) so numbers compare with published ones. ``"coco"`` gives the ten
thresholds 0.50..0.95. Per-threshold APs are always returned. ScanNet's default
``min_region_size`` is 100 mesh vertices; here the default is 1 because our point sets are voxel sets
whose density is the user's choice (set it explicitly to mimic ScanNet).

Common point set ("pixel-to-voxel" evaluation)
----------------------------------------------
FAST3DIS predicts per-pixel instance labels *and* geometry. Predicted 3D points live in predicted
geometry (up to scale, with depth/pose error), so scoring their labels against GT points would mix
segmentation quality with geometry error. ``build_common_point_set`` instead lifts every valid GT pixel
with GT depth and GT cameras, voxel-downsamples the union (so a surface seen by several views counts
once), and gives each voxel the majority GT instance and the majority predicted global instance of the
pixels falling in it (predicted label maps are nearest-resized to the GT grid). The instance AP on this
set measures multi-view segmentation and cross-view id consistency only; geometry is scored separately
by ``depth_metrics`` and ``pose_metrics``. ``transfer_labels_nn`` is the alternative for lifted
predicted clouds: Sim(3)-align the predicted cloud to GT, then give each GT point the label of its
nearest predicted point within a distance cut-off (0 beyond it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, NamedTuple, Sequence

import numpy as np

__all__ = [
    "SCANNET_IOU_THRESHOLDS",
    "COCO_IOU_THRESHOLDS",
    "InstanceAPEvaluator",
    "SceneMatches",
    "match_scene",
    "ap_from_matches",
    "ap_summary",
    "instance_ap",
    "CommonPointSet",
    "backproject_depth",
    "resize_nearest",
    "build_common_point_set",
    "transfer_labels_nn",
    "mask_ap_2d",
    "coco_mask_ap",
    "depth_metrics",
    "umeyama",
    "apply_sim3",
    "align_camera_centers",
    "relative_pose_errors",
    "pose_auc",
    "pose_metrics",
]

SCANNET_IOU_THRESHOLDS = np.arange(0.5, 0.95, 0.05)  # 0.50..0.90, exactly what ScanNet's script uses
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # 0.50..0.95


def _thresholds(iou_thresholds) -> np.ndarray:
    if isinstance(iou_thresholds, str):
        if iou_thresholds == "scannet":
            return SCANNET_IOU_THRESHOLDS.copy()
        if iou_thresholds == "coco":
            return COCO_IOU_THRESHOLDS.copy()
        raise ValueError(f"iou_thresholds must be 'scannet', 'coco' or an array, got {iou_thresholds!r}")
    return np.asarray(iou_thresholds, dtype=np.float64).ravel()


# ----------------------------------------------------------------------------------------------------
# 3D instance AP
# ----------------------------------------------------------------------------------------------------


@dataclass
class _SceneStats:
    """Everything ScanNet's matching needs from one scene (small: no per-point arrays)."""

    gt_counts: np.ndarray  # (G,) points per GT instance
    pred_counts: np.ndarray  # (P,) points per prediction
    pred_scores: np.ndarray  # (P,)
    pred_void: np.ndarray  # (P,) points of the prediction on gt 0
    inter: np.ndarray  # (G, P) intersections


def _pred_masks_from_input(pred, n_points: int, scores) -> tuple[list[np.ndarray] | None, np.ndarray | None, np.ndarray]:
    """Normalise predictions to either a label array (N,) or a (P, N) bool stack; returns scores (P,)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if isinstance(pred, np.ndarray) and pred.ndim == 1 and pred.dtype != bool:
        labels = pred.astype(np.int64)
        if labels.shape[0] != n_points:
            raise ValueError(f"pred_labels has {labels.shape[0]} points, gt_labels {n_points}")
        if labels.size and labels.max() > scores.shape[0]:
            raise ValueError(f"pred_labels has id {labels.max()} but only {scores.shape[0]} scores")
        return None, labels, scores
    masks = np.asarray(pred, dtype=bool)
    if masks.ndim == 1:
        masks = masks[None]
    masks = masks.reshape(masks.shape[0], -1)
    if masks.shape[0] and masks.shape[1] != n_points:
        raise ValueError(f"pred masks have {masks.shape[1]} points, gt_labels {n_points}")
    if masks.shape[0] != scores.shape[0]:
        raise ValueError(f"{masks.shape[0]} masks but {scores.shape[0]} scores")
    return masks, None, scores


def _scannet_ap(y_true: np.ndarray, y_score: np.ndarray, hard_fn: int, has_gt: bool, has_pred: bool):
    """ScanNet's precision/recall and AP integration (see module doc). Returns (ap, precision, recall)."""
    if not has_gt:
        return float("nan"), np.zeros(0), np.zeros(0)
    if not has_pred or y_score.size == 0:
        # ScanNet: has_gt and has_pred -> integrate; has_gt only -> 0. With predictions that were all
        # ignored (y empty) the ScanNet loop would give precision [1] recall [0] -> AP 0 as well.
        return 0.0, np.array([1.0]), np.array([0.0])
    order = np.argsort(y_score)  # ScanNet: plain (quicksort) argsort, ascending
    y_score_sorted = y_score[order]
    y_true_sorted = y_true[order]
    cumsum = np.cumsum(y_true_sorted)
    _, unique_idx = np.unique(y_score_sorted, return_index=True)
    n_pr = len(unique_idx) + 1
    n_examples = len(y_score_sorted)
    n_true = cumsum[-1] if len(cumsum) > 0 else 0
    precision = np.zeros(n_pr)
    recall = np.zeros(n_pr)
    cumsum = np.append(cumsum, 0)
    for k, idx in enumerate(unique_idx):
        c = cumsum[idx - 1]
        tp = n_true - c
        fp = n_examples - idx - tp
        fn = c + hard_fn
        p = float(tp) / (tp + fp)
        r = float(tp) / (tp + fn) if (tp + fn) > 0 else 0.0
        precision[k] = p
        recall[k] = r
    precision[-1] = 1.0
    recall[-1] = 0.0
    r_conv = np.append(recall[0], recall)
    r_conv = np.append(r_conv, 0.0)
    steps = np.convolve(r_conv, [-0.5, 0, 0.5], "valid")
    return float(np.dot(precision, steps)), precision, recall


class InstanceAPEvaluator:
    """Accumulates scenes and computes class-agnostic ScanNet AP / AP50 / AP25 (see module doc).

    Usage::

        ev = InstanceAPEvaluator()
        for scene in scenes:
            ev.add_scene(pred_labels, scores, gt_labels)      # pred ids 1..P index scores[id-1]
            # or ev.add_scene(list_of_bool_masks, scores, gt_labels)
        res = ev.compute()   # {"AP", "AP50", "AP25", "ap_per_threshold", "curves", ...}

    Only per-instance counts and a (G, P) intersection matrix are kept per scene, so it can run over
    long bag replays.
    """

    def __init__(self, iou_thresholds="scannet", min_region_size: int = 1):
        self.iou_thresholds = _thresholds(iou_thresholds)
        self.min_region_size = int(min_region_size)
        self.scenes: list[_SceneStats] = []

    def __len__(self) -> int:
        return len(self.scenes)

    def add_scene(self, pred, pred_scores, gt_labels) -> None:
        """Add one scene.

        pred: (N,) int labels (0 = none, id k -> ``pred_scores[k-1]``; ids absent from the labels are
              predictions with no points and are skipped, as ScanNet skips empty masks), or a list /
              (P, N) array of boolean masks (may overlap) aligned with ``pred_scores`` (P,).
        gt_labels: (N,) int, 0 = void (ignored), other values = instance ids.
        """
        gt = np.asarray(gt_labels).astype(np.int64).ravel()
        n = gt.shape[0]
        gt_ids, gt_inv, gt_counts = np.unique(gt, return_inverse=True, return_counts=True)
        keep_gt = gt_ids != 0
        # column index of each point's gt instance among the non-zero ids, -1 for void
        col = np.full(len(gt_ids), -1, dtype=np.int64)
        col[keep_gt] = np.arange(int(keep_gt.sum()))
        gcol = col[gt_inv]
        G = int(keep_gt.sum())
        masks, labels, scores = _pred_masks_from_input(pred, n, pred_scores)
        if labels is not None:
            P_all = scores.shape[0]
            pred_counts = np.bincount(labels, minlength=P_all + 1)[1:]
            # (gt col + 1) x (pred id) joint histogram; gt col 0 here = void
            joint = np.bincount((gcol + 1) * (P_all + 1) + labels, minlength=(G + 1) * (P_all + 1))
            joint = joint.reshape(G + 1, P_all + 1)[:, 1:]
            pred_void = joint[0]
            inter = joint[1:]
        else:
            P_all = masks.shape[0]
            pred_counts = masks.sum(1)
            pred_void = np.zeros(P_all, dtype=np.int64)
            inter = np.zeros((G, P_all), dtype=np.int64)
            for p in range(P_all):
                h = np.bincount(gcol[masks[p]] + 1, minlength=G + 1)
                pred_void[p] = h[0]
                inter[:, p] = h[1:]
        nonempty = pred_counts >= max(1, self.min_region_size)  # ScanNet: skip masks < min_region_size
        self.scenes.append(
            _SceneStats(
                gt_counts=gt_counts[keep_gt].astype(np.int64),
                pred_counts=pred_counts[nonempty].astype(np.int64),
                pred_scores=scores[nonempty],
                pred_void=pred_void[nonempty].astype(np.int64),
                inter=inter[:, nonempty].astype(np.int64),
            )
        )

    def evaluated_thresholds(self) -> list[float]:
        """The IoU thresholds ``compute()`` matches at: ``iou_thresholds`` (AP = their mean), then 0.50
        and 0.25 where they are not among them (for AP50 / AP25)."""
        extra = [t for t in (0.5, 0.25) if not np.any(np.isclose(self.iou_thresholds, t))]
        return [float(t) for t in self.iou_thresholds] + extra

    def scene_matches(self, th: float) -> list[SceneMatches]:
        """Each added scene's ScanNet matches at IoU threshold ``th`` (``match_scene``), in order."""
        return [match_scene(sc, th, self.min_region_size) for sc in self.scenes]

    def compute(self) -> dict:
        """Returns dict with AP (mean over thresholds), AP50, AP25, ``ap_per_threshold`` {th: ap},
        ``curves`` {"0.50": {"precision", "recall"}, "0.25": ...}, ``n_scenes``, ``n_gt``, ``n_pred``."""
        ths = [float(t) for t in self.iou_thresholds]
        per_th, curves = {}, {}
        for th in self.evaluated_thresholds():
            ap, prec, rec = ap_from_matches(self.scene_matches(th))
            key = f"{th:.2f}"
            per_th[key] = ap
            curves[key] = {"precision": prec, "recall": rec}
        return {
            **ap_summary(per_th, ths),
            "ap_per_threshold": {k: per_th[k] for k in (f"{t:.2f}" for t in ths)},
            "curves": {k: curves[k] for k in ("0.50", "0.25")},
            "n_scenes": len(self.scenes),
            "n_gt": int(sum(int((s.gt_counts >= self.min_region_size).sum()) for s in self.scenes)),
            "n_pred": int(sum(s.pred_counts.shape[0] for s in self.scenes)),
            "iou_thresholds": ths,
        }


class SceneMatches(NamedTuple):
    """One scene's ScanNet matches at one IoU threshold; scenes pool by concatenation (``ap_from_matches``)."""

    y_true: np.ndarray  # (M,) 1 for a matched GT, 0 for a false positive
    y_score: np.ndarray  # (M,) the prediction scores
    hard_fn: int  # GT instances with no match
    has_gt: bool
    has_pred: bool


def match_scene(sc: _SceneStats, th: float, min_region_size: int = 1) -> SceneMatches:
    """ScanNet's greedy matching of one scene at IoU threshold ``th``. GT instances below ``min_region_size``
    points are not matched; their points count, with void, as ignored when an unmatched prediction is
    judged a false positive (ignored fraction <= ``th``)."""
    valid_gt = sc.gt_counts >= min_region_size
    gidx = np.nonzero(valid_gt)[0]
    P = sc.pred_counts.shape[0]
    union = sc.gt_counts[:, None] + sc.pred_counts[None, :] - sc.inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(sc.inter > 0, sc.inter / np.maximum(union, 1), 0.0)
    # preds in descending score (stable) -> the greedy-by-score version of ScanNet's loop
    pred_order = np.argsort(-sc.pred_scores, kind="stable")
    visited = np.zeros(P, dtype=bool)
    cur_true = np.ones(len(gidx))
    cur_score = np.full(len(gidx), -np.inf)
    cur_match = np.zeros(len(gidx), dtype=bool)
    extra_true, extra_score = [], []
    hard_fn = 0
    for k, g in enumerate(gidx):
        found = False
        for p in pred_order:
            if sc.inter[g, p] <= 0 or visited[p]:
                continue
            if iou[g, p] > th:
                conf = sc.pred_scores[p]
                if cur_match[k]:
                    hi, lo = max(cur_score[k], conf), min(cur_score[k], conf)
                    cur_score[k] = hi
                    extra_true.append(0.0)
                    extra_score.append(lo)
                else:
                    found = True
                    cur_match[k] = True
                    cur_score[k] = conf
                    visited[p] = True
        if not found:
            hard_fn += 1
    y_true = cur_true[cur_match].tolist() + extra_true
    y_score = cur_score[cur_match].tolist() + extra_score
    small_gt = ~valid_gt
    for p in range(P):
        # matched against *valid* GT only (ScanNet filters GT before matching)
        if np.any(iou[gidx, p] > th):
            continue
        n_ignore = sc.pred_void[p] + sc.inter[small_gt, p].sum()
        if n_ignore / sc.pred_counts[p] <= th:
            y_true.append(0.0)
            y_score.append(float(sc.pred_scores[p]))
    return SceneMatches(np.asarray(y_true, dtype=np.float64), np.asarray(y_score, dtype=np.float64), hard_fn,
                        gidx.size > 0, P > 0)


def ap_from_matches(matches: Sequence[SceneMatches]) -> tuple[float, np.ndarray, np.ndarray]:
    """Pooled ScanNet AP of scenes' matches at one IoU threshold: (ap, precision, recall)."""
    y_true = np.concatenate([m.y_true for m in matches]) if matches else np.zeros(0)
    y_score = np.concatenate([m.y_score for m in matches]) if matches else np.zeros(0)
    return _scannet_ap(y_true, y_score, sum(m.hard_fn for m in matches), any(m.has_gt for m in matches),
                       any(m.has_pred for m in matches))


def ap_summary(per_th: dict[str, float], iou_thresholds: Sequence[float]) -> dict[str, float]:
    """AP (nan-mean over ``iou_thresholds``), AP50 and AP25 from per-threshold APs keyed ``f"{th:.2f}"``."""
    main = np.array([per_th[f"{t:.2f}"] for t in iou_thresholds])
    ap_mean = float(np.nanmean(main)) if np.any(~np.isnan(main)) else float("nan")
    return {"AP": ap_mean, "AP50": per_th["0.50"], "AP25": per_th["0.25"]}


def instance_ap(scenes: Iterable, iou_thresholds="scannet", min_region_size: int = 1) -> dict:
    """Pooled class-agnostic ScanNet AP over scenes.

    ``scenes``: iterable of ``(pred, pred_scores, gt_labels)`` tuples or dicts with keys
    ``pred_labels`` (or ``pred_masks``), ``pred_scores`` (or ``scores``), ``gt_labels``.
    See ``InstanceAPEvaluator.add_scene`` / ``compute``.
    """
    ev = InstanceAPEvaluator(iou_thresholds=iou_thresholds, min_region_size=min_region_size)
    for sc in scenes:
        if isinstance(sc, dict):
            pred = sc["pred_labels"] if "pred_labels" in sc else sc["pred_masks"]
            scores = sc["pred_scores"] if "pred_scores" in sc else sc["scores"]
            ev.add_scene(pred, scores, sc["gt_labels"])
        else:
            ev.add_scene(*sc)
    return ev.compute()


# ----------------------------------------------------------------------------------------------------
# Common point set
# ----------------------------------------------------------------------------------------------------


def backproject_depth(depth: np.ndarray, K: np.ndarray, T_world_cam: np.ndarray) -> np.ndarray:
    """Lift depth maps (V, H, W) (z-depth along the optical axis) with pinhole K (V, 3, 3) and
    camera-to-world poses (V, 4, 4) to world points (V, H, W, 3) float64.

    Same pixel convention as the rest of the project (``geometry.cameras``: integer pixel centres, the
    convention of the synthetic renderer's K and of OpenCV), so GT and predictions lift alike.
    """
    from fast3dis_ros.geometry.cameras import transform_points, unproject_depth

    depth = np.asarray(depth, dtype=np.float64)
    single = depth.ndim == 2
    if single:
        depth, K, T_world_cam = depth[None], np.asarray(K)[None], np.asarray(T_world_cam)[None]
    V = depth.shape[0]
    K = np.asarray(K, dtype=np.float64).reshape(V, 3, 3)
    T = np.asarray(T_world_cam, dtype=np.float64).reshape(V, 4, 4)
    out = np.stack([transform_points(T[i], unproject_depth(K[i], depth[i])) for i in range(V)])
    return out[0] if single else out


def resize_nearest(labels: np.ndarray, H: int, W: int) -> np.ndarray:
    """Nearest-neighbour resize of (..., h, w) maps to (..., H, W) (pixel-centre aligned)."""
    labels = np.asarray(labels)
    h, w = labels.shape[-2:]
    if (h, w) == (H, W):
        return labels
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return labels[..., rows[:, None], cols[None, :]]


def _voxel_majority(voxel: np.ndarray, labels: np.ndarray, n_voxels: int) -> np.ndarray:
    """Majority label per voxel; ties -> the smallest label.

    The (voxel, label) pairs are counted through one packed int64 key (labels made dense first): one 1-D
    sort instead of a two-key lexsort over every pixel, which dominated the scoring time."""
    labels = np.asarray(labels).astype(np.int64)
    voxel = np.asarray(voxel, np.int64)
    if len(voxel) == 0:
        return np.zeros(n_voxels, dtype=np.int64)
    ulab, dense = np.unique(labels, return_inverse=True)
    L = len(ulab)
    if n_voxels * L < 2**62:
        key, counts = np.unique(voxel * L + dense.ravel(), return_counts=True)
        pv, pl = key // L, ulab[key % L]
    else:  # pragma: no cover - astronomically many voxels x labels
        order = np.lexsort((labels, voxel))
        v, lab = voxel[order], labels[order]
        new = np.ones(len(v), dtype=bool)
        new[1:] = (v[1:] != v[:-1]) | (lab[1:] != lab[:-1])
        starts = np.nonzero(new)[0]
        counts = np.diff(np.append(starts, len(v)))
        pv, pl = v[starts], lab[starts]
    # per voxel: max count, then smallest label (pairs are sorted by label within a voxel)
    o2 = np.lexsort((pl, -counts, pv))
    first = np.ones(len(o2), dtype=bool)
    first[1:] = pv[o2][1:] != pv[o2][:-1]
    out = np.zeros(n_voxels, dtype=np.int64)
    out[pv[o2][first]] = pl[o2][first]
    return out


@dataclass
class CommonPointSet:
    """Voxelised union of the GT surfaces of all views, with majority GT and predicted labels."""

    xyz: np.ndarray  # (M, 3) float64 voxel centroids (world frame of the GT cameras)
    gt_labels: np.ndarray  # (M,) int64, 0 = void
    pred_labels: np.ndarray  # (M,) int64, 0 = none
    n_pixels: np.ndarray  # (M,) pixels that fell into each voxel
    pixel_voxel: np.ndarray  # (V, H, W) int64 voxel index of each GT pixel, -1 where invalid
    voxel_size: float = 0.0
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.xyz.shape[0])


def _voxelize(xyz: np.ndarray, voxel_size: float) -> tuple[np.ndarray, int]:
    if voxel_size <= 0:
        return np.arange(len(xyz)), len(xyz)
    keys = np.floor(xyz / voxel_size).astype(np.int64)
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64), 0
    keys -= keys.min(0)
    ext = keys.max(0).astype(np.float64) + 1
    if np.prod(ext) < 2.0**62:  # pack into one int64 key: 1-D unique is much faster than axis=0
        flat = (keys[:, 0] * int(ext[1]) + keys[:, 1]) * int(ext[2]) + keys[:, 2]
        _, inv = np.unique(flat, return_inverse=True)
    else:
        _, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.ravel()
    return inv, int(inv.max()) + 1 if len(inv) else 0


def build_common_point_set(
    gt_depth: np.ndarray,
    gt_instance: np.ndarray,
    K: np.ndarray,
    pred_labels: np.ndarray,
    *,
    T_world_cam: np.ndarray | None = None,
    T_cam_world: np.ndarray | None = None,
    voxel_size: float = 0.02,
    valid: np.ndarray | None = None,
    max_depth: float | None = None,
) -> CommonPointSet:
    """Pixel-to-voxel common point set (see module doc).

    gt_depth (V, H, W) metres (<= 0 / non-finite = invalid); gt_instance (V, H, W) int (0 = void);
    K (V, 3, 3) GT intrinsics at (H, W); exactly one of T_world_cam / T_cam_world (V, 4, 4);
    pred_labels (V, h, w) int predicted *global* instance ids (same id = same instance in every view),
    nearest-resized to (H, W). voxel_size in metres (0 = no downsampling, one point per pixel).
    """
    gt_depth = np.asarray(gt_depth, dtype=np.float64)
    if gt_depth.ndim == 2:
        gt_depth, gt_instance, K, pred_labels = gt_depth[None], np.asarray(gt_instance)[None], np.asarray(K)[None], np.asarray(pred_labels)[None]
        T_world_cam = None if T_world_cam is None else np.asarray(T_world_cam)[None]
        T_cam_world = None if T_cam_world is None else np.asarray(T_cam_world)[None]
    V, H, W = gt_depth.shape
    if (T_world_cam is None) == (T_cam_world is None):
        raise ValueError("give exactly one of T_world_cam / T_cam_world")
    if T_world_cam is None:
        T_world_cam = np.linalg.inv(np.asarray(T_cam_world, dtype=np.float64))
    pred = resize_nearest(np.asarray(pred_labels), H, W).astype(np.int64)
    ok = np.isfinite(gt_depth) & (gt_depth > 0)
    if max_depth is not None:
        ok &= gt_depth <= max_depth
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    pts = backproject_depth(np.where(ok, gt_depth, 0.0), K, T_world_cam)[ok]
    vox, M = _voxelize(pts, float(voxel_size))
    n_pix = np.bincount(vox, minlength=M)
    xyz = np.stack([np.bincount(vox, weights=pts[:, d], minlength=M) for d in range(3)], 1) / np.maximum(n_pix, 1)[:, None]
    gt_v = _voxel_majority(vox, np.asarray(gt_instance)[ok], M)
    pr_v = _voxel_majority(vox, pred[ok], M)
    pixel_voxel = np.full((V, H, W), -1, dtype=np.int64)
    pixel_voxel[ok] = vox
    return CommonPointSet(xyz=xyz, gt_labels=gt_v, pred_labels=pr_v, n_pixels=n_pix, pixel_voxel=pixel_voxel, voxel_size=float(voxel_size))


def transfer_labels_nn(
    pred_xyz: np.ndarray,
    pred_labels: np.ndarray,
    gt_xyz: np.ndarray,
    max_dist: float,
    sim3_gt_pred: np.ndarray | tuple | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Give each GT point the label of its nearest predicted point (after Sim(3) alignment).

    pred_xyz (M, 3) predicted points in predicted geometry, pred_labels (M,), gt_xyz (N, 3).
    sim3_gt_pred: 4x4 ``[[sR, t], [0, 1]]`` or (s, R, t) mapping predicted to GT frame (e.g. from
    ``align_camera_centers``); None = already aligned. GT points whose nearest predicted point is
    farther than ``max_dist`` (GT units) get 0. Returns (labels (N,) int64, distances (N,)).
    """
    from scipy.spatial import cKDTree

    p = apply_sim3(sim3_gt_pred, pred_xyz) if sim3_gt_pred is not None else np.asarray(pred_xyz, dtype=np.float64)
    lab = np.asarray(pred_labels).astype(np.int64).ravel()
    gt_xyz = np.asarray(gt_xyz, dtype=np.float64)
    if len(p) == 0:
        return np.zeros(len(gt_xyz), dtype=np.int64), np.full(len(gt_xyz), np.inf)
    d, idx = cKDTree(p).query(gt_xyz, k=1, distance_upper_bound=float(max_dist))
    out = np.zeros(len(gt_xyz), dtype=np.int64)
    hit = np.isfinite(d)
    out[hit] = lab[idx[hit]]
    return out, d


# ----------------------------------------------------------------------------------------------------
# 2D mask AP (COCO, class-agnostic)
# ----------------------------------------------------------------------------------------------------


def _mask_iou(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU matrix (D, G) of flattened bool masks; exact integer counts like pycocotools' RLE IoU."""
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)))
    d = dt.reshape(len(dt), -1).astype(np.float64)
    g = gt.reshape(len(gt), -1).astype(np.float64)
    inter = d @ g.T
    union = d.sum(1)[:, None] + g.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def coco_mask_ap(images: Sequence, iou_thresholds=COCO_IOU_THRESHOLDS, max_dets: int = 100) -> dict:
    """COCO mask AP, class-agnostic, area range "all", in numpy (a port of COCOeval.evaluateImg +
    accumulate for one category and one area range; matches pycocotools to float precision).

    images: sequence of ``(pred_masks (D, H, W) bool, pred_scores (D,), gt_masks (G, H, W) bool)``.
    Returns {"AP", "AP50", "AP75", "precision" (T, 101), "recall" (T,)}; AP = -1 (as COCO) with no GT.
    Matching: detections in descending score (stable), capped at ``max_dets`` per image; each takes
    the unmatched GT with the highest IoU >= threshold (COCO uses >=); 101-point interpolated
    precision with the monotone envelope.
    """
    ths = np.asarray(iou_thresholds, dtype=np.float64)
    T = len(ths)
    rec_thrs = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)
    R = len(rec_thrs)
    all_scores, all_dtm = [], []
    npig = 0
    for pred_masks, pred_scores, gt_masks in images:
        pred_masks = np.asarray(pred_masks, dtype=bool)
        gt_masks = np.asarray(gt_masks, dtype=bool)
        pred_scores = np.asarray(pred_scores, dtype=np.float64).ravel()
        if pred_masks.ndim == 2:
            pred_masks = pred_masks.reshape(0, *pred_masks.shape) if pred_masks.size == 0 else pred_masks[None]
        G = len(gt_masks)
        npig += G
        if len(pred_masks) == 0 and G == 0:
            continue
        order = np.argsort(-pred_scores, kind="mergesort")[:max_dets]
        ious = _mask_iou(pred_masks[order], gt_masks)
        D = len(order)
        dtm = np.zeros((T, D), dtype=bool)
        for ti, t in enumerate(ths):
            gtm = np.zeros(G, dtype=bool)
            for di in range(D):
                iou = min(t, 1 - 1e-10)
                m = -1
                for gi in range(G):
                    if gtm[gi]:
                        continue
                    if ious[di, gi] < iou:
                        continue
                    iou = ious[di, gi]
                    m = gi
                if m == -1:
                    continue
                gtm[m] = True
                dtm[ti, di] = True
        all_scores.append(pred_scores[order])
        all_dtm.append(dtm)
    precision = -np.ones((T, R))
    recall = -np.ones(T)
    if npig > 0:
        scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
        dtm = np.concatenate(all_dtm, axis=1) if all_dtm else np.zeros((T, 0), dtype=bool)
        inds = np.argsort(-scores, kind="mergesort")
        dtm = dtm[:, inds]
        tp_sum = np.cumsum(dtm, axis=1).astype(np.float64)
        fp_sum = np.cumsum(~dtm, axis=1).astype(np.float64)
        for t in range(T):
            tp, fp = tp_sum[t], fp_sum[t]
            nd = len(tp)
            rc = tp / npig
            pr = tp / (fp + tp + np.spacing(1))
            recall[t] = rc[-1] if nd else 0
            pr = pr.tolist()
            for i in range(nd - 1, 0, -1):
                if pr[i] > pr[i - 1]:
                    pr[i - 1] = pr[i]
            idx = np.searchsorted(rc, rec_thrs, side="left")
            q = np.zeros(R)
            for ri, pi in enumerate(idx):
                if pi < nd:
                    q[ri] = pr[pi]
            precision[t] = q

    def _ap(sel):
        p = precision[sel]
        p = p[p > -1]
        return float(np.mean(p)) if p.size else -1.0

    out = {"AP": _ap(slice(None)), "precision": precision, "recall": recall, "iou_thresholds": ths.tolist()}
    for name, t in (("AP50", 0.5), ("AP75", 0.75)):
        hit = np.nonzero(np.isclose(ths, t))[0]
        out[name] = _ap(hit[0]) if hit.size else float("nan")
    return out


def mask_ap_2d(pred_labels: np.ndarray, pred_scores: np.ndarray, gt_labels: np.ndarray, max_dets: int = 100) -> dict:
    """Per-view class-agnostic COCO mask AP of label maps.

    pred_labels (V, h, w) int (0 = none, id k scored ``pred_scores[k-1]``), nearest-resized to the GT
    grid; gt_labels (V, H, W) int (0 = background). Each view is one COCO image; each id present in a
    view is one detection / GT mask there.
    """
    gt_labels = np.asarray(gt_labels)
    if gt_labels.ndim == 2:
        gt_labels, pred_labels = gt_labels[None], np.asarray(pred_labels)[None]
    V, H, W = gt_labels.shape
    pred = resize_nearest(np.asarray(pred_labels), H, W)
    scores = np.asarray(pred_scores, dtype=np.float64).ravel()
    images = []
    for v in range(V):
        pids = np.unique(pred[v])
        pids = pids[pids > 0]
        gids = np.unique(gt_labels[v])
        gids = gids[gids > 0]
        images.append(
            (
                pred[v][None] == pids[:, None, None],
                scores[pids - 1],
                gt_labels[v][None] == gids[:, None, None],
            )
        )
    return coco_mask_ap(images, max_dets=max_dets)


# ----------------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------------


def depth_metrics(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None, scale="median", return_errors: bool = False) -> dict:
    """AbsRel and delta<1.25 of predicted depth (V, H, W) against GT depth (same grid).

    scale: "median" (per view s_v = median(gt) / median(pred) over valid pixels, the usual
    protocol for up-to-scale depth), "global_median" (one s for all views), "none" (s = 1), or a
    float (a given global scale, e.g. from Sim(3) pose alignment). Valid = finite, gt > 0, pred > 0
    (and ``valid`` if given). AbsRel = mean |s*pred - gt| / gt; delta1 = mean(max(s*pred/gt,
    gt/(s*pred)) < 1.25); both pooled over all valid pixels of all views (also per view).
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.ndim == 2:
        pred, gt = pred[None], gt[None]
        valid = None if valid is None else np.asarray(valid)[None]
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ; resize first")
    ok = np.isfinite(pred) & np.isfinite(gt) & (gt > 0) & (pred > 0)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    V = pred.shape[0]
    if isinstance(scale, str):
        if scale == "median":
            s = np.array([np.median(gt[v][ok[v]]) / np.median(pred[v][ok[v]]) if ok[v].any() else 1.0 for v in range(V)])
        elif scale == "global_median":
            s = np.full(V, np.median(gt[ok]) / np.median(pred[ok]) if ok.any() else 1.0)
        elif scale == "none":
            s = np.ones(V)
        else:
            raise ValueError(f"unknown scale {scale!r}")
    else:
        s = np.full(V, float(scale))
    p = pred * s[:, None, None]
    rel = np.abs(p - gt) / np.where(ok, gt, 1.0)
    ratio = np.maximum(p / np.where(ok, gt, 1.0), gt / np.where(ok, p, 1.0))
    out = {
        "abs_rel": float(rel[ok].mean()) if ok.any() else float("nan"),
        "delta1": float((ratio[ok] < 1.25).mean()) if ok.any() else float("nan"),
        "abs_rel_per_view": [float(rel[v][ok[v]].mean()) if ok[v].any() else float("nan") for v in range(V)],
        "delta1_per_view": [float((ratio[v][ok[v]] < 1.25).mean()) if ok[v].any() else float("nan") for v in range(V)],
        "scale": s.tolist(),
        "n_valid": int(ok.sum()),
    }
    if return_errors:
        out["abs_rel_errors"] = rel[ok].astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------------
# Pose
# ----------------------------------------------------------------------------------------------------


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares (s, R, t) with dst ~ s R src + t (Umeyama 1991); the project's one implementation."""
    from fast3dis_ros.geometry.align import umeyama as _umeyama

    return _umeyama(src, dst, with_scale=with_scale)


def apply_sim3(sim3, xyz: np.ndarray) -> np.ndarray:
    """Apply a Sim(3) given as 4x4 matrix or (s, R, t) to points (..., 3)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    if isinstance(sim3, tuple):
        s, R, t = sim3
        A, t = s * np.asarray(R), np.asarray(t)
    else:
        M = np.asarray(sim3, dtype=np.float64)
        A, t = M[:3, :3], M[:3, 3]
    return xyz @ A.T + t


def _centers(T_cam_world: np.ndarray) -> np.ndarray:
    T = np.asarray(T_cam_world, dtype=np.float64)
    R, t = T[:, :3, :3], T[:, :3, 3]
    return -np.einsum("vji,vj->vi", R, t)  # -R^T t


def align_camera_centers(pred_T_cam_world: np.ndarray, gt_T_cam_world: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Sim(3) (s, R, t) mapping the predicted world to the GT world, x_gt ~ s R x_pred + t.

    With >= 3 views whose centres are not (near) collinear: Umeyama on camera centres. Otherwise the
    rotation is the chordal mean of the per-view world-to-world rotations R_gt_wc @ R_pred_cw, and s, t
    come from least squares on the centres given R (s = 1 for a single view).
    """
    P = np.asarray(pred_T_cam_world, dtype=np.float64)
    G = np.asarray(gt_T_cam_world, dtype=np.float64)
    cp, cg = _centers(P), _centers(G)
    V = len(cp)
    if V >= 3:
        sv = np.linalg.svd(cp - cp.mean(0), compute_uv=False)
        if sv[0] > 0 and sv[1] > 1e-6 * sv[0]:
            return umeyama(cp, cg, with_scale=True)
    from fast3dis_ros.geometry.align import rotation_mean

    # per view: R_gtworld_predworld = R_gt_cw^T @ R_pred_cw; their chordal mean
    R = rotation_mean(np.swapaxes(G[:, :3, :3], 1, 2) @ P[:, :3, :3])
    if V == 1:
        return 1.0, R, cg[0] - R @ cp[0]
    rp = cp @ R.T
    xs, xd = rp - rp.mean(0), cg - cg.mean(0)
    den = (xs**2).sum()
    s = float((xs * xd).sum() / den) if den > 0 else 1.0
    t = cg.mean(0) - s * rp.mean(0)
    return s, R, t


def _rot_angle_deg(R: np.ndarray) -> np.ndarray:
    c = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def relative_pose_errors(pred_T_cam_world: np.ndarray, gt_T_cam_world: np.ndarray, eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Per view pair (i < j): rotation error and translation-direction error, in degrees.

    Relative pose T_ij = T_cam_i_world @ inv(T_cam_j_world). Rotation error = angle of
    R_ij_gt^T R_ij_pred; translation error = angle between t_ij_gt and t_ij_pred with the sign
    ambiguity folded, min(e, 180 - e), as VGGT/DA3's ``translation_angle(..., ambiguity=True)``.
    Both are invariant to a Sim(3) of the predicted world, so no alignment is needed here.
    A pair whose GT or predicted baseline is below ``eps`` gets translation error 0 if both are,
    else 90 degrees.
    """
    P = np.asarray(pred_T_cam_world, dtype=np.float64)
    G = np.asarray(gt_T_cam_world, dtype=np.float64)
    pairs = list(combinations(range(len(P)), 2))
    rerr = np.zeros(len(pairs))
    terr = np.zeros(len(pairs))
    for k, (i, j) in enumerate(pairs):
        Tp = P[i] @ np.linalg.inv(P[j])
        Tg = G[i] @ np.linalg.inv(G[j])
        rerr[k] = _rot_angle_deg(Tg[:3, :3].T @ Tp[:3, :3])
        tp, tg = Tp[:3, 3], Tg[:3, 3]
        npn, ngn = np.linalg.norm(tp), np.linalg.norm(tg)
        if npn < eps or ngn < eps:
            terr[k] = 0.0 if (npn < eps and ngn < eps) else 90.0
            continue
        e = float(np.degrees(np.arccos(np.clip(tp @ tg / (npn * ngn), -1.0, 1.0))))
        terr[k] = min(e, 180.0 - e)
    return rerr, terr


def pose_auc(rot_err: np.ndarray, trans_err: np.ndarray, max_threshold: int) -> float:
    """VGGT / DA3 ``calculate_auc_np``: per pair e = max(rot, trans) (degrees); histogram with 1-degree
    bins [0, 1), ..., [max-1, max]; AUC = mean over bins of the cumulative fraction of pairs, i.e. the
    accuracy curve sampled at 1..max degrees and averaged. 1.0 when every error is < 1 degree."""
    e = np.maximum(np.asarray(rot_err, dtype=np.float64), np.asarray(trans_err, dtype=np.float64))
    if e.size == 0:
        return float("nan")
    hist, _ = np.histogram(e, bins=np.arange(int(max_threshold) + 1))
    return float(np.mean(np.cumsum(hist.astype(np.float64) / e.size)))


def pose_metrics(pred_T_cam_world: np.ndarray, gt_T_cam_world: np.ndarray) -> dict:
    """AUC@3 / AUC@30 of pairwise relative pose errors, mean errors, and the absolute trajectory error
    (RMSE of camera centres after Sim(3) alignment of predicted to GT, ``align_camera_centers``)."""
    P = np.asarray(pred_T_cam_world, dtype=np.float64)
    G = np.asarray(gt_T_cam_world, dtype=np.float64)
    rerr, terr = relative_pose_errors(P, G)
    s, R, t = align_camera_centers(P, G)
    cp = apply_sim3((s, R, t), _centers(P))
    ate = float(np.sqrt(np.mean(np.sum((cp - _centers(G)) ** 2, 1)))) if len(P) else float("nan")
    return {
        "auc3": pose_auc(rerr, terr, 3),
        "auc30": pose_auc(rerr, terr, 30),
        "rot_err_mean_deg": float(rerr.mean()) if rerr.size else float("nan"),
        "trans_err_mean_deg": float(terr.mean()) if terr.size else float("nan"),
        "ate_rmse": ate,
        "sim3_scale": float(s),
        "n_pairs": int(rerr.size),
    }
