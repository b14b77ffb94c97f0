"""bench_plot: the time / memory against views curve drawn from a fast3dis-bench result."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fast3dis_ros.bench.plot import curve_series, main, plot_curves

ROOT = Path(__file__).resolve().parents[1]


def _result():
    def row(V, ms, mode, **kw):
        return {"views": V, "fast3dis_ms": ms, "da3_ms": ms / 2 if isinstance(ms, float) else ms,
                "backbone_ms": "skipped", "fast3dis_peak_gib": V / 10, "da3_peak_gib": "skipped", "mode": mode, **kw}

    return {"size": "large", "width": 504, "height": 378, "dtype": "bf16", "gpu": "test GPU", "rows": [
        row(8, 90.0, "graph", floor_full_fast3dis_ms=14.5, floor_measured_fast3dis_ms=25.0),
        row(64, 1100.0, "graph", floor_full_fast3dis_ms=313.0, floor_measured_fast3dis_ms="n/a"),
        row(350, 19000.0, "eager"),
        row(512, "OOM", "eager"),
        row(8, 38.0, "graph+merge+compile", floor_full_fast3dis_ms="n/a"),
    ]}


def test_series_group_modes_and_skip_missing_cells():
    s = curve_series(_result())
    t, m = s["time"], s["memory"]
    assert t["FAST3DIS (exact path)"] == [(8, 90.0), (64, 1100.0), (350, 19000.0)]  # graph + eager, no OOM
    assert t["plain DA3 (exact path)"] == [(8, 45.0), (64, 550.0), (350, 9500.0)]
    assert t["FAST3DIS (fast path)"] == [(8, 38.0)]
    assert t["FAST3DIS FLOPs at spec peak"] == [(8, 14.5), (64, 313.0)]
    assert t["FAST3DIS FLOPs at measured kernel rates"] == [(8, 25.0)]
    assert not any(label.startswith("both DA3") for label in t)  # every cell skipped
    assert m["FAST3DIS (exact path)"][-1] == (512, 51.2) and "plain DA3 (exact path)" not in m


def test_plot_writes_a_png_with_the_lines(tmp_path):
    path = plot_curves(_result(), tmp_path / "sub" / "curve.png")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape == (528, 1320, 3)
    # matplotlib's first line colour (C0, #1f77b4) is drawn on both panels
    c0 = np.all(np.abs(rgb.astype(int) - [31, 119, 180]) < 8, axis=-1)
    assert c0[:, :660].sum() > 200 and c0[:, 660:].sum() > 200


def test_plot_refuses_a_result_without_timings(tmp_path):
    with pytest.raises(ValueError, match="no timed rows"):
        plot_curves({"rows": [{"views": 8, "fast3dis_ms": "OOM", "mode": "graph"}]}, tmp_path / "x.png")


def test_cli_draws_the_recorded_gpu_suite(tmp_path):
    src = ROOT / "docs" / "bench" / "bench_gpu_s4.json"
    assert main([str(src), str(tmp_path / "gpu.png")]) == 0
    s = curve_series(json.loads(src.read_text()))
    assert [v for v, _ in s["time"]["FAST3DIS (exact path)"]] == [8, 16, 32, 50, 64, 128, 256, 350]
    assert (tmp_path / "gpu.png").stat().st_size > 20_000
