"""``fast3dis-eval``: replay a rosbag2 through the pipeline at full speed and score it against ground truth.

Usage::

    fast3dis-eval --bag run.mcap [--gt gt.mcap] --out report/ [--checkpoint DIR] [--device cpu]
    fast3dis-eval --bags DIR|BAG... --out report/ [...]     # many bags, one pooled report (eval/sharded.py)
    torchrun --nproc-per-node N -m fast3dis_ros.eval.sharded --bags DIR --out report/    # the same, N ranks
                  [--cameras front,left,right | --image-topics /a/image_raw /b/image_raw]
                  [--window-size 4 --stride 2 --slop-ms 50] [--baseline hdbscan]
                  [--oracle masks,depth,poses] [--oracle-table issue|all] [--replay-only]
                  [--hdbscan-min-cluster-frac 0.004 --hdbscan-min-samples 10 --hdbscan-w-xyz 1
                   --hdbscan-w-feat 1 --hdbscan-max-points 8000]

Writes into ``--out``: ``output_bag/`` (the node's output topics, ``eval/output_bag.py``),
``accounting.json`` (every input frame and frame set: processed or dropped with a reason), and when the
GT bag has ground truth (``/<cam>/depth_gt``, ``/<cam>/instance_gt``, GT poses ``map <- <cam>_optical_frame``
from ``/tf`` + ``/tf_static``, CameraInfo): ``metrics.json``, ``report.md`` and PNG plots (``eval/report.py``).

How predictions meet the ground truth
-------------------------------------
Predictions live in the predicted, up-to-scale ``map`` frame; GT in metres in the GT world. Nothing is
aligned in 3D for the instance metrics: they are scored on the **GT surface**.

* Views are matched to GT by (camera, header stamp). A view seen by several overlapping windows is scored
  once, with the labels of the **latest** window that contained it.
* **Lifted AP / AP50 / AP25** (keys ``AP``, ``AP50``, ``AP25``; formerly "whole replay"; ScanNet,
  class-agnostic; ``metrics.build_common_point_set``): labels lifted with GT geometry. Every valid GT
  pixel of every scored view is lifted with GT depth, K and GT pose and voxelised (``--eval-voxel``, m);
  each voxel gets its majority GT instance and the majority *global* predicted id of its pixels. The
  predicted per-view labels are mapped to map ids with the window's ``FusionResult.id_map`` (labels the
  fusion did not keep, e.g. below ``score_threshold``, become 0) and nearest-resized to the GT grid. One
  scene = the whole replay, so ids must be consistent across views *and* windows. Instance score = the
  tracker's score of the map instance (``InstanceSummary.score``) if it is still in the final map, else
  the highest window score that mapped to it.
  The lifted AP scores labels and linking; it never sees the map's own points.
* **Map-cloud AP and map metrics** (``map_cloud``; ``eval/map_metrics.py``): the published map cloud
  (``FusionResult.map_cloud`` = ``~/instances_cloud``) after one Sim(3) per scene, each map point labelled
  by its nearest GT surface voxel within 10 cm (else background); geometry accuracy / completeness /
  Chamfer, splits, merges, id switches over checkpoints, GT-object points left unassigned, and the
  linking rate (``linking``: window instances linked to an existing map id).
* ``AP_per_window``: the same with each window as its own scene and its window-local labels (no tracking
  needed), scored on **all** views of the window (``window_gt_views``; a view in two windows counts in
  both); this is the fair comparison with the HDBSCAN baseline, which has no cross-window ids.
* **2D mask AP** (COCO, class-agnostic): every scored view is one image; window-local masks and scores.
* **Depth** AbsRel / delta1: predicted depth nearest-resized to the GT grid, per-view median scaling.
* **Pose** AUC@3 / AUC@30 (pairwise relative errors, VGGT/DA3 protocol) of each window's predicted
  cameras, pooled over windows; ATE after Sim(3) alignment averaged over windows; ``pose_map``: the same
  for the fused camera poses in ``map`` (``FusionResult.T_map_cam``) of all scored views (tests drift of
  the window-to-map alignment).

Error budget (``--oracle``, ``--oracle-table``; ``eval/oracle.py``, ``eval/oracle_table.py``): replace
masks / depth / poses of every window's prediction with GT (GT masks with window-local shuffled ids);
``--oracle-table`` replays the configurations of the issue's table (or all 8) and puts the table in the
report. Exit codes: 0 ok, 1 accounting unbalanced, 2 unreadable input / bad options, 3 nothing scored.

Baseline (``--baseline hdbscan``, ``eval/baseline.py``): on every window, HDBSCAN clusters the window's
predicted points (FAST3DIS depth + cameras, so geometry is identical) with features = the pixel
decoder's ``mask_features`` of the same forward (the predictor returns them with ``keep_mask_features``, see
``PredictorSpec(keep_mask_features=True)``; if absent, the RGB image is used and ``meta`` says so).
Its timing is the clustering alone and clustering + the network forward it needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ScoredViews", "select_views", "compute_metrics", "run_baseline", "baseline_metrics", "evaluate_bag",
           "add_baseline_args", "baseline_params_from_args", "main"]


@dataclass
class ScoredViews:
    """The views that met ground truth, in replay order (one entry per unique (camera, stamp))."""

    keys: list = field(default_factory=list)  # (camera, stamp_ns)
    rec_idx: list = field(default_factory=list)  # index into records
    view_idx: list = field(default_factory=list)  # view index in that window
    images: list = field(default_factory=list)  # (h, w, 3) processing-resolution RGB
    pred_local: list = field(default_factory=list)  # (h, w) window-local labels
    pred_global: list = field(default_factory=list)  # (h, w) map ids
    pred_depth: list = field(default_factory=list)  # (h, w)
    gt_depth: list = field(default_factory=list)  # (H, W)
    gt_instance: list = field(default_factory=list)
    gt_K: list = field(default_factory=list)
    gt_T_world_cam: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # (camera, stamp_ns) -> GT parts missing ("depth", "K", ...)

    def __len__(self) -> int:
        return len(self.keys)


def _gt_pose(gt, cam: str, stamp: int):
    d = gt.T_world_cam.get(cam) or {}
    if stamp in d:
        return d[stamp]
    return None


def _lut(id_map: dict, n: int) -> np.ndarray:
    lut = np.zeros(max(n, max(id_map, default=0)) + 1, np.int64)
    for w, g in id_map.items():
        lut[int(w)] = int(g)
    return lut


def select_views(records, gt) -> ScoredViews:
    """Latest window per (camera, stamp) among views that have GT depth, instances, K and pose."""
    latest: dict = {}
    # ids merged by fusion after a window was fused live on as the id they merged into (the map's ids)
    merged = (records[-1].fusion.info.get("merged_into") or {}) if records else {}
    for ri, rec in enumerate(records):
        p = rec.prediction
        for v, (cam, st) in enumerate(zip(p.cameras, p.view_stamps_ns)):
            latest[(cam, int(st))] = (ri, v)
    sv = ScoredViews()
    for (cam, st), (ri, v) in sorted(latest.items(), key=lambda kv: (kv[0][1], kv[1][1])):
        dep = (gt.depth.get(cam) or {}).get(st)
        ins = (gt.instance.get(cam) or {}).get(st)
        K = gt.K.get(cam)
        T = _gt_pose(gt, cam, st)
        if dep is None or ins is None or K is None or T is None:
            sv.skipped[(cam, st)] = [n for n, x in (("depth", dep), ("instance", ins), ("K", K), ("pose", T))
                                     if x is None]
            continue
        rec = records[ri]
        p = rec.prediction
        lut = _lut({w: merged.get(g, g) for w, g in rec.fusion.id_map.items()}, p.n_instances)
        loc = p.labels[v].astype(np.int64)
        sv.keys.append((cam, st))
        sv.rec_idx.append(ri)
        sv.view_idx.append(v)
        sv.images.append(p.images[v])
        sv.pred_local.append(loc)
        sv.pred_global.append(lut[np.clip(loc, 0, len(lut) - 1)])
        sv.pred_depth.append(p.depth[v])
        sv.gt_depth.append(np.asarray(dep, np.float32))
        sv.gt_instance.append(np.asarray(ins, np.int64))
        sv.gt_K.append(np.asarray(K, np.float64))
        sv.gt_T_world_cam.append(np.asarray(T, np.float64))
    return sv


def _global_scores(records) -> dict[int, float]:
    """map id -> score: final tracker score if the id is in the final map, else max window score."""
    sc: dict[int, float] = {}
    for rec in records:
        s = np.asarray(rec.prediction.scores, np.float64)
        for w, g in rec.fusion.id_map.items():
            if 0 < w <= len(s):
                sc[int(g)] = max(sc.get(int(g), 0.0), float(s[w - 1]))
    if records:
        for inst in records[-1].fusion.instances:
            sc[int(inst.id)] = float(inst.score)
    return sc


def _dense(labels: list[np.ndarray], score_of: dict[int, float]):
    """Relabel ids to 1..P (order of first appearance) -> (labels list, scores (P,))."""
    ids = np.unique(np.concatenate([l.ravel() for l in labels])) if labels else np.zeros(0, np.int64)
    ids = ids[ids > 0]
    lut = np.zeros(int(ids.max()) + 1 if len(ids) else 1, np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    scores = np.array([score_of.get(int(i), 0.0) for i in ids], np.float64)
    return [lut[l] for l in labels], scores


def _group_by_shape(idx: list[int], shapes: list[tuple]) -> list[list[int]]:
    groups: dict = {}
    for i in idx:
        groups.setdefault(shapes[i], []).append(i)
    return list(groups.values())


def _ap3d(sv: ScoredViews, labels: list[np.ndarray], scores: np.ndarray, scenes: list[list[int]],
          voxel: float, pool=None) -> dict:
    """``pool``: an extra ``InstanceAPEvaluator`` that receives the same scenes (multi-bag pooling)."""
    from fast3dis_ros.eval.metrics import InstanceAPEvaluator, build_common_point_set

    ev = InstanceAPEvaluator()
    n_pts = 0
    shapes = [g.shape for g in sv.gt_depth]
    for sc in scenes:
        for grp in _group_by_shape(sc, shapes):
            cps = build_common_point_set(np.stack([sv.gt_depth[i] for i in grp]),
                                         np.stack([sv.gt_instance[i] for i in grp]),
                                         np.stack([sv.gt_K[i] for i in grp]),
                                         np.stack([labels[i] for i in grp]),
                                         T_world_cam=np.stack([sv.gt_T_world_cam[i] for i in grp]), voxel_size=voxel)
            n_pts += len(cps)
            ev.add_scene(cps.pred_labels, scores, cps.gt_labels)
            if pool is not None:
                pool.add_scene(cps.pred_labels, scores, cps.gt_labels)
    res = ev.compute()
    res["n_points"] = int(n_pts)
    return res


def _offset_window_labels(sv: ScoredViews, local_labels: list[np.ndarray], local_scores: dict[int, np.ndarray]):
    """Window-local labels made globally unique by window (no cross-window association)."""
    offs, cur = {}, 0
    for ri in sorted(set(sv.rec_idx)):
        offs[ri] = cur
        cur += len(local_scores[ri])
    labels = [np.where(l > 0, l + offs[ri], 0) for l, ri in zip(local_labels, sv.rec_idx)]
    scores = np.concatenate([local_scores[ri] for ri in sorted(set(sv.rec_idx))]) if offs else np.zeros(0)
    return labels, scores


def _mask2d(sv: ScoredViews, labels: list[np.ndarray], scores_of_view: list[np.ndarray]) -> dict:
    from fast3dis_ros.eval.metrics import coco_mask_ap, resize_nearest

    images = []
    for i in range(len(sv)):
        g = sv.gt_instance[i]
        p = resize_nearest(labels[i], *g.shape)
        pids = np.unique(p)
        pids = pids[pids > 0]
        gids = np.unique(g)
        gids = gids[gids > 0]
        s = np.asarray(scores_of_view[i], np.float64)
        images.append((p[None] == pids[:, None, None], s[pids - 1] if len(pids) else np.zeros(0),
                       g[None] == gids[:, None, None]))
    res = coco_mask_ap(images) if images else {"AP": float("nan")}
    return {k: v for k, v in res.items() if k not in ("precision", "recall")}


def _depth(sv: ScoredViews) -> dict:
    from fast3dis_ros.eval.metrics import depth_metrics, resize_nearest

    preds, gts = [], []
    for i in range(len(sv)):
        g = sv.gt_depth[i]
        preds.append(resize_nearest(sv.pred_depth[i], *g.shape))
        gts.append(g)
    shapes = {g.shape for g in gts}
    if len(shapes) == 1:
        return depth_metrics(np.stack(preds), np.stack(gts), scale="median", return_errors=True)
    # different camera resolutions: pool per-view results
    outs = [depth_metrics(p, g, scale="median", return_errors=True) for p, g in zip(preds, gts)]
    err = np.concatenate([o["abs_rel_errors"] for o in outs])
    d1 = np.concatenate([np.full(o["n_valid"], o["delta1"]) for o in outs])
    return {"abs_rel": float(err.mean()) if err.size else float("nan"),
            "delta1": float(d1.mean()) if d1.size else float("nan"), "n_valid": int(err.size),
            "abs_rel_errors": err}


def _pose(records, sv: ScoredViews, gt) -> tuple[dict, dict]:
    from fast3dis_ros.eval.metrics import pose_auc, pose_metrics, relative_pose_errors

    rs, ts, ates = [], [], []
    for rec in records:
        p = rec.prediction
        idx, G = [], []
        for v, (cam, st) in enumerate(zip(p.cameras, p.view_stamps_ns)):
            T = _gt_pose(gt, cam, int(st))
            if T is not None:
                idx.append(v)
                G.append(np.linalg.inv(T))
        if len(idx) < 2:
            continue
        P = np.asarray(p.T_cam_world, np.float64)[idx]
        r, t = relative_pose_errors(P, np.stack(G))
        rs.append(r)
        ts.append(t)
        ates.append(pose_metrics(P, np.stack(G))["ate_rmse"])
    if rs:
        r, t = np.concatenate(rs), np.concatenate(ts)
        win = {"auc3": pose_auc(r, t, 3), "auc30": pose_auc(r, t, 30), "rot_err_mean_deg": float(r.mean()),
               "trans_err_mean_deg": float(t.mean()), "ate_rmse_mean": float(np.mean(ates)), "n_pairs": int(r.size),
               "n_windows": len(rs)}
    else:
        win = {"auc3": float("nan"), "auc30": float("nan"), "n_pairs": 0, "n_windows": 0}
    mp = {"auc3": float("nan"), "auc30": float("nan"), "n_pairs": 0}
    if len(sv) >= 2:
        T_map_cam = np.stack([records[ri].fusion.T_map_cam[v] for ri, v in zip(sv.rec_idx, sv.view_idx)])
        mp = pose_metrics(np.linalg.inv(T_map_cam), np.linalg.inv(np.stack(sv.gt_T_world_cam)))
    return win, mp


def run_baseline(records, sv: ScoredViews, **params) -> dict:
    """HDBSCAN on every window (see module doc). Returns per-record labels/scores and timings."""
    from fast3dis_ros.eval.baseline import cluster_window

    out = {"labels": {}, "scores": {}, "ms": [], "features": None}
    for ri, rec in enumerate(records):
        p = rec.prediction
        feats = p.extras.get("mask_features")
        if feats is not None:
            out["features"] = "pixel decoder mask_features"
        else:
            feats = np.moveaxis(p.images.astype(np.float32) / 255.0, -1, 1)
            out["features"] = "RGB (mask_features not available)"
        valid = np.isfinite(p.depth) & (p.depth > 0)
        # HDBSCAN's min_cluster_size applies to the clustered subsample (max_points), not to all pixels:
        # ~0.4% of the subsample, so that a small object seen in a few views still forms a cluster.
        # ``min_cluster_frac`` (fraction of the subsample) overrides that default; an explicit
        # ``min_cluster_size`` (points) overrides both.
        params = dict(params)
        frac = params.pop("min_cluster_frac", None)
        max_points = int(params.get("max_points", 8000))
        n_sub = min(int(valid.sum()), max_points)
        mcs = max(10, n_sub // 250) if frac is None else max(10, int(round(float(frac) * n_sub)))
        kw = dict(min_cluster_size=mcs, max_points=max_points)
        kw.update(params)
        lab, sc, timing = cluster_window(p.depth, p.K, p.T_cam_world, feats, valid=valid, **kw)
        out["labels"][ri] = lab
        out["scores"][ri] = np.asarray(sc, np.float64)
        out["ms"].append(float(timing["total_ms"]))
    return out


def baseline_metrics(records, sv: ScoredViews, *, eval_voxel: float = 0.05, params: dict | None = None,
                     pool: dict | None = None, depth: dict | None = None, pose: dict | None = None, gt=None):
    """HDBSCAN (``run_baseline`` with ``params``) on the replay's windows, scored like FAST3DIS.
    Returns (method metrics, curves, baseline output). ``pool``: {"whole": ev, "per_window": ev} of
    ``InstanceAPEvaluator`` s that also receive this replay's scenes (pooling over several bags)."""
    pool = pool or {}
    engine_ms = [r.engine_ms for r in records]
    base_out = run_baseline(records, sv, **(params or {}))
    b_loc = [base_out["labels"][ri][v] for ri, v in zip(sv.rec_idx, sv.view_idx)]
    b_scores = {ri: base_out["scores"][ri] for ri in set(sv.rec_idx)}
    b_lab, b_sc = _offset_window_labels(sv, b_loc, b_scores)
    bap = _ap3d(sv, b_lab, b_sc, [list(range(len(sv)))], eval_voxel, pool=pool.get("whole"))
    gtv = window_gt_views(records, gt) if gt is not None else {}
    bapw = _ev_per_window(gtv, lambda ri, v: base_out["labels"][ri][v], base_out["scores"], eval_voxel,
                          pool=pool.get("per_window"))
    bm2 = _mask2d(sv, b_loc, [b_scores[ri] for ri in sv.rec_idx])
    cl = base_out["ms"]
    m = {
        "AP": bap["AP"], "AP50": bap["AP50"], "AP25": bap["AP25"],
        "ap_per_threshold": bap["ap_per_threshold"], "n_gt": bap["n_gt"], "n_pred": bap["n_pred"],
        "n_points": bap["n_points"],
        "AP_per_window": {k: bapw[k] for k in ("AP", "AP50", "AP25", "n_gt", "n_pred", "n_views")},
        "mask2d": bm2,
        "depth": depth, "pose": pose,  # same geometry (FAST3DIS forward)
        "timing": {"cluster_ms_mean": float(np.mean(cl)) if cl else float("nan"), "ms_per_window_mean":
                   float(np.mean(np.add(cl, engine_ms))) if cl else float("nan"), "n_windows": len(cl)},
        "features": base_out["features"],
        "params": dict(params or {}),
        "note": "lifted AP: ids are per window (no tracking); compare AP_per_window",
    }
    return m, {"pr": bap["curves"]}, base_out


