"""Held-out evaluation: FAST3DIS vs the HDBSCAN baseline on synthetic scenes never used in training.

Usage::

    python -m fast3dis_ros.eval.heldout --seeds 7000-7007 --out docs/training/heldout
        [--tune-seeds 7100-7102 | --no-sweep] [--cameras 3 --frames 8 --width 224 --height 168]
        [--checkpoint DIR] [--device cpu] [--window-size 4 --stride 2]
        [--sweep-min-cluster-frac 0.001,0.002,0.004,0.01 --sweep-w-feat 0,1
         --sweep-min-samples 10]
        [--hdbscan-min-cluster-frac F --hdbscan-w-feat W ...]   # fixed baseline settings (skips the sweep)

What it does
------------
For every seed, a synthetic scene (``data.synthetic.generate_scene``, the demo's rig and size by default)
is written as a rosbag2 (mcap) with ground truth (``data.bags.write_scene_bag``) and replayed through the
same pipeline as ``fast3dis-eval`` (``eval.replay.replay_bag``: synchronous ``PipelineRunner`` + fusion),
then scored by ``eval.evaluate.compute_metrics`` with the HDBSCAN baseline on the same windows (same
forward: FAST3DIS depth + cameras + pixel-decoder mask features).

**Pooling** (ScanNet style): the 3D instance AP is not averaged over scenes; every scene's common point
sets are added to one ``InstanceAPEvaluator`` per method and protocol, and AP / AP50 / AP25 are computed
once over the pooled matches. Two protocols:

* ``per_window``: every window is its own scene with window-local ids. This is the fair comparison with
  HDBSCAN, which clusters each window independently and has no ids across windows.
* ``whole`` ("lifted"): every replay (bag) is one scene; each view's labels lifted with GT depth and poses;
  FAST3DIS uses its tracked map ids, HDBSCAN its per-window clusters made unique per window (so it is
  penalised for not tracking; reported for completeness). The published map cloud itself is scored by
  ``python -m fast3dis_ros.eval.oracle_table`` (eval/map_metrics.py).

2D mask AP, depth AbsRel / delta1 and pose AUC are means over scenes of the per-scene values.

Baseline tuning: unless ``--no-sweep`` or explicit ``--hdbscan-*`` settings are given, a small grid of
HDBSCAN settings (``min_cluster_size`` as a fraction of the clustered subsample x feature weight, 0 =
xyz only) is scored on separate tuning seeds (``--tune-seeds``, disjoint from ``--seeds``); the best
pooled per-window AP50 (ties: AP) is then evaluated on the test seeds. The network runs once per tuning
scene; only the clustering is repeated per setting.

Writes into ``--out``: ``heldout.json`` (everything, incl. per-scene results, the sweep and the command
line), ``heldout.md`` (tables + command), and through ``eval.report.write_report``: ``metrics.json``,
``report.md``, ``ap_bars.png`` (bar chart of AP/AP50/AP25 per method and protocol), ``pr_iou50.png``,
``pr_iou25.png``. The scene bags go to a temporary folder unless ``--bags DIR`` is given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["parse_seeds", "run_heldout", "main", "BUNDLED_TRAIN_SEEDS", "BUNDLED_VAL_SEEDS"]

# seeds the bundled checkpoint saw (scripts/train_bundled.sh: --synthetic 512 --scene-seed 1000,
# --val-seeds 900000-900015)
BUNDLED_TRAIN_SEEDS = range(1000, 1512)
BUNDLED_VAL_SEEDS = range(900000, 900016)

_AP_KEYS = ("AP", "AP50", "AP25")


def parse_seeds(spec: str) -> list[int]:
    """``"7000-7007"`` / ``"7000,7002"`` / ``"7000-7002,7010"`` -> sorted unique ints (ranges inclusive)."""
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            i = part.index("-", 1)
            a, b = int(part[:i]), int(part[i + 1:])
            if b < a:
                raise ValueError(f"bad seed range {part!r}")
            out.extend(range(a, b + 1))
        else:
            out.append(int(part))
    if not out:
        raise ValueError(f"no seeds in {spec!r}")
    return sorted(set(out))


def _floats(spec: str) -> list[float]:
    return [float(x) for x in str(spec).split(",") if x.strip()]


def _parse(argv):
    from fast3dis_ros.eval.evaluate import add_baseline_args

    ap = argparse.ArgumentParser(prog="python -m fast3dis_ros.eval.heldout", description=(
        "FAST3DIS vs HDBSCAN on held-out synthetic scenes: generate bags with GT, replay them through the "
        "pipeline, pool the 3D instance AP over scenes (per window and lifted with GT geometry)."))
    ap.add_argument("--seeds", default="7000-7007", help="test scene seeds, e.g. 7000-7007")
    ap.add_argument("--tune-seeds", default="7100-7102", help="baseline tuning seeds (disjoint from --seeds)")
    ap.add_argument("--no-sweep", action="store_true", help="no baseline sweep (defaults or --hdbscan-*)")
    ap.add_argument("--sweep-min-cluster-frac", default="0.001,0.002,0.004,0.01",
                    help="sweep: min_cluster_size as fractions of the clustered subsample")
    ap.add_argument("--sweep-w-feat", default="0,1", help="sweep: feature weights (0 = xyz only)")
    ap.add_argument("--sweep-min-samples", default="10", help="sweep: HDBSCAN min_samples values")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--bags", default=None, help="keep the generated scene bags here (default: temporary)")
    ap.add_argument("--checkpoint", default=None, help="FAST3DIS checkpoint folder (default: bundled tiny)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--cameras", type=int, default=3, help="cameras in the synthetic rig")
    ap.add_argument("--frames", type=int, default=8, help="frame sets per scene")
    ap.add_argument("--width", type=int, default=224)
    ap.add_argument("--height", type=int, default=168)
    ap.add_argument("--objects", type=int, default=14, help="instances per scene")
    ap.add_argument("--window-size", type=int, default=4, help="frame sets per window")
    ap.add_argument("--stride", type=int, default=2, help="new window every N frame sets")
    ap.add_argument("--score-threshold", type=float, default=None,
                    help="instance score threshold (predictor and fusion; default: the checkpoint's)")
    ap.add_argument("--eval-voxel", type=float, default=0.05, help="voxel of the GT common point set (m)")
    add_baseline_args(ap)
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def _pools(methods=("fast3dis", "hdbscan")) -> dict:
    from fast3dis_ros.eval.metrics import InstanceAPEvaluator

    return {m: {"whole": InstanceAPEvaluator(), "per_window": InstanceAPEvaluator()} for m in methods}


def _ap_summary(res: dict) -> dict:
    return {**{k: res[k] for k in _AP_KEYS}, "n_gt": res["n_gt"], "n_pred": res["n_pred"],
            "n_scenes": res["n_scenes"], "ap_per_threshold": res["ap_per_threshold"]}


def _nanmean(vals) -> float:
    v = np.array([np.nan if x is None else float(x) for x in vals], np.float64)
    return float(np.nanmean(v)) if np.any(np.isfinite(v)) else float("nan")


class _Scenes:
    """Generates scene bags and replays them (network once per scene)."""

    def __init__(self, args, predictor, bag_root: Path, progress: bool):
        self.args, self.predictor, self.bag_root, self.progress = args, predictor, bag_root, progress

    def replay(self, seed: int):
        from fast3dis_ros.data.bags import read_ground_truth, write_scene_bag
        from fast3dis_ros.data.synthetic import SceneConfig, generate_scene
        from fast3dis_ros.eval.replay import ReplayConfig, replay_bag

        a = self.args
        t0 = time.perf_counter()
        scene = generate_scene(SceneConfig(n_cameras=a.cameras, n_frames=a.frames, width=a.width, height=a.height,
                                           n_objects=a.objects, seed=seed))
        bag = self.bag_root / f"scene_{seed}"
        if bag.exists():
            shutil.rmtree(bag)
        write_scene_bag(scene, bag)
        t_gen = time.perf_counter() - t0
        cfg = ReplayConfig(window_size=a.window_size, stride=a.stride)
        if a.score_threshold is not None:
            cfg.score_threshold = a.score_threshold
        t0 = time.perf_counter()
        res = replay_bag(bag, self.predictor, cfg, out_bag=None, progress=False)
        gt = read_ground_truth(bag)
        return res, gt, {"generate_s": t_gen, "replay_s": time.perf_counter() - t0, "bag": str(bag),
                         "n_gt_instances": len(scene.instances)}


def _sweep(scenes: _Scenes, seeds: list[int], grid: list[dict], eval_voxel: float, log) -> dict:
    from fast3dis_ros.eval.evaluate import baseline_metrics, compute_metrics

    pools = [_pools(("hdbscan",))["hdbscan"] for _ in grid]
    fpool = _pools(("fast3dis",))
    t0 = time.perf_counter()
    for si, seed in enumerate(seeds):
        res, gt, info = scenes.replay(seed)
        _m, _c, sv, _b = compute_metrics(res.records, gt, eval_voxel=eval_voxel, pool=fpool)
        msg = []
        for params, pool in zip(grid, pools):
            m, _cur, _out = baseline_metrics(res.records, sv, eval_voxel=eval_voxel, params=params, pool=pool, gt=gt)
            msg.append(f"{100 * (m['AP_per_window']['AP50'] or 0):.1f}")
        log(f"  tune scene {si + 1}/{len(seeds)} seed {seed}: {len(res.records)} windows, per-window AP50 per "
            f"setting [{', '.join(msg)}] ({time.perf_counter() - t0:.0f} s)")
    rows = []
    for params, pool in zip(grid, pools):
        rows.append({"params": params, "per_window": _ap_summary(pool["per_window"].compute()),
                     "whole": _ap_summary(pool["whole"].compute())})

    def key(r):
        pw = r["per_window"]
        return (np.nan_to_num(pw["AP50"], nan=-1.0), np.nan_to_num(pw["AP"], nan=-1.0))

    best = max(range(len(rows)), key=lambda i: key(rows[i]))
    return {"seeds": seeds, "criterion": "pooled per-window AP50 on the tuning seeds (ties: AP)",
            "rows": rows, "best_index": best, "best_params": rows[best]["params"],
            "fast3dis_on_tuning_seeds": {k: _ap_summary(v.compute()) for k, v in fpool["fast3dis"].items()},
            "wall_s": time.perf_counter() - t0}


def _scene_row(seed: int, metrics: dict, info: dict, balanced: bool) -> dict:
    row = {"seed": seed, "balanced": balanced, **{k: v for k, v in info.items() if k != "bag"}}
    for m, d in metrics["methods"].items():
        row[m] = {"whole": {k: d[k] for k in (*_AP_KEYS, "n_gt", "n_pred")},
                  "per_window": dict(d["AP_per_window"]),
                  "mask2d_AP": d["mask2d"].get("AP"),
                  "depth": {k: d["depth"].get(k) for k in ("abs_rel", "delta1")},
                  "pose": {k: d["pose"].get(k) for k in ("auc3", "auc30")},
                  "ms_per_window": d["timing"].get("ms_per_window_mean")}
        if m == "hdbscan":
            row[m]["cluster_ms_per_window"] = d["timing"].get("cluster_ms_mean")
    row["scored_views"] = metrics["meta"].get("scored_views")
    return row


def _load(la) -> str:
    return "n/a" if la is None else "/".join(f"{x:.1f}" for x in la)


def _fmt(v, pct=True) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def _table_lines(results: dict) -> list[str]:
    lines = ["| method | protocol | AP | AP50 | AP25 | GT inst. | pred. | 2D mask AP | AbsRel | delta1 | AUC@3 | "
             "AUC@30 | ms/window |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for proto, name in (("per_window", "per window (fair)"), ("whole", "lifted, GT geometry (1 scene per bag)")):
        for m, d in results["pooled"].items():
            ap = d[proto]
            lines.append(f"| {m} | {name} | {_fmt(ap['AP'])} | {_fmt(ap['AP50'])} | {_fmt(ap['AP25'])} | "
                         f"{ap['n_gt']} | {ap['n_pred']} | {_fmt(d['mask2d_AP_mean'])} | "
                         f"{_fmt(d['depth_abs_rel_mean'], False)} | {_fmt(d['depth_delta1_mean'])} | "
                         f"{_fmt(d['pose_auc3_mean'])} | {_fmt(d['pose_auc30_mean'])} | "
                         f"{d['ms_per_window_mean']:.0f} |")
    return lines


def _sweep_lines(sweep: dict) -> list[str]:
    lines = ["| min_cluster_frac | w_feat | min_samples | per-window AP | AP50 | AP25 | lifted AP50 | pred. (per window) "
             "| chosen |", "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(sweep["rows"]):
        p, pw = r["params"], r["per_window"]
        lines.append(f"| {p.get('min_cluster_frac', 'default')} | {p.get('w_feat', 1.0)} | {p.get('min_samples', 10)} | "
                     f"{_fmt(pw['AP'])} | "
                     f"{_fmt(pw['AP50'])} | {_fmt(pw['AP25'])} | {_fmt(r['whole']['AP50'])} | {pw['n_pred']} | "
                     f"{'**yes**' if i == sweep['best_index'] else ''} |")
    return lines


def print_table(results: dict, file=None) -> None:
    file = sys.stdout if file is None else file
    hdr = f"{'method':<9} {'protocol':<11} {'AP':>6} {'AP50':>6} {'AP25':>6} {'GT':>5} {'pred':>5} {'2D AP':>6} " \
          f"{'AbsRel':>7} {'d1':>6} {'AUC@30':>6} {'ms/win':>7}"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for proto in ("per_window", "whole"):
        for m, d in results["pooled"].items():
            ap = d[proto]
            print(f"{m:<9} {proto:<11} {_fmt(ap['AP']):>6} {_fmt(ap['AP50']):>6} {_fmt(ap['AP25']):>6} "
                  f"{ap['n_gt']:>5} {ap['n_pred']:>5} {_fmt(d['mask2d_AP_mean']):>6} "
                  f"{_fmt(d['depth_abs_rel_mean'], False):>7} {_fmt(d['depth_delta1_mean']):>6} "
                  f"{_fmt(d['pose_auc30_mean']):>6} {d['ms_per_window_mean']:7.0f}", file=file)


def run_heldout(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    command = "python -m fast3dis_ros.eval.heldout " + shlex.join(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    progress = not args.no_progress

    def log(msg):
        print(msg, flush=True)

    import torch

    if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from fast3dis_ros.eval.evaluate import baseline_params_from_args, compute_metrics
    from fast3dis_ros.inference.factory import BUNDLED, PredictorSpec, build_predictor
    from fast3dis_ros.eval.report import to_jsonable, write_report

    seeds = parse_seeds(args.seeds)
    tune_seeds = [] if args.no_sweep else parse_seeds(args.tune_seeds)
    fixed = baseline_params_from_args(args)
    if fixed:
        tune_seeds = []
    overlap = sorted(set(seeds) & set(tune_seeds))
    if overlap:
        raise SystemExit(f"heldout: error: tuning seeds overlap the test seeds: {overlap}")
    warnings_ = []
    if args.checkpoint is None:
        seen = sorted(s for s in set(seeds) | set(tune_seeds) if s in BUNDLED_TRAIN_SEEDS or s in BUNDLED_VAL_SEEDS)
        if seen:
            warnings_.append(f"seeds {seen} were used to train/validate the bundled checkpoint: not held out")
            print(f"WARNING: {warnings_[-1]}", file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    predictor, winfo = build_predictor(PredictorSpec(
        checkpoint=args.checkpoint or BUNDLED, device=args.device, score_threshold=args.score_threshold,
        keep_mask_features=True))
    log(f"model: {winfo['weights']} ({winfo.get('checkpoint')}), device {args.device}")

    tmp = None
    if args.bags:
        bag_root = Path(args.bags)
        bag_root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="fast3dis_heldout_")
        bag_root = Path(tmp)
    scenes = _Scenes(args, predictor, bag_root, progress)
    try:
        # ---- baseline tuning on separate seeds
        sweep = None
        if tune_seeds:
            grid = [{"min_cluster_frac": f, "w_feat": w, "min_samples": int(ms)} for f, w, ms in
                    itertools.product(_floats(args.sweep_min_cluster_frac), _floats(args.sweep_w_feat),
                                      _floats(args.sweep_min_samples))]
            log(f"HDBSCAN sweep: {len(grid)} settings on tuning seeds {args.tune_seeds} ({len(tune_seeds)} scenes)")
            sweep = _sweep(scenes, tune_seeds, grid, args.eval_voxel, log)
            base_params = dict(sweep["best_params"])
            log(f"  chosen: {base_params} (pooled per-window AP50 "
                f"{_fmt(sweep['rows'][sweep['best_index']]['per_window']['AP50'])})")
            print("\n".join(_sweep_lines(sweep)))
        else:
            base_params = fixed
            log(f"HDBSCAN settings: {base_params or 'defaults'} (no sweep)")

        # ---- held-out test scenes
        pools = _pools()
        rows, curves_src = [], {}
        log(f"test scenes: seeds {args.seeds} ({len(seeds)} scenes)")
        t_test = time.perf_counter()
        for si, seed in enumerate(seeds):
            res, gt, info = scenes.replay(seed)
            metrics, _curves, sv, _b = compute_metrics(res.records, gt, eval_voxel=args.eval_voxel, baseline="hdbscan",
                                                       baseline_params=base_params, pool=pools)
            if not metrics["methods"]:
                log(f"  scene {seed}: no view matched ground truth (skipped)")
                continue
            row = _scene_row(seed, metrics, info, bool(res.accounting["balanced"]))
            row["windows"] = len(res.records)
            rows.append(row)
            f, h = row["fast3dis"], row["hdbscan"]
            el = time.perf_counter() - t_test
            log(f"  scene {si + 1}/{len(seeds)} seed {seed}: {row['windows']} windows, per-window AP50 "
                f"fast3dis {_fmt(f['per_window']['AP50'])} / hdbscan {_fmt(h['per_window']['AP50'])}, lifted AP50 "
                f"{_fmt(f['whole']['AP50'])} / {_fmt(h['whole']['AP50'])}; gen {info['generate_s']:.1f} s, "
                f"replay {info['replay_s']:.1f} s; elapsed {el:.0f} s, ETA {el / (si + 1) * (len(seeds) - si - 1):.0f} s")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    pooled, curves = {}, {}
    for m, pv in pools.items():
        whole, pw = pv["whole"].compute(), pv["per_window"].compute()
        curves[m] = whole["curves"]
        curves[m + "_per_window"] = pw["curves"]
        pooled[m] = {
            "whole": _ap_summary(whole), "per_window": _ap_summary(pw),
            "mask2d_AP_mean": _nanmean(r[m]["mask2d_AP"] for r in rows),
            "depth_abs_rel_mean": _nanmean(r[m]["depth"]["abs_rel"] for r in rows),
            "depth_delta1_mean": _nanmean(r[m]["depth"]["delta1"] for r in rows),
            "pose_auc3_mean": _nanmean(r[m]["pose"]["auc3"] for r in rows),
            "pose_auc30_mean": _nanmean(r[m]["pose"]["auc30"] for r in rows),
            "ms_per_window_mean": _nanmean(r[m]["ms_per_window"] for r in rows),
        }
    pooled["hdbscan"]["params"] = base_params
    pooled["hdbscan"]["cluster_ms_per_window_mean"] = _nanmean(r["hdbscan"]["cluster_ms_per_window"] for r in rows)
    wall = time.perf_counter() - t_start
    f50, h50 = pooled["fast3dis"]["per_window"]["AP50"], pooled["hdbscan"]["per_window"]["AP50"]
    results = {
        "command": command, "argv": argv,
        "test_seeds": seeds, "tune_seeds": tune_seeds,
        "config": {"cameras": args.cameras, "frames": args.frames, "width": args.width, "height": args.height,
                   "objects": args.objects, "window_size": args.window_size, "stride": args.stride,
                   "score_threshold": args.score_threshold, "eval_voxel_m": args.eval_voxel, "device": args.device},
        "weights": {k: winfo.get(k) for k in ("weights", "checkpoint", "random_weights")},
        "pooling": "ScanNet: one InstanceAPEvaluator per method and protocol over all scenes (per_window: each "
                   "window is a scene; whole: each replay is a scene, map ids); 2D AP, depth, pose: mean over scenes",
        "pooled": pooled,
        "fast3dis_beats_hdbscan_ap50_per_window": bool(np.nan_to_num(f50, nan=-1) > np.nan_to_num(h50, nan=-1)),
        "sweep": sweep,
        "per_scene": rows,
        "warnings": warnings_,
        "runtime_s": wall,
        "host": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                 "load_avg_1_5_15_start": load_start,
                 "load_avg_1_5_15_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    (out / "heldout.json").write_text(json.dumps(to_jsonable(results), indent=2, allow_nan=False))

    # bar chart / PR curves / report through eval.report
    rep_methods, rep_curves = {}, {}
    for m in pooled:
        for proto, tag in (("per_window", "per-window"), ("whole", "whole")):
            name = f"{m} {tag}"
            rep_methods[name] = {**{k: pooled[m][proto][k] for k in _AP_KEYS},
                                 "mask2d": {"AP": pooled[m]["mask2d_AP_mean"]},
                                 "depth": {"abs_rel": pooled[m]["depth_abs_rel_mean"],
                                           "delta1": pooled[m]["depth_delta1_mean"]},
                                 "pose": {"auc3": pooled[m]["pose_auc3_mean"], "auc30": pooled[m]["pose_auc30_mean"]}}
            rep_curves[name] = {"pr": curves[m if proto == "whole" else m + "_per_window"]}
    files = write_report({"methods": rep_methods, "meta": {"test_seeds": args.seeds, "command": command,
                                                          "hdbscan_params": base_params}},
                         out, curves=rep_curves, title=f"Held-out synthetic scenes (seeds {args.seeds})")

    md = [f"# FAST3DIS vs HDBSCAN on held-out synthetic scenes (seeds {args.seeds})", "",
          "Command:", "", "```", command, "```", "",
          f"- model: {winfo['weights']} `{winfo.get('checkpoint')}`; device {args.device}",
          f"- scenes: {len(rows)} ({args.cameras} cameras x {args.frames} frame sets, {args.width}x{args.height}, "
          f"{args.objects} objects), windows of {args.window_size} frame sets every {args.stride}",
          f"- HDBSCAN settings: `{json.dumps(base_params)}` "
          + (f"(chosen on tuning seeds {args.tune_seeds})" if sweep else "(fixed)"),
          f"- pooling: {results['pooling']}",
          f"- runtime: {wall:.0f} s on {os.cpu_count()} CPU cores (load average 1/5/15 min at start "
          f"{_load(results['host']['load_avg_1_5_15_start'])}, at end {_load(results['host']['load_avg_1_5_15_end'])}; "
          "ms/window and runtime depend on other jobs on the host, the AP figures do not)", "",
          "## Pooled results (%)", "", *_table_lines(results), "",
          "`per window` is the fair comparison (HDBSCAN has no ids across windows); `lifted` scores the "
          "tracked map ids of FAST3DIS (lifted with GT depth and poses) against HDBSCAN's per-window clusters.", ""]
    if sweep:
        md += [f"## HDBSCAN sweep on tuning seeds {args.tune_seeds} (pooled, %)", "",
               f"Criterion: {sweep['criterion']}. FAST3DIS on the same tuning scenes: per-window AP50 "
               f"{_fmt(sweep['fast3dis_on_tuning_seeds']['per_window']['AP50'])}, lifted AP50 "
               f"{_fmt(sweep['fast3dis_on_tuning_seeds']['whole']['AP50'])}.", "", *_sweep_lines(sweep), ""]
    md += ["## Per scene (AP50 %, per window / lifted)", "",
           "| seed | windows | GT inst. | FAST3DIS per-window | HDBSCAN per-window | FAST3DIS lifted | HDBSCAN lifted |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['seed']} | {r['windows']} | {r['fast3dis']['whole']['n_gt']} | "
                  f"{_fmt(r['fast3dis']['per_window']['AP50'])} | {_fmt(r['hdbscan']['per_window']['AP50'])} | "
                  f"{_fmt(r['fast3dis']['whole']['AP50'])} | {_fmt(r['hdbscan']['whole']['AP50'])} |")
    md += ["", "![AP bars](ap_bars.png)", ""]
    for w in warnings_:
        md.insert(2, f"**WARNING: {w}**\n")
    (out / "heldout.md").write_text("\n".join(md) + "\n")

    print()
    print_table(results)
    print(f"\nFAST3DIS beats HDBSCAN on per-window AP50: {results['fast3dis_beats_hdbscan_ap50_per_window']}")
    print(f"wall time {wall:.0f} s")
    print(f"command: {command}")
    print("outputs:")
    for p in [out / "heldout.json", out / "heldout.md", *files]:
        print(f"  {Path(p).resolve()}")
    results["paths"] = [str(out / "heldout.json"), str(out / "heldout.md"), *files]
    return results


def main(argv: list[str] | None = None) -> None:
    from fast3dis_ros.data.bags import BagReadError

    try:
        run_heldout(argv)
    except (BagReadError, FileNotFoundError, ValueError) as e:
        print(f"heldout: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
