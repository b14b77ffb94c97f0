"""Evaluation report: metrics.json, report.md and PNG plots (matplotlib, Agg backend).

``metrics`` layout (what ``evaluate.py`` should pass)::

    {"methods": {"fast3dis": {"AP": .., "AP50": .., "AP25": .., "depth": {...}, "pose": {...},
                              "mask2d": {...}, "timing": {...}},
                 "hdbscan": {...}},
     "meta": {...}}                       # anything JSON-able (bag name, views, checkpoint...)

A flat dict with AP keys at top level is treated as one method named "method".
``curves`` (optional): ``{method: {"pr": {"0.50": {"precision", "recall"}, "0.25": {...}},
"depth_abs_rel": array}}`` -- ``curves_from_results`` builds it from ``InstanceAPEvaluator.compute()``
and ``depth_metrics(..., return_errors=True)`` outputs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["to_jsonable", "curves_from_results", "write_report"]


def to_jsonable(x):
    """numpy scalars/arrays -> Python; NaN/inf -> None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def curves_from_results(ap_result: dict | None = None, depth_result: dict | None = None) -> dict:
    out = {}
    if ap_result is not None and "curves" in ap_result:
        out["pr"] = ap_result["curves"]
    if depth_result is not None and "abs_rel_errors" in depth_result:
        out["depth_abs_rel"] = np.asarray(depth_result["abs_rel_errors"])
    return out


def _methods(metrics: dict) -> dict:
    if "methods" in metrics:
        return metrics["methods"]
    if any(k in metrics for k in ("AP", "AP50", "AP25")):
        return {"method": metrics}
    return {}


def _fmt(v, pct=True) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.4g}"


