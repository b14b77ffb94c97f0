"""CPU smoke tests of fast3dis-bench (--baseline, --node, --suite plumbing) and bench_node.

They check that every expected row is there with finite positive numbers; no timing thresholds (the
machine may be loaded).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pos(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _nonneg(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _bench_exe() -> list[str]:
    exe = Path(sys.executable).with_name("fast3dis-bench")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from fast3dis_ros.cli import bench_main; bench_main()"]


def test_bench_cli_baseline_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = _bench_exe() + ["--size", "tiny", "--device", "cpu", "--views", "2", "--iters", "1", "--warmup", "0",
                          "--height", "56", "--width", "70", "--baseline", "--json", str(out),
                          "--plot", str(tmp_path / "curve.png")]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "HDBSCAN baseline" in p.stdout and "f3d_ms" in p.stdout
    from PIL import Image

    with Image.open(tmp_path / "curve.png") as png:  # the time / memory curve (bench_plot)
        assert png.size == (1320, 528)
    res = json.loads(out.read_text())
    assert [r["views"] for r in res["rows"]] == [2]
    r = res["rows"][0]
    for k in ("da3_ms", "fast3dis_ms", "backbone_ms", "ratio", "floor_da3_ms", "floor_fast3dis_ms",
              "floor_measured_da3_ms", "floor_measured_fast3dis_ms"):
        assert _pos(r[k]), (k, r[k])
    assert set(r["measured_tflops"]) == {"linear", "attn_global", "attn_local", "conv"}
    assert all(_pos(v) for v in r["measured_tflops"].values())
    # the same FLOPs at measured (below-peak) rates cost more time than at the spec-sheet peak
    assert r["floor_measured_fast3dis_ms"] > r["floor_full_fast3dis_ms"]
    assert [b["views"] for b in res["baseline_rows"]] == [2]
    b = res["baseline_rows"][0]
    for k in ("forward_ms", "cluster_ms", "total_s", "cluster_rss_peak_gib"):
        assert _pos(b[k]), (k, b[k])
    assert _nonneg(b["to_host_ms"]) and _nonneg(b["cluster_rss_delta_gib"])
    assert b["n_points"] == 2 * 56 * 70 and b["features"].startswith("mask_features")
    assert math.isclose(b["total_s"] * 1e3, b["forward_ms"] + b["to_host_ms"] + b["cluster_ms"], rel_tol=1e-6)


def test_bench_node_tiny(tmp_path):
    out = tmp_path / "node.json"
    cmd = [sys.executable, "-m", "fast3dis_ros.ros.bench_node", "--pack-points", "20000", "--image-size", "64", "48",
           "--sync-sets", "50", "--fusion-sizes", "56x42", "84x63", "--fusion-windows", "2", "--fusion-prefill", "5000",
           "--e2e-size", "70", "56", "--e2e-window", "2", "--e2e-stride", "1", "--e2e-windows", "2", "--e2e-gt-size", "84", "63",
           "--e2e-gt-prefill", "5000", "--profile", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "cumulative" in p.stdout  # the cProfile listing
    res = json.loads(out.read_text())
    rows = {r["name"]: r for r in res["rows"]}
    e2e = [f"e2e_{k}{s}" for s in ("", "_gt_84x63", "_gt_84x63_map5k")
           for k in ("overhead", "map_overhead", "recv_overhead", "map_recv_overhead")]
    expected = ["pack_20k", "pack_20k_structured", "image_rgb8", "image_bgr8", "sync_push", "fusion_56x42",
                "fusion_84x63", "fusion_84x63_map5k"] + e2e
    assert list(rows) == expected, list(rows)
    for name in expected:
        assert _pos(rows[name]["measured"]), (name, rows[name])
    # pass/fail is the measured value against the limit, for every row that has one
    assert rows["pack_20k"]["limit"] == 20.0
    for name in expected:
        r = rows[name]
        assert r["pass"] is (None if r["limit"] is None else r["measured"] <= r["limit"]), (name, r)
    for suffix in ("", "_gt_84x63", "_gt_84x63_map5k"):
        win, mp = rows[f"e2e_overhead{suffix}"], rows[f"e2e_map_overhead{suffix}"]
        assert win["target"] == "engine + 30 ms" and mp["target"] == "-"
        d = win["detail"]
        assert d["messages"] is True and d["listener"] == "subscriber process"
        # steady state: the median over the windows after the first; the first is reported beside it
        assert win["measured"] == pytest.approx(statistics.median(d["overhead_ms"][1:]))
        assert d["first_window_overhead_ms"] == d["overhead_ms"][0]
        assert d["windows"] >= 2 and all(_pos(x) for x in d["engine_ms"] + d["latency_ms"])
        assert all(lat > eng for lat, eng in zip(d["latency_ms"], d["engine_ms"]))
        # the window cloud is published before the map update, the running map after it
        assert all(m > w for m, w in zip(mp["detail"]["latency_ms"], d["latency_ms"]))
        assert len(d["recv_window_ms"]) == len(d["latency_ms"])
        for k in ("recv_overhead", "map_recv_overhead"):
            r = rows[f"e2e_{k}{suffix}"]["detail"]
            assert all(lat > eng for lat, eng in zip(r["latency_ms"], r["engine_ms"]))
        assert all(n > 0 for n in d["window_points"])
    assert all(n >= 5000 for n in rows["e2e_map_overhead_gt_84x63_map5k"]["detail"]["map_points"])
    assert rows["fusion_84x63_map5k"]["detail"]["map_voxels"][0] >= 5000
    assert rows["fusion_84x63"]["detail"]["align"][1] == "shared_views"
    assert rows["sync_push"]["detail"]["emitted"] == 50


def test_bench_suite_targets_rows():
    """The target table of a suite from a synthetic result (no model run)."""
    from fast3dis_ros.bench.suite import targets

    rows = [{"views": V, "fast3dis_ms": 100.0 * V, "da3_ms": 70.0 * V, "ratio": 100 / 70, "fast3dis_peak_gib": 0.1 * V,
             "floor_fast3dis_ms": 10.0 * V} for V in (8, 32, 50, 350)]
    res = {"rows": rows, "device": "cuda:0", "peak_tflops": 989.0,
           "baseline_rows": [{"views": 8, "forward_ms": 800.0, "cluster_ms": 5000.0, "total_s": 5.8}]}
    t = {r["name"]: r for r in targets(res)}
    assert t["ratio_f3d_da3_32v"]["pass"] is True
    assert t["f3d_50v_time"]["measured"] == pytest.approx(5.0) and t["f3d_50v_time"]["pass"] is False
    assert t["f3d_350v_time"]["measured"] == pytest.approx(35.0) and t["f3d_350v_time"]["pass"] is False
    assert t["f3d_350v_memory"]["measured"] == pytest.approx(35.0) and t["f3d_350v_memory"]["pass"] is True
    assert t["f3d_8v_vs_floor"]["measured"] == pytest.approx(10.0) and t["f3d_8v_vs_floor"]["pass"] is False
    assert t["f3d_8v_vs_measured_floor"]["measured"] == "not run"
    rows[0]["floor_measured_fast3dis_ms"] = 600.0  # 800 ms at 8 views -> 1.33x the measured-rate floor
    t = {r["name"]: r for r in targets(res)}
    assert t["f3d_8v_vs_measured_floor"]["measured"] == pytest.approx(800 / 600)
    assert t["f3d_8v_vs_measured_floor"]["pass"] is True
    assert t["hdbscan_8v_total"]["detail"]["x_fast3dis"] == pytest.approx(5800 / 800)
    res["device"] = "cpu"
    t = {r["name"]: r for r in targets(res)}
    assert t["f3d_50v_time"]["pass"] is None and "(GPU)" in t["f3d_50v_time"]["target"]


def test_measured_floor_sums_each_kind_at_its_rate():
    """Floor = each ViT kind's FLOPs at its own rate + the rest (heads) at the convolution rate."""
    from fast3dis_ros.bench.profile import measured_floor_ms

    parts = {"linear": 6e12, "attn_global": 4e12, "attn_local": 1e12}
    rates = {"linear": 600.0, "attn_global": 400.0, "attn_local": 250.0, "conv": 500.0}
    # 10 + 10 + 4 ms for the ViT, 3e12 rest FLOPs at 500 TFLOP/s = 6 ms
    assert measured_floor_ms(14e12, parts, rates) == pytest.approx(30.0)
    assert measured_floor_ms(11e12, parts, rates) == pytest.approx(24.0)  # nothing outside the ViT