def compute_metrics(records, gt, *, eval_voxel: float = 0.05, baseline: str | None = None,
                    meta: dict | None = None, baseline_params: dict | None = None, pool: dict | None = None,
                    keep_points: bool = False) -> tuple[dict, dict, ScoredViews, dict | None]:
    """(metrics for report.write_report, curves, scored views, baseline output or None).

    ``baseline_params``: keyword arguments of ``run_baseline`` (``min_cluster_frac``, ``min_samples``,
    ``w_xyz``, ``w_feat``, ``max_points``, ...). ``pool``: {method: {"whole": ev, "per_window": ev}} of
    ``InstanceAPEvaluator`` s that also receive this replay's scenes (``eval/heldout.py`` pools bags;
    ``pool["fast3dis"]["map_cloud"]`` receives the final map). ``keep_points``: keep the map's per-point
    distance / GT label in ``methods.fast3dis.map_cloud.points`` (demo error render)."""
    pool = pool or {}
    fpool = pool.get("fast3dis") or {}
    sv = select_views(records, gt)
    methods: dict = {}
    curves: dict = {}
    engine_ms = [r.engine_ms for r in records]
    fusion_ms = [r.fusion_ms for r in records]
    timing = {"engine_ms_mean": float(np.mean(engine_ms)) if engine_ms else float("nan"),
              "fusion_ms_mean": float(np.mean(fusion_ms)) if fusion_ms else float("nan"),
              "ms_per_window_mean": float(np.mean(np.add(engine_ms, fusion_ms))) if engine_ms else float("nan"),
              "n_windows": len(records)}
    if len(sv) == 0:
        return {"methods": {}, "meta": {**(meta or {}), "scored_views": 0,
                                        "note": "no view matched ground truth"}}, {}, sv, None
    # FAST3DIS, lifted: map ids of each view's latest window, lifted with GT depth and poses
    glab, gsc = _dense(sv.pred_global, _global_scores(records))
    ap = _ap3d(sv, glab, gsc, [list(range(len(sv)))], eval_voxel, pool=fpool.get("whole"))
    # per window, window-local ids, every view of the window
    gtv = window_gt_views(records, gt)
    loc_scores = {ri: np.asarray(rec.prediction.scores, np.float64) for ri, rec in enumerate(records)}
    apw = _ev_per_window(gtv, lambda ri, v: records[ri].prediction.labels[v], loc_scores, eval_voxel,
                         pool=fpool.get("per_window"))
    m2 = _mask2d(sv, sv.pred_local, [loc_scores[ri] for ri in sv.rec_idx])
    dep = _depth(sv)
    pose_w, pose_m = _pose(records, sv, gt)
    from .map_metrics import score_replay_map

    mp = score_replay_map(records, gt, voxel=eval_voxel, ap=fpool.get("map_cloud"), keep_points=keep_points)
    methods["fast3dis"] = {
        "AP": ap["AP"], "AP50": ap["AP50"], "AP25": ap["AP25"],
        "ap_per_threshold": ap["ap_per_threshold"], "n_gt": ap["n_gt"], "n_pred": ap["n_pred"],
        "n_points": ap["n_points"],
        "AP_per_window": {k: apw[k] for k in ("AP", "AP50", "AP25", "n_gt", "n_pred", "n_views")},
        "map_cloud": mp,
        "linking": mp["linking"] if mp else None,
        "mask2d": m2,
        "depth": {k: v for k, v in dep.items() if k != "abs_rel_errors"},
        "pose": pose_w, "pose_map": pose_m,
        "timing": timing,
    }
    curves["fast3dis"] = {"pr": ap["curves"], "depth_abs_rel": dep.get("abs_rel_errors", [])}
    if mp is not None and "points" in mp:  # arrays: not for metrics.json
        curves["fast3dis"]["map_points"] = mp.pop("points")
    base_out = None
    if baseline == "hdbscan":
        methods["hdbscan"], curves["hdbscan"], base_out = baseline_metrics(
            records, sv, eval_voxel=eval_voxel, params=baseline_params, pool=(pool or {}).get("hdbscan"),
            depth=methods["fast3dis"]["depth"], pose=pose_w, gt=gt)
    metrics = {"methods": methods,
               "meta": {**(meta or {}), "scored_views": len(sv), "eval_voxel_m": eval_voxel,
                        "protocol": "AP/AP50/AP25 = LIFTED AP: each view's map ids (latest window, "
                                    "FusionResult.id_map) lifted with GT depth and poses onto the GT surface "
                                    "(scores labels, not the map's geometry); map_cloud = the published map "
                                    "cloud scored against the GT surface after one Sim(3) (eval/map_metrics.py); "
                                    "AP_per_window = each window on all of its views; see eval/evaluate.py"}}
    return metrics, curves, sv, base_out


