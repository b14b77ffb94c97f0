"""Scores of the published map (``~/instances_cloud``) against the ground-truth instance surfaces.

The "lifted" AP of ``eval/evaluate.py`` lifts each view's predicted labels with *ground-truth* depth and
poses, so it never sees the map's own geometry. This module scores what a robot receives: the points and
instance field of ``FusionResult.map_cloud`` (the cloud the node publishes unchanged on
``~/instances_cloud``, and ``eval.replay`` writes to ``/fast3dis/instances_cloud``).

Protocol (every distance in GT metres, after the Sim(3) below)
---------------------------------------------------------------
* **GT surface**: every valid GT pixel of every view the replay processed, lifted with GT depth, K and
  pose and voxelised at ``voxel`` (default 0.05 m, ``metrics.build_common_point_set``); each voxel keeps
  its majority GT instance (0 = background: walls, floor, ceiling).
* **Sim(3)**: ``map`` is the first window's world, up to scale. One Sim(3) per scene maps it onto the GT
  world: ``metrics.align_camera_centers`` on the fused camera poses (``FusionResult.T_map_cam`` of each
  view's first window, the pose fusion anchors on) vs the GT poses. Reported: its scale, the RMSE of
  the camera centres after the fit (``residual_m``), its rotation angle (``rotation_deg``) and translation
  (``translation_m``): where the map frame is the metric GT world (known poses, GT geometry) the fit is the
  identity, so the map was scored as published.
* **Label transfer** (map point -> GT label): a map point takes the GT instance of its nearest GT surface
  voxel if that is within ``tau`` (default 0.10 m), else background (0). For the AP the map is
  re-voxelised at ``voxel`` in the GT frame (majority map id per voxel) so map and GT have one density.
* **Map-cloud AP / AP50 / AP25** (ScanNet, class-agnostic, ``metrics.InstanceAPEvaluator``): the point set
  is the map voxels (prediction = map id, GT = transferred label) plus the GT-object voxels no map voxel
  covers within ``tau`` (prediction 0): missing geometry costs recall, points spread off an object cost
  IoU. As in ScanNet, a map instance lying entirely on background is ignored, not counted false. Score of
  a map id: its ``InstanceSummary.score`` (tracker), else the highest point score of the id.
* **Geometry**: accuracy = distance of every published map point to the GT surface (voxelised at 2 cm,
  ``FINE_VOXEL_M``; mean, median, % within
  5 / 10 cm); completeness = distance of every GT surface voxel to the map (mean, % within ``tau`` =
  "% GT surface covered"); Chamfer = (mean accuracy + mean completeness) / 2.
* **Instances**: among map voxels on a GT object (label > 0), ``share[g, id]`` voxels. A *split* is an extra
  map id holding >= ``frac`` (10 %) of a GT object's voxels; a *merge* is an extra GT object holding >=
  ``frac`` of a map id's on-object voxels. ``unassigned``: fraction of GT-object voxels with no map voxel of
  a non-zero id within ``tau`` (``uncovered``: no map voxel at all). ``dominant`` id per GT object.
* **Over time**: the map after several windows (checkpoints) is scored the same way with the scene's one
  Sim(3); an *id switch* is a GT object whose dominant map id changes between consecutive checkpoints.
* **Linking rate** (``linking_stats``): window instances (``FusionResult.id_map`` entries) of every window
  but the first that map to a global id some earlier window already had, over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import InstanceAPEvaluator, _voxel_majority, _voxelize, align_camera_centers, apply_sim3, \
    build_common_point_set

__all__ = ["GTSurface", "gt_surface", "fit_map_sim3", "score_map_cloud", "score_replay_map", "linking_stats",
           "id_switches", "MAP_TAU_M"]

MAP_TAU_M = 0.10  # label-transfer / coverage distance (m)
FINE_VOXEL_M = 0.02  # GT surface resolution for point-to-surface distances (m)
SPLIT_MERGE_FRAC = 0.10


@dataclass
class GTSurface:
    """Voxelised GT surface of a scene (GT world, metres)."""

    xyz: np.ndarray  # (M, 3) voxel centroids at ``voxel`` (AP, coverage)
    labels: np.ndarray  # (M,) 0 = background
    voxel: float
    fine_xyz: np.ndarray | None = None  # the same surface at FINE_VOXEL_M (point distances)

    def __post_init__(self):
        from scipy.spatial import cKDTree

        self.tree = cKDTree(self.xyz) if len(self.xyz) else None
        fine = self.xyz if self.fine_xyz is None or not len(self.fine_xyz) else self.fine_xyz
        self.fine_tree = cKDTree(fine) if len(fine) else None


def _view_keys(records) -> dict:
    """(camera, stamp) -> (record index, view index) of the first window that held the view."""
    first: dict = {}
    for ri, rec in enumerate(records):
        p = rec.prediction
        for v, (cam, st) in enumerate(zip(p.cameras, p.view_stamps_ns)):
            first.setdefault((cam, int(st)), (ri, v))
    return first


def gt_surface(gt, keys, voxel: float = 0.05) -> GTSurface:
    """GT surface of the views ``keys`` ((camera, stamp) pairs) that have GT depth, instances, K and pose.
    Cached on ``gt`` (the oracle configurations of one bag score against the same surface)."""
    cache = gt.__dict__.setdefault("_map_surface_cache", {})
    ck = (tuple(sorted(keys)), float(voxel))
    if ck not in cache:
        cache.clear()
        cache[ck] = _gt_surface(gt, keys, voxel)
    return cache[ck]


def _gt_surface(gt, keys, voxel: float) -> GTSurface:
    groups: dict = {}
    for cam, st in keys:
        dep = (gt.depth.get(cam) or {}).get(st)
        ins = (gt.instance.get(cam) or {}).get(st)
        T = (gt.T_world_cam.get(cam) or {}).get(st)
        K = gt.K.get(cam)
        if dep is None or ins is None or T is None or K is None:
            continue
        groups.setdefault(dep.shape, []).append((dep, ins, K, T))
    xyz, lab, fine = [], [], []
    for views in groups.values():
        d, i, K, T = (np.stack(x) for x in zip(*views))
        cps = build_common_point_set(d, i, K, np.zeros_like(i), T_world_cam=T, voxel_size=voxel)
        xyz.append(cps.xyz)
        lab.append(cps.gt_labels)
        fine.append(build_common_point_set(d, i, K, np.zeros_like(i), T_world_cam=T, voxel_size=FINE_VOXEL_M).xyz)
    if not xyz:
        return GTSurface(np.zeros((0, 3)), np.zeros(0, np.int64), voxel)
    xyz, lab, fine = np.concatenate(xyz), np.concatenate(lab), np.concatenate(fine)
    if len(groups) > 1:  # cameras of different sizes: one more voxelisation merges their voxels
        vox, M = _voxelize(xyz, voxel)
        n = np.bincount(vox, minlength=M)
        xyz = np.stack([np.bincount(vox, weights=xyz[:, a], minlength=M) for a in range(3)], 1) / n[:, None]
        lab = _voxel_majority(vox, lab, M)
    return GTSurface(xyz, lab, voxel, fine)


def fit_map_sim3(records, gt) -> dict:
    """The scene's Sim(3) map -> GT world from camera poses (module doc): {"sim3": (s, R, t), "scale",
    "residual_m", "rotation_deg", "translation_m", "n_views"}; ``sim3`` None when no view has a GT pose."""
    pred, ref = [], []
    for (cam, st), (ri, v) in _view_keys(records).items():
        T = (gt.T_world_cam.get(cam) or {}).get(st)
        if T is None:
            continue
        pred.append(np.linalg.inv(np.asarray(records[ri].fusion.T_map_cam[v], np.float64)))
        ref.append(np.linalg.inv(np.asarray(T, np.float64)))
    if not pred:
        return {"sim3": None, "scale": float("nan"), "residual_m": float("nan"), "rotation_deg": float("nan"),
                "translation_m": float("nan"), "n_views": 0}
    P, G = np.stack(pred), np.stack(ref)
    s, R, t = align_camera_centers(P, G)
    cp = apply_sim3((s, R, t), np.linalg.inv(P)[:, :3, 3])
    cg = np.linalg.inv(G)[:, :3, 3]
    res = float(np.sqrt(np.mean(np.sum((cp - cg) ** 2, 1))))
    rot = float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))
    return {"sim3": (float(s), R, t), "scale": float(s), "residual_m": res, "rotation_deg": rot,
            "translation_m": float(np.linalg.norm(t)), "n_views": len(P)}


def _instance_scores(cloud, instances) -> dict[int, float]:
    sc = {int(i.id): float(i.score) for i in (instances or [])}
    ids = np.asarray(cloud.instance, np.int64)
    for gid in np.unique(ids[ids > 0]):
        if int(gid) not in sc:
            sc[int(gid)] = float(np.max(np.asarray(cloud.score)[ids == gid]))
    return sc


def score_map_cloud(cloud, surface: GTSurface, sim3, *, instances=None, tau: float = MAP_TAU_M,
                    frac: float = SPLIT_MERGE_FRAC, ap: InstanceAPEvaluator | None = None,
                    keep_points: bool = False) -> dict:
    """Score one map cloud (``InstanceCloud``) against ``surface`` (module doc). ``ap``: an evaluator that
    receives this map as one scene (pooling); ``keep_points``: also return per-point distance / GT label
    in GT frame (for the error render)."""
    from scipy.spatial import cKDTree

    xyz = apply_sim3(sim3, np.asarray(cloud.xyz, np.float64)) if len(cloud) else np.zeros((0, 3))
    ids = np.asarray(cloud.instance, np.int64)
    out: dict = {"n_points": int(len(xyz)), "tau_m": tau, "voxel_m": surface.voxel}
    if surface.tree is None:
        raise ValueError("score_map_cloud: empty GT surface")
    # accuracy on every published point (fine surface); its label from the coarse one
    if len(xyz):
        d_acc = surface.fine_tree.query(xyz, k=1)[0]
        nn = surface.tree.query(xyz, k=1)[1]
    else:
        d_acc, nn = np.zeros(0), np.zeros(0, np.int64)
    # the map re-voxelised at the GT voxel, in GT frame
    vox, M = _voxelize(xyz, surface.voxel)
    if M:
        cnt = np.bincount(vox, minlength=M)
        mxyz = np.stack([np.bincount(vox, weights=xyz[:, a], minlength=M) for a in range(3)], 1) / cnt[:, None]
        mid = _voxel_majority(vox, ids, M)
        dm, jm = surface.tree.query(mxyz, k=1)
        m_gt = np.where(dm <= tau, surface.labels[jm], 0)
        d_comp, _ = cKDTree(mxyz).query(surface.xyz, k=1)
        inst = mid > 0
        d_inst = cKDTree(mxyz[inst]).query(surface.xyz, k=1)[0] if inst.any() else np.full(len(surface.xyz), np.inf)
    else:
        mid = m_gt = np.zeros(0, np.int64)
        d_comp = d_inst = np.full(len(surface.xyz), np.inf)
    covered = d_comp <= tau
    obj = surface.labels > 0
    # AP point set: map voxels + uncovered GT-object voxels
    miss = obj & ~covered
    pred_all = np.concatenate([mid, np.zeros(int(miss.sum()), np.int64)])
    gt_all = np.concatenate([m_gt, surface.labels[miss]])
    score_of = _instance_scores(cloud, instances)
    uid = np.unique(pred_all[pred_all > 0])
    lut = np.zeros(int(uid.max()) + 1 if len(uid) else 1, np.int64)
    lut[uid] = np.arange(1, len(uid) + 1)
    scores = np.array([score_of.get(int(g), 0.0) for g in uid], np.float64)
    ev = InstanceAPEvaluator()
    for e in (ev, ap):
        if e is not None:
            e.add_scene(lut[pred_all], scores, gt_all)
    r = ev.compute()
    out.update(AP=r["AP"], AP50=r["AP50"], AP25=r["AP25"], n_gt=r["n_gt"], n_pred=r["n_pred"])
    fin = np.isfinite(d_comp)
    out["geometry"] = {
        "accuracy_mean_m": float(d_acc.mean()) if len(d_acc) else float("nan"),
        "accuracy_median_m": float(np.median(d_acc)) if len(d_acc) else float("nan"),
        "pct_points_within_5cm": float(np.mean(d_acc <= 0.05)) if len(d_acc) else 0.0,
        "pct_points_within_10cm": float(np.mean(d_acc <= 0.10)) if len(d_acc) else 0.0,
        "completeness_mean_m": float(d_comp[fin].mean()) if fin.any() else float("nan"),
        "pct_gt_surface_covered": float(covered.mean()) if len(covered) else 0.0,
        "chamfer_m": float((d_acc.mean() + d_comp[fin].mean()) / 2) if len(d_acc) and fin.any() else float("nan"),
    }
    # splits / merges / dominant ids on map voxels lying on a GT object
    on = (m_gt > 0) & (mid > 0)
    gids, gi = np.unique(m_gt[on], return_inverse=True)
    mids, mi = np.unique(mid[on], return_inverse=True)
    share = np.zeros((len(gids), len(mids)), np.int64)
    np.add.at(share, (gi, mi), 1)
    g_sig = share >= frac * np.maximum(share.sum(1, keepdims=True), 1)
    m_sig = share >= frac * np.maximum(share.sum(0, keepdims=True), 1)
    n_obj = int(len(np.unique(surface.labels[obj])))
    out["instances"] = {
        "gt_objects": n_obj,
        "map_ids": int(len(np.unique(ids[ids > 0]))),
        "splits": int(np.maximum(g_sig.sum(1) - 1, 0).sum()),
        "merges": int(np.maximum(m_sig.sum(0) - 1, 0).sum()),
        "gt_objects_split": int((g_sig.sum(1) > 1).sum()),
        "map_ids_merged": int((m_sig.sum(0) > 1).sum()),
        "unassigned_frac": float(np.mean(d_inst[obj] > tau)) if obj.any() else float("nan"),
        "uncovered_frac": float(np.mean(~covered[obj])) if obj.any() else float("nan"),
    }
    out["dominant"] = {int(g): int(mids[np.argmax(share[k])]) for k, g in enumerate(gids)}
    if keep_points:
        out["points"] = {"xyz_gt": xyz, "dist_m": d_acc,
                         "gt_label": np.where(d_acc <= tau, surface.labels[nn] if len(nn) else 0, 0), "id": ids}
    return out


def id_switches(dominant_seq: list[dict]) -> dict:
    """Id switches over checkpoints: per GT object, changes of its dominant map id between consecutive
    checkpoints where it has one."""
    last: dict = {}
    n = 0
    objs = set()
    for dom in dominant_seq:
        for g, m in dom.items():
            if g in last and last[g] != m:
                n += 1
                objs.add(g)
            last[g] = m
    return {"id_switches": n, "gt_objects_switched": len(objs), "checkpoints": len(dominant_seq)}


def linking_stats(records) -> dict:
    """Window instances linked to a global id an earlier window already had (module doc)."""
    seen: set = set()
    total = linked = 0
    for k, rec in enumerate(records):
        ids = [int(g) for g in rec.fusion.id_map.values()]
        if k > 0:
            total += len(ids)
            linked += sum(g in seen for g in ids)
        seen.update(ids)
    return {"window_instances": total, "linked": linked, "rate": linked / total if total else float("nan")}


def _checkpoints(n: int, k: int) -> list[int]:
    """Up to ``k`` record indices spread over ``n`` windows, always including the last."""
    if n <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(n - 1, 0, k)} | {n - 1}) if n > k else list(range(n))


def score_replay_map(records, gt, *, voxel: float = 0.05, tau: float = MAP_TAU_M, checkpoints: int = 4,
                     ap: InstanceAPEvaluator | None = None, keep_points: bool = False) -> dict | None:
    """Map metrics of a replay (module doc): the final map (pooled into ``ap``), the map at up to
    ``checkpoints`` windows, id switches, the Sim(3) and the linking rate. None without GT poses/surface."""
    if not records:
        return None
    fit = fit_map_sim3(records, gt)
    surface = gt_surface(gt, list(_view_keys(records)), voxel)
    if fit["sim3"] is None or surface.tree is None:
        return None
    final = records[-1].fusion
    res = score_map_cloud(final.map_cloud, surface, fit["sim3"], instances=final.instances, tau=tau, ap=ap,
                          keep_points=keep_points)
    ck, dom = [], []
    for ri in _checkpoints(len(records), checkpoints):
        f = records[ri].fusion
        r = res if ri == len(records) - 1 else score_map_cloud(f.map_cloud, surface, fit["sim3"],
                                                              instances=f.instances, tau=tau)
        dom.append(r["dominant"])
        ck.append({"window": int(records[ri].window_index), "AP50": r["AP50"], "n_points": r["n_points"],
                   "pct_gt_surface_covered": r["geometry"]["pct_gt_surface_covered"],
                   "accuracy_median_m": r["geometry"]["accuracy_median_m"],
                   "unassigned_frac": r["instances"]["unassigned_frac"]})
    res["instances"].update(id_switches(dom))
    res["checkpoints"] = ck
    res["sim3"] = {k: fit[k] for k in ("scale", "residual_m", "rotation_deg", "translation_m", "n_views")}
    res["linking"] = linking_stats(records)
    res.pop("dominant")
    return res
