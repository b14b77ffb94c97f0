"""Predictor end to end on one window (resize, normalise, forward, instance postprocessing, to host).

``python scripts/bench_predictor.py --size large --views 8 [--no-graphs] [--compile]`` prints the median of
``--iters`` windows after the warm-up (the first windows capture / compile). Random weights.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from fast3dis_ros.model.config import Fast3disConfig
from fast3dis_ros.model.fast3dis import Fast3DIS
from fast3dis_ros.inference.predictor import Predictor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="large")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--hw", type=int, nargs=2, default=[480, 640])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = Fast3disConfig.for_size(args.size)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    pred = Predictor(Fast3DIS(cfg), cfg, device=dev, cuda_graphs=not args.no_graphs, compile=args.compile)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (args.views, *args.hw, 3), dtype=np.uint8)
    first = time.perf_counter()
    pred.predict_arrays(imgs)
    first_s = time.perf_counter() - first
    for _ in range(args.warmup - 1):
        pred.predict_arrays(imgs)
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        pred.predict_arrays(imgs)
        times.append((time.perf_counter() - t) * 1e3)
    print(f"predictor {args.size} {args.views}v {args.hw[1]}x{args.hw[0]} on {dev} graphs={not args.no_graphs} "
          f"compile={args.compile}: median {statistics.median(times):.1f} ms (min {min(times):.1f}, max {max(times):.1f}); "
          f"first window {first_s:.1f} s; build {first - t0:.1f} s")


if __name__ == "__main__":
    main()
