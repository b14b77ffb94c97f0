"""Time and memory against views, from a ``fast3dis-bench --json`` result, as one PNG.

Why: issue 7 asks for the curve of forward time and peak memory against the number of views. The
bench prints it as a table; this draws it (log-log: the interesting part is how each line bends
between 8 and 350 views): FAST3DIS, plain DA3 and the DA3+LoRA backbone per mode, with the two
arithmetic floors (spec peak, measured kernel rates) where the run computed them.

    python -m fast3dis_ros.bench.plot docs/bench/bench_gpu_s4.json docs/bench/curve_gpu_s4.png
    fast3dis-bench --suite cpu --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

#: (row key, legend label) of the time series drawn per mode
TIME_SERIES = (("fast3dis_ms", "FAST3DIS"), ("da3_ms", "plain DA3"), ("backbone_ms", "both DA3 passes"))
FLOOR_SERIES = (("floor_full_fast3dis_ms", "FAST3DIS FLOPs at spec peak"),
                ("floor_measured_fast3dis_ms", "FAST3DIS FLOPs at measured kernel rates"))
MEMORY_SERIES = (("fast3dis_peak_gib", "FAST3DIS"), ("da3_peak_gib", "plain DA3"))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def curve_series(result: dict[str, Any]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{"time": {label: [(views, ms), ...]}, "memory": {label: [(views, GiB), ...]}}`` from the bench's
    rows. Rows are grouped by mode (``graph``, ``eager``, the fast path's label); cells that were
    skipped, ran out of memory or were not computed (strings such as ``"skipped"`` or ``"OOM"``) are
    left out. The exact path's ``graph`` and ``eager`` rows form one line (the bench switches to eager
    above its graph limit); the fast path (compiled; any other mode) gets its own."""
    time: dict[str, list[tuple[int, float]]] = defaultdict(list)
    memory: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in result.get("rows", []):
        V = int(row["views"])
        mode = str(row.get("mode", ""))
        fast = mode not in ("graph", "eager", "")
        suffix = " (fast path)" if fast else " (exact path)"
        for key, label in TIME_SERIES:
            if (v := _num(row.get(key))) is not None:
                time[label + suffix].append((V, v))
        if not fast:
            for key, label in FLOOR_SERIES:
                if (v := _num(row.get(key))) is not None:
                    time[label].append((V, v))
        for key, label in MEMORY_SERIES:
            if (v := _num(row.get(key))) is not None:
                memory[label + suffix].append((V, v))
    order = lambda d: {k: sorted(v) for k, v in d.items() if v}  # noqa: E731
    return {"time": order(time), "memory": order(memory)}


def plot_curves(result: dict[str, Any], path: str | Path, title: str | None = None) -> str:
    """Draw ``curve_series(result)`` (time left, peak memory right) to ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = curve_series(result)
    if not series["time"]:
        raise ValueError("no timed rows in this bench result")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, pts in series["time"].items():
        floor = label.startswith("FAST3DIS FLOPs")
        ax_t.plot(*zip(*pts), "--" if floor else "-o", label=label, linewidth=1.2 if floor else 1.8)
    for label, pts in series["memory"].items():
        ax_m.plot(*zip(*pts), "-o", label=label)
    device = result.get("gpu") or result.get("device", "")
    from matplotlib.ticker import ScalarFormatter

    for ax, unit in ((ax_t, "forward time (ms)"), (ax_m, "peak memory (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(ScalarFormatter() if axis is ax.yaxis and unit.startswith("peak") else
                                     matplotlib.ticker.NullFormatter())
        ax.set_xlabel("views per window")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    size = f"DA3-{str(result.get('size', '')).capitalize()}, {result.get('width')}x{result.get('height')}, {result.get('dtype')}"
    fig.suptitle(title or f"fast3dis-bench: {size}, {device}")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="a fast3dis-bench --json result")
    ap.add_argument("png", help="where to write the plot")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    with open(args.json) as f:
        result = json.load(f)
    print(plot_curves(result, args.png, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