def window_gt_views(records, gt) -> dict[int, list[tuple]]:
    """Per record index: (view index, GT depth, GT instances, K, T_world_cam) of **every** view of that
    window with GT (a view shared by several windows appears in each of them)."""
    out: dict[int, list[tuple]] = {}
    for ri, rec in enumerate(records):
        p = rec.prediction
        for v, (cam, st) in enumerate(zip(p.cameras, p.view_stamps_ns)):
            st = int(st)
            dep = (gt.depth.get(cam) or {}).get(st)
            ins = (gt.instance.get(cam) or {}).get(st)
            K = gt.K.get(cam)
            T = _gt_pose(gt, cam, st)
            if dep is None or ins is None or K is None or T is None:
                continue
            out.setdefault(ri, []).append((v, np.asarray(dep, np.float32), np.asarray(ins, np.int64),
                                           np.asarray(K, np.float64), np.asarray(T, np.float64)))
    return out


def _ev_per_window(gt_views: dict, label_of, scores_by_rec: dict, voxel: float, pool=None) -> dict:
    """Per-window AP: each window is one scene, scored on all of its views with GT (``window_gt_views``),
    with its window-local labels ``label_of(record index, view index)`` and scores ``scores_by_rec``."""
    from .metrics import InstanceAPEvaluator, build_common_point_set

    ev = InstanceAPEvaluator()
    for ri, views in gt_views.items():
        for grp in _group_by_shape(list(range(len(views))), [vw[1].shape for vw in views]):
            sel = [views[i] for i in grp]
            cps = build_common_point_set(np.stack([x[1] for x in sel]), np.stack([x[2] for x in sel]),
                                         np.stack([x[3] for x in sel]),
                                         np.stack([np.asarray(label_of(ri, x[0])) for x in sel]),
                                         T_world_cam=np.stack([x[4] for x in sel]), voxel_size=voxel)
            ev.add_scene(cps.pred_labels, scores_by_rec[ri], cps.gt_labels)
            if pool is not None:
                pool.add_scene(cps.pred_labels, scores_by_rec[ri], cps.gt_labels)
    res = ev.compute()
    res["n_views"] = int(sum(len(v) for v in gt_views.values()))
    return res


