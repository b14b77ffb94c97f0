"""PointCloud2 packing benchmark: median ms of ``geometry.clouds.pointcloud_structured`` on random points.

``python -m fast3dis_ros.bench.pack`` (the node-side rows with the ROS message are in ``ros/bench_node.py``).
"""

from __future__ import annotations

import time

import numpy as np

from fast3dis_ros.core.frames import InstanceCloud
from fast3dis_ros.geometry.clouds import POINT_STEP, pointcloud_structured


def bench_pack(n: int = 1_000_000, repeats: int = 7, seed: int = 0, verbose: bool = True) -> float:
    """Median milliseconds of ``pointcloud_structured`` on ``n`` random points (prints it)."""
    rng = np.random.default_rng(seed)
    cloud = InstanceCloud(
        "map", 0, rng.standard_normal((n, 3)).astype(np.float32), rng.integers(0, 256, (n, 3), dtype=np.uint8),
        rng.integers(0, 50, n).astype(np.uint32), rng.random(n, dtype=np.float32)
    )
    pointcloud_structured(cloud)  # warm up
    ts, tr = [], []
    reuse = np.empty(n * POINT_STEP, np.uint8)
    for _ in range(repeats):
        t0 = time.perf_counter()
        arr = pointcloud_structured(cloud)
        ts.append((time.perf_counter() - t0) * 1e3)
        del arr
        t0 = time.perf_counter()
        pointcloud_structured(cloud, out=reuse)
        tr.append((time.perf_counter() - t0) * 1e3)
    ms = float(np.median(ts))
    if verbose:
        print(f"bench_pack: {n} points ({n * POINT_STEP / 1e6:.1f} MB): fresh buffer {ms:.2f} ms median "
              f"(min {min(ts):.2f}); reused buffer {np.median(tr):.2f} ms median (min {min(tr):.2f})")
    return ms


if __name__ == "__main__":
    bench_pack()
