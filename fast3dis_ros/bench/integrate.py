"""Fusion benchmark: milliseconds per ``MapFusion.integrate`` on worst-case random windows.

``python -m fast3dis_ros.bench.integrate [VIEWS H W [MAX_POINTS]]`` (recorded in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from fast3dis_ros.core.frames import WindowPrediction
from fast3dis_ros.pipeline.fusion import MapFusion


def random_prediction(rng: np.random.Generator, views: int, h: int, w: int, window_index: int = 0,
                      n_instances: int = 20, depth_range: tuple[float, float] = (0.5, 8.0)) -> WindowPrediction:
    """Worst-case window for the fusion benchmark: i.i.d. random depth (almost every point its own voxel),
    random camera poses, ``n_instances`` random rectangles of labels per view."""
    from scipy.spatial.transform import Rotation

    depth = rng.uniform(*depth_range, (views, h, w)).astype(np.float32)
    labels = np.zeros((views, h, w), np.int32)
    for v in range(views):
        for k in range(n_instances):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            labels[v, y0:y0 + rng.integers(2, max(3, h // 3)), x0:x0 + rng.integers(2, max(3, w // 3))] = k + 1
    K = np.array([[0.8 * w, 0, (w - 1) / 2], [0, 0.8 * w, (h - 1) / 2], [0, 0, 1.0]])
    T = np.repeat(np.eye(4)[None], views, 0)
    T[:, :3, :3] = Rotation.from_euler("y", rng.uniform(-30, 30, (views, 1)), degrees=True).as_matrix()
    T[:, :3, 3] = rng.uniform(-0.5, 0.5, (views, 3))
    stamps = [window_index * 1000 + v for v in range(views)]
    return WindowPrediction(
        window_index, stamps[-1], [f"cam{v}" for v in range(views)], [f"cam{v}" for v in range(views)], stamps,
        rng.integers(0, 256, (views, h, w, 3), dtype=np.uint8), depth, np.ones((views, h, w), np.float32),
        np.repeat(K[None], views, 0), T, labels, rng.uniform(0.2, 1.0, n_instances).astype(np.float32))


def bench_integrate(views: int = 8, h: int = 168, w: int = 224, max_points: int = 1_000_000, windows: int = 8,
                    voxel_size: float = 0.05, pixel_stride: int = 2, seed: int = 0, verbose: bool = True,
                    max_points_per_view: int = 20_000) -> dict:
    """Milliseconds per ``MapFusion.integrate`` of ``views``-view windows at ``h`` x ``w`` with random depth
    (worst case: almost every lifted point is a new voxel); the map is first filled to ``max_points``.
    Prints and returns {'first_ms', 'median_ms', 'max_ms', 'map_voxels'}."""
    rng = np.random.default_rng(seed)
    preds = [random_prediction(rng, views, h, w, i) for i in range(4)]
    T0 = [p.T_cam_world.copy() for p in preds]

    def window(i: int) -> WindowPrediction:  # new stamps and a shifted rig: new voxels every window
        p = preds[i % len(preds)]
        p.window_index, p.view_stamps_ns = i, [i * 1000 + v for v in range(views)]
        p.T_cam_world = T0[i % len(preds)].copy()
        p.T_cam_world[:, :3, 3] += rng.uniform(-50, 50, 3)
        return p

    f = MapFusion(voxel_size=voxel_size, max_points=max_points, pixel_stride=pixel_stride,
                  max_points_per_view=max_points_per_view)
    t0 = time.perf_counter()
    f.integrate(window(0))
    first = (time.perf_counter() - t0) * 1e3
    i = 1
    while len(f.map) < max_points and i < 200:  # fill to the cap (not timed)
        f.integrate(window(i))
        i += 1
    ts = []
    for _ in range(windows):
        p = window(i)
        t0 = time.perf_counter()
        f.integrate(p)
        ts.append((time.perf_counter() - t0) * 1e3)
        i += 1
    out = {"first_ms": first, "median_ms": float(np.median(ts)), "max_ms": float(np.max(ts)),
           "map_voxels": len(f.map)}
    if verbose:
        print(f"bench_integrate: {views} views {w}x{h} stride {f.stride_for((h, w))}, cap {max_points}: first window "
              f"{first:.1f} ms, at cap {out['median_ms']:.1f} ms median / {out['max_ms']:.1f} ms max per window "
              f"({out['map_voxels']} voxels)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    a = [int(x) for x in args[:3]] or [8, 168, 224]
    bench_integrate(*a, max_points=int(args[3]) if len(args) > 3 else 1_000_000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