def _map_lines(methods: dict) -> list[str]:
    """The published map cloud's scores (``eval/map_metrics.py``) of the methods that have them."""
    have = {m: d["map_cloud"] for m, d in methods.items() if isinstance(d, dict) and d.get("map_cloud")}
    if not have:
        return []
    lines = ["## Published map cloud (`~/instances_cloud`) vs the GT surface", "",
             "| method | map AP | AP50 | AP25 | linked / window inst. | pts within 5 / 10 cm | GT surface covered | "
             "median dist. (m) | Chamfer (m) | splits / merges / id switches | GT-object unassigned | "
             "Sim(3) scale / residual (m) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, mc in have.items():
        g, i, lk, s3 = mc["geometry"], mc["instances"], mc["linking"], mc["sim3"]
        lines.append(f"| {m} | {_fmt(mc['AP'])} | {_fmt(mc['AP50'])} | {_fmt(mc['AP25'])} | "
                     f"{lk['linked']}/{lk['window_instances']} | {_fmt(g['pct_points_within_5cm'])} / "
                     f"{_fmt(g['pct_points_within_10cm'])} | {_fmt(g['pct_gt_surface_covered'])} | "
                     f"{_fmt(g['accuracy_median_m'], False)} | {_fmt(g['chamfer_m'], False)} | {i['splits']} / "
                     f"{i['merges']} / {i['id_switches']} | {_fmt(i['unassigned_frac'])} | "
                     f"{_fmt(s3['scale'], False)} / {_fmt(s3['residual_m'], False)} |")
    lines += ["", f"Map points take the GT instance of the nearest GT surface voxel within "
              f"{next(iter(have.values()))['tau_m']:.2f} m (else background) after one Sim(3) per scene fitted on "
              "the fused camera poses; see eval/map_metrics.py.", ""]
    for m, mc in have.items():
        ck = mc.get("checkpoints") or []
        if ck:
            lines += [f"Map over time ({m}): " + ", ".join(
                f"window {c['window']}: AP50 {_fmt(c['AP50'])}, covered {_fmt(c['pct_gt_surface_covered'])}"
                for c in ck), ""]
    return lines


def write_report(metrics: dict, out_dir, curves: dict | None = None, title: str = "FAST3DIS evaluation") -> list[str]:
    """Write metrics.json, report.md and plots (ap_bars.png, pr_iou50.png, pr_iou25.png,
    depth_abs_rel_hist.png when the data exist) into ``out_dir``; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    p = out / "metrics.json"
    p.write_text(json.dumps(to_jsonable(metrics), indent=2, allow_nan=False))
    files.append(str(p))
    methods = _methods(metrics)
    curves = curves or {}
    names = list(methods)
    plots = []
    if names:
        keys = ["AP", "AP50", "AP25"]
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names) + 2), 3.2))
        w = 0.8 / len(keys)
        for j, k in enumerate(keys):
            vals = [float(methods[m].get(k, np.nan) or 0.0) for m in names]
            bars = ax.bar(np.arange(len(names)) + (j - 1) * w, vals, w, label=k)
            ax.bar_label(bars, labels=[f"{100 * v:.1f}" for v in vals], fontsize=7)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("class-agnostic 3D AP")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "ap_bars.png", dpi=100)
        plt.close(fig)
        plots.append("ap_bars.png")
    for th, fname in (("0.50", "pr_iou50.png"), ("0.25", "pr_iou25.png")):
        have = [(m, c["pr"][th]) for m, c in curves.items() if "pr" in c and th in c["pr"]]
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        for m, pr in have:
            r, pcs = np.asarray(pr["recall"]), np.asarray(pr["precision"])
            o = np.argsort(r, kind="stable")
            ax.plot(r[o], pcs[o], marker=".", label=m)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"PR at IoU {th} (ScanNet points)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        plots.append(fname)
    have = [(m, np.asarray(c["depth_abs_rel"], dtype=np.float64)) for m, c in curves.items() if "depth_abs_rel" in c and len(c["depth_abs_rel"])]
    if have:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        hi = max(float(np.percentile(e, 99)) for _, e in have) or 1.0
        for m, e in have:
            ax.hist(np.clip(e, 0, hi), bins=50, range=(0, hi), histtype="step", density=True, label=m)
        ax.set_xlabel("|d - d_gt| / d_gt")
        ax.set_ylabel("density")
        ax.set_title("depth AbsRel per pixel")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "depth_abs_rel_hist.png", dpi=100)
        plt.close(fig)
        plots.append("depth_abs_rel_hist.png")
    files += [str(out / f) for f in plots]
    lines = [f"# {title}", ""]
    meta = metrics.get("meta") if isinstance(metrics, dict) else None
    if meta:
        lines += [f"- {k}: {to_jsonable(v)}" for k, v in meta.items()] + [""]
    if names:
        lines += ["## Lifted 3D instance AP: labels lifted with GT depth and poses (ScanNet AP, %)", "", "| method | AP | AP50 | AP25 | 2D mask AP | AbsRel | delta1 | AUC@3 | AUC@30 |", "|---|---|---|---|---|---|---|---|---|"]
        for m in names:
            d = methods[m]
            dep, pose, m2 = d.get("depth") or {}, d.get("pose") or {}, d.get("mask2d") or {}
            lines.append(
                f"| {m} | {_fmt(d.get('AP'))} | {_fmt(d.get('AP50'))} | {_fmt(d.get('AP25'))} | {_fmt(m2.get('AP'))} | "
                f"{_fmt(dep.get('abs_rel'), pct=False)} | {_fmt(dep.get('delta1'))} | {_fmt(pose.get('auc3'))} | {_fmt(pose.get('auc30'))} |"
            )
        lines += [
            "",
            "AP: mean over the IoU thresholds in metrics.json (default: ScanNet's 0.50:0.05:0.90); the labels of each view's",
            "latest window (map ids) lifted with GT geometry onto the GT surface: this scores labels and linking, not the",
            "map's geometry. The published map itself is scored below.",
            "",
        ]
        lines += _map_lines(methods)
    if metrics.get("oracle_table"):

        lines += ["## Error budget (oracle table, %)", "",
                  "Each row replays the bag with the named parts of every window's prediction replaced by ground "
                  "truth (`--oracle`, eval/oracle.py).", "", *table_lines(metrics["oracle_table"]), ""]
    lines += [f"![{f}]({f})" for f in plots]
    p = out / "report.md"
    p.write_text("\n".join(lines) + "\n")
    files.insert(1, str(p))
    return [os.fspath(f) for f in files]


def _f(v, pct=True, nd=1) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{100 * v:.{nd}f}" if pct else f"{v:.{2 if nd == 1 else nd}f}"


def table_lines(rows: list[dict]) -> list[str]:
    """Markdown table of pooled (or one scene's) rows; AP and fractions in %. *known geometry*: the source a
    row's replay read from the bag's TF (``--known-geometry``), which fusion applies to the network's
    geometry. The Sim(3) is the fit map -> GT world (``eval/map_metrics.py``): scale, residual, rotation and
    shift, the identity where the map frame is the metric GT world."""
    lines = ["| masks | depth | poses | known geometry | lifted AP50 (GT geometry) | per-window AP50 | "
             "map-cloud AP / AP50 / AP25 | linked / window inst. | map pts within 5 / 10 cm | GT surface covered | "
             "median dist. (m) | Chamfer (m) | splits / merges / id sw. | GT-object unassigned | "
             "Sim(3) scale / resid. (m) / rot. (deg) / shift (m) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        parts = set(r["oracle"].split("+"))
        g, i, lk = r["geometry"] or {}, r["instances"] or {}, r["linking"] or {}
        src = {p: ("GT" if p in parts else "net") for p in ("masks", "depth", "poses")}
        sim = {k: r.get(f"sim3_{k}_mean", (r.get("sim3") or {}).get(k))
               for k in ("scale", "residual_m", "rotation_deg", "translation_m")}
        lines.append(
            f"| {src['masks']} | {src['depth']} | {src['poses']} | {r.get('known_geometry') or 'none'} | "
            f"{_f(r['lifted_AP50'])} | {_f(r['per_window_AP50'])} | "
            f"{_f(r['map_AP'])} / {_f(r['map_AP50'])} / {_f(r['map_AP25'])} | "
            f"{lk.get('linked', 'n/a')}/{lk.get('window_instances', 'n/a')} ({_f(lk.get('rate'), nd=0)} %) | "
            f"{_f(g.get('pct_points_within_5cm'))} / {_f(g.get('pct_points_within_10cm'))} | "
            f"{_f(g.get('pct_gt_surface_covered'))} | "
            f"{_f(g.get('accuracy_median_m'), False)} | {_f(g.get('chamfer_m'), False)} | "
            f"{i.get('splits', 'n/a')} / {i.get('merges', 'n/a')} / {i.get('id_switches', 'n/a')} | "
            f"{_f(i.get('unassigned_frac'))} | {_f(sim['scale'], False, 3)} / {_f(sim['residual_m'], False, 3)} / "
            f"{_f(sim['rotation_deg'], False, 1)} / {_f(sim['translation_m'], False, 2)} |")
    return lines
