#!/usr/bin/env python3
"""Bounded soak run of the fast3dis node over DDS on loopback.

Starts the node as a subprocess (tiny model on CPU: the bundled checkpoint, or random weights with
``--random-weights``), then streams a synthetic scene's camera streams (Image + CameraInfo per camera) in a
loop at a fixed rate. Every ``--jump-every`` loops the stamps restart from the beginning, as when a bag is
played with ``--loop`` (or a sim-time reset): a time jump back that the node must survive. Every
``--sample-period`` seconds it samples the node's RSS (psutil), the running map size (width of the last
``~/instances_cloud``) and the latencies (``/diagnostics``). At the end it stops streaming, lets the node
drain, reads the final diagnostics, stops the node with SIGINT and reports:

- frames sent, frames the node received (the rest was lost in DDS transport, best-effort QoS), frames
  rejected by the node, and frames lost **unaccounted** inside the node (must be 0:
  received == rejected + pushed and pushed == in_sets + pending + sync drops);
- frame sets processed / dropped by reason / in flight, and unaccounted frame sets (must be 0);
- RSS at start, median over the first / second half of the samples after ``--warmup`` ("mid" / "end";
  growth mid -> end: a leak shows as a slope, one-off allocator steps do not dominate), max, after the drain; the map size (max seen, the cap), latency p50s over time.

Writes ``soak.json`` and (unless ``--no-plot``) ``soak.png`` into ``--out``; prints a table. Exit code 0
when nothing was unaccounted and the node exited cleanly, 1 otherwise.

    .venv/bin/python scripts/soak.py --minutes 3 --out outputs/soak
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="streaming time (default 3)")
    ap.add_argument("--seconds", type=float, default=None, help="streaming time in seconds (overrides --minutes)")
    ap.add_argument("--rate", type=float, default=5.0, help="frame sets per second (default 5)")
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--width", type=int, default=112)
    ap.add_argument("--height", type=int, default=84)
    ap.add_argument("--loop-frames", type=int, default=8, help="frames of the synthetic scene (one loop)")
    ap.add_argument("--jump-every", type=int, default=2, help="stamps restart (time jump back) every N loops")
    ap.add_argument("--sample-period", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds at the start left out of the RSS growth figure (default: 25%% of the run, <= 30)")
    ap.add_argument("--window-size", type=int, default=4)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--queue-depth", type=int, default=2)
    ap.add_argument("--voxel-size", type=float, default=0.01)
    ap.add_argument("--max-map-points", type=int, default=50_000)
    ap.add_argument("--random-weights", action="store_true", help="random tiny model instead of the bundled one")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "soak"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def diag_table(msgs) -> dict:
    """{status name: {key: value}} of the newest DiagnosticArray seen for each status."""
    out = {}
    for d in msgs:
        for s in d.status:
            out[s.name] = {"_message": s.message, **{kv.key: kv.value for kv in s.values}}
    return out


def _num(x, default=0.0):
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


def main(argv=None) -> int:
    a = parse_args(argv)
    duration = a.seconds if a.seconds is not None else a.minutes * 60.0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(101, 160)))
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import numpy as np
    import psutil
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, PointCloud2

    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene
    from fast3dis_ros.model.checkpoint import BUNDLED_CHECKPOINT
    from fast3dis_ros.ros.conversions import ns_to_stamp, numpy_to_image

    t_gen = time.monotonic()
    scene = generate_scene(SceneConfig(n_cameras=a.cameras, n_frames=a.loop_frames, width=a.width,
                                       height=a.height, seed=a.seed))
    cams = list(scene.camera_names)
    print(f"soak: scene {a.loop_frames} frames x {cams} {a.width}x{a.height} in {time.monotonic() - t_gen:.1f} s; "
          f"domain {os.environ['ROS_DOMAIN_ID']}", flush=True)

    use_ck = not a.random_weights
    node_cmd = [sys.executable, "-m", "fast3dis_ros.ros.node", "--ros-args",
                "-p", f"cameras:=[{','.join(cams)}]", "-p", f"window_size:={a.window_size}",
                "-p", f"stride:={a.stride}", "-p", f"queue_depth:={a.queue_depth}", "-p", "device:=cpu",
                "-p", "sync_slop:=0.02", "-p", "diagnostics_period:=1.0", "-p", f"voxel_size:={a.voxel_size}",
                "-p", f"max_map_points:={a.max_map_points}", "-p", "score_threshold:=0.3"]
    node_cmd += ["-p", f"checkpoint:={BUNDLED_CHECKPOINT}"] if use_ck else ["-p", "model_size:=tiny", "-p", "checkpoint:=''"]
    log_path = out / "node.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    logf = open(log_path, "wb")
    proc = subprocess.Popen(node_cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                            start_new_session=True)
    pnode = psutil.Process(proc.pid)

    ctx = rclpy.context.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("fast3dis_soak", context=ctx)
    from rclpy.executors import SingleThreadedExecutor

    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    q = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    img_pubs = [node.create_publisher(__import__("sensor_msgs.msg", fromlist=["Image"]).Image,
                                      f"/{c}/image_raw", q) for c in cams]
    info_pubs = [node.create_publisher(CameraInfo, f"/{c}/camera_info", q) for c in cams]
    state = {"map_width": 0, "map_msgs": 0, "diag": []}

    def on_map(m):
        state["map_width"] = int(m.width) * int(m.height)
        state["map_msgs"] += 1
        state["max_map"] = max(state.get("max_map", 0), state["map_width"])

    node.create_subscription(PointCloud2, "/fast3dis/instances_cloud", on_map, q)
    node.create_subscription(DiagnosticArray, "/diagnostics",
                             lambda m: (state["diag"].append(m), state.__setitem__("diag", state["diag"][-4:])), q)

    def spin(seconds):
        end = time.monotonic() + seconds
        while True:
            rem = end - time.monotonic()
            if rem <= 0:
                break
            ex.spin_once(timeout_sec=min(0.02, rem))

    # wait for the node to subscribe (model load)
    t0 = time.monotonic()
    while any(p.get_subscription_count() < 1 for p in img_pubs + info_pubs):
        if proc.poll() is not None or time.monotonic() - t0 > 120:
            print(log_path.read_text()[-3000:])
            raise SystemExit("soak: the node did not come up")
        spin(0.1)
    print(f"soak: node up in {time.monotonic() - t0:.1f} s ({'bundled checkpoint' if use_ck else 'random tiny'})",
          flush=True)

    base_ns = 1_700_000_000_000_000_000
    period_ns = int(round(1e9 / a.rate))
    infos = []
    for v in scene.frames[0]:
        ci = CameraInfo(width=a.width, height=a.height, distortion_model="plumb_bob")
        ci.k = [float(x) for x in np.asarray(v.K, np.float64).ravel()]
        ci.d = [0.0] * 5
        infos.append(ci)
    imgs = [[numpy_to_image(v.rgb, "rgb8") for v in fr] for fr in scene.frames]

    samples = []
    sent = 0
    jumps = 0
    tick = 0
    L, N = a.loop_frames, max(1, a.jump_every)
    t_start = time.monotonic()
    next_pub = t_start
    next_sample = t_start
    end_t = t_start + duration
    while time.monotonic() < end_t:
        now = time.monotonic()
        if now >= next_pub:
            loop, fi = divmod(tick, L)
            epoch, lin = divmod(loop, N)
            if fi == 0 and lin == 0 and epoch > 0:
                jumps += 1
            ns = base_ns + (lin * L + fi) * period_ns
            stamp = ns_to_stamp(ns)
            for i, c in enumerate(cams):
                m = imgs[fi][i]
                m.header.stamp, m.header.frame_id = stamp, f"{c}_optical_frame"
                ci = infos[i]
                ci.header.stamp, ci.header.frame_id = stamp, m.header.frame_id
                info_pubs[i].publish(ci)
                img_pubs[i].publish(m)
                sent += 1
            tick += 1
            next_pub += 1.0 / a.rate
            if next_pub < now - 1.0:  # fell far behind (machine busy): do not burst
                next_pub = now
        if now >= next_sample:
            next_sample += a.sample_period
            d = diag_table(state["diag"])
            eng, outs = d.get("fast3dis: engine", {}), d.get("fast3dis: outputs", {})
            try:
                rss = pnode.memory_info().rss / 2**20
            except psutil.Error:
                rss = float("nan")
            samples.append({"t_s": round(now - t_start, 2), "rss_mib": round(rss, 1), "frames_sent": sent,
                            "map_points": state["map_width"], "results": int(_num(outs.get("results_published"))),
                            "engine_ms_p50": _num(eng.get("engine_ms_p50"), float("nan")),
                            "e2e_ms_p50": _num(eng.get("e2e_ms_p50"), float("nan")),
                            "queue_len": int(_num(eng.get("queue_len")))})
            s = samples[-1]
            print(f"  t={s['t_s']:6.1f}s rss={s['rss_mib']:7.1f} MiB map={s['map_points']:6d} results={s['results']:4d} "
                  f"engine p50={s['engine_ms_p50']:6.1f} ms e2e p50={s['e2e_ms_p50']:6.1f} ms", flush=True)
        spin(max(0.0, min(next_pub, next_sample) - time.monotonic()))
    stream_s = time.monotonic() - t_start

    # drain: wait until the node's counters stop changing (engine idle), then take the final diagnostics
    last, stable_since = None, time.monotonic()
    t_drain = time.monotonic()
    while time.monotonic() - t_drain < 30:
        spin(0.5)
        d = diag_table(state["diag"])
        key = json.dumps([d.get("fast3dis: engine", {}).get(k) for k in ("processed", "queue_len",
                                                                          "frame_sets_processed")]
                         + [d.get("fast3dis: outputs", {}).get("results_published")])
        if key != last:
            last, stable_since = key, time.monotonic()
        elif time.monotonic() - stable_since > 2.5 and d.get("fast3dis: engine", {}).get("queue_len") == "0":
            break
    final = diag_table(state["diag"])
    try:
        rss_final = pnode.memory_info().rss / 2**20
    except psutil.Error:
        rss_final = float("nan")

    # stop the node like a user would
    t_stop = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        rc = proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait(5)
        rc = f"killed ({rc})"
    stop_s = time.monotonic() - t_stop
    logf.close()
    ex.shutdown(timeout_sec=1.0)
    node.destroy_node()
    rclpy.shutdown(context=ctx)

    # ---------------------------------------------------------------- accounting
    received = rejected = 0
    rejected_by = {}
    for c in cams:
        st = final.get(f"fast3dis: input {c}", {})
        received += int(_num(st.get("images_received")))
        for k, v in st.items():
            if k.startswith("rejected_"):
                rejected_by[k[9:]] = rejected_by.get(k[9:], 0) + int(_num(v))
    rejected = sum(rejected_by.values())
    sync, eng, outs = final.get("fast3dis: sync", {}), final.get("fast3dis: engine", {}), final.get("fast3dis: outputs", {})
    sync_drops = {k[5:]: int(_num(v)) for k, v in sync.items() if k.startswith("drop_")}
    pushed, in_sets, pending = (int(_num(outs.get(k))) for k in ("frames_pushed", "frames_in_sets", "frames_pending"))
    unaccounted_frames = abs(received - rejected - pushed) + abs(pushed - in_sets - pending - sum(sync_drops.values()))
    sets_received = int(_num(sync.get("frame_sets")))
    sets_processed = int(_num(eng.get("frame_sets_processed")))
    sets_in_flight = int(_num(eng.get("frame_sets_in_flight")))
    sets_dropped = {k[10:]: int(_num(v)) for k, v in eng.items() if k.startswith("drop_sets_")}
    sets_unaccounted = sets_received - sets_processed - sum(sets_dropped.values()) - sets_in_flight
    window_drops = {k[5:]: int(_num(v)) for k, v in eng.items() if k.startswith("drop_") and not k.startswith("drop_sets_")}
    rss = [s["rss_mib"] for s in samples]  # while streaming
    warm = min(30.0, 0.25 * stream_s) if a.warmup is None else a.warmup
    meas = [s["rss_mib"] for s in samples if s["t_s"] >= warm] or rss
    half = max(1, len(meas) // 2)
    mid, end = float(np.median(meas[:half])), float(np.median(meas[half:] or meas))  # robust to one-off spikes
    lat = [s["e2e_ms_p50"] for s in samples if s["e2e_ms_p50"] == s["e2e_ms_p50"]]
    summary = {
        "stream_s": round(stream_s, 1), "rate_hz": a.rate, "cameras": len(cams),
        "image_size": f"{a.width}x{a.height}", "model": "bundled tiny checkpoint" if use_ck else "random tiny",
        "frames_sent": sent, "frames_received_by_node": received, "frames_not_received_dds": sent - received,
        "frames_rejected": rejected_by, "frames_pushed": pushed, "frames_in_sets": in_sets,
        "frames_pending": pending, "frames_dropped_by_sync": sync_drops,
        "frames_lost_unaccounted": unaccounted_frames,
        "frame_sets_received": sets_received, "frame_sets_processed": sets_processed,
        "frame_sets_dropped": sets_dropped, "frame_sets_in_flight": sets_in_flight,
        "frame_sets_unaccounted": sets_unaccounted, "windows_dropped": window_drops,
        "windows_processed": int(_num(eng.get("processed"))), "results_published": int(_num(outs.get("results_published"))),
        "time_jumps_sent": jumps, "sync_resets": int(_num(outs.get("sync_resets"))),
        "rss_start_mib": rss[0], "rss_warmup_s": round(warm, 1), "rss_mid_mib": round(mid, 1),
        "rss_end_mib": round(end, 1), "rss_growth_mid_to_end_mib": round(end - mid, 1), "rss_max_mib": max(rss),
        "rss_after_drain_mib": round(rss_final, 1),
        "max_map_points_seen": int(state.get("max_map", 0)), "max_map_points": a.max_map_points,
        "engine_ms_p50_final": _num(eng.get("engine_ms_p50")), "engine_ms_max": _num(eng.get("engine_ms_max")),
        "e2e_ms_p50_median_over_samples": float(np.median(lat)) if lat else float("nan"),
        "node_exit_code": rc, "node_stop_s": round(stop_s, 2),
    }
    rep = {"args": vars(a), "summary": summary, "samples": samples, "final_diagnostics": final,
           "node_command": node_cmd}
    (out / "soak.json").write_text(json.dumps(rep, indent=2, default=str))

    print("\n  t [s]   RSS [MiB]  map pts  results  engine p50 [ms]  e2e p50 [ms]  queue")
    for s in samples:
        print(f"  {s['t_s']:6.1f}  {s['rss_mib']:9.1f}  {s['map_points']:7d}  {s['results']:7d}  "
              f"{s['engine_ms_p50']:15.1f}  {s['e2e_ms_p50']:12.1f}  {s['queue_len']:5d}")
    print("\nsummary:")
    for k, v in summary.items():
        print(f"  {k:32s} {v}")
    if not a.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = [s["t_s"] for s in samples]
        fig, ax = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
        ax[0].plot(t, [s["rss_mib"] for s in samples], "o-")
        ax[0].set_ylabel("node RSS [MiB]")
        ax[1].plot(t, [s["map_points"] for s in samples], "o-")
        ax[1].axhline(a.max_map_points, color="r", ls="--", label="max_map_points")
        ax[1].set_ylabel("map points")
        ax[1].legend()
        ax[2].plot(t, [s["engine_ms_p50"] for s in samples], "o-", label="engine p50")
        ax[2].plot(t, [s["e2e_ms_p50"] for s in samples], "o-", label="end-to-end p50")
        ax[2].set_ylabel("latency [ms]")
        ax[2].set_xlabel("time [s]")
        ax[2].legend()
        fig.suptitle(f"fast3dis soak: {len(cams)} cameras @ {a.rate} Hz, {summary['model']}, "
                     f"{jumps} time jumps")
        fig.tight_layout()
        fig.savefig(out / "soak.png", dpi=90)
        plt.close(fig)
    print(f"\nwrote {out / 'soak.json'}" + ("" if a.no_plot else f", {out / 'soak.png'}") + f", {log_path}")
    ok = unaccounted_frames == 0 and sets_unaccounted == 0 and rc == 0
    if not ok:
        print("soak: FAILED (unaccounted frames / frame sets, or the node did not exit cleanly)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