def has_ground_truth(gt) -> bool:
    return bool(gt.depth and gt.instance and gt.T_world_cam)


# ---------------------------------------------------------------------------------- oracle error budget
def _row(parts, known: str, metrics: dict, name: str) -> dict:
    from .oracle import oracle_name

    f = metrics["methods"]["fast3dis"]
    mc = f.get("map_cloud") or {}
    return {"config": name, "oracle": oracle_name(parts), "known_geometry": known, "lifted_AP50": f["AP50"],
            "per_window_AP50": f["AP_per_window"]["AP50"],
            "map_AP": mc.get("AP"), "map_AP50": mc.get("AP50"), "map_AP25": mc.get("AP25"),
            "linking": mc.get("linking"), "geometry": mc.get("geometry"), "instances": mc.get("instances"),
            "sim3": mc.get("sim3"), "checkpoints": mc.get("checkpoints")}


def scene_rows(bag, gt, predictor, cfg, configs, *, eval_voxel: float = 0.05, pools: dict | None = None,
               seed: int = 0) -> list[dict]:
    """Replay ``bag`` once per table row and score it; ``pools`` {row name: {"whole", "per_window",
    "map_cloud": InstanceAPEvaluator}} receive the scenes. A row (``oracle.split_config``) is a tuple of oracle
    parts, replayed with ``cfg`` as given, or ``oracle.table_config(parts, known)``, replayed with
    ``cfg.known_geometry = known``: the product's own replay path (``fast3dis-eval --known-geometry``). Rows of
    unscored replays are skipped (a bag whose views never meet GT)."""
    from .oracle import CachedPredictor, OraclePredictor, config_name, split_config
    from .replay import replay_bag

    cached = predictor if isinstance(predictor, CachedPredictor) else CachedPredictor(predictor)
    rows = []
    for config in configs:
        parts, known = split_config(config)
        name = config_name(config)
        row_cfg = cfg if known is None else dataclasses.replace(cfg, known_geometry=known)
        res = replay_bag(bag, OraclePredictor(cached, gt, parts, seed), row_cfg, out_bag=None, progress=False)
        m, *_ = compute_metrics(res.records, gt, eval_voxel=eval_voxel,
                                pool={"fast3dis": (pools or {}).get(name, {})})
        if m["methods"]:
            row = _row(parts, row_cfg.known_geometry, m, name)
            row["known_geometry_counts"] = {k: v for k, v in res.accounting["known_geometry"].items() if k != "mode"}
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
def evaluate_bag(bag, out_dir, *, gt_bag=None, predictor=None, weights_info=None, replay_cfg=None,
                 baseline: str | None = None, eval_voxel: float = 0.05, progress: bool = True,
                 title: str = "FAST3DIS evaluation", baseline_params: dict | None = None,
                 oracle: tuple = (), oracle_table: list | None = None, keep_points: bool = False,
                 pool: dict | None = None) -> dict:
    """Replay + accounting + (GT) metrics report. Returns a dict of results and written paths.

    ``oracle``: parts of every window's prediction replaced by GT (``eval/oracle.py``); ``oracle_table``:
    oracle configurations to replay as well (network run once per window), written to the report as the
    error-budget table (``eval/oracle_table.py``). Both need GT in the bag. ``pool``: as in
    ``compute_metrics`` (pooling over bags, ``eval/sharded.py``)."""
    from ..data.bags import read_ground_truth
    from .replay import ReplayConfig, replay_bag
    from .report import write_report

    base_predictor = predictor
    if oracle or oracle_table:
        gt_oracle = read_ground_truth(gt_bag or bag)
        if not has_ground_truth(gt_oracle):
            raise ValueError("--oracle / --oracle-table need ground truth (depth_gt, instance_gt, GT poses) in "
                             "the bag")
    if oracle_table:
        from .oracle import CachedPredictor

        base_predictor = predictor = CachedPredictor(predictor)
    if oracle:
        from .oracle import OraclePredictor

        predictor = OraclePredictor(base_predictor, gt_oracle, oracle)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out_bag = out / "output_bag"
    if out_bag.exists():
        import shutil

        shutil.rmtree(out_bag)
    cfg = replay_cfg or ReplayConfig()
    res = replay_bag(bag, predictor, cfg, out_bag=out_bag, progress=progress)
    acc_path = out / "accounting.json"
    from .report import to_jsonable
    from .run_summary import append_to_report, build_summary

    def finish(gt, sv) -> dict:
        """The "what happened" block: into the result, accounting.json and report.md."""
        summary = build_summary(res.accounting, gt=gt, scored=sv, gt_expected=True if gt_bag else None,
                                weights_info=weights_info, slop_ms=cfg.slop_ms, window_size=cfg.window_size)
        acc_path.write_text(json.dumps(to_jsonable({**res.accounting, "replay_wall_s": res.wall_s,
                                                    "output_topics": res.output_counts, "summary": summary}),
                                       indent=2))
        md = append_to_report(out / "report.md", summary, title=title)
        if md.resolve() not in {Path(f).resolve() for f in paths.setdefault("report", [])}:
            paths["report"].insert(0, str(md.resolve()))
        result["summary"] = summary
        return result

    paths = {"output_bag": str(out_bag.resolve()), "accounting": str(acc_path.resolve())}
    result = {"replay": res, "paths": paths, "metrics": None, "scored": None, "baseline": None, "summary": None}
    report_md = out / "report.md"
    if report_md.exists():  # a report of an earlier run in the same folder would be appended to
        report_md.unlink()
    gt = read_ground_truth(gt_bag or bag, identity=res.identity)
    if not has_ground_truth(gt) or not res.records:  # still say which views lack which GT part
        return finish(gt, select_views(res.records, gt) if res.records else None)
    meta = {"bag": str(Path(bag).resolve()), "gt_bag": str(Path(gt_bag or bag).resolve()),
            "cameras": res.cameras, "windows": len(res.records),
            "window_size": cfg.window_size, "stride": cfg.stride}
    if oracle:
        from .oracle import oracle_name

        meta["oracle"] = oracle_name(oracle)
        meta["oracle_stats"] = dict(predictor.stats)
    if weights_info:
        meta["weights"] = weights_info.get("weights")
        meta["checkpoint"] = weights_info.get("checkpoint")
        if weights_info.get("random_weights"):
            meta["WARNING"] = "WEIGHTS ARE RANDOM (no checkpoint found): metrics are not meaningful"
    t0 = time.perf_counter()
    metrics, curves, sv, base = compute_metrics(res.records, gt, eval_voxel=eval_voxel, baseline=baseline, meta=meta,
                                                baseline_params=baseline_params, keep_points=keep_points,
                                                pool=pool)
    metrics["meta"]["metrics_s"] = time.perf_counter() - t0
    if oracle_table and len(sv):

        metrics["oracle_table"] = scene_rows(bag, gt, base_predictor, replay_cfg or ReplayConfig(), oracle_table,
                                             eval_voxel=eval_voxel)
    files = write_report(metrics, out, curves=curves, title=title)
    paths["report"] = files
    result.update(metrics=metrics, scored=sv, baseline=base, gt=gt, curves=curves)
    return finish(gt, sv)


