"""Issue 16 benchmark: window linking and known geometry on held-out synthetic scenes.

Usage::

    python -m fast3dis_ros.bench.linking [--seeds 7000-7007] [--bags DIR] [--out docs/bench/linking.json]
                                         [--configs all | name,name,...]

Every scene (``data.synthetic``, the held-out evaluation's rig: 3 cameras, 8 frame sets, 224 x 168) is
written as a rosbag2 with ground truth and replayed through ``eval.replay.replay_bag`` (default
``ReplayConfig``: window 4, stride 2, bundled checkpoint, CPU). A configuration chooses:

* masks / geometry: ``net`` (the network's) or ``gt``: ``OraclePredictor`` swaps the prediction's labels
  (GT instance images with window-local shuffled ids, score 1) and/or its depth, K and camera poses (GT,
  world = view 0, metric) for ground truth; the network runs once per window (cached);
* linking: ``voxel`` (3D voxel IoU only, no split/merge decisions: the linking of before issue 16) or
  ``2d+3d`` (``pipeline/linking.py``);
* known geometry: ``none`` | ``rig`` | ``poses`` (``ReplayConfig.known_geometry``).

Reported per configuration: window instances linked to an existing map id / window instances (windows
whose map already held instances; ``MapFusion.link_stats``), the "whole replay" AP / AP50 / AP25 of
``eval.evaluate.compute_metrics`` (labels lifted with GT geometry; pooled over scenes), merges / splits /
absorbed fragments, the map's scale relative to metres (median over scenes of the map-frame distance
between two fused camera centres over the GT distance) and map ids per GT object (spread).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["OraclePredictor", "CONFIGS", "run_config", "main"]

# name: (masks, geometry, linking, known geometry)
CONFIGS = {
    "gt_gt_voxel": ("gt", "gt", "voxel", "none"),
    "gt_gt": ("gt", "gt", "2d+3d", "none"),
    "gtmask_net_voxel": ("gt", "net", "voxel", "none"),
    "gtmask_net": ("gt", "net", "2d+3d", "none"),
    "net_gtgeo_voxel": ("net", "gt", "voxel", "none"),
    "net_gtgeo": ("net", "gt", "2d+3d", "none"),
    "net_net_voxel": ("net", "net", "voxel", "none"),
    "net_net": ("net", "net", "2d+3d", "none"),
    "net_net_rig": ("net", "net", "2d+3d", "rig"),
    "net_net_poses": ("net", "net", "2d+3d", "poses"),
    "net_net_rig+poses": ("net", "net", "2d+3d", "rig+poses"),
    "net_net_poses_cond": ("net", "net", "2d+3d", "poses+conditioning"),
    "gtmask_net_rig": ("gt", "net", "2d+3d", "rig"),
    "gtmask_net_poses": ("gt", "net", "2d+3d", "poses"),
    "gtmask_net_poses_cond": ("gt", "net", "2d+3d", "poses+conditioning"),
}


def _nearest(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    import cv2

    if img.shape[:2] == tuple(hw):
        return img
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


class OraclePredictor:
    """The network's prediction with its masks and/or geometry replaced by ground truth (``gt`` from
    ``data.bags.read_ground_truth``). GT masks get window-local ids in a random order (``seed``)."""

    def __init__(self, base, gt, masks: bool, geometry: bool, seed: int = 0) -> None:
        self.base, self.gt, self.masks, self.geometry = base, gt, masks, geometry
        self.rng = np.random.default_rng(seed)

    def predict(self, window):
        from fast3dis_ros.geometry.cameras import scale_K

        p = self.base.predict(window)
        if not (self.masks or self.geometry):
            return p
        p = copy.copy(p)
        hw = tuple(p.depth.shape[1:])
        keys = list(zip(p.cameras, p.view_stamps_ns))
        if self.geometry:
            T_wc = [self.gt.T_world_cam[c][s] for c, s in keys]
            p.T_cam_world = np.stack([np.linalg.inv(T) @ T_wc[0] for T in T_wc])
            p.depth = np.stack([_nearest(self.gt.depth[c][s], hw) for c, s in keys]).astype(np.float32)
            p.depth_conf = np.ones_like(p.depth)
            p.K = np.stack([scale_K(self.gt.K[c], self.gt.depth[c][s].shape[:2], hw) for c, s in keys])
            p.depth_scale_metric = True
        if self.masks:
            inst = np.stack([_nearest(self.gt.instance[c][s], hw) for c, s in keys]).astype(np.int64)
            ids = np.unique(inst[inst > 0])
            lut = np.zeros(int(inst.max()) + 1 if inst.size else 1, np.int32)
            lut[ids] = self.rng.permutation(len(ids)).astype(np.int32) + 1
            p.labels = lut[inst]
            p.scores = np.ones(len(ids), np.float32)
        return p


def _scene_bags(seeds: list[int], root: Path, log) -> list[Path]:
    from fast3dis_ros.data.bags import write_scene_bag
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene

    out = []
    for seed in seeds:
        bag = root / f"scene_{seed}"
        if not (bag / "metadata.yaml").is_file():
            if bag.exists():
                shutil.rmtree(bag)
            t0 = time.perf_counter()
            write_scene_bag(generate_scene(SceneConfig(seed=seed)), bag)
            log(f"  scene {seed}: written in {time.perf_counter() - t0:.1f} s")
        out.append(bag)
    return out


def _ids_per_object(records, gt) -> float:
    """Mean over GT objects of the map ids that hold >= 10 % of the object's scored pixels (1 = no spread)."""
    from fast3dis_ros.eval.evaluate import select_views

    sv = select_views(records, gt)
    pairs: dict[int, dict[int, int]] = {}
    for pg, gi in zip(sv.pred_global, sv.gt_instance):
        p = _nearest(np.asarray(pg, np.int64), gi.shape[:2])
        sel = gi > 0
        code = gi[sel].astype(np.int64) * (1 << 32) + p[sel]
        u, c = np.unique(code, return_counts=True)
        for k, n in zip(u, c):
            pairs.setdefault(int(k >> 32), {}).setdefault(int(k & 0xFFFFFFFF), 0)
            pairs[int(k >> 32)][int(k & 0xFFFFFFFF)] += int(n)
    counts = []
    for g, d in pairs.items():
        tot = sum(d.values())
        counts.append(sum(1 for m, n in d.items() if m > 0 and n >= 0.1 * tot))
    return float(np.mean(counts)) if counts else float("nan")


