"""Memory across lifecycle transitions of the fast3dis node (issue 20): host RSS and, on CUDA, GPU
allocated / reserved memory after configure, after mapping, after deactivate, after activate and after
cleanup. Prints a table (docs/BENCHMARKS.md).

The node runs in this process (its own context; frames go straight into the pipeline, no DDS), with the
model given by the usual parameters (default: the bundled tiny checkpoint on the best device).

  python -m fast3dis_ros.ros.bench_lifecycle [--device cpu] [--windows 12] [--size 640x480]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def run(device: str = "auto", windows: int = 12, width: int = 640, height: int = 480, cameras: int = 3,
        window_size: int = 4, checkpoint: str = "bundled") -> list[tuple[str, dict, float]]:
    import rclpy
    from rclpy.parameter import Parameter

    from fast3dis_ros.core.frames import CameraFrame
    from fast3dis_ros.ros.lifecycle import Fast3disLifecycleNode, memory_mib

    cams = [f"cam{i}" for i in range(cameras)]
    ctx = rclpy.context.Context()
    rclpy.init(context=ctx, domain_id=0)
    params = {"cameras": cams, "device": device, "window_size": window_size, "stride": window_size // 2,
              "checkpoint": checkpoint, "warmup_width": width, "warmup_height": height, "queue_depth": 64,
              "publish_tf": False, "score_threshold": 0.0}
    rows: list[tuple[str, dict, float]] = []
    node = Fast3disLifecycleNode(context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    try:
        rows.append(("constructed (unconfigured)", memory_mib(), 0.0))
        t0 = time.perf_counter()
        node.trigger_configure()
        rows.append(("configure (model loaded + warm-up)", memory_mib(), time.perf_counter() - t0))
        t0 = time.perf_counter()
        node.trigger_activate()
        rng = np.random.default_rng(0)
        stride = window_size // 2
        n_sets = window_size + (windows - 1) * stride
        for k in range(n_sets):
            stamp = 1_000_000_000 + k * 100_000_000
            for c in cams:
                img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                node.runner.feed(CameraFrame(c, stamp, img, frame_id=f"{c}_optical_frame"))
        node.runner.engine.wait_idle(600.0)
        rows.append((f"active, {node.runner.engine.stats()['processed']} windows mapped "
                     f"({len(node.runner.fusion.map)} map points)", memory_mib(), time.perf_counter() - t0))
        t0 = time.perf_counter()
        node.trigger_deactivate()
        rows.append(("deactivate (input stopped, model off the GPU, map kept)", memory_mib(),
                     time.perf_counter() - t0))
        t0 = time.perf_counter()
        node.trigger_activate()
        rows.append(("activate again", memory_mib(), time.perf_counter() - t0))
        node.trigger_deactivate()
        t0 = time.perf_counter()
        node.trigger_cleanup()
        rows.append(("cleanup (model + map dropped)", memory_mib(), time.perf_counter() - t0))
    finally:
        node.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    return rows


def print_table(rows: list[tuple[str, dict, float]]) -> None:
    keys = [k for k in ("rss_mib", "gpu_allocated_mib", "gpu_reserved_mib") if any(k in r[1] for r in rows)]
    head = f"| {'state':<62} | " + " | ".join(f"{k[:-4]} [MiB]" for k in keys) + " | transition [s] |"
    print(head)
    print("|" + "-" * 64 + "|" + "|".join("-" * (len(k) + 4) for k in keys) + "|----------------|")
    for label, mem, dt in rows:
        vals = " | ".join(f"{mem.get(k, 0.0):>{len(k) + 2}.0f}" for k in keys)
        print(f"| {label:<62} | {vals} | {dt:>14.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--cameras", type=int, default=3)
    ap.add_argument("--window-size", type=int, default=4)
    ap.add_argument("--checkpoint", default="bundled")
    a = ap.parse_args(argv)
    w, h = (int(x) for x in a.size.split("x"))
    rows = run(a.device, a.windows, w, h, a.cameras, a.window_size, a.checkpoint)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