INPUT_FORMS = """\
accepted input (rosbag2 folder with metadata.yaml; storage mcap or sqlite3, taken from the metadata):
  images      sensor_msgs/Image (raw: rgb8, bgr8, rgba8, bgra8, mono8, mono16, ...) on <ns>/<cam>/image_raw
              or any Image topic; sensor_msgs/CompressedImage (jpeg/png) on <ns>/<cam>/image_raw/compressed.
              A camera with both reads one (--image-transport, default raw; said once, nothing dropped).
  calibration sensor_msgs/CameraInfo on <ns>/<cam>/camera_info; a camera without one (or with an unusable
              one) gets K estimated by the network for its views only; the run summary says which.
  namespaces  /robot/front/image_raw is camera 'front' when --cameras names front; frame ids
              (front_optical_frame, robot/front_link) and TF child frames join the same way; anything else:
              --camera-map robot/front=front (keys: stream, topic or frame id). Streams that match no camera
              are named in the summary.
  ground truth (optional; --gt or the same bag) <ns>/<cam>/depth_gt (32FC1 m), <ns>/<cam>/instance_gt
              (32SC1), TF <world> -> <camera frame> poses on /tf, K from CameraInfo or the JSON on
              /fast3dis_gt/instances ("K": {cam: 3x3}).
exit codes: 0 ok; 1 accounting does not add up; 2 unreadable input or bad arguments;
  3 nothing processed, or ground truth present but no view scored (the summary names the cause and the fix).
"""


