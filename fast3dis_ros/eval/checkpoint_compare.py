"""Old vs new checkpoint on held-out synthetic scenes: the figures that decide whether to bundle (issue 22).

Usage::

    python -m fast3dis_ros.eval.checkpoint_compare --out DIR \\
        --checkpoint old=fast3dis_ros/assets/fast3dis_tiny --checkpoint new=PATH/bundled \\
        [--seeds 7000-7007] [--rig-variety] [--device cpu] [--cameras 3 --frames 8 --width 224 --height 168]
        [--reuse PREVIOUS/compare.json]   # its columns join the table without replaying them again

Every seed's scene is generated and written as a rosbag2 once (``data.bags.write_scene_bag``, the demo's
rig by default, ``--rig-variety`` for randomised wide-yaw rigs with per-camera K); each checkpoint replays
it through the product path (``eval.replay.replay_bag``) and is scored by ``eval.evaluate.compute_metrics``
(the same code as ``fast3dis-eval`` and ``eval.heldout``), plus the in-window geometry error below.
One table, one column per checkpoint:

* **in-window point error** (m): per window, every view's pixels (every 4th row/column with GT depth) are
  lifted with the *predicted* depth, K and camera poses into the window's frame and with the GT ones into the
  world; one Sim(3) (Umeyama, all views of the window together) maps the prediction onto GT; the window's
  figure is the median residual. Reported: median over windows. This is what fusion inherits from one
  window: depth and relative poses together, the global scale and frame factored out.
* **camera centre error** (m): the same Sim(3) applied to the predicted camera centres, median over views.
* relative rotation error (deg, mean over view pairs) and pose AUC@30 from ``compute_metrics``;
* **per-window AP50 / AP** (%): pooled ScanNet AP, each window a scene with window-local ids
  (``eval.heldout``'s fair protocol); **2D mask AP** (%): mean over scenes;
* whole-replay AP50 (%): tracked map ids, labels lifted with GT geometry (the existing replay metric).

Writes ``compare.json`` (everything, per scene too) and ``compare.md`` (the table + command) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["window_geometry_errors", "lift_view", "run_compare", "main"]

_STEP_PX = 4  # pixel subsampling of the in-window geometry error


@dataclass
class GeometryError:
    """One window's Sim(3)-aligned errors (metres)."""

    point_median: float
    centre_median: float
    scale: float
    n_points: int


def lift_view(depth: np.ndarray, K: np.ndarray, T_world_cam: np.ndarray, step: int = _STEP_PX) -> tuple[np.ndarray, np.ndarray]:
    """(pixel mask on the ``step`` grid where depth > 0 and finite, (N,3) world points of those pixels)."""
    H, W = depth.shape
    vv, uu = np.mgrid[0:H:step, 0:W:step]
    d = depth[vv, uu].astype(np.float64)
    ok = np.isfinite(d) & (d > 0)
    pix = np.stack([uu[ok], vv[ok], np.ones(int(ok.sum()))], 0).astype(np.float64)
    X = (np.linalg.inv(K) @ pix) * d[ok]
    Xw = (T_world_cam[:3, :3] @ X).T + T_world_cam[:3, 3]
    return ok, Xw