def test_vit_flops_parts_global_and_local_attention():
    """DA3-tiny at 4 views: blocks >= alt_start alternate local (even) / global (odd) attention; blocks at or
    past the LoRA split run twice."""
    from fast3dis_ros.bench.suite import vit_flops, vit_flops_parts
    from fast3dis_ros.model.config import Fast3disConfig
    from fast3dis_ros.model.fast3dis import Fast3DIS

    bb = Fast3DIS(Fast3disConfig.tiny()).backbone
    vit, V, H, W = bb.vit, 4, 56, 70
    N = (H // 14) * (W // 14) + 1 + vit.num_register_tokens
    D = vit.embed_dim
    last = max(bb.out_layers) + 1
    glob = [i for i in range(last) if i >= vit.alt_start and i % 2 == 1]
    p1 = vit_flops_parts(bb, V, H, W, None)
    assert p1["attn_global"] == pytest.approx(len(glob) * 4.0 * (V * N) ** 2 * D)
    assert p1["attn_local"] == pytest.approx((last - len(glob)) * 4.0 * V * N * N * D)
    assert p1["linear"] == pytest.approx(last * 2.0 * 12 * D * D * V * N)  # qkv 3, proj 1, fc1 4, fc2 4 (x D^2)
    p2 = vit_flops_parts(bb, V, H, W, bb.lora_start)
    twice_glob = [i for i in glob if i >= bb.lora_start]
    assert p2["attn_global"] == pytest.approx((len(glob) + len(twice_glob)) * 4.0 * (V * N) ** 2 * D)
    assert vit_flops(bb, V, H, W, bb.lora_start) == pytest.approx(sum(p2.values()))


def test_bench_suite_gpu_needs_cuda(capsys):
    from fast3dis_ros.bench.suite import main

    with pytest.raises(SystemExit):
        main(["--suite", "gpu", "--device", "cpu"])
    assert "needs CUDA" in capsys.readouterr().err


def test_bench_json_keeps_finished_rows_when_killed(tmp_path, monkeypatch):
    """A run stopped mid-way (the device's call limit) leaves the rows finished so far in --json."""
    import fast3dis_ros.bench.suite as bench

    real, calls = bench.measure, []

    def measure_then_stop(*a, **k):
        calls.append(1)
        if len(calls) > 3:  # plain, FAST3DIS and backbone of the first row; stop in the second
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bench, "measure", measure_then_stop)
    out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--size", "tiny", "--device", "cpu", "--views", "2", "4", "--iters", "1", "--warmup", "0",
                    "--height", "56", "--width", "70", "--no-flops", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["partial"] is True and res["stage"].startswith("row 2 views")
    assert [r["views"] for r in res["rows"]] == [2] and _pos(res["rows"][0]["fast3dis_ms"])
    # a finished run replaces the partial file
    monkeypatch.setattr(bench, "measure", real)
    assert bench.main(["--size", "tiny", "--device", "cpu", "--views", "2", "--iters", "1", "--warmup", "0",
                       "--height", "56", "--width", "70", "--no-flops", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "partial" not in res and [r["views"] for r in res["rows"]] == [2]