def _parse(argv):
    ap = argparse.ArgumentParser(prog="fast3dis-eval", description=(
        "Replay a rosbag2 (mcap or sqlite3) through the FAST3DIS pipeline at full speed, write the output "
        "topics to a new bag, account for every input frame set, and score against ground truth."),
        epilog=INPUT_FORMS, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bag", required=True, help="input rosbag2 folder (or a file inside it), mcap or sqlite3")
    ap.add_argument("--gt", default=None, help="bag with ground truth (default: --bag)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--checkpoint", default=None, help="FAST3DIS checkpoint folder (default: bundled tiny)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch",
                    help="engine of the network: torch (checkpoint) or an exported --engine (docs: Issue 25)")
    ap.add_argument("--engine", default=None, help="fast3dis-export .onnx (onnxruntime) or TensorRT engine file")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--cameras", default=None, help="comma separated camera names, in view order (topics "
                   "[/<ns>]/<cam>/image_raw[/compressed]; default: every camera image stream in the bag)")
    g.add_argument("--image-topics", nargs="+", default=None, help="explicit image topics (Image or CompressedImage)")
    ap.add_argument("--camera-map", nargs="+", default=None, metavar="KEY=CAMERA",
                    help="map a stream, topic or frame id to a camera, e.g. robot/front=front (comma separated or "
                         "repeated)")
    ap.add_argument("--image-transport", choices=["raw", "compressed"], default="raw",
                    help="which images a camera with both raw and compressed topics reads (default raw)")
    ap.add_argument("--window-size", type=int, default=4, help="frame sets per window")
    ap.add_argument("--stride", type=int, default=2, help="new window every N frame sets")
    ap.add_argument("--slop-ms", type=float, default=50.0, help="sync slop in milliseconds")
    ap.add_argument("--score-threshold", type=float, default=None,
                    help="instance score threshold (predictor and fusion; default: the checkpoint's)")
    ap.add_argument("--voxel-size", type=float, default=0.02, help="map voxel size (map units)")
    ap.add_argument("--eval-voxel", type=float, default=0.05, help="voxel of the GT common point set (m)")
    ap.add_argument("--known-geometry", choices=["none", "rig", "poses", "rig+poses"], default="none",
                    help="geometry from the bag's TF: rig = /tf_static camera extrinsics (metric scale, relative "
                         "camera poses in fusion), poses = camera poses in --known-pose-frame (fusion places the "
                         "windows on them)")
    ap.add_argument("--pose-conditioning", action="store_true",
                    help="known poses also condition the network (the node's use_known_poses)")
    ap.add_argument("--known-pose-frame", default="map", help="fixed TF frame of --known-geometry poses")
    ap.add_argument("--baseline", choices=["hdbscan"], default=None, help="also run a clustering baseline")
    ap.add_argument("--oracle", default=None, metavar="PARTS",
                    help="replace these parts of every window's prediction with ground truth: any of "
                         "masks,depth,poses (comma separated; 'all'); GT masks get window-local shuffled ids")
    ap.add_argument("--oracle-table", choices=["issue", "all"], default=None,
                    help="also replay the oracle configurations (issue: masks x depth+poses; all: every subset) "
                         "and put the error-budget table in the report")
    ap.add_argument("--replay-only", action="store_true",
                    help="a bag without ground truth is fine (replay + accounting, exit 0); otherwise a run that "
                         "scores nothing exits 3")
    add_baseline_args(ap)
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def add_baseline_args(ap) -> None:
    """HDBSCAN baseline settings (``run_baseline`` / ``baseline.cluster_instances``); unset = defaults."""
    g = ap.add_argument_group("HDBSCAN baseline")
    g.add_argument("--hdbscan-min-cluster-frac", type=float, default=None,
                   help="min_cluster_size as a fraction of the clustered subsample (default 0.004, at least 10)")
    g.add_argument("--hdbscan-min-cluster-size", type=int, default=None,
                   help="min_cluster_size in points (overrides the fraction)")
    g.add_argument("--hdbscan-min-samples", type=int, default=None, help="HDBSCAN min_samples (default 10)")
    g.add_argument("--hdbscan-w-xyz", type=float, default=None, help="weight of the xyz block (default 1)")
    g.add_argument("--hdbscan-w-feat", type=float, default=None,
                   help="weight of the feature block (default 1; 0 = cluster on xyz only)")
    g.add_argument("--hdbscan-max-points", type=int, default=None, help="clustered subsample size (default 8000)")


def baseline_params_from_args(args) -> dict:
    """The ``--hdbscan-*`` options that were given, as ``run_baseline`` keyword arguments."""
    names = {"hdbscan_min_cluster_frac": "min_cluster_frac", "hdbscan_min_cluster_size": "min_cluster_size",
             "hdbscan_min_samples": "min_samples", "hdbscan_w_xyz": "w_xyz", "hdbscan_w_feat": "w_feat",
             "hdbscan_max_points": "max_points"}
    return {k: getattr(args, a) for a, k in names.items() if getattr(args, a, None) is not None}


def print_table(metrics: dict, file=None) -> None:
    file = sys.stdout if file is None else file

    def f(v, pct=True):
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "n/a"
        return f"{100 * v:5.1f}" if pct else f"{v:.3f}"

    hdr = f"{'method':<10} {'liftAP':>6} {'lift50':>6} {'lift25':>6} {'AP/win':>6} {'map AP':>6} {'map50':>6} " \
          f"{'link%':>6} {'2D AP':>6} {'AbsRel':>7} {'d1':>6} {'AUC@3':>6} {'AUC@30':>6} {'ms/win':>8}"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for m, d in metrics.get("methods", {}).items():
        mc = d.get("map_cloud") or {}
        print(f"{m:<10} {f(d.get('AP')):>6} {f(d.get('AP50')):>6} {f(d.get('AP25')):>6} "
              f"{f(d.get('AP_per_window', {}).get('AP')):>6} {f(mc.get('AP')):>6} {f(mc.get('AP50')):>6} "
              f"{f((d.get('linking') or {}).get('rate')):>6} {f(d.get('mask2d', {}).get('AP')):>6} "
              f"{f(d.get('depth', {}).get('abs_rel'), False):>7} {f(d.get('depth', {}).get('delta1')):>6} "
              f"{f(d.get('pose', {}).get('auc3')):>6} {f(d.get('pose', {}).get('auc30')):>6} "
              f"{d.get('timing', {}).get('ms_per_window_mean', float('nan')):8.1f}", file=file)
    print("liftAP: labels lifted with GT depth+poses; map AP: the published map cloud vs the GT surface; "
          "link%: window instances linked to an existing map id", file=file)
    if metrics.get("oracle_table"):
        from .report import table_lines

        print("\nerror budget (oracle table, %):", file=file)
        print("\n".join(table_lines(metrics["oracle_table"])), file=file)


def main(argv: list[str] | None = None) -> None:
    """Console entry: exits 0 on success, 1 when the accounting does not add up, 2 on unreadable input or bad
    arguments, 3 when nothing was processed or scored (no window, no ground truth without ``--replay-only``,
    ground truth present but no view matching it)."""
    raise SystemExit(run(argv))


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    from fast3dis_ros.data.bags import BagReadError
    from fast3dis_ros.data.camera_identity import parse_camera_map
    from fast3dis_ros.eval.replay import ReplayConfig
    from fast3dis_ros.inference.factory import BUNDLED, PredictorSpec, build_predictor

    try:
        camera_map = parse_camera_map(args.camera_map)
    except ValueError as e:
        print(f"fast3dis-eval: error: --camera-map: {e}", file=sys.stderr)
        return 2
    cfg = ReplayConfig(cameras=[c.strip() for c in args.cameras.split(",") if c.strip()] if args.cameras else None,
                       image_topics=args.image_topics, window_size=args.window_size, stride=args.stride,
                       slop_ms=args.slop_ms, voxel_size=args.voxel_size, camera_map=camera_map,
                       image_transport=args.image_transport, known_geometry=args.known_geometry,
                       known_pose_frame=args.known_pose_frame, pose_conditioning=args.pose_conditioning)
    if args.score_threshold is not None:
        cfg.score_threshold = args.score_threshold
    from fast3dis_ros.eval.oracle import all_oracle_configs, ISSUE_TABLE_CONFIGS, parse_oracle

    try:
        oracle = parse_oracle(args.oracle)
    except ValueError as e:
        print(f"fast3dis-eval: error: --oracle: {e}", file=sys.stderr)
        return 2
    table = {"issue": ISSUE_TABLE_CONFIGS, "all": all_oracle_configs(), None: None}[args.oracle_table]
    t0 = time.perf_counter()
    try:  # fail fast on an unreadable bag or cameras that match no stream, before loading the model
        from ..data.bags import bag_topics
        from .replay import plan_bag_streams

        plan_bag_streams(args.bag, cfg.cameras, cfg.image_topics, cfg.camera_map, cfg.image_transport)
        if args.gt:
            bag_topics(args.gt)
    except BagReadError as e:
        what = "" if type(e).__name__ == "StreamPlanError" else "cannot read bag: "
        print(f"fast3dis-eval: error: {what}{e}", file=sys.stderr)
        return 2
    try:
        predictor, info = build_predictor(PredictorSpec(
        checkpoint=args.checkpoint or BUNDLED, device=args.device, score_threshold=args.score_threshold,
        keep_mask_features=args.baseline == "hdbscan", backend=args.backend, engine=args.engine or ""))
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # missing checkpoint / engine / TensorRT
        print(f"fast3dis-eval: error: {e}", file=sys.stderr)
        return 2
    try:
        r = evaluate_bag(args.bag, args.out, gt_bag=args.gt, predictor=predictor, weights_info=info,
                         replay_cfg=cfg, baseline=args.baseline, eval_voxel=args.eval_voxel,
                         progress=not args.no_progress, baseline_params=baseline_params_from_args(args),
                         oracle=oracle, oracle_table=table)
    except BagReadError as e:
        print(f"fast3dis-eval: error: cannot read bag: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"fast3dis-eval: error: {e}", file=sys.stderr)
        return 2
    acc = r["replay"].accounting
    fs = acc["frame_sets"]
    print(f"\nframes: read {acc['frames']['read']}, rejected {acc['frames']['rejected']}, "
          f"dropped by sync {acc['frames']['dropped_by_sync']}; frame sets: received {fs['received']}, processed "
          f"{fs['processed']}, dropped {fs['dropped']}; windows fused {acc['windows']['fused']}; "
          f"balanced: {acc['balanced']}")
    ln = acc["fusion"].get("linking") or {}
    print(f"linking: {ln.get('linked_instances', 0)}/{ln.get('window_instances', 0)} window instances linked to an "
          f"existing map id (2D {ln.get('linked_2d', 0)}, 3D {ln.get('linked_3d', 0)}, mixed {ln.get('linked_mixed', 0)}; "
          f"merges {ln.get('merges', 0)}, splits {ln.get('splits', 0)}, absorbed {ln.get('absorbed', 0)}); "
          f"known geometry: {acc.get('known_geometry', {})}")
    if r["metrics"] is not None:
        print()
        print_table(r["metrics"])
    elif (r["summary"].get("views") or {}).get("scored") == 0:
        print("ground truth present, but no view could be scored: metrics skipped (see 'what happened' below)")
    else:
        print("no ground truth in the bag: metrics skipped")
    print(f"\nwall time {time.perf_counter() - t0:.1f} s")
    print("outputs:")
    for k, v in r["paths"].items():
        for p in v if isinstance(v, list) else [v]:
            print(f"  {Path(p).resolve()}")
    from .run_summary import format_summary

    summary = r["summary"]
    print("\n" + format_summary(summary))
    if summary["exit"]["code"]:
        print(f"fast3dis-eval: {summary['exit']['reason']}", file=sys.stderr)
        return summary["exit"]["code"]
    why = _scored_nothing(r, args.replay_only)
    if why:
        print(f"fast3dis-eval: error: nothing was scored: {why}", file=sys.stderr)
        return 3
    return 0


def _scored_nothing(r: dict, replay_only: bool) -> str | None:
    """Why the run scored nothing (None when it scored something, or had nothing to score and
    ``replay_only`` allows that)."""
    if not r["replay"].records:
        return "no window was processed (see accounting.json: frames rejected / dropped by sync)"
    m = r["metrics"]
    if m is None:
        return None if replay_only else ("the bag has no ground truth (/<cam>/depth_gt, /<cam>/instance_gt, GT poses "
                                         "on /tf); give --gt, or --replay-only for replay + accounting alone")
    if not m.get("methods"):
        return ("no processed view matched the ground truth by (camera, stamp): "
                f"{m.get('meta', {}).get('note', 'check camera names and stamps of --gt')}")
    return None


if __name__ == "__main__":
    main()
