"""Backend speed: the same window through PyTorch (exact path) and onnxruntime on the CPU (issue 25).

``python -m fast3dis_ros.bench.backends --onnx tiny.onnx [--repeats 10] [--threads 2]`` exports nothing: it
times an existing ``fast3dis-export`` model against the checkpoint it came from (bundled tiny by default),
both behind the same `Predictor`, on one synthetic window of the model's fixed shape, and prints a table
(median and p90 of the whole ``predict_arrays``, i.e. resize + forward + instance postprocessing).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _time_interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Alternate the backends window by window, so a busy shared machine slows both alike."""
    for fn in fns.values():
        fn()  # warm-up (allocations, ORT graph optimisation)
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t0) * 1000.0)
    return out


def main(argv: list[str] | None = None) -> int:
    from fast3dis_ros.deploy.onnx_predictor import onnx_predictor
    from fast3dis_ros.deploy.export import read_export_metadata
    from fast3dis_ros.model.checkpoint import BUNDLED_CHECKPOINT
    from fast3dis_ros.inference.predictor import Predictor

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of both backends")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = read_export_metadata(args.onnx).shape
    images = np.random.default_rng(0).integers(0, 255, (s.views, s.height, s.width, 3), dtype=np.uint8)
    preds = {"torch": Predictor.from_checkpoint(args.checkpoint, process_size=max(s.height, s.width)),
             "onnxruntime": onnx_predictor(args.onnx, threads=args.threads)}
    times = _time_interleaved({k: (lambda p=p: p.predict_arrays(images)) for k, p in preds.items()}, args.repeats)
    rows = [{"backend": k, "views": s.views, "hw": f"{s.height}x{s.width}", "threads": args.threads,
             "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "n": len(ms)}
            for k, ms in times.items()]
    base = rows[0]["median_ms"]
    print(f"{'backend':<12} {'views':>5} {'HxW':>8} {'thr':>3} {'median ms':>10} {'p90 ms':>8} {'vs torch':>8}")
    for r in rows:
        print(f"{r['backend']:<12} {r['views']:>5} {r['hw']:>8} {r['threads']:>3} {r['median_ms']:>10.1f} "
              f"{r['p90_ms']:>8.1f} {base / r['median_ms']:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
