"""Tune fusion / linking on cached window predictions (issue 16, network masks into the map).

Why: the oracle table replays each bag per configuration and reruns fusion + scoring; the network pass
is the expensive part. This script does the network (and the oracle swap) once per validation scene,
pickles every window's prediction with the scene's GT, and then re-runs only ``MapFusion`` + the scorers
(``eval.evaluate.compute_metrics``) for each fusion variant, pooled over scenes as ``eval/oracle_table.py``
pools them.

Validation seeds only: never the held-out 7000-7007, the CI floor's 7010-7011, the independent scenes
0-1, nor the bundled checkpoint's training / validation seeds (``eval/heldout.py``)::

    python -m experiments.fusion_tuning cache --seeds 7100-7107 --out /tmp/ftune
    python -m experiments.fusion_tuning eval --cache /tmp/ftune --variants base,strict ...
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {"net": (), "gtgeo": ("depth", "poses"), "allgt": ("masks", "depth", "poses")}
FORBIDDEN = set(range(7000, 7008)) | {7010, 7011}


def cache(args) -> None:
    from fast3dis_ros.data.bags import read_ground_truth, write_scene_bag
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene
    from fast3dis_ros.eval.heldout import BUNDLED_TRAIN_SEEDS, BUNDLED_VAL_SEEDS, parse_seeds
    from fast3dis_ros.eval.oracle import CachedPredictor, OraclePredictor
    from fast3dis_ros.eval.replay import ReplayConfig, replay_bag
    from fast3dis_ros.inference.factory import PredictorSpec, build_predictor

    seeds = parse_seeds(args.seeds)
    bad = [s for s in seeds if s in FORBIDDEN or s in BUNDLED_TRAIN_SEEDS or s in BUNDLED_VAL_SEEDS]
    if bad:
        sys.exit(f"seeds {bad} are held out or were used in training: not for tuning")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    predictor, _ = build_predictor(PredictorSpec(device="cpu"))
    tmp = Path(tempfile.mkdtemp(prefix="ftune_"))
    try:
        for seed in seeds:
            t0 = time.perf_counter()
            bag = tmp / f"s{seed}"
            write_scene_bag(generate_scene(SceneConfig(n_cameras=3, n_frames=args.frames, seed=seed)), bag)
            gt = read_ground_truth(bag)
            cached = CachedPredictor(predictor)
            preds = {}
            for name, parts in CONFIGS.items():
                res = replay_bag(bag, OraclePredictor(cached, gt, parts, 0), ReplayConfig(), out_bag=None,
                                 progress=False)
                preds[name] = [r.prediction for r in res.records]
            gt.__dict__.pop("_map_surface_cache", None)
            (out / f"s{seed}.pkl").write_bytes(pickle.dumps({"seed": seed, "gt": gt, "preds": preds}))
            shutil.rmtree(bag, ignore_errors=True)
            print(f"seed {seed}: {len(preds['net'])} windows ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fuse(preds, fusion_kw: dict):
    """Records of one replay: ``MapFusion`` (replay defaults + ``fusion_kw``) over the cached predictions."""
    from fast3dis_ros.eval.replay import ReplayConfig, WindowRecord
    from fast3dis_ros.pipeline.fusion import MapFusion

    cfg = ReplayConfig()
    kw = dict(voxel_size=cfg.voxel_size, max_points=cfg.max_map_points, min_score=cfg.score_threshold,
              conf_threshold=cfg.conf_threshold, map_frame=cfg.map_frame, workers=1)
    kw.update(fusion_kw)
    f = MapFusion(**kw)
    return [WindowRecord(p.window_index, p, f.integrate(p), 0.0, 0.0) for p in preds]


def lean_metrics(records, gt, pools: dict) -> dict:
    """The two figures tuned here, as ``compute_metrics`` computes them (same functions), without the
    per-window / 2D / depth / pose scores and the map checkpoints: lifted AP (into ``pools['whole']``) and
    the final map cloud (into ``pools['map_cloud']``); returns the map's instance errors."""
    from fast3dis_ros.eval.evaluate import _ap3d, _dense, _global_scores, select_views
    from fast3dis_ros.eval.map_metrics import _view_keys, fit_map_sim3, gt_surface, score_map_cloud

    sv = select_views(records, gt)
    glab, gsc = _dense(sv.pred_global, _global_scores(records))
    _ap3d(sv, glab, gsc, [list(range(len(sv)))], 0.05, pool=pools["whole"])
    fit = fit_map_sim3(records, gt)
    surface = gt_surface(gt, list(_view_keys(records)), 0.05)
    final = records[-1].fusion
    return score_map_cloud(final.map_cloud, surface, fit["sim3"], instances=final.instances,
                           ap=pools["map_cloud"])["instances"]


def evaluate(scenes, fusion_kw: dict, configs) -> dict:
    from fast3dis_ros.eval.metrics import InstanceAPEvaluator

    out = {}
    for name in configs:
        pools = {k: InstanceAPEvaluator() for k in ("whole", "map_cloud")}
        inst = {"splits": 0, "merges": 0, "map_ids": 0}
        for sc in scenes:
            mi = lean_metrics(fuse(sc["preds"][name], fusion_kw), sc["gt"], pools)  # GT surface cached on gt
            for k in inst:
                inst[k] += mi[k]
        out[name] = {"lifted_AP50": pools["whole"].compute()["AP50"], "map_AP50": pools["map_cloud"].compute()["AP50"],
                     "map_AP": pools["map_cloud"].compute()["AP"], **inst}
    return out


def parse_kw(spec: str) -> dict:
    """``a=1,b=x`` -> {"a": 1, "b": "x"} (numbers and true/false parsed); ``link.x=..`` -> LinkParams."""
    from fast3dis_ros.pipeline.linking import LinkParams

    kw, link = {}, {}
    for part in filter(None, spec.split(",")):
        k, v = part.split("=")
        val: object = v
        if v.lower() in ("true", "false"):
            val = v.lower() == "true"
        else:
            try:
                val = float(v) if "." in v or "e" in v else int(v)
            except ValueError:
                pass
        if k.startswith("link."):
            link[k[5:]] = val
        else:
            kw[k] = val
    if link:
        kw["link"] = LinkParams(**link)
    return kw


def run_eval(args) -> None:
    scenes = [pickle.loads(p.read_bytes()) for p in sorted(Path(args.cache).glob("s*.pkl"))]
    configs = args.configs.split(",")
    rows = []
    for spec in args.variants:
        t0 = time.perf_counter()
        r = evaluate(scenes, parse_kw(spec), configs)
        rows.append({"variant": spec or "default", **r})
        cells = "  ".join(f"{c}: lifted {100 * v['lifted_AP50']:.1f} map {100 * v['map_AP50']:.1f} "
                          f"(AP {100 * v['map_AP']:.1f}) s/m/ids {v['splits']}/{v['merges']}/{v['map_ids']}"
                          for c, v in r.items())
        print(f"{spec or 'default':40s} {cells}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.fusion_tuning")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--seeds", required=True)
    c.add_argument("--frames", type=int, default=8)
    c.add_argument("--out", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--cache", required=True)
    e.add_argument("--configs", default="gtgeo,net")
    e.add_argument("--json", default=None)
    e.add_argument("variants", nargs="*", default=[""])
    args = ap.parse_args(argv)
    cache(args) if args.cmd == "cache" else run_eval(args)


if __name__ == "__main__":
    main()