def _scaled_K(K: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """K of an image resized from ``src_hw`` to ``dst_hw`` (pixel-centre convention)."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    K = np.asarray(K, np.float64).copy()
    K[0, :] *= sx
    K[1, :] *= sy
    K[0, 2] += 0.5 * sx - 0.5
    K[1, 2] += 0.5 * sy - 0.5
    return K


def window_geometry_errors(pred, gt) -> GeometryError | None:
    """Sim(3)-aligned point and camera-centre error of one ``WindowPrediction`` against ``GroundTruth``.

    None when fewer than 100 pixels have both GT and predicted depth (nothing to align)."""
    from fast3dis_ros.geometry.align import umeyama
    from .evaluate import _gt_pose
    from .metrics import resize_nearest

    src, dst, c_pred, c_gt = [], [], [], []
    for v, (cam, st) in enumerate(zip(pred.cameras, pred.view_stamps_ns)):
        g_depth = (gt.depth.get(cam) or {}).get(int(st))
        g_K = gt.K.get(cam)
        g_T = _gt_pose(gt, cam, int(st))
        if g_depth is None or g_K is None or g_T is None:
            continue
        g_depth = np.asarray(g_depth, np.float32)
        HW = g_depth.shape
        p_depth = resize_nearest(np.asarray(pred.depth[v], np.float32), *HW)
        p_K = _scaled_K(pred.K[v], pred.depth[v].shape, HW)
        p_T = np.linalg.inv(np.asarray(pred.T_cam_world[v], np.float64))
        both = np.where(np.isfinite(g_depth) & (g_depth > 0), p_depth, 0.0)
        ok_p, Xp = lift_view(both, p_K, p_T)
        g_masked = np.where(both > 0, g_depth, 0.0)
        ok_g, Xg = lift_view(g_masked, np.asarray(g_K, np.float64), np.asarray(g_T, np.float64))
        if not np.array_equal(ok_p, ok_g):  # same pixels by construction; guard against NaN depth
            keep = ok_p & ok_g
            Xp = Xp[keep[ok_p]]
            Xg = Xg[keep[ok_g]]
        src.append(Xp)
        dst.append(Xg)
        c_pred.append(p_T[:3, 3])
        c_gt.append(np.asarray(g_T, np.float64)[:3, 3])
    if not src:
        return None
    P, G = np.concatenate(src), np.concatenate(dst)
    if len(P) < 100:
        return None
    s, R, t = umeyama(P, G, with_scale=True)
    res = np.linalg.norm(s * P @ R.T + t - G, axis=1)
    cen = np.linalg.norm(s * np.stack(c_pred) @ R.T + t - np.stack(c_gt), axis=1)
    return GeometryError(point_median=float(np.median(res)), centre_median=float(np.median(cen)), scale=float(s),
                         n_points=int(len(P)))


def _parse(argv):
    from .heldout import parse_seeds  # noqa: F401  (validated below)

    ap = argparse.ArgumentParser(prog="python -m fast3dis_ros.eval.checkpoint_compare",
                                 description="Old vs new FAST3DIS checkpoint on held-out synthetic scenes: in-window "
                                             "geometry error, per-window AP50, 2D mask AP, replay AP (one table).")
    ap.add_argument("--reuse", default=None, metavar="COMPARE_JSON",
                    help="columns of an earlier run (same seeds and settings; checked) to show without rescoring")
    ap.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR",
                    help="a checkpoint folder to score, named (repeat: --checkpoint old=A --checkpoint new=B)")
    ap.add_argument("--seeds", default="7000-7007", help="scene seeds, e.g. 7000-7007 (never used in training)")
    ap.add_argument("--out", required=True, help="output folder (compare.json, compare.md)")
    ap.add_argument("--rig-variety", action="store_true", help="score on randomised rigs (data/rig_variety.py)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cameras", type=int, default=3)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--width", type=int, default=224)
    ap.add_argument("--height", type=int, default=168)
    ap.add_argument("--objects", type=int, default=14)
    ap.add_argument("--window-size", type=int, default=4)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--eval-voxel", type=float, default=0.05)
    return ap.parse_args(argv)


def _named_checkpoints(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        p = Path(path)
        if not (p / "model.safetensors").is_file() or not (p / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {name}: {p} has no config.json + model.safetensors")
        if name in out:
            raise ValueError(f"checkpoint name {name!r} given twice")
        out[name] = p
    return out


def _median(vals) -> float:
    v = [x for x in vals if x is not None and np.isfinite(x)]
    return float(np.median(v)) if v else float("nan")


def _nanmean(vals) -> float:
    v = [float(x) for x in vals if x is not None and np.isfinite(float(x))]
    return float(np.mean(v)) if v else float("nan")


def _score_checkpoint(name: str, ckpt: Path, bags: list[tuple[int, Path]], args, log) -> dict:
    from ..data.bags import read_ground_truth
    from .evaluate import compute_metrics
    from .heldout import _ap_summary, _pools
    from fast3dis_ros.inference.factory import PredictorSpec, build_predictor

    from .replay import ReplayConfig, replay_bag

    predictor, _info = build_predictor(PredictorSpec(checkpoint=str(ckpt), device=args.device))
    pools = _pools(("fast3dis",))
    per_scene, geo_point, geo_centre = [], [], []
    t0 = time.perf_counter()
    for seed, bag in bags:
        res = replay_bag(bag, predictor, ReplayConfig(window_size=args.window_size, stride=args.stride),
                         out_bag=None, progress=False)
        gt = read_ground_truth(bag)
        metrics, _c, _sv, _b = compute_metrics(res.records, gt, eval_voxel=args.eval_voxel, pool=pools)
        if not metrics["methods"]:
            raise ValueError(f"{name}: scene {seed}: no view matched ground truth ({metrics['meta'].get('note')})")
        m = metrics["methods"]["fast3dis"]
        errs = [window_geometry_errors(r.prediction, gt) for r in res.records]
        errs = [e for e in errs if e is not None]
        geo_point += [e.point_median for e in errs]
        geo_centre += [e.centre_median for e in errs]
        per_scene.append({"seed": seed, "windows": len(res.records),
                          "point_err_median_m": _median([e.point_median for e in errs]),
                          "centre_err_median_m": _median([e.centre_median for e in errs]),
                          "per_window_AP50": m["AP_per_window"]["AP50"], "whole_AP50": m["AP50"],
                          "mask2d_AP": m["mask2d"].get("AP"), "depth_abs_rel": m["depth"].get("abs_rel"),
                          "rot_err_mean_deg": m["pose"].get("rot_err_mean_deg"), "pose_auc30": m["pose"].get("auc30")})
        s = per_scene[-1]
        log(f"  {name} seed {seed}: {s['windows']} windows, point err {s['point_err_median_m']:.3f} m, per-window "
            f"AP50 {100 * (s['per_window_AP50'] or 0):.1f}, 2D AP {100 * (s['mask2d_AP'] or 0):.1f} "
            f"({time.perf_counter() - t0:.0f} s)")
    pw, wh = pools["fast3dis"]["per_window"].compute(), pools["fast3dis"]["whole"].compute()
    return {
        "checkpoint": str(ckpt),
        "point_err_median_m": _median(geo_point), "centre_err_median_m": _median(geo_centre),
        "n_windows_geometry": len(geo_point),
        "per_window": _ap_summary(pw), "whole": _ap_summary(wh),
        "mask2d_AP_mean": _nanmean(s["mask2d_AP"] for s in per_scene),
        "depth_abs_rel_mean": _nanmean(s["depth_abs_rel"] for s in per_scene),
        "rot_err_mean_deg": _nanmean(s["rot_err_mean_deg"] for s in per_scene),
        "pose_auc30_mean": _nanmean(s["pose_auc30"] for s in per_scene),
        "replay_s": time.perf_counter() - t0, "per_scene": per_scene,
    }


#: (label, getter, format) rows of the comparison table
_ROWS = (
    ("in-window point error, median (m)", lambda r: r["point_err_median_m"], "{:.3f}"),
    ("camera centre error, median (m)", lambda r: r["centre_err_median_m"], "{:.3f}"),
    ("relative rotation error, mean (deg)", lambda r: r["rot_err_mean_deg"], "{:.1f}"),
    ("pose AUC@30 (%)", lambda r: 100 * r["pose_auc30_mean"], "{:.1f}"),
    ("depth AbsRel (median-scaled)", lambda r: r["depth_abs_rel_mean"], "{:.3f}"),
    ("per-window AP50 (%)", lambda r: 100 * r["per_window"]["AP50"], "{:.1f}"),
    ("per-window AP (%)", lambda r: 100 * r["per_window"]["AP"], "{:.1f}"),
    ("2D mask AP (%)", lambda r: 100 * r["mask2d_AP_mean"], "{:.1f}"),
    ("whole-replay AP50, GT-lifted labels (%)", lambda r: 100 * r["whole"]["AP50"], "{:.1f}"),
    ("replay + scoring wall time (s)", lambda r: r["replay_s"], "{:.0f}"),
)


def table_lines(results: dict[str, dict]) -> list[str]:
    """Markdown table: one row per metric, one column per checkpoint."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, get, fmt in _ROWS:
        cells = []
        for n in names:
            try:
                v = float(get(results[n]))
                cells.append(fmt.format(v) if np.isfinite(v) else "n/a")
            except (TypeError, KeyError):
                cells.append("n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _settings(args) -> dict:
    """What must match for a reused column to be comparable."""
    from .heldout import parse_seeds

    return {"seeds": parse_seeds(args.seeds), "rig_variety": bool(args.rig_variety),
            "config": {k: getattr(args, k) for k in ("cameras", "frames", "width", "height", "objects",
                                                      "window_size", "stride", "eval_voxel")}}


def _reused_results(args) -> dict[str, dict]:
    """Columns of ``--reuse`` (empty without it); refuses a file scored on other seeds or settings."""
    if not args.reuse:
        return {}
    prev = json.loads(Path(args.reuse).read_text())
    mine = _settings(args)
    theirs = {"seeds": prev.get("seeds"), "rig_variety": bool(prev.get("rig_variety")), "config": prev.get("config")}
    if theirs != mine:
        raise ValueError(f"--reuse {args.reuse}: scored with {theirs}, this run uses {mine}")
    return dict(prev["results"])


def run_compare(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    from ..data.bags import write_scene_bag
    from ..data.synthetic import SceneConfig, generate_scene
    from .heldout import parse_seeds

    import torch

    if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    command = "python -m fast3dis_ros.eval.checkpoint_compare " + shlex.join(argv)
    ckpts = _named_checkpoints(args.checkpoint)
    reused = _reused_results(args)
    clash = sorted(set(reused) & set(ckpts))
    if clash:
        raise ValueError(f"--reuse already holds column(s) {clash}: name the new checkpoint differently")
    seeds = parse_seeds(args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="fast3dis_compare_"))
    try:
        bags = []
        for seed in seeds:
            scene = generate_scene(SceneConfig(n_cameras=args.cameras, n_frames=args.frames, width=args.width,
                                               height=args.height, n_objects=args.objects, seed=seed,
                                               rig_variety=args.rig_variety))
            bag = tmp / f"scene_{seed}"
            write_scene_bag(scene, bag)
            bags.append((seed, bag))
        log(f"{len(bags)} scene bags (seeds {args.seeds}{', varied rigs' if args.rig_variety else ''}) in "
            f"{time.perf_counter() - t_start:.0f} s")
        results = dict(reused)
        results.update({name: _score_checkpoint(name, p, bags, args, log) for name, p in ckpts.items()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t_start
    report = {"command": command, **_settings(args), "device": args.device, "reused": args.reuse,
              "results": results, "wall_s": wall, "cpu_count": os.cpu_count()}
    (out / "compare.json").write_text(json.dumps(report, indent=2, default=float))
    lines = table_lines(results)
    md = [f"# Checkpoint comparison on seeds {args.seeds}" + (" (varied rigs)" if args.rig_variety else ""), "",
          "```", command, "```", "", *lines, "",
          f"wall time {wall:.0f} s on {os.cpu_count()} CPU cores ({args.device}); see "
          "fast3dis_ros/eval/checkpoint_compare.py for the definitions.", ""]
    (out / "compare.md").write_text("\n".join(md))
    print("\n".join(lines))
    print(f"wall time {wall:.0f} s; wrote {out / 'compare.json'} and {out / 'compare.md'}")
    return report


def main(argv: list[str] | None = None) -> None:
    from ..data.bags import BagReadError

    try:
        run_compare(argv)
    except (BagReadError, FileNotFoundError, ValueError) as e:
        print(f"checkpoint_compare: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
