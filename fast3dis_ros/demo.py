"""``fast3dis-demo``: the main job on the bundled defaults, with no GPU, no ROS install and no network.

1. Generate (or reuse, when ``<out>/sample_bag`` already holds the same settings) a small synthetic
   multi-camera scene as a rosbag2 (mcap) with ground truth (``data/synthetic.py``, ``data/bags.py``).
2. Replay it through the same :class:`PipelineRunner` the ROS node uses, in synchronous mode (nothing
   dropped), with the bundled checkpoint (``fast3dis_ros/assets/fast3dis_tiny``; random tiny weights with
   a loud warning when it is missing) -- ``eval/replay.py``.
3. Write the node's output topics to ``<out>/output_bag`` (mcap: instances_cloud, window_cloud,
   instances, markers, tf), ``accounting.json``, the instance-coloured map cloud as a binary PLY with
   ``instance`` and ``score`` properties, PNGs (input views, predicted depth next to GT, per-view instance
   masks next to GT, top-down and perspective renders of the instance cloud, ``png/map_errors.png``: the
   published map with its ids, its distance to the GT surface and its label errors), and ``metrics.json`` +
   ``report.md`` (3D AP/AP50/AP25 vs GT, 2D mask AP, depth AbsRel/delta1, pose AUC; see
   ``eval/evaluate.py`` for the protocol).

Usage::

    fast3dis-demo [--out outputs/demo] [--checkpoint DIR] [--device cpu]
                  [--cameras 3 --frames 8 --width 224 --height 168 --seed 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "run_demo", "ensure_sample_bag"]


def _parse(argv):
    ap = argparse.ArgumentParser(prog="fast3dis-demo", description=(
        "Generate a small synthetic multi-camera rosbag2, replay it through the FAST3DIS pipeline on CPU, "
        "and write output bag, PLY, PNGs and a metrics report."), epilog=(
        "The run ends with a 'what happened' block (cameras, calibration, frame sets, views scored, warnings), "
        "also in report.md; exit 3 when nothing was processed or scored. Your own bags (raw or compressed "
        "images, namespaced topics, sqlite3 or mcap): fast3dis-eval --help lists every accepted input form."))
    ap.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    ap.add_argument("--checkpoint", default=None, help="FAST3DIS checkpoint folder (default: bundled tiny)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch",
                    help="engine of the network: torch (checkpoint) or an exported --engine (docs: Issue 25)")
    ap.add_argument("--engine", default=None, help="fast3dis-export .onnx (onnxruntime) or TensorRT engine file")
    ap.add_argument("--cameras", type=int, default=3, help="cameras in the synthetic rig")
    ap.add_argument("--frames", type=int, default=8, help="frame sets (time steps) in the sample bag")
    ap.add_argument("--width", type=int, default=224)
    ap.add_argument("--height", type=int, default=168)
    ap.add_argument("--seed", type=int, default=7, help="scene seed")
    ap.add_argument("--window-size", type=int, default=4, help="frame sets per window")
    ap.add_argument("--stride", type=int, default=2, help="new window every N frame sets")
    ap.add_argument("--score-threshold", type=float, default=None,
                    help="instance score threshold for predictor and fusion (default: the checkpoint's)")
    ap.add_argument("--baseline", choices=["hdbscan"], default=None, help="also score the HDBSCAN baseline")
    ap.add_argument("--regenerate", action="store_true", help="rebuild the sample bag even if present")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def ensure_sample_bag(out: Path, n_cameras: int, n_frames: int, width: int, height: int, seed: int,
                      regenerate: bool = False, progress: bool = True) -> tuple[Path, bool, float]:
    """``out/sample_bag`` (mcap) for these settings; reused when its ``sample_bag.json`` matches.
    Returns (bag path, generated?, seconds)."""
    from fast3dis_ros.data.bags import write_scene_bag
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene

    bag = out / "sample_bag"
    stamp = out / "sample_bag.json"
    want = {"cameras": n_cameras, "frames": n_frames, "width": width, "height": height, "seed": seed, "version": 1}
    if not regenerate and bag.is_dir() and (bag / "metadata.yaml").is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == want:
                return bag, False, 0.0
        except ValueError:
            pass
    t0 = time.perf_counter()
    if bag.exists():
        shutil.rmtree(bag)
    cfg = SceneConfig(n_cameras=n_cameras, n_frames=n_frames, width=width, height=height, seed=seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_frames, desc="render scene", unit="frame set")
    scene = generate_scene(cfg, progress=(bar.update if bar is not None else None))
    if bar is not None:
        bar.close()
    write_scene_bag(scene, bag)
    stamp.write_text(json.dumps(want))
    return bag, True, time.perf_counter() - t0


def _input_images(bag: Path, cameras: list[str]) -> dict:
    """(camera, stamp) -> RGB image of the input bag (for the PNG panels)."""
    from fast3dis_ros.eval.replay import frames_from_bag

    return {(f.camera, f.stamp_ns): f.image for f in frames_from_bag(bag, cameras, use_known_intrinsics=False)}


def _write_pngs(out: Path, res, sv, inputs: dict, cameras: list[str], map_points: dict | None = None) -> list[str]:
    from fast3dis_ros.eval import viz

    files = []
    if map_points is not None and len(map_points["xyz_gt"]):  # the published map, its ids and its errors
        from .eval.map_metrics import MAP_TAU_M

        files.append(viz.save_map_errors_png(map_points["xyz_gt"], map_points["id"], map_points["dist_m"],
                                             map_points["gt_label"], out / "png" / "map_errors.png", tau=MAP_TAU_M))
    png = out / "png"
    # input views: one row per frame set, one column per camera
    stamps = sorted({st for (_c, st) in inputs})
    tiles = [inputs[(c, st)] for st in stamps for c in cameras if (c, st) in inputs]
    if tiles:
        files.append(viz.save_views_png(tiles, png / "input_views.png", ncols=len(cameras)))
    if sv is not None and len(sv):
        full = [inputs.get(k, sv.images[i]) for i, k in enumerate(sv.keys)]
        # predicted depth | GT depth per view (each coloured with its own range: prediction is up to scale)
        rows = []
        for i in range(len(sv)):
            from fast3dis_ros.eval.metrics import resize_nearest

            g = sv.gt_depth[i]
            rows += [full[i], viz.depth_to_color(resize_nearest(sv.pred_depth[i], *g.shape)), viz.depth_to_color(g)]
        files.append(viz.save_views_png(rows, png / "depth_pred_vs_gt.png", ncols=3))
        files.append(viz.save_masks_comparison_png(full, sv.pred_global, sv.gt_instance, png / "masks_pred_vs_gt.png"))
    elif res.records:
        p = res.records[-1].prediction
        files.append(viz.save_views_png([viz.depth_to_color(d) for d in p.depth], png / "depth_pred.png",
                                        ncols=len(cameras)))
        files.append(viz.save_views_png([viz.overlay_labels(im, lab) for im, lab in zip(p.images, p.labels)],
                                        png / "masks_pred.png", ncols=len(cameras)))
    m = res.final_map
    if m is not None and len(m):
        col = viz.label_color(m.instance.astype(np.int64))
        viz.render_cloud_topdown_png(m.xyz, col, png / "map_instances_topdown.png")
        files.append(str(png / "map_instances_topdown.png"))
        viz.render_cloud_perspective_png(m.xyz, col, png / "map_instances_perspective.png")
        files.append(str(png / "map_instances_perspective.png"))
        viz.render_cloud_perspective_png(m.xyz, m.rgb, png / "map_rgb_perspective.png")
        files.append(str(png / "map_rgb_perspective.png"))
    return files


def run_demo(argv: list[str] | None = None) -> dict:
    """Run the demo; returns {"paths": [...], "metrics": ..., "accounting": ..., "wall_s": ...}."""
    args = _parse(argv)
    t_start = time.perf_counter()
    progress = not args.no_progress
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    from fast3dis_ros.eval import viz
    from fast3dis_ros.eval.evaluate import evaluate_bag, print_table
    from fast3dis_ros.eval.replay import ReplayConfig
    from fast3dis_ros.inference.factory import BUNDLED, PredictorSpec, build_predictor

    timings = {}
    bag, generated, t_gen = ensure_sample_bag(out, args.cameras, args.frames, args.width, args.height, args.seed,
                                              args.regenerate, progress)
    timings["sample_bag_s"] = t_gen
    print(f"sample bag: {bag} ({'generated' if generated else 'reused'})")

    t0 = time.perf_counter()
    cfg = ReplayConfig(window_size=args.window_size, stride=args.stride)
    if args.score_threshold is not None:
        cfg.score_threshold = args.score_threshold
    predictor, info = build_predictor(PredictorSpec(
        checkpoint=args.checkpoint or BUNDLED, device=args.device, score_threshold=args.score_threshold,
        keep_mask_features=args.baseline == "hdbscan", backend=args.backend, engine=args.engine or ""))
    timings["load_model_s"] = time.perf_counter() - t0
    print(f"model: {info['weights']} checkpoint {info['checkpoint']}")

    t0 = time.perf_counter()
    r = evaluate_bag(bag, out, predictor=predictor, weights_info=info, replay_cfg=cfg, baseline=args.baseline,
                     progress=progress, title="FAST3DIS demo (synthetic sample bag)", keep_points=True)
    timings["replay_and_metrics_s"] = time.perf_counter() - t0
    res = r["replay"]

    t0 = time.perf_counter()
    paths = [str(bag), r["paths"]["output_bag"], r["paths"]["accounting"]]
    m = res.final_map
    ply = out / "map_instances.ply"
    if m is not None:
        viz.write_ply(ply, m.xyz, viz.label_color(m.instance.astype(np.int64)), m.instance.astype(np.uint32),
                      m.score.astype(np.float32))
        paths.append(str(ply))
    inputs = _input_images(bag, res.cameras)
    map_points = (r.get("curves") or {}).get("fast3dis", {}).get("map_points")
    paths += _write_pngs(out, res, r["scored"], inputs, res.cameras, map_points)
    if map_points is not None and (out / "report.md").is_file():
        with open(out / "report.md", "a") as fh:
            fh.write("\n## What the robot sees\n\nThe published map (top-down, GT world after the Sim(3)): ids, "
                     "distance of each point to the GT surface, and label errors.\n\n![map errors](png/map_errors.png)\n")
    paths += r["paths"].get("report", [])
    timings["outputs_s"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    timings["total_s"] = wall

    # timings into metrics.json (report already written: update the JSON in place)
    if r["metrics"] is not None:
        mj = out / "metrics.json"
        d = json.loads(mj.read_text())
        d.setdefault("meta", {})["demo_timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        mj.write_text(json.dumps(d, indent=2))

    acc = res.accounting
    fs = acc["frame_sets"]
    print("\n=== FAST3DIS demo summary ===")
    print(f"cameras {res.cameras}, frame sets received {fs['received']}, processed {fs['processed']}, dropped "
          f"{fs['dropped'] or 0}; windows fused {len(res.records)}; accounting balanced: {acc['balanced']}")
    if m is not None:
        print(f"final map: {len(m)} points, {len(res.final.instances)} instances "
              f"(ids {[i.id for i in res.final.instances][:20]})")
        mc = (r["metrics"] or {}).get("methods", {}).get("fast3dis", {}).get("map_cloud")
        if mc:
            g = mc["geometry"]
            print(f"map vs GT: map-cloud AP50 {100 * mc['AP50']:.1f}, median distance {g['accuracy_median_m']:.2f} m, "
                  f"{100 * g['pct_points_within_10cm']:.0f} % of points within 10 cm, "
                  f"{100 * g['pct_gt_surface_covered']:.0f} % of the GT surface covered, linking "
                  f"{mc['linking']['linked']}/{mc['linking']['window_instances']} (png/map_errors.png)")
    print(f"output topics: {res.output_counts}")
    if r["metrics"] is not None:
        print()
        print_table(r["metrics"])
    print("\ntimings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"wall time: {wall:.1f} s")
    print("\noutputs:")
    for p in paths:
        print(f"  {Path(p).resolve()}")
    from .eval.run_summary import format_summary

    print("\n" + format_summary(r["summary"]))
    return {"paths": [str(Path(p).resolve()) for p in paths], "metrics": r["metrics"], "accounting": acc,
            "wall_s": wall, "weights": info, "result": r, "summary": r["summary"],
            "exit_code": r["summary"]["exit"]["code"]}


def main(argv: list[str] | None = None) -> None:
    from fast3dis_ros.data.bags import BagReadError

    try:
        out = run_demo(argv)
    except (BagReadError, FileNotFoundError) as e:
        print(f"fast3dis-demo: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if out["exit_code"]:
        print(f"fast3dis-demo: {out['summary']['exit']['reason']}", file=sys.stderr)
        raise SystemExit(out["exit_code"])


if __name__ == "__main__":
    main()
