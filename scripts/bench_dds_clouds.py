#!/usr/bin/env python3
"""Large PointCloud2 messages between two processes over Fast DDS, with and without
config/fastdds_large_clouds.xml: received latency and integrity.

For each transport setting ("default": no profile file; "profile": FASTDDS_DEFAULT_PROFILES_FILE pointing at
config/fastdds_large_clouds.xml) it starts a publisher process and a subscriber process (plain rclpy, own
ROS domain, ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) and sends ``--messages`` PointCloud2 messages of
``--points`` points in the node's layout (x y z rgb instance score, 24 bytes a point; 125k points = 3 MB,
the size of a ~/window_cloud at 504x378), one every ``--period`` s (0.4 s: the node's window rate at its
defaults), on the node's output QoS (reliable, keep last 2), each after the previous one was acknowledged.

Latency = from just before ``publish()`` in the publisher (message already built) to the subscriber's
callback having the message as a Python object (CLOCK_MONOTONIC, shared by the processes), i.e. the
transport part of section 13's "received" figures (publish-side serialisation included). The subscriber
checks every message against the bytes the publisher generated (deterministic, ``cloud_bytes``).

    .venv/bin/python scripts/bench_dds_clouds.py --points 125000 1000000 --runs 2 --json out.json

Roles (child processes, also used by test/test_fastdds_profile.py):
    --role pub --out F --messages N --points P --period S
    --role sub --out F --messages N --points P
Each writes JSON lines to ``--out``: {"kind": "shm", ...} (the largest Fast DDS shared-memory segment it maps,
from /proc/self/maps) and one record per message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "config" / "fastdds_large_clouds.xml"
TOPIC = "/dds_bench/cloud"
ACK_TOPIC = "/dds_bench/ack"
WARMUP = 1 << 31  # index of the warm-up messages (not measured)


def cloud_bytes(index: int, points: int) -> bytes:
    """The payload of message ``index``: deterministic pseudo-random bytes (any bit pattern must survive)."""
    import numpy as np

    return np.random.default_rng([7, index % WARMUP, points]).integers(0, 256, points * 24, np.uint8).tobytes()


def sha256(b) -> str:
    return hashlib.sha256(b).hexdigest()


def shm_segment_bytes() -> int:
    """Largest /dev/shm/fastdds_<id> segment (not the port queues) mapped by this process, bytes; 0: none."""
    best = 0
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 6 or not parts[5].startswith("/dev/shm/fastdds_"):
                    continue
                name = parts[5].rsplit("/", 1)[1]
                if name.startswith("fastdds_port") or name.endswith("_el"):
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                best = max(best, hi - lo)
    except OSError:
        pass
    return best


def _write(fh, rec: dict) -> None:
    fh.write(json.dumps(rec) + "\n")
    fh.flush()


def _ros():
    import rclpy
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import UInt32

    sys.path.insert(0, str(ROOT))
    from fast3dis_ros.ros.qos import output_qos

    return rclpy, PointCloud2, UInt32, output_qos


def run_pub(out: str, messages: int, points: int, period: float, timeout: float = 60.0) -> int:
    rclpy, PointCloud2, UInt32, output_qos = _ros()
    from fast3dis_ros.ros.conversions import _point_fields, _set_uint8_data, ns_to_stamp

    import array

    rclpy.init()
    node = rclpy.create_node("dds_bench_pub")
    pub = node.create_publisher(PointCloud2, TOPIC, output_qos(2))
    acked: set[int] = set()
    node.create_subscription(UInt32, ACK_TOPIC, lambda m: acked.add(int(m.data)), output_qos(10))
    fields, step = _point_fields()

    def build(index: int) -> PointCloud2:
        msg = PointCloud2()
        msg.header.frame_id = f"cloud_{index}"
        msg.height, msg.width = 1, points
        msg.fields = fields
        msg.is_bigendian = False
        msg.point_step, msg.row_step = step, step * points
        msg.is_dense = False
        a = array.array("B")
        a.frombytes(cloud_bytes(index, points))
        _set_uint8_data(msg, a)
        return msg

    def spin_until(pred, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not pred():
            rclpy.spin_once(node, timeout_sec=0.01)
        return pred()

    fh = open(out, "w")
    rc = 1
    try:
        _write(fh, {"kind": "shm", "role": "pub", "bytes": shm_segment_bytes()})
        end = time.monotonic() + timeout
        # warm-up: until the subscriber acknowledged one (both sides matched, buffers allocated)
        warm = build(WARMUP)
        while time.monotonic() < end and WARMUP not in acked:
            if pub.get_subscription_count() > 0:
                warm.header.stamp = ns_to_stamp(time.monotonic_ns())
                pub.publish(warm)
            spin_until(lambda: WARMUP in acked, 0.5)
        if WARMUP not in acked:
            _write(fh, {"kind": "error", "error": "no subscriber acknowledged the warm-up"})
            return 1
        for i in range(messages):
            msg = build(i)
            next_t = time.monotonic() + period
            t0 = time.monotonic_ns()
            msg.header.stamp = ns_to_stamp(t0)
            pub.publish(msg)
            t1 = time.monotonic_ns()
            _write(fh, {"kind": "sent", "index": i, "publish_ms": (t1 - t0) / 1e6})
            if not spin_until(lambda: i in acked, max(5.0, end - time.monotonic())):
                _write(fh, {"kind": "error", "error": f"message {i} not acknowledged"})
                return 1
            spin_until(lambda: False, max(0.0, next_t - time.monotonic()))
        rc = 0
        spin_until(lambda: False, 0.2)  # let the last ack's reader settle before tearing down
    finally:
        fh.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return rc


def run_sub(out: str, messages: int, points: int, timeout: float = 60.0) -> int:
    rclpy, PointCloud2, UInt32, output_qos = _ros()
    from fast3dis_ros.ros.conversions import stamp_to_ns

    rclpy.init()
    node = rclpy.create_node("dds_bench_sub")
    ack = node.create_publisher(UInt32, ACK_TOPIC, output_qos(10))
    fh = open(out, "w")
    done: set[int] = set()

    def cb(msg) -> None:
        t = time.monotonic_ns()
        index = int(msg.header.frame_id.split("_")[1])
        if index != WARMUP and index not in done:
            data = msg.data  # array('B'), the bytes as received
            _write(fh, {"kind": "recv", "index": index, "latency_ms": (t - stamp_to_ns(msg.header.stamp)) / 1e6,
                        "width": msg.width, "height": msg.height, "point_step": msg.point_step,
                        "row_step": msg.row_step, "fields": [f.name for f in msg.fields], "nbytes": len(data),
                        "sha256": sha256(data), "equal": bytes(data) == cloud_bytes(index, points)})
            done.add(index)
        ack.publish(UInt32(data=index))

    node.create_subscription(PointCloud2, TOPIC, cb, output_qos(2))
    _write(fh, {"kind": "shm", "role": "sub", "bytes": shm_segment_bytes()})
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end and len(done) < messages:
            rclpy.spin_once(node, timeout_sec=0.05)
        stop = time.monotonic() + 0.5  # the last ack must reach the publisher
        while time.monotonic() < stop:
            rclpy.spin_once(node, timeout_sec=0.05)
    finally:
        fh.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0 if len(done) >= messages else 1


# ------------------------------------------------------------------------------------------ benchmark
def child_env(domain_id: int, profile: Path | None) -> dict:
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("ROS_LOCALHOST_ONLY", None)
    for k in ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE"):
        env.pop(k, None)
    if profile is not None:
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def read_records(path: str) -> list[dict]:
    try:
        return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    except OSError:
        return []


def run_pair(profile: Path | None, sub_profile: Path | None, messages: int, points: int, period: float,
             timeout: float = 120.0) -> dict:
    """One publisher process with the Fast DDS ``profile`` and one subscriber with ``sub_profile``
    (None: Fast DDS defaults)."""
    dom = random.Random(os.getpid() ^ time.monotonic_ns()).randint(101, 200)
    tmp = Path(tempfile.mkdtemp(prefix="dds_bench_"))
    envs = {"pub": child_env(dom, profile), "sub": child_env(dom, sub_profile)}
    common = ["--messages", str(messages), "--points", str(points)]
    procs = {}
    for role in ("sub", "pub"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--out", str(tmp / f"{role}.jsonl"),
               *common] + (["--period", str(period)] if role == "pub" else [])
        procs[role] = subprocess.Popen(cmd, env=envs[role], stdout=open(tmp / f"{role}.log", "wb"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
    rcs = {}
    for role, p in procs.items():
        try:
            rcs[role] = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rcs[role] = p.wait()
    recs = {r: read_records(str(tmp / f"{r}.jsonl")) for r in procs}
    recv = [r for r in recs["sub"] if r["kind"] == "recv"]
    sent = [r for r in recs["pub"] if r["kind"] == "sent"]
    shm = {r["role"]: r["bytes"] for rr in recs.values() for r in rr if r["kind"] == "shm"}
    logs = {r: (tmp / f"{r}.log").read_text(errors="replace") for r in procs}
    lat = [r["latency_ms"] for r in recv]
    return {"profile": str(profile) if profile else None, "sub_profile": str(sub_profile) if sub_profile else None, "points": points, "messages": messages,
            "rc": rcs, "received": len(recv), "all_equal": bool(recv) and all(r["equal"] for r in recv),
            "latency_ms": lat, "publish_ms": [r["publish_ms"] for r in sent], "shm_segment_bytes": shm,
            "xml_errors": any("XMLPARSER" in t for t in logs.values()), "logs": logs}


def _summ(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["pub", "sub"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--points", type=int, nargs="+", default=[125_000], help="points per message (24 B each)")
    ap.add_argument("--messages", type=int, default=20, help="measured messages per run")
    ap.add_argument("--period", type=float, default=0.4, help="seconds between messages")
    ap.add_argument("--runs", type=int, default=2, help="runs per setting (alternated)")
    ap.add_argument("--profile", default=str(PROFILE), help="the profile file of the 'profile' setting")
    ap.add_argument("--mixed", action="store_true",
                    help="also 'pub-only' and 'sub-only': the profile loaded by one of the two processes")
    ap.add_argument("--json", default=None, help="write all runs here")
    args = ap.parse_args(argv)
    if args.role == "pub":
        return run_pub(args.out, args.messages, args.points[0], args.period)
    if args.role == "sub":
        return run_sub(args.out, args.messages, args.points[0])

    print(f"# bench_dds_clouds: {os.cpu_count()} cpus, load {os.getloadavg()}, profile {args.profile}")
    print(f"{'points':>8} {'MB':>5} {'setting':<8} {'run':>3} {'recv':>5} {'equal':<5} "
          f"{'latency ms median (min-max)':<28} {'p90':>6} {'publish() ms':<18} {'SHM segments mapped'}")
    runs = []
    prof = Path(args.profile)
    settings = {"default": (None, None), "profile": (prof, prof)}
    if args.mixed:
        settings.update({"pub-only": (prof, None), "sub-only": (None, prof)})
    for points in args.points:
        for k in range(args.runs):
            for setting, (p_pub, p_sub) in settings.items():
                r = run_pair(p_pub, p_sub, args.messages, points, args.period)
                r.update(setting=setting, run=k)
                runs.append(r)
                lat = sorted(r["latency_ms"])
                p90 = lat[int(0.9 * (len(lat) - 1))] if lat else float("nan")
                print(f"{points:>8} {points * 24 / 1e6:>5.1f} {setting:<8} {k:>3} {r['received']:>5} "
                      f"{str(r['all_equal']):<5} {_summ(lat):<28} {p90:>6.1f} {_summ(r['publish_ms']):<18} "
                      f"pub {r['shm_segment_bytes'].get('pub', 0) / 2**20:.1f} / sub "
                      f"{r['shm_segment_bytes'].get('sub', 0) / 2**20:.1f} MiB{'  XMLPARSER errors!' if r['xml_errors'] else ''}", flush=True)
                if r["rc"] != {"sub": 0, "pub": 0}:
                    print(f"#   exit codes {r['rc']}; logs:\n" + "\n".join(r["logs"].values())[-3000:])
    print("# pooled over runs: median (min-max) of the per-message latencies")
    for points in args.points:
        for setting in settings:
            lat = [x for r in runs if r["points"] == points and r["setting"] == setting for x in r["latency_ms"]]
            print(f"{points:>8} {setting:<8} n={len(lat):<4} {_summ(lat)}")
    if args.json:
        for r in runs:
            r.pop("logs")
        Path(args.json).write_text(json.dumps({"argv": sys.argv, "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                                               "runs": runs}, indent=1))
    return 0 if all(r["all_equal"] and r["received"] == args.messages for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