def _map_scales(records, gt) -> list[float]:
    """Map units per metre of every window: median over its views of (depth x the window's Sim(3) scale) /
    GT depth (1 = metric map; the spread over windows is the scale drift)."""
    out = []
    for r in records:
        p, ratios = r.prediction, []
        for v, (c, s) in enumerate(zip(p.cameras, p.view_stamps_ns)):
            g = (gt.depth.get(c) or {}).get(s)
            if g is None:
                continue
            g = _nearest(g, p.depth.shape[1:])
            ok = (g > 0) & np.isfinite(g) & (p.depth[v] > 0) & np.isfinite(p.depth[v])
            if ok.sum() > 16:
                ratios.append(np.median(p.depth[v][ok] * r.fusion.scale / g[ok]))
        if ratios:
            out.append(float(np.median(ratios)))
    return out


def _map_voxel_stats(map_cloud, T_world_map: np.ndarray, gt, tol: float = 0.05) -> dict:
    """The published map cloud against GT, where the map frame is known in the GT world (GT geometry: the
    first window's view 0; known poses: the GT world itself). A map point is on the surface when some GT
    view sees it within ``tol`` m of its GT depth; it then takes that pixel's GT instance. Returns the
    on-surface fraction and, per GT object (>= 20 matched points), the map ids holding >= 10 % of its points
    (``voxel_ids_per_object``, 1 = no spread) and its share of unlabelled points."""
    xyz = np.asarray(map_cloud.xyz, np.float64)
    if not len(xyz):
        return {}
    pw = xyz @ T_world_map[:3, :3].T + T_world_map[:3, 3]
    gid = np.zeros(len(pw), np.int64)
    hit = np.zeros(len(pw), bool)
    for cam, by_stamp in gt.depth.items():
        K = gt.K[cam]
        for st, dep in by_stamp.items():
            ins = gt.instance[cam][st]
            T_cw = np.linalg.inv(gt.T_world_cam[cam][st])
            pc = pw @ T_cw[:3, :3].T + T_cw[:3, 3]
            z = pc[:, 2]
            front = (z > 1e-3) & ~hit
            u = np.round(K[0, 0] * pc[:, 0] / np.where(front, z, 1) + K[0, 2]).astype(np.int64)
            v = np.round(K[1, 1] * pc[:, 1] / np.where(front, z, 1) + K[1, 2]).astype(np.int64)
            inb = front & (u >= 0) & (u < dep.shape[1]) & (v >= 0) & (v < dep.shape[0])
            idx = np.flatnonzero(inb)
            ok = np.abs(dep[v[idx], u[idx]] - z[idx]) < tol
            idx = idx[ok]
            hit[idx] = True
            gid[idx] = ins[v[idx], u[idx]]
    inst = np.asarray(map_cloud.instance, np.int64)
    spread, unassigned = [], []
    for g in np.unique(gid[hit & (gid > 0)]):
        m = inst[hit & (gid == g)]
        if len(m) < 20:
            continue
        ids, cnt = np.unique(m, return_counts=True)
        spread.append(int(np.sum((ids > 0) & (cnt >= 0.1 * len(m)))))
        unassigned.append(float(np.mean(m == 0)))
    return {"on_surface": float(hit.mean()), "voxel_ids_per_object": float(np.mean(spread)) if spread else None,
            "object_unassigned": float(np.mean(unassigned)) if unassigned else None}


