"""``fast3dis-export`` for a published DA3 size without its weights: wall time, peak memory, files, parity.

``python -m fast3dis_ros.bench.export_size --size large --views 8 --height 378 --width 504 --out /tmp/x``

What it does, in order (every artefact under ``--out``, which should be outside the repository):

1. builds the configuration (``Fast3disConfig.for_size``) with random init (DA3 weights are not needed to
   measure an export: the graph and the weight volume do not depend on the values) and saves it as a full
   FAST3DIS checkpoint, so step 2 is the real command line;
2. runs ``fast3dis-export --external-data`` on it in a child process at the requested window (its wall
   time and peak RSS are the child's; the ONNX checker runs inside, by path);
3. reads the graph: file sizes, node count, the largest ``TopK`` k and `tensorrt_blockers`;
4. optionally (``--parity-views``) exports a second, small window and compares onnxruntime with PyTorch
   on one random window: depth relative error and mask sign agreement.

It prints a table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def _child_export(ckpt: Path, views: int, height: int, width: int, onnx_path: Path) -> dict:
    """``fast3dis-export`` in a child process; wall seconds and the child's peak RSS (GiB)."""
    cmd = [sys.executable, "-c", "from fast3dis_ros.cli import export_main; export_main()",
           "--checkpoint", str(ckpt), "--views", str(views), "--height", str(height), "--width", str(width),
           "--external-data", "-o", str(onnx_path)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fast3dis-export failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: exact for the first, a bound after it
    return {"export_wall_s": round(wall, 1), "peak_rss_gib": round(max(peak, before) / 2**20, 2),
            "peak_rss_is_first_child": before == 0, "cli": report}


def _graph_facts(onnx_path: Path) -> dict:
    import onnx

    from fast3dis_ros.deploy.tensorrt_engine import tensorrt_blockers, topk_ks

    model = onnx.load(str(onnx_path), load_external_data=False)
    data = Path(str(onnx_path) + ".data")
    return {"onnx_mb": round(onnx_path.stat().st_size / 2**20, 2),
            "data_gib": round(data.stat().st_size / 2**30, 3) if data.exists() else 0.0,
            "nodes": len(model.graph.node), "topk_k": sorted(topk_ks(onnx_path).values()),
            "tensorrt_blockers": tensorrt_blockers(onnx_path)}


def _parity(ckpt: Path, onnx_path: Path, views: int, height: int, width: int) -> dict:
    """onnxruntime vs PyTorch (exact path) on one random window with a known K."""
    from fast3dis_ros.deploy.export import example_inputs, WindowShape
    from fast3dis_ros.deploy.onnx_predictor import OnnxForward
    from fast3dis_ros.model.checkpoint import load_checkpoint

    images, K = example_inputs(WindowShape(views, height, width), "intrinsics")
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        ref = model(images, K=K, return_aux=False)
    del model
    got = OnnxForward(onnx_path, threads=torch.get_num_threads())(images, K=K)
    rel = ((got["depth"] - ref["depth"]).abs() / ref["depth"].abs().clamp_min(1e-6)).max().item()
    agree = ((got["pred_masks"] > 0) == (ref["pred_masks"] > 0)).float().mean().item()
    return {"parity_shape": f"{views}x{height}x{width}", "depth_max_rel_err": rel, "mask_sign_agreement": agree,
            "extrinsics_max_abs": (got["extrinsics"] - ref["extrinsics"]).abs().max().item(),
            "logits_max_abs": (got["pred_logits"] - ref["pred_logits"]).abs().max().item()}


def main(argv: list[str] | None = None) -> int:
    from fast3dis_ros.model.checkpoint import save_checkpoint
    from fast3dis_ros.model.config import Fast3disConfig
    from fast3dis_ros.model.fast3dis import Fast3DIS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="large", help="DA3 size (tiny | small | base | large | giant)")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--height", type=int, default=378)
    ap.add_argument("--width", type=int, default=504)
    ap.add_argument("--parity-views", type=int, default=0, help="0 = no parity run")
    ap.add_argument("--parity-height", type=int, default=140)
    ap.add_argument("--parity-width", type=int, default=196)
    ap.add_argument("--out", required=True, help="folder for the checkpoint and the ONNX files (not in git)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    ckpt = out / f"{args.size}_random"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = Fast3DIS(Fast3disConfig.for_size(args.size))  # pretrained=None: random init
    n_params = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, ckpt, full=True)
    del model
    row = {"size": args.size, "params_m": round(n_params / 1e6, 1), "build_save_s": round(time.perf_counter() - t0, 1),
           "window": f"{args.views}x{args.height}x{args.width}"}
    onnx_path = out / f"{args.size}_{args.views}x{args.height}x{args.width}.onnx"
    row.update(_child_export(ckpt, args.views, args.height, args.width, onnx_path))
    row.update(_graph_facts(onnx_path))
    if args.parity_views:
        small = out / f"{args.size}_{args.parity_views}x{args.parity_height}x{args.parity_width}.onnx"
        _child_export(ckpt, args.parity_views, args.parity_height, args.parity_width, small)
        row.update(_parity(ckpt, small, args.parity_views, args.parity_height, args.parity_width))
    print(f"{'size':<6} {'params M':>8} {'window':>11} {'export s':>8} {'peak RSS GiB':>12} {'onnx MB':>8} "
          f"{'data GiB':>8} {'max TopK k':>10} {'TRT blockers':>12}")
    print(f"{row['size']:<6} {row['params_m']:>8} {row['window']:>11} {row['export_wall_s']:>8} "
          f"{row['peak_rss_gib']:>12} {row['onnx_mb']:>8} {row['data_gib']:>8} "
          f"{max(row['topk_k'], default=0):>10} {len(row['tensorrt_blockers']):>12}")
    if args.parity_views:
        print(f"parity {row['parity_shape']}: depth max rel err {row['depth_max_rel_err']:.2e}, "
              f"mask sign agreement {100 * row['mask_sign_agreement']:.3f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
