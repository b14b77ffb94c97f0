"""The error-budget table: one bag or many scenes replayed with each oracle configuration (``eval/oracle.py``).

Per configuration (which parts of every window's prediction are ground truth) it reports the lifted AP50
(labels lifted with GT geometry, ``eval/evaluate.py``), the per-window AP50, the map-cloud AP / AP50 / AP25,
geometry and instance errors of the published map, and the linking rate (``eval/map_metrics.py``). The
network runs once per window (``CachedPredictor``); only fusion and scoring repeat per configuration.

Usage (held-out synthetic scenes, plus scenes from the independent generator ``eval/independent_scene.py``)::

    python -m fast3dis_ros.eval.oracle_table --seeds 7000-7007 --independent 0-1 --out /tmp/oracle
        [--configs all|issue] [--known-geometry none,rig,poses,rig+poses] [--checkpoint DIR]
        [--window-size 4 --stride 2]

``--known-geometry`` adds rows replayed with geometry the robot already has, read from the bag's TF exactly
as ``fast3dis-eval --known-geometry`` reads it (``eval.replay.KnownGeometry``; fusion places / scales the
network's windows with it): for each source other than ``none``, network masks and GT masks on the network's
geometry (``oracle.KNOWN_GEOMETRY_ROW_PARTS``), so mask error and the geometry error the source leaves are
read apart. ``none`` in the list keeps the ``--configs`` rows.

Pooling over scenes: AP as ScanNet (one evaluator per configuration over all scenes), linking counts
summed, geometry means over scenes, instance counts summed.
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
from pathlib import Path

import numpy as np

from .evaluate import scene_rows
from .oracle import (ISSUE_TABLE_CONFIGS, CachedPredictor, all_oracle_configs, config_name, known_geometry_configs,
                     parse_known_sources)
from .report import _f, table_lines

__all__ = ["scene_rows", "OracleTable", "table_lines", "main"]

_GEOM = ("accuracy_median_m", "pct_points_within_5cm", "pct_points_within_10cm", "pct_gt_surface_covered",
         "chamfer_m")
_INST = ("gt_objects", "map_ids", "splits", "merges", "id_switches")


class OracleTable:
    """Pools ``scene_rows`` of several scenes into one table (module doc). ``configs``: rows as
    ``scene_rows`` takes them (oracle parts, or ``oracle.table_config(parts, known)``)."""

    def __init__(self, configs) -> None:
        from .metrics import InstanceAPEvaluator

        self.configs = [tuple(c) for c in configs]
        self.pools = {config_name(c): {k: InstanceAPEvaluator() for k in ("whole", "per_window", "map_cloud")}
                      for c in self.configs}
        self.scenes: list[dict] = []

    def add(self, name: str, bag, gt, predictor, cfg, eval_voxel: float = 0.05) -> list[dict]:
        rows = scene_rows(bag, gt, predictor, cfg, self.configs, eval_voxel=eval_voxel, pools=self.pools)
        self.scenes.append({"scene": name, "rows": rows})
        return rows

    def merge(self, other: "OracleTable") -> None:
        """Add the scenes of ``other`` (same configurations), e.g. from parallel runs (``--save`` / ``--merge``)."""
        if other.configs != self.configs:
            raise ValueError("oracle tables with different configurations cannot be merged")
        self.scenes += other.scenes
        for name, pools in other.pools.items():
            for k, ev in pools.items():
                self.pools[name][k].scenes += ev.scenes

    def pooled(self) -> list[dict]:
        out = []
        for c in self.configs:
            name = config_name(c)
            rows = [r for s in self.scenes for r in s["rows"] if r.get("config", r["oracle"]) == name]
            if not rows:
                continue
            p = self.pools[name]
            w, pw, mc = p["whole"].compute(), p["per_window"].compute(), p["map_cloud"].compute()
            linked = sum(r["linking"]["linked"] for r in rows if r["linking"])
            total = sum(r["linking"]["window_instances"] for r in rows if r["linking"])
            geo = {k: float(np.nanmean([np.nan if r["geometry"] is None else r["geometry"][k] for r in rows]))
                   for k in _GEOM}
            inst = {k: int(sum(r["instances"][k] for r in rows if r["instances"])) for k in _INST}
            inst["unassigned_frac"] = float(np.nanmean([r["instances"]["unassigned_frac"] for r in rows
                                                        if r["instances"]]))
            sim = {f"sim3_{k}_mean": float(np.nanmean([r["sim3"].get(k, np.nan) for r in rows if r["sim3"]]))
                   for k in ("scale", "residual_m", "rotation_deg", "translation_m")}
            out.append({"config": name, "oracle": rows[0]["oracle"], "known_geometry": rows[0].get("known_geometry"),
                        "scenes": len(rows), "lifted_AP50": w["AP50"], "per_window_AP50": pw["AP50"],
                        "map_AP": mc["AP"], "map_AP50": mc["AP50"], "map_AP25": mc["AP25"],
                        "linking": {"linked": linked, "window_instances": total,
                                    "rate": linked / total if total else float("nan")},
                        "geometry": geo, "instances": inst, **sim})
        return out


# ---------------------------------------------------------------------------------------------- CLI
def _known_sources(spec: str) -> list[str]:
    try:
        return parse_known_sources(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m fast3dis_ros.eval.oracle_table", description=(
        "Error budget on held-out synthetic scenes: replay each scene with every oracle configuration "
        "(GT masks / depth / poses) and score the lifted labels, the published map cloud and linking."))
    ap.add_argument("--seeds", default="7000-7007", help="synthetic scene seeds (data.synthetic); none = only --independent")
    ap.add_argument("--independent", default=None,
                    help="seeds of scenes from the independent generator (eval/independent_scene.py), e.g. 0-1")
    ap.add_argument("--configs", choices=["all", "issue"], default="all",
                    help="all 8 subsets of masks/depth/poses, or the issue's 4 (masks x depth+poses)")
    ap.add_argument("--known-geometry", type=_known_sources, default=["none"], metavar="SOURCES",
                    help="comma list of none,rig,poses,rig+poses (or all): each source other than none adds rows "
                         "(network / GT masks on the network's geometry) replayed with that known geometry from "
                         "the bag's TF, as fast3dis-eval --known-geometry; none keeps the --configs rows")
    ap.add_argument("--out", required=True, help="output folder (oracle_table.json, oracle_table.md)")
    ap.add_argument("--checkpoint", default=None, help="FAST3DIS checkpoint folder (default: bundled tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--window-size", type=int, default=4)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--eval-voxel", type=float, default=0.05)
    ap.add_argument("--cameras", type=int, default=3)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--save", default=None, help="also pickle the tables here (for --merge)")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="pool tables pickled by parallel runs (--save) instead of replaying scenes")
    return ap.parse_args(argv)


def run(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    sources = args.known_geometry
    import torch

    if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from ..data.bags import read_ground_truth, write_scene_bag
    from ..data.synthetic import SceneConfig, generate_scene
    from .heldout import parse_seeds
    from .independent_scene import IndependentSceneConfig, generate_independent_scene
    from fast3dis_ros.inference.factory import BUNDLED, PredictorSpec, build_predictor

    from .replay import ReplayConfig
    from .report import to_jsonable

    import pickle

    t_start = time.perf_counter()
    configs = known_geometry_configs(all_oracle_configs() if args.configs == "all" else ISSUE_TABLE_CONFIGS, sources)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"synthetic": OracleTable(configs), "independent": OracleTable(configs)}
    jobs = [("synthetic", s) for s in parse_seeds(args.seeds)] if not args.merge and args.seeds != "none" else []
    if args.independent and not args.merge:
        jobs += [("independent", s) for s in parse_seeds(args.independent)]
    winfo: dict = {}
    for p in args.merge or []:
        part = pickle.loads(Path(p).read_bytes())
        winfo = part["weights"]
        for k, t in part["tables"].items():
            tables[k].merge(t)
    if jobs:
        predictor, winfo = build_predictor(PredictorSpec(checkpoint=args.checkpoint or BUNDLED, device=args.device))
    cfg = ReplayConfig(window_size=args.window_size, stride=args.stride)
    tmp = Path(tempfile.mkdtemp(prefix="oracle_table_"))
    try:
        for kind, seed in jobs:
            t0 = time.perf_counter()
            if kind == "synthetic":
                scene = generate_scene(SceneConfig(n_cameras=args.cameras, n_frames=args.frames, seed=seed))
            else:
                scene = generate_independent_scene(IndependentSceneConfig(n_cameras=args.cameras,
                                                                          n_frames=args.frames, seed=seed))
            bag = tmp / f"{kind}_{seed}"
            write_scene_bag(scene, bag)
            rows = tables[kind].add(f"{kind} {seed}", bag, read_ground_truth(bag), CachedPredictor(predictor), cfg,
                                    args.eval_voxel)
            shutil.rmtree(bag, ignore_errors=True)
            if args.save:  # after every scene: a killed run keeps what it finished
                Path(args.save).write_bytes(pickle.dumps({"tables": tables, "weights": {
                    k: winfo.get(k) for k in ("weights", "checkpoint")}}))
            summ = ", ".join(f"{r['config']} {_f(r['map_AP50'])}" for r in rows)
            print(f"{kind} {seed}: map-cloud AP50 {summ} ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.save:
        Path(args.save).write_bytes(pickle.dumps({"tables": tables, "weights": {k: winfo.get(k) for k in
                                                                                ("weights", "checkpoint")}}))
    command = "python -m fast3dis_ros.eval.oracle_table " + shlex.join(argv)
    result = {"command": command, "known_geometry_sources": sources, "weights": {k: winfo.get(k) for k in ("weights", "checkpoint")},
              "window_size": args.window_size, "stride": args.stride, "device": args.device,
              "cpu_count": os.cpu_count(), "runtime_s": time.perf_counter() - t_start,
              "pooled": {k: t.pooled() for k, t in tables.items() if t.scenes},
              "per_scene": {k: t.scenes for k, t in tables.items() if t.scenes}}
    (out / "oracle_table.json").write_text(json.dumps(to_jsonable(result), indent=2))
    md = ["# Oracle table (error budget)", "", "```", command, "```", "",
          f"known-geometry sources: {', '.join(sources)} (rows with a source other than none: the network's "
          "geometry placed / scaled by it in fusion, as fast3dis-eval --known-geometry)", "",
          f"model {winfo.get('weights')}, device {args.device}, window {args.window_size} stride {args.stride}, "
          f"{os.cpu_count()} CPU cores, runtime {result['runtime_s']:.0f} s", ""]
    for k, rows in result["pooled"].items():
        md += [f"## {k} scenes, pooled ({len(tables[k].scenes)} scenes)", "", *table_lines(rows), ""]
    (out / "oracle_table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


def main(argv: list[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
