"""Node-side CPU figures of fast3dis_ros, each a row with its target (``python -m fast3dis_ros.ros.bench_node``).

Rows (all on CPU, median over repeats unless said otherwise):

- ``pack_1m``: 1M-point cloud -> ``geometry.clouds.pointcloud_structured`` + the sensor_msgs/PointCloud2
  built by ``ros.conversions.cloud_to_pointcloud2`` (what the node publishes). Target < 20 ms. When rclpy
  does not import, only the structured pack is timed (the row says so).
- ``pack_1m_structured``: the structured pack alone (no message), for reference.
- ``image_rgb8`` / ``image_bgr8``: ``ros.conversions.image_to_rgb`` of one frame set (``--cams`` cameras,
  640x480) of sensor_msgs/Image messages, ms per frame set.
- ``sync_push``: ``pipeline.sync.ApproximateTimeSync.push`` of every frame of a frame set (``--cams``
  cameras, jittered stamps), µs per frame set.
- ``fusion_<W>x<H>``: ``pipeline.fusion.MapFusion.integrate`` (node defaults: voxel 0.02, min_score 0.5,
  pixel_stride 2) per 8-view window built from a synthetic scene's ground truth (depth, instances, cameras
  relative to the window's first view; 2 cameras x 4 frame sets, stride 2, so windows share views and take
  the shared-view Sim(3) path). Median over the windows after the first. ``fusion_<W>x<H>_map990k``: the
  same windows at the largest size with the map first filled with 990k old voxels (cap 1M, as after a long
  run), so every window pays for a map at its cap (insertion, eviction, summaries).
- ``e2e_overhead``: a real ``Fast3disNode`` (in this process, own ROS domain on loopback) with a real random tiny
  ``Predictor.random_tiny`` on CPU, node window defaults (window 8 frame sets, stride 4, 3 cameras). Each
  frame is fed as a sensor_msgs/Image through the node's image callback, a frame set after the engine went
  idle (no queueing) and, with the listener, after it received the previous window's map (as when windows
  come at the node defaults' pace, 0.4 s apart at 10 Hz). Latency = from the window's last frame entering
  the callback to ``publish()`` of its ``~/window_cloud`` returning (the node publishes it from
  ``MapFusion.begin``, before the map update; the message is then serialised and in DDS), minus the
  engine's own ``predict`` time; median over the windows after the first (the first pays one-time costs and
  is reported as ``first_window_overhead_ms``). Target (issue 7):
  engine + 30 ms, i.e. overhead < 30 ms. ``e2e_map_overhead``: the same up to ``publish()`` of the running
  map ``~/instances_cloud`` (after the map update, instances and markers). ``e2e_recv_overhead`` /
  ``e2e_map_recv_overhead``: up to the moment a plain rclpy subscriber in another process had the message
  (default middleware settings: large messages cross Fast DDS's UDP loopback unless its shared-memory
  segment is made large enough, see docs/BENCHMARKS.md section 13). The tiny network runs at 70 px, so its
  fusion is cheap; ``*_gt_504x378`` is the same with a stand-in predictor that returns the scene's ground
  truth at 504x378 (the processing size of the DA3 models), i.e. the node overhead at the real resolution
  (24 views per window), and ``*_gt_504x378_map990k`` again with the map first holding 990k old voxels (a
  map at its 1M cap, as after a long run). Without rclpy the runner alone is timed (no messages).

All figures are wall-clock on a possibly loaded machine; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

__all__ = ["run_node_bench", "format_rows", "main", "row"]


def row(name: str, measured: float | str, unit: str, target: str | None = None, limit: float | None = None,
        detail: dict | None = None) -> dict:
    """One result row. ``limit``: measured must be <= limit to pass (None: no numeric target)."""
    ok = None
    if limit is not None and isinstance(measured, (int, float)) and np.isfinite(measured):
        ok = bool(measured <= limit)
    elif limit is not None and isinstance(measured, str) and measured.startswith(("OOM", "error")):
        ok = False  # ran and failed: the target is missed
    return {"name": name, "measured": measured, "unit": unit, "target": target or "-", "limit": limit,
            "pass": ok, "detail": detail or {}}


def _rclpy_ok() -> tuple[bool, str]:
    try:
        from fast3dis_ros.ros import conversions  # noqa: F401  (imports sensor_msgs / builtin_interfaces)

        return True, ""
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"


def _median_ms(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(ts)), ts


# ------------------------------------------------------------------------------------------- pack
def bench_pack(n: int = 1_000_000, repeats: int = 7, seed: int = 0) -> list[dict]:
    from fast3dis_ros.geometry.clouds import POINT_STEP, pointcloud_structured
    from fast3dis_ros.core.frames import InstanceCloud

    rng = np.random.default_rng(seed)
    cloud = InstanceCloud("map", 123, rng.standard_normal((n, 3)).astype(np.float32),
                          rng.integers(0, 256, (n, 3), dtype=np.uint8), rng.integers(0, 50, n).astype(np.uint32),
                          rng.random(n, dtype=np.float32))
    tag = f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n // 1000}k"
    ms_s, ts_s = _median_ms(lambda: pointcloud_structured(cloud), repeats)
    rows = []
    ok, why = _rclpy_ok()
    if ok:
        from fast3dis_ros.ros.conversions import cloud_to_pointcloud2

        msg = cloud_to_pointcloud2(cloud)
        assert len(msg.data) == n * POINT_STEP
        del msg
        ms_m, ts_m = _median_ms(lambda: cloud_to_pointcloud2(cloud), repeats)
        rows.append(row(f"pack_{tag}", ms_m, "ms", "< 20 ms", 20.0,
                        {"what": "pointcloud_structured + PointCloud2 message (ros.conversions)", "points": n,
                         "times_ms": ts_m, "min_ms": min(ts_m)}))
    else:
        rows.append(row(f"pack_{tag}", ms_s, "ms", "< 20 ms", 20.0,
                        {"what": f"structured pack only (rclpy unavailable: {why})", "points": n, "times_ms": ts_s,
                         "min_ms": min(ts_s)}))
    rows.append(row(f"pack_{tag}_structured", ms_s, "ms", None, None,
                    {"what": "pointcloud_structured alone (fresh buffer)", "points": n, "times_ms": ts_s,
                     "min_ms": min(ts_s)}))
    return rows


# ------------------------------------------------------------------------------------------ images
def bench_images(cams: int = 3, height: int = 480, width: int = 640, repeats: int = 20, seed: int = 0) -> list[dict]:
    ok, why = _rclpy_ok()
    if not ok:
        return [row(f"image_{enc}", "n/a", "ms/frame set", None, None, {"why": why}) for enc in ("rgb8", "bgr8")]
    from fast3dis_ros.ros.conversions import image_to_rgb, numpy_to_image

    rng = np.random.default_rng(seed)
    rows = []
    for enc in ("rgb8", "bgr8"):
        msgs = [numpy_to_image(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), enc) for _ in range(cams)]

        def conv():
            return [image_to_rgb(m) for m in msgs]

        out = conv()
        assert all(o.shape == (height, width, 3) and o.dtype == np.uint8 for o in out)
        ms, ts = _median_ms(conv, repeats)
        rows.append(row(f"image_{enc}", ms, "ms/frame set", None, None,
                        {"what": f"image_to_rgb x {cams} cameras {width}x{height} {enc}", "cams": cams,
                         "per_image_ms": ms / cams, "times_ms": ts}))
    return rows


# -------------------------------------------------------------------------------------------- sync
def bench_sync(cams: int = 3, n_sets: int = 2000, repeats: int = 5, seed: int = 0) -> list[dict]:
    from fast3dis_ros.core.frames import CameraFrame
    from fast3dis_ros.pipeline.sync import ApproximateTimeSync

    rng = np.random.default_rng(seed)
    names = [f"cam{i}" for i in range(cams)]
    img = np.zeros((4, 4, 3), np.uint8)  # the synchroniser never touches pixels
    period = 33_333_333
    frames = []
    for k in range(n_sets):
        jit = rng.integers(-3_000_000, 3_000_000, cams)
        order = rng.permutation(cams)  # cameras arrive in any order
        frames.extend(CameraFrame(names[c], 1_000_000_000 + k * period + int(jit[c]), img) for c in order)
    per_set_us = []
    emitted = 0
    for _ in range(repeats):
        sync = ApproximateTimeSync(names, slop_ns=50_000_000, queue_size=10)
        push = sync.push
        t0 = time.perf_counter()
        for f in frames:
            push(f)
        per_set_us.append((time.perf_counter() - t0) * 1e6 / n_sets)
        emitted = sync.emitted_sets
    us = float(statistics.median(per_set_us))
    return [row("sync_push", us, "µs/frame set", None, None,
                {"what": f"ApproximateTimeSync.push x {cams} cameras, slop 50 ms, 30 Hz with +-3 ms jitter",
                 "cams": cams, "frame_sets": n_sets, "emitted": emitted, "per_frame_us": us / cams,
                 "runs_us": per_set_us})]


# ------------------------------------------------------------------------------------------ fusion
def _gt_windows(scene, frames_per_window: int, stride: int, score: float = 0.9):
    """WindowPredictions from a synthetic scene's ground truth, world = camera of the window's view 0."""
    cams = scene.camera_names
    out = []
    starts = range(0, scene.n_frames - frames_per_window + 1, stride)
    for wi, s in enumerate(starts):
        views = [scene.view(f, c) for f in range(s, s + frames_per_window) for c in cams]
        stamps = [1_000_000_000 + f * 100_000_000 for f in range(s, s + frames_per_window) for _ in cams]
        out.append(_gt_prediction(views, wi, stamps, score))
    return out


def _gt_prediction(views, window_index: int, stamps: list[int], score: float = 0.9):
    """WindowPrediction of rendered views (ground truth), world = camera of view 0."""
    from fast3dis_ros.core.frames import WindowPrediction

    T0 = views[0].T_world_cam
    T_cam_world = np.stack([np.linalg.inv(v.T_world_cam) @ T0 for v in views])
    inst = np.stack([v.instance for v in views]).astype(np.int64)
    ids = np.unique(inst[inst > 0])
    lut = np.zeros(int(inst.max()) + 1 if inst.size else 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return WindowPrediction(
        window_index=window_index, stamp_ns=int(stamps[-1]), cameras=[v.camera for v in views],
        frame_ids=[f"{v.camera}_optical_frame" for v in views], view_stamps_ns=[int(t) for t in stamps],
        images=np.stack([v.rgb for v in views]), depth=np.stack([v.depth for v in views]).astype(np.float32),
        depth_conf=np.ones((len(views),) + views[0].depth.shape, np.float32),
        K=np.stack([v.K for v in views]).astype(np.float64), T_cam_world=T_cam_world, labels=lut[inst].astype(np.int32),
        scores=np.full(len(ids), score, np.float32), depth_scale_metric=True,
    )


def node_fusion(**overrides):
    """MapFusion with the node's defaults (ros/params.py)."""
    from fast3dis_ros.pipeline.fusion import MapFusion

    kw = dict(voxel_size=0.02, max_points=1_000_000, min_score=0.5, conf_threshold=0.0)
    kw.update(overrides)
    return MapFusion(**kw)