def run_config(name: str, bags: list[Path], gts: list, nets: list, log) -> dict:
    from fast3dis_ros.eval.evaluate import compute_metrics
    from fast3dis_ros.eval.metrics import InstanceAPEvaluator
    from fast3dis_ros.eval.replay import ReplayConfig, replay_bag

    masks, geometry, linking, known = CONFIGS[name]
    cond = known.endswith("+conditioning")
    cfg = ReplayConfig(known_geometry=known.replace("+conditioning", ""), pose_conditioning=cond,
                       link_2d=linking != "voxel", link_decisions=linking != "voxel")
    pool = {"fast3dis": {"whole": InstanceAPEvaluator(), "per_window": InstanceAPEvaluator()}}
    tot: dict = {}
    spread, scales, vox = [], [], []
    t0 = time.perf_counter()
    for bag, gt, net in zip(bags, gts, nets):
        pred = OraclePredictor(net, gt, masks == "gt", geometry == "gt", seed=len(tot))
        res = replay_bag(bag, pred, cfg, progress=False)
        for k, v in res.accounting["fusion"]["linking"].items():
            if isinstance(v, int):
                tot[k] = tot.get(k, 0) + v
        compute_metrics(res.records, gt, pool=pool)
        spread.append(_ids_per_object(res.records, gt))
        scales += _map_scales(res.records, gt)
        r0 = res.records[0].prediction
        if geometry == "gt":  # map = the first window's view 0 (metric)
            vox.append(_map_voxel_stats(res.final_map, gt.T_world_cam[r0.cameras[0]][r0.view_stamps_ns[0]], gt))
        elif "poses" in known and not cond:  # map = the known (GT) world
            vox.append(_map_voxel_stats(res.final_map, np.eye(4), gt))
    ap = pool["fast3dis"]["whole"].compute()
    apw = pool["fast3dis"]["per_window"].compute()
    row = {"name": name, "masks": masks, "geometry": geometry, "linking": linking, "known_geometry": known,
           **{k: tot.get(k, 0) for k in ("linked_instances", "window_instances", "linked_2d", "linked_3d",
                                         "linked_mixed", "merges", "merged_ids", "splits", "absorbed")},
           "whole_AP": ap["AP"], "whole_AP50": ap["AP50"], "whole_AP25": ap["AP25"],
           "per_window_AP50": apw["AP50"], "ids_per_gt_object": float(np.nanmean(spread)),
           "map_units_per_metre_median": float(np.median(scales)) if scales else None,
           **{k: (float(np.mean([d[k] for d in vox if d.get(k) is not None])) if any(d.get(k) is not None for d in vox)
                  else None) for k in ("on_surface", "voxel_ids_per_object", "object_unassigned")},
           "map_units_per_metre_spread": float(np.std(np.log(scales))) if len(scales) > 1 else None,
           "wall_s": time.perf_counter() - t0}
    log(f"  {name}: linked {row['linked_instances']}/{row['window_instances']}, whole AP50 "
        f"{100 * (ap['AP50'] or 0):.1f}, ids/object {row['ids_per_gt_object']:.2f}, map units/m "
        f"{row['map_units_per_metre_median']} ({row['wall_s']:.0f} s)")
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| config | masks | depth + poses | linking | known geometry | linked / window inst. | rate | "
             "whole AP | AP50 | AP25 | per-window AP50 | 2D / 3D / mixed links | merges | splits | absorbed | "
             "ids per GT object (labels / map voxels) | map points on GT surface (5 cm) | map units per m "
             "(median, log-spread over windows) |", "|" + "---|" * 18]
    for r in rows:
        rate = r["linked_instances"] / r["window_instances"] if r["window_instances"] else float("nan")
        f = lambda v: "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"  # noqa: E731
        sc = r["map_units_per_metre_median"]
        lines.append(f"| {r['name']} | {r['masks']} | {r['geometry']} | {r['linking']} | {r['known_geometry']} | "
                     f"{r['linked_instances']}/{r['window_instances']} | {100 * rate:.0f} % | {f(r['whole_AP'])} | "
                     f"{f(r['whole_AP50'])} | {f(r['whole_AP25'])} | {f(r['per_window_AP50'])} | "
                     f"{r['linked_2d']} / {r['linked_3d']} / {r['linked_mixed']} | {r['merges']} | {r['splits']} | "
                     f"{r['absorbed']} | {r['ids_per_gt_object']:.2f} / "
                     f"{'n/a' if r['voxel_ids_per_object'] is None else format(r['voxel_ids_per_object'], '.2f')} | "
                     f"{f(r['on_surface'])} | {'n/a' if sc is None else f'{sc:.2f}'} "
                     f"({'n/a' if r['map_units_per_metre_spread'] is None else format(r['map_units_per_metre_spread'], '.2f')}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fast3dis_ros.data.bags import read_ground_truth
    from fast3dis_ros.eval.heldout import parse_seeds
    from fast3dis_ros.inference.factory import PredictorSpec, build_predictor
    from fast3dis_ros.eval.oracle import CachedPredictor

    ap = argparse.ArgumentParser(prog="python -m fast3dis_ros.bench.linking", description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="7000-7007")
    ap.add_argument("--bags", default="/tmp/fast3dis_bench_linking_bags", help="scene bags (kept, reused)")
    ap.add_argument("--out", default=None, help="JSON with every row")
    ap.add_argument("--configs", default="all", help="comma separated names of CONFIGS, or all")
    args = ap.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    names = list(CONFIGS) if args.configs == "all" else [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown configs {unknown}; known: {list(CONFIGS)}", file=sys.stderr)
        return 2
    seeds = parse_seeds(args.seeds)
    root = Path(args.bags)
    root.mkdir(parents=True, exist_ok=True)
    bags = _scene_bags(seeds, root, log)
    gts = [read_ground_truth(b) for b in bags]
    base, info = build_predictor(PredictorSpec(device="cpu"))
    if info.get("random_weights"):
        print("no bundled checkpoint: refusing to benchmark random weights", file=sys.stderr)
        return 2
    nets = [CachedPredictor(base, b) for b in bags]
    rows = []
    for n in names:
        rows.append(run_config(n, bags, gts, nets, log))
        for c in nets:
            c.save()
    print(_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"seeds": seeds, "rows": rows, "argv": sys.argv[1:]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
