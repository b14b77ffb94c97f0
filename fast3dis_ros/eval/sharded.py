"""``fast3dis-eval --bags``: evaluate a folder or list of bags, sharded over torch.distributed ranks, into one
pooled report.

    fast3dis-eval --bags fleet/ --out report/ --device cuda                       # one process
    torchrun --nproc-per-node 8 -m fast3dis_ros.eval.sharded --bags fleet/ --out report/ --device cuda

Bag ``i`` of the sorted list goes to rank ``i % world``. Each rank replays and scores its bags with the
single-bag code (``evaluate.evaluate_bag``: per-bag report in ``report/bags/<i>_<name>/``) and keeps each
bag's ScanNet match statistics (``InstanceAPEvaluator.scenes``: counts and intersections, no point
arrays). Rank 0 gathers them, re-adds them **in bag order** to fresh evaluators and computes the pooled
AP with the same ``InstanceAPEvaluator.compute`` as a single process, so the pooled numbers are exactly
those of a one-process run over the same bags (``test/test_sharded_eval.py``). Writes (rank 0)
``report/pooled.json`` and ``report/pooled.md``.

Exit status: 0 when every bag was read, its accounting balanced and at least one bag was scored against
ground truth; 1 when some bag failed or did not balance; 2 when no bag could be scored at all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fast3dis_ros.core import distributed as D

__all__ = ["find_bags", "shard", "pool_results", "run_many"]

#: process-group timeout of a sharded evaluation: the final gather waits for the slowest rank
EVAL_TIMEOUT_S = 6 * 3600.0
_AP_KEYS = ("AP", "AP50", "AP25")


def _is_bag(p: Path) -> bool:
    return (p.is_dir() and (p / "metadata.yaml").is_file()) or (p.is_file() and p.suffix in (".mcap", ".db3"))


def find_bags(specs: Sequence[str]) -> list[Path]:
    """Bags named by ``specs``: a bag (folder with metadata.yaml, or an .mcap/.db3 file) is itself; any
    other folder contributes the bags directly inside it. Sorted and de-duplicated, so every rank sees the
    same list. Raises FileNotFoundError for a spec that is neither."""
    out: list[Path] = []
    for s in specs:
        p = Path(s)
        if _is_bag(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(c for c in p.iterdir() if _is_bag(c))
            if not found:
                raise FileNotFoundError(f"{p}: no rosbag2 bags inside (folders with metadata.yaml, .mcap files)")
            out.extend(found)
        else:
            raise FileNotFoundError(f"{p}: not a bag or a folder of bags")
    seen, uniq = set(), []
    for b in sorted(out, key=lambda q: str(q.resolve())):
        if b.resolve() not in seen:
            seen.add(b.resolve())
            uniq.append(b)
    return uniq


def shard(items: Sequence[Any], rank: int, world: int) -> list[tuple[int, Any]]:
    """``(global index, item)`` of this rank's share: item ``i`` goes to rank ``i % world``."""
    return [(i, x) for i, x in enumerate(items) if i % world == rank]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    from .evaluate import add_baseline_args

    ap = argparse.ArgumentParser(prog="fast3dis-eval --bags", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bags", nargs="+", required=True, help="bags and/or folders of bags")
    ap.add_argument("--out", required=True, help="output folder (pooled report + bags/<i>_<name>/)")
    ap.add_argument("--checkpoint", default=None, help="FAST3DIS checkpoint folder (default: bundled tiny)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (under torchrun: cuda:LOCAL_RANK)")
    ap.add_argument("--cameras", default=None, help="comma separated camera names (topics /<cam>/image_raw)")
    ap.add_argument("--window-size", type=int, default=4)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--slop-ms", type=float, default=50.0)
    ap.add_argument("--score-threshold", type=float, default=None)
    ap.add_argument("--voxel-size", type=float, default=0.02)
    ap.add_argument("--eval-voxel", type=float, default=0.05)
    ap.add_argument("--baseline", choices=["hdbscan"], default=None)
    add_baseline_args(ap)
    ap.add_argument("--dist-timeout", type=float, default=EVAL_TIMEOUT_S,
                    help="under torchrun: seconds the gather waits for the slowest rank")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(list(argv))


def _pools(methods: Sequence[str]) -> dict:
    from .metrics import InstanceAPEvaluator

    return {m: {"whole": InstanceAPEvaluator(), "per_window": InstanceAPEvaluator()} for m in methods}


def _bag_row(index: int, bag: Path, r: dict | None, pools: dict, err: str | None, wall: float) -> dict:
    """What rank 0 needs of one bag: its summary and its pooled-AP scene statistics."""
    row: dict[str, Any] = {"index": index, "bag": str(bag), "error": err, "wall_s": wall, "methods": {},
                           "scenes": {}, "balanced": None, "scored": False}
    if r is None:
        return row
    acc = r["replay"].accounting
    row["balanced"] = bool(acc["balanced"])
    row["frame_sets"] = {"received": acc["frame_sets"]["received"], "processed": acc["frame_sets"]["processed"]}
    m = r.get("metrics")
    if m is None or not m.get("methods"):
        row["note"] = "no ground truth in the bag" if m is None else m["meta"].get("note", "nothing scored")
        return row
    row["scored"] = True
    for name, d in m["methods"].items():
        row["methods"][name] = {**{k: d.get(k) for k in _AP_KEYS},
                                "AP_per_window": {k: d["AP_per_window"].get(k) for k in _AP_KEYS},
                                "mask2d_AP": d.get("mask2d", {}).get("AP"),
                                "abs_rel": d.get("depth", {}).get("abs_rel"),
                                "auc30": d.get("pose", {}).get("auc30")}
    row["scenes"] = {name: {kind: list(ev.scenes) for kind, ev in p.items()} for name, p in pools.items()}
    return row


def evaluate_shard(args: argparse.Namespace, bags: Sequence[Path], rank: int, world: int) -> list[dict]:
    """Evaluate this rank's bags (a failing bag is recorded with its error, the others go on)."""
    from ..data.bags import BagReadError
    from .evaluate import baseline_params_from_args, evaluate_bag
    from fast3dis_ros.inference.factory import BUNDLED, PredictorSpec, build_predictor

    from .replay import ReplayConfig

    predictor, info = build_predictor(PredictorSpec(checkpoint=args.checkpoint or BUNDLED, device=args.device,
                                                    score_threshold=args.score_threshold,
                                                    keep_mask_features=args.baseline == "hdbscan"))
    methods = ("fast3dis", "hdbscan") if args.baseline == "hdbscan" else ("fast3dis",)
    rows = []
    for i, bag in shard(bags, rank, world):
        cfg = ReplayConfig(cameras=[c.strip() for c in args.cameras.split(",") if c.strip()] if args.cameras
                           else None, window_size=args.window_size, stride=args.stride, slop_ms=args.slop_ms,
                           voxel_size=args.voxel_size)
        if args.score_threshold is not None:
            cfg.score_threshold = args.score_threshold
        pools = _pools(methods)
        t0 = time.perf_counter()
        r, err = None, None
        try:
            r = evaluate_bag(bag, Path(args.out) / "bags" / f"{i:04d}_{bag.stem}", predictor=predictor,
                             weights_info=info, replay_cfg=cfg, baseline=args.baseline, eval_voxel=args.eval_voxel,
                             progress=False, baseline_params=baseline_params_from_args(args), pool=pools)
        except (BagReadError, OSError, ValueError) as e:
            err = f"{type(e).__name__}: {e}"
            print(f"fast3dis-eval: rank {rank}: bag {bag}: {err}", file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)
        rows.append(_bag_row(i, bag, r, pools, err, time.perf_counter() - t0))
        if not args.no_progress:
            print(f"[fast3dis-eval] rank {rank}/{world}: bag {i + 1}/{len(bags)} {bag.name} "
                  f"{'FAILED' if err else 'ok'} ({rows[-1]['wall_s']:.1f}s)", file=sys.stderr, flush=True)
    return rows


def pool_results(rows: Sequence[dict]) -> dict:
    """Pooled report of per-bag rows from any number of ranks: scenes are re-added in bag order, so the
    result does not depend on how the bags were sharded."""
    from .metrics import InstanceAPEvaluator

    rows = sorted(rows, key=lambda r: r["index"])
    methods = sorted({m for r in rows for m in r["scenes"]})
    pooled: dict[str, Any] = {}
    for m in methods:
        pooled[m] = {}
        for kind in ("whole", "per_window"):
            ev = InstanceAPEvaluator()
            for r in rows:
                ev.scenes.extend(r["scenes"].get(m, {}).get(kind, []))
            res = ev.compute()
            pooled[m][kind] = {**{k: res[k] for k in _AP_KEYS}, "n_scenes": res["n_scenes"], "n_gt": res["n_gt"],
                               "n_pred": res["n_pred"], "ap_per_threshold": res["ap_per_threshold"]}
        for key in ("mask2d_AP", "abs_rel", "auc30"):
            vals = [r["methods"][m][key] for r in rows if m in r["methods"] and r["methods"][m][key] is not None]
            vals = [float(v) for v in vals if np.isfinite(v)]
            pooled[m][f"{key}_mean_over_bags"] = float(np.mean(vals)) if vals else None
    bags = [{k: v for k, v in r.items() if k != "scenes"} for r in rows]
    return {"pooled": pooled, "bags": bags, "n_bags": len(rows), "n_scored": sum(r["scored"] for r in rows),
            "n_failed": sum(r["error"] is not None for r in rows),
            "n_unbalanced": sum(r["balanced"] is False for r in rows)}


def _write_markdown(report: dict, path: Path) -> None:
    def pct(v):
        return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"

    lines = [f"# FAST3DIS pooled evaluation: {report['n_bags']} bags", "",
             f"{report['n_scored']} scored, {report['n_failed']} failed, {report['n_unbalanced']} unbalanced; "
             f"{report['world_size']} rank(s), {report['wall_s']:.1f} s.", "",
             "| method | scenes | AP | AP50 | AP25 | per-window AP | per-window AP50 |", "|---|---|---|---|---|---|---|"]
    for m, d in report["pooled"].items():
        w, pw = d["whole"], d["per_window"]
        lines.append(f"| {m} | {w['n_scenes']} | {pct(w['AP'])} | {pct(w['AP50'])} | {pct(w['AP25'])} | "
                     f"{pct(pw['AP'])} | {pct(pw['AP50'])} |")
    lines += ["", "| # | bag | status | AP50 (fast3dis) | s |", "|---|---|---|---|---|"]
    for b in report["bags"]:
        status = "FAILED: " + b["error"] if b["error"] else ("scored" if b["scored"] else b.get("note", "-"))
        ap50 = b["methods"].get("fast3dis", {}).get("AP50")
        lines.append(f"| {b['index']} | {Path(b['bag']).name} | {status} | {pct(ap50)} | {b['wall_s']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def run_many(argv: Sequence[str]) -> int:
    """Console entry of ``fast3dis-eval --bags`` (every rank runs it; rank 0 writes the pooled report)."""
    args = _parse(argv)
    try:
        bags = find_bags(args.bags)
    except FileNotFoundError as e:
        print(f"fast3dis-eval: error: {e}", file=sys.stderr)
        return 2
    denv, args.device = D.init_distributed(args.device, timeout_s=args.dist_timeout)
    t0 = time.perf_counter()
    try:
        try:
            rows = evaluate_shard(args, bags, denv.rank, denv.world)
        except FileNotFoundError as e:  # the checkpoint: every rank fails the same way, before any collective
            print(f"fast3dis-eval: error: {e}", file=sys.stderr)
            return 2
        gathered = D.all_gather_objects(rows)
        if not denv.is_main:
            return 0
        return _report(args, [r for rs in gathered for r in rs], denv.world, time.perf_counter() - t0)
    finally:
        D.shutdown_distributed()


def _report(args: argparse.Namespace, rows: list[dict], world: int, wall_s: float) -> int:
    """Rank 0: pool, write pooled.json / pooled.md, print the summary; the exit status."""
    report = pool_results(rows)
    report.update(world_size=world, wall_s=wall_s, checkpoint=args.checkpoint, eval_voxel_m=args.eval_voxel)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pooled.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    _write_markdown(report, out / "pooled.md")
    for m, d in report["pooled"].items():
        print(f"{m}: pooled AP {d['whole']['AP']:.4f} AP50 {d['whole']['AP50']:.4f} | per-window AP "
              f"{d['per_window']['AP']:.4f} AP50 {d['per_window']['AP50']:.4f} over {d['whole']['n_scenes']} bags")
    print(f"{report['n_bags']} bags: {report['n_scored']} scored, {report['n_failed']} failed, "
          f"{report['n_unbalanced']} unbalanced ({world} rank(s), {wall_s:.1f} s) -> {out / 'pooled.json'}")
    if report["n_scored"] == 0:
        print("fast3dis-eval: error: no bag could be scored against ground truth", file=sys.stderr)
        return 3
    return 1 if report["n_failed"] or report["n_unbalanced"] else 0

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run_many(sys.argv[1:]))