def fusion_windows(width: int, height: int, views: int = 8, cams: int = 2, n_windows: int = 4, seed: int = 0):
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene

    fpw = max(1, views // cams)
    stride = max(1, fpw // 2)
    n_frames = fpw + stride * (n_windows - 1)
    scene = generate_scene(SceneConfig(n_cameras=cams, n_frames=n_frames, width=width, height=height, seed=seed))
    return _gt_windows(scene, fpw, stride)


def prefill_map(fusion, n: int, seed: int = 0, n_instances: int = 50) -> None:
    """Put ``n`` old voxels (tick 0, random keys far from the scene, random instance ids) into the map, as
    after a long run: the next windows then pay the cost of a map at (or near) its cap."""
    from fast3dis_ros.geometry.clouds import pack_voxel_keys

    if n <= 0:
        return
    rng = np.random.default_rng(seed)
    ijk = rng.integers(-500_000, 500_000, (int(n * 1.1) + 16, 3))
    ijk[:, 0] = np.abs(ijk[:, 0]) + 10_000  # x >= 200 m: never overlaps the scene
    keys = np.unique(pack_voxel_keys(ijk))[:n]
    rng.shuffle(keys)
    keys = np.sort(keys)
    m = len(keys)
    xyz = (rng.standard_normal((m, 3)) + 300.0) * 1.0
    fusion.map.integrate(keys, xyz, rng.uniform(0, 255, (m, 3)), np.ones(m), 
                         rng.integers(0, n_instances + 1, m).astype(np.uint32), rng.random(m).astype(np.float32), 0)


def bench_fusion(sizes=((224, 168), (504, 378)), views: int = 8, cams: int = 2, n_windows: int = 4,
                 seed: int = 0, prefill: int = 0) -> list[dict]:
    """``prefill`` > 0: the map first holds that many old voxels (``prefill_map``), rows get a suffix."""
    rows = []
    for w, h in sizes:
        preds = fusion_windows(w, h, views, cams, n_windows, seed)
        fusion = node_fusion()
        prefill_map(fusion, prefill, seed)
        ms_all, methods, voxels = [], [], []
        for p in preds:
            t0 = time.perf_counter()
            res = fusion.integrate(p)
            ms_all.append((time.perf_counter() - t0) * 1e3)
            methods.append(res.align_method)
            voxels.append(len(res.map_cloud))
        later = ms_all[1:] if len(ms_all) > 1 else ms_all
        ms = float(statistics.median(later))
        tag = f"_map{prefill / 1e6:g}M" if prefill >= 1_000_000 else (f"_map{prefill // 1000}k" if prefill else "")
        rows.append(row(f"fusion_{w}x{h}{tag}", ms, "ms/window", None, None,
                        {"what": f"MapFusion.integrate, {preds[0].depth.shape[0]}-view GT window {w}x{h} "
                                 f"({cams} cameras), node defaults (voxel 0.02, pixel_stride 2, cap 1M voxels)"
                                 + (f", map prefilled with {prefill} old voxels" if prefill else ""),
                         "prefill_voxels": prefill, "evicted": fusion.map.evicted,
                         "views": int(preds[0].depth.shape[0]), "windows": len(preds), "times_ms": ms_all,
                         "align": methods, "map_voxels": voxels, "first_window_ms": ms_all[0]}))
    return rows


def profile_fusion(width: int = 504, height: int = 378, views: int = 8, top: int = 25, seed: int = 0,
                   prefill: int = 0) -> str:
    """cProfile of MapFusion.integrate over the windows after the first (cumulative + own time)."""
    import cProfile
    import io
    import pstats

    preds = fusion_windows(width, height, views, seed=seed)
    fusion = node_fusion()
    prefill_map(fusion, prefill, seed)
    fusion.integrate(preds[0])
    pr = cProfile.Profile()
    pr.enable()
    for p in preds[1:]:
        fusion.integrate(p)
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s).strip_dirs()
    st.sort_stats("cumulative").print_stats(top)
    st.sort_stats("tottime").print_stats(top)
    return s.getvalue()


# --------------------------------------------------------------------------------------------- e2e
class _TimedPublisher:
    """Stands in front of one of the node's real rclpy publishers: publishes through it, then records
    (header stamp, time.monotonic_ns() after publish() returned, points) -- the message is then in the
    middleware (serialised and written to DDS)."""

    def __init__(self, pub, log: list):
        self._pub, self._log = pub, log

    def publish(self, msg) -> None:
        from fast3dis_ros.ros.conversions import stamp_to_ns

        self._pub.publish(msg)
        self._log.append((stamp_to_ns(msg.header.stamp), time.monotonic_ns(), int(getattr(msg, "width", 0))))

    def __getattr__(self, name):
        return getattr(self._pub, name)


LISTEN_TOPICS = {"window": "/fast3dis/window_cloud", "map": "/fast3dis/instances_cloud"}


def listen(out_path: str, expect: int, timeout_s: float = 120.0) -> int:
    """Child process of the e2e bench: a plain rclpy subscriber (another process, as a user's) to the node's
    window and map clouds; writes one JSON line per message (topic, header stamp, time.monotonic_ns() on
    receipt, points) and exits after ``expect`` messages of each topic or ``timeout_s``."""
    import rclpy
    from sensor_msgs.msg import PointCloud2

    from fast3dis_ros.ros.conversions import stamp_to_ns
    from fast3dis_ros.ros.qos import output_qos

    rclpy.init()
    node = rclpy.create_node("fast3dis_bench_listener")
    got = {k: 0 for k in LISTEN_TOPICS}
    fh = open(out_path, "w")

    def cb(msg, key):
        t = time.monotonic_ns()
        st = stamp_to_ns(msg.header.stamp)
        fh.write(json.dumps({"topic": key, "stamp_ns": st, "t_ns": t, "points": int(msg.width)}) + "\n")
        fh.flush()
        if st > 1:  # stamp 1 ns: the bench's warm-up messages
            got[key] += 1

    for key, topic in LISTEN_TOPICS.items():
        node.create_subscription(PointCloud2, topic, lambda m, k=key: cb(m, k), output_qos(10))
    end = time.monotonic() + timeout_s
    try:
        while time.monotonic() < end and min(got.values()) < expect:
            rclpy.spin_once(node, timeout_sec=0.05)
    finally:
        fh.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _start_listener(domain_id: int, out_path: str, expect: int):
    import subprocess

    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("ROS_LOCALHOST_ONLY", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-m", "fast3dis_ros.ros.bench_node", "--listen", out_path,
                             "--listen-expect", str(expect)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _e2e_scene_and_predictor(cams, window_size, stride, n_windows, width, height, process_size, seed, predictor):
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene
    from fast3dis_ros.inference.predictor import Predictor

    n_frames = window_size + stride * (n_windows - 1)
    scene = generate_scene(SceneConfig(n_cameras=cams, n_frames=n_frames, width=width, height=height, seed=seed))
    if predictor == "gt":
        lookup = {}
        for f in range(n_frames):
            for c, name in enumerate(scene.camera_names):
                lookup[(name, _e2e_stamp(f, c))] = scene.view(f, c)

        def predict_fn(w):
            vs = w.views
            return _gt_prediction([lookup[(v.camera, int(v.stamp_ns))] for v in vs], w.index,
                                  [int(v.stamp_ns) for v in vs])

        return scene, n_frames, predict_fn, f"ground-truth stand-in at {width}x{height}"
    pr = Predictor.random_tiny(seed=seed, device="cpu", **({"process_size": process_size} if process_size else {}))
    pr.predict_arrays([scene.view(0, c).rgb for c in range(cams)])  # warm the model (first forward allocates)
    return scene, n_frames, pr.predict, f"random tiny Predictor on CPU (process size {pr.process_size})"


def _e2e_stamp(f: int, c: int) -> int:
    return 1_000_000_000 + f * 100_000_000 + c * 1_000_000


class _StandIn:
    score_threshold = 0.5

    def __init__(self, fn):
        self.predict = fn


def bench_e2e(cams: int = 3, window_size: int = 8, stride: int = 4, n_windows: int = 4, width: int = 224,
              height: int = 168, process_size: int | None = None, seed: int = 0, threads: int | None = None,
              predictor: str = "tiny", prefill: int = 0, listener: bool = True) -> list[dict]:
    """Latency of the node's outputs minus the engine's own predict time.

    ``predictor="tiny"``: random tiny network on CPU; ``"gt"``: a stand-in returning the scene's ground truth
    at the input resolution (no network: the node overhead at full resolution). ``prefill``: the map first
    holds that many old voxels (as after a long run; the map cloud is then ~1M points).

    With rclpy: a real ``Fast3disNode`` (own context and ROS domain, loopback) with the node's defaults except
    the cameras / window / stride; every frame goes through the node's image callback (Image message ->
    numpy -> runner), frame sets are fed after the engine went idle (no queueing). Times are taken when
    ``publish()`` of the node's real publisher returned (the message is serialised and in DDS):
    ``window`` = ``~/window_cloud`` (the issue-7 figure), ``map`` = ``~/instances_cloud``. With ``listener``
    a subscriber in another process also records when each cloud arrived (``recv_*``). Without rclpy the
    runner alone is timed (no messages)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    scene, n_frames, predict_fn, proc_desc = _e2e_scene_and_predictor(
        cams, window_size, stride, n_windows, width, height, process_size, seed, predictor)
    ok, why = _rclpy_ok()
    if ok:
        try:
            import fast3dis_msgs.msg  # noqa: F401
        except Exception as e:  # noqa: BLE001
            ok, why = False, f"{type(e).__name__}: {e}"
    base = "e2e_overhead" if predictor != "gt" else f"e2e_overhead_gt_{width}x{height}"
    if prefill:
        base += f"_map{prefill / 1e6:g}M" if prefill >= 1_000_000 else f"_map{prefill // 1000}k"
    map_name = base.replace("e2e_overhead", "e2e_map_overhead", 1)
    desc = (f"{proc_desc}, {cams} cameras {width}x{height}, window {window_size} sets ({window_size * cams} "
            f"views), stride {stride}" + (f", map prefilled with {prefill} old voxels" if prefill else ""))
    if ok:
        res = _e2e_node(scene, n_frames, predict_fn, cams, window_size, stride, prefill, listener, seed)
    else:
        res = _e2e_runner(scene, n_frames, predict_fn, window_size, stride, prefill, seed)
        res["why_no_messages"] = why
    lat_w, lat_m, eng = res["window_ms"], res["map_ms"], res["engine_ms"]
    if not lat_w:
        return [row(base, "n/a", "ms", "engine + 30 ms", 30.0, {"why": "no window completed", **res})]
    over_w = [a - e for a, e in zip(lat_w, eng)]
    over_m = [a - e for a, e in zip(lat_m, eng)]

    def steady(over: list[float]) -> float:
        """Median over the windows after the first: the first window after start pays one-time costs
        (first publish of each topic, allocations; with a prefilled map the row arrays' growth, which a
        running node does in ``commit``), reported separately as ``first_window_overhead_ms``."""
        return float(statistics.median(over[1:] if len(over) > 1 else over))

    what_w = ("last frame's Image callback -> ~/window_cloud publish() returned, minus engine predict time"
              if ok else "last frame's feed -> window cloud ready (on_window; no rclpy: no message), minus engine")
    what_m = ("last frame's Image callback -> ~/instances_cloud (running map) publish() returned, minus engine"
              if ok else "last frame's feed -> map cloud ready (on_fusion; no rclpy: no message), minus engine")
    detail = {"what": f"{what_w}; {desc}", "views": window_size * cams, "windows": len(over_w),
              "latency_ms": lat_w, "engine_ms": eng, "overhead_ms": over_w, "first_window_overhead_ms": over_w[0],
              "measured_over": "median of the windows after the first",
              "engine_ms_median": float(statistics.median(eng)), "latency_ms_median": float(statistics.median(lat_w)),
              "messages": ok, **{k: v for k, v in res.items() if k not in ("window_ms", "map_ms", "engine_ms")}}
    rows = [row(base, steady(over_w), "ms", "engine + 30 ms", 30.0, detail)]
    if over_m:
        rows.append(row(map_name, steady(over_m), "ms", None, None,
                        {"what": f"{what_m}; {desc}", "views": window_size * cams, "windows": len(over_m),
                         "latency_ms": lat_m, "engine_ms": eng, "overhead_ms": over_m,
                         "first_window_overhead_ms": over_m[0],
                         "map_points": res.get("map_points", [])}))
    for key in ("window", "map"):
        rec = res.get(f"recv_{key}_ms")
        if rec and len(rec) == len(eng):
            over_r = [a - e for a, e in zip(rec, eng)]
            name = (base if key == "window" else map_name).replace("overhead", "recv_overhead", 1)
            rows.append(row(name, steady(over_r), "ms", None, None,
                            {"what": f"as {base if key == 'window' else map_name}, but until a Python rclpy "
                                     f"subscriber in another process had the message; {desc}",
                             "latency_ms": rec, "engine_ms": eng, "overhead_ms": over_r,
                             "first_window_overhead_ms": over_r[0]}))
    return rows


def _e2e_node(scene, n_frames, predict_fn, cams, window_size, stride, prefill, listener, seed) -> dict:
    """The e2e measurement through a real Fast3disNode (see ``bench_e2e``)."""
    import random
    import tempfile

    import rclpy
    from rclpy.parameter import Parameter

    from fast3dis_ros.ros.conversions import ns_to_stamp, numpy_to_image
    from fast3dis_ros.ros.node import Fast3disNode

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")  # loopback only (this process)
    dom = random.Random(os.getpid() ^ time.monotonic_ns()).randint(101, 200)
    ctx = rclpy.context.Context()
    rclpy.init(context=ctx, domain_id=dom)
    names = list(scene.camera_names)
    params = [Parameter("cameras", value=names), Parameter("window_size", value=window_size),
              Parameter("stride", value=stride), Parameter("queue_depth", value=2)]
    node = Fast3disNode(predictor=_StandIn(predict_fn), context=ctx, parameter_overrides=params)
    pub_log = {"window": [], "map": []}
    node.pub_window = _TimedPublisher(node.pub_window, pub_log["window"])
    node.pub_map = _TimedPublisher(node.pub_map, pub_log["map"])
    engine_ms: dict[int, float] = {}
    node.runner.on_prediction = lambda w, p: engine_ms.__setitem__(int(p.stamp_ns), float(p.engine_ms))
    prefill_map(node.runner.fusion, prefill, seed)
    n_win = (n_frames - window_size) // stride + 1
    proc, recv_path, listen_note = None, None, ""
    try:
        if listener:
            fd, recv_path = tempfile.mkstemp(prefix="fast3dis_bench_recv_", suffix=".jsonl")
            os.close(fd)
            proc = _start_listener(dom, recv_path, n_win)
            end = time.monotonic() + 30.0
            while time.monotonic() < end and not (node.pub_window.get_subscription_count() >= 1
                                                   and node.pub_map.get_subscription_count() >= 1):
                time.sleep(0.05)
            if node.pub_window.get_subscription_count() < 1:
                listen_note = "listener never matched (DDS discovery): no recv_* figures"
            elif not _warm_listener(node, recv_path):
                listen_note = "listener matched but got no warm-up message: recv_* figures may be late"
        msgs = []
        for f in range(n_frames):
            fs = []
            for c, name in enumerate(names):
                m = numpy_to_image(scene.view(f, c).rgb, "rgb8")
                m.header.stamp = ns_to_stamp(_e2e_stamp(f, c))
                m.header.frame_id = f"{name}_optical_frame"
                fs.append((name, m))
            msgs.append(fs)
        t_feed: dict[int, int] = {}
        runner = node.runner
        for fs in msgs:
            runner.engine.wait_idle(120.0)
            if proc is not None and listen_note == "" and pub_log["map"]:
                # windows arrive every stride / rate (0.4 s at the node defaults and 10 Hz): the previous
                # window's clouds are delivered by then, so the next one does not share the CPU with them
                _wait_received(recv_path, pub_log["map"][-1][0], 5.0)
            for name, m in fs:
                n0 = runner.windows_emitted
                t0 = time.monotonic_ns()
                node._on_image(m, name)  # the node's Image subscription callback
                if runner.windows_emitted > n0:
                    t_feed[max(_e2e_stamp_of(x) for _, x in fs)] = t0
        runner.engine.wait_idle(120.0)
        recv = {"window": {}, "map": {}}
        if proc is not None:
            try:
                proc.wait(timeout=15.0)
            except Exception:  # noqa: BLE001 - the listener missed messages: stop it, keep what it had
                proc.terminate()
                proc.wait(timeout=5.0)
            with open(recv_path) as fh:
                for line in fh:
                    r = json.loads(line)
                    recv[r["topic"]].setdefault(r["stamp_ns"], r["t_ns"])
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if recv_path:
            try:
                os.unlink(recv_path)
            except OSError:
                pass
        node.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    pubw = {s: t for s, t, _ in pub_log["window"]}
    pubm = {s: (t, n) for s, t, n in pub_log["map"]}
    out = {"window_ms": [], "map_ms": [], "engine_ms": [], "map_points": [], "window_points": [],
           "recv_window_ms": [], "recv_map_ms": []}
    wpts = {s: n for s, _, n in pub_log["window"]}
    for st, t0 in sorted(t_feed.items()):
        if st not in pubw or st not in pubm or st not in engine_ms:
            continue
        out["window_ms"].append((pubw[st] - t0) / 1e6)
        out["map_ms"].append((pubm[st][0] - t0) / 1e6)
        out["engine_ms"].append(engine_ms[st])
        out["map_points"].append(pubm[st][1])
        out["window_points"].append(wpts[st])
        if st in recv["window"]:
            out["recv_window_ms"].append((recv["window"][st] - t0) / 1e6)
        if st in recv["map"]:
            out["recv_map_ms"].append((recv["map"][st] - t0) / 1e6)
    acc = runner.accounting()
    out["fusion_ms"] = acc["fusion"]["ms"]
    out["listener"] = listen_note or ("subscriber process" if listener else "off")
    return out


def _warm_listener(node, recv_path: str, timeout_s: float = 20.0) -> bool:
    """Publish empty clouds stamped 1 ns on both topics until the listener has one of each (discovery is
    complete both ways: no first-sample repair delay in the figures)."""
    from sensor_msgs.msg import PointCloud2

    from fast3dis_ros.ros.conversions import ns_to_stamp

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for pub in (node.pub_window, node.pub_map):
            m = PointCloud2()
            m.header.stamp = ns_to_stamp(1)
            pub._pub.publish(m)  # not through the timing wrapper
        time.sleep(0.1)
        with open(recv_path) as fh:
            topics = {json.loads(line)["topic"] for line in fh if line.strip()}
        if topics >= set(LISTEN_TOPICS):
            return True
    return False


def _wait_received(recv_path: str, stamp_ns: int, timeout_s: float) -> bool:
    """Wait until the listener has the map cloud stamped ``stamp_ns``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with open(recv_path) as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    if r["topic"] == "map" and r["stamp_ns"] == stamp_ns:
                        return True
        time.sleep(0.005)
    return False


def _e2e_stamp_of(msg) -> int:
    from fast3dis_ros.ros.conversions import stamp_to_ns

    return stamp_to_ns(msg.header.stamp)


def _e2e_runner(scene, n_frames, predict_fn, window_size, stride, prefill, seed) -> dict:
    """Fallback without rclpy: the runner alone (async, as in the node), callbacks without messages."""
    from fast3dis_ros.core.frames import CameraFrame
    from fast3dis_ros.pipeline.runner import PipelineRunner

    t_win: dict[int, int] = {}
    t_map: dict[int, int] = {}
    eng: dict[int, float] = {}
    fusion = node_fusion()
    prefill_map(fusion, prefill, seed)
    runner = PipelineRunner(scene.camera_names, predict_fn, slop_ns=50_000_000, window_size=window_size,
                            stride=stride, fusion=fusion, sync_mode=False, queue_depth=2,
                            on_window=lambda w, p: t_win.__setitem__(int(w.stamp_ns), time.monotonic_ns()),
                            on_fusion=lambda r, p: (t_map.__setitem__(int(r.stamp_ns), time.monotonic_ns()),
                                                    eng.__setitem__(int(r.stamp_ns), float(p.engine_ms))))
    t_feed: dict[int, int] = {}
    try:
        for f in range(n_frames):
            runner.engine.wait_idle(120.0)
            for c, name in enumerate(scene.camera_names):
                v = scene.view(f, c)
                n0 = runner.windows_emitted
                t0 = time.monotonic_ns()
                runner.feed(CameraFrame(name, _e2e_stamp(f, c), v.rgb, f"{name}_optical_frame", v.K))
                if runner.windows_emitted > n0:
                    t_feed[_e2e_stamp(f, len(scene.camera_names) - 1)] = t0
        runner.engine.wait_idle(120.0)
    finally:
        runner.stop(5.0)
    out = {"window_ms": [], "map_ms": [], "engine_ms": []}
    for st, t0 in sorted(t_feed.items()):
        if st in t_win and st in t_map:
            out["window_ms"].append((t_win[st] - t0) / 1e6)
            out["map_ms"].append((t_map[st] - t0) / 1e6)
            out["engine_ms"].append(eng[st])
    out["fusion_ms"] = runner.accounting()["fusion"]["ms"]
    return out


# -------------------------------------------------------------------------------------------- main
def run_node_bench(*, pack_points: int = 1_000_000, pack_repeats: int = 7, image_hw: tuple[int, int] = (480, 640),
                   image_repeats: int = 20, cams: int = 3, sync_sets: int = 2000,
                   fusion_sizes=((224, 168), (504, 378)), fusion_views: int = 8, fusion_windows_n: int = 4,
                   fusion_prefill: int = 990_000, e2e: dict | None = None, e2e_gt_size: tuple | None = (504, 378),
                   e2e_gt_prefill: int = 990_000, profile: bool = False, log=print) -> dict:
    """Every node figure; returns {"rows": [...], "profile": str | None, "machine": {...}}."""
    rows: list[dict] = []
    steps = [
        ("pack", lambda: bench_pack(pack_points, pack_repeats)),
        ("images", lambda: bench_images(cams, image_hw[0], image_hw[1], image_repeats)),
        ("sync", lambda: bench_sync(cams, sync_sets)),
        ("fusion", lambda: bench_fusion(fusion_sizes, fusion_views, n_windows=fusion_windows_n)),
        ("fusion_full_map", lambda: bench_fusion(fusion_sizes[-1:], fusion_views, n_windows=fusion_windows_n,
                                                 prefill=fusion_prefill) if fusion_prefill > 0 else []),
        ("e2e", lambda: bench_e2e(cams=cams, **(e2e or {}))),
    ]
    if e2e_gt_size:
        gt = {**(e2e or {}), "width": e2e_gt_size[0], "height": e2e_gt_size[1], "predictor": "gt"}
        steps.append(("e2e_gt", lambda: bench_e2e(cams=cams, **gt)))
        if e2e_gt_prefill > 0:
            steps.append(("e2e_gt_full_map", lambda: bench_e2e(cams=cams, **{**gt, "prefill": e2e_gt_prefill})))
    for name, fn in steps:
        t0 = time.perf_counter()
        try:
            new = fn()
        except Exception as e:  # noqa: BLE001  -- one failing figure must not hide the others
            import traceback

            new = [row(name, "error", "", None, None, {"error": f"{type(e).__name__}: {e}",
                                                        "traceback": traceback.format_exc(limit=6)})]
        rows.extend(new)
        if log:
            for r in new:
                log(format_rows([r], header=False))
            log(f"#   ({name}: {time.perf_counter() - t0:.1f} s)")
    prof = None
    if profile and fusion_sizes:
        w, h = fusion_sizes[-1]
        prof = profile_fusion(w, h, fusion_views, prefill=fusion_prefill)
    return {"rows": rows, "profile": prof, "machine": machine_info()}


def machine_info() -> dict:
    info: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    info["numpy"] = np.__version__
    return info


def _fmt(v, nd=2) -> str:
    if isinstance(v, float):
        if not np.isfinite(v):
            return str(v)
        return f"{v:.{nd}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def format_rows(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines.append(f"{'figure':<28} {'measured':>12} {'unit':<14} {'target':<18} {'ok':<4}")
    for r in rows:
        ok = {True: "yes", False: "NO", None: "-"}[r.get("pass")]
        lines.append(f"{r['name']:<28} {_fmt(r['measured']):>12} {r['unit']:<14} {r['target']:<18} {ok:<4}")
    return "\n".join(lines)


def add_args(ap: argparse.ArgumentParser, prefix: str = "") -> None:
    p = prefix
    ap.add_argument(f"--{p}pack-points", type=int, default=1_000_000)
    ap.add_argument(f"--{p}cams", type=int, default=3)
    ap.add_argument(f"--{p}image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    ap.add_argument(f"--{p}sync-sets", type=int, default=2000)
    ap.add_argument(f"--{p}fusion-sizes", nargs="+", default=["224x168", "504x378"], help="WxH per entry")
    ap.add_argument(f"--{p}fusion-views", type=int, default=8)
    ap.add_argument(f"--{p}fusion-windows", type=int, default=4)
    ap.add_argument(f"--{p}fusion-prefill", type=int, default=990_000,
                    help="also time the last fusion size with the map holding this many old voxels (cap 1M); 0: off")
    ap.add_argument(f"--{p}e2e-size", type=int, nargs=2, default=[224, 168], metavar=("W", "H"))
    ap.add_argument(f"--{p}e2e-window", type=int, default=8, help="frame sets per window (node default 8)")
    ap.add_argument(f"--{p}e2e-stride", type=int, default=4)
    ap.add_argument(f"--{p}e2e-windows", type=int, default=4)
    ap.add_argument(f"--{p}e2e-process-size", type=int, default=None,
                    help="network long edge (default: the tiny config's, 70)")
    ap.add_argument(f"--{p}e2e-gt-size", type=int, nargs=2, default=[504, 378], metavar=("W", "H"),
                    help="also the overhead with a ground-truth stand-in predictor at this size (0 0: off)")
    ap.add_argument(f"--{p}e2e-gt-prefill", type=int, default=990_000,
                    help="and again with the map first holding this many old voxels (cap 1M); 0: off")
    ap.add_argument(f"--{p}e2e-no-listener", action="store_true",
                    help="no subscriber process (no recv_* figures)")
    ap.add_argument(f"--{p}profile", action="store_true", help="cProfile MapFusion.integrate at the last fusion size")


def kwargs_from_args(args, prefix: str = "") -> dict:
    g = lambda k: getattr(args, (prefix + k).replace("-", "_"))  # noqa: E731
    sizes = []
    for s in g("fusion-sizes"):
        w, h = s.lower().split("x")
        sizes.append((int(w), int(h)))
    ew, eh = g("e2e-size")
    iw, ih = g("image-size")
    return dict(
        pack_points=g("pack-points"), cams=g("cams"), image_hw=(ih, iw), sync_sets=g("sync-sets"),
        fusion_sizes=tuple(sizes), fusion_views=g("fusion-views"), fusion_windows_n=g("fusion-windows"),
        fusion_prefill=g("fusion-prefill"),
        e2e=dict(window_size=g("e2e-window"), stride=g("e2e-stride"), n_windows=g("e2e-windows"), width=ew, height=eh,
                 process_size=g("e2e-process-size"), listener=not g("e2e-no-listener")),
        e2e_gt_size=tuple(g("e2e-gt-size")) if min(g("e2e-gt-size")) > 0 else None,
        e2e_gt_prefill=g("e2e-gt-prefill"),
        profile=g("profile"),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fast3dis_ros.ros.bench_node", description=__doc__.split("\n")[0])
    add_args(ap)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (2: keep the machine usable)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--listen", default=None, help=argparse.SUPPRESS)  # the e2e bench's subscriber process
    ap.add_argument("--listen-expect", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.listen:
        return listen(args.listen, args.listen_expect)
    import torch

    torch.set_num_threads(max(1, args.threads))
    print(f"# fast3dis bench_node (CPU) load={machine_info().get('loadavg')}")
    print(format_rows([], header=True))
    res = run_node_bench(**kwargs_from_args(args))
    print("#")
    print(format_rows(res["rows"]))
    if res["profile"]:
        print(res["profile"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
