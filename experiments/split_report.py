"""Reports of the LoRA split study: console table, markdown, JSON, bar chart, loss curves, log archive.

Kept apart from the driver (``lora_split_study.py``) so the table layout can be read and changed without
the process handling around it. Every function takes the study's result dict (see ``lora_split_study``).
"""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path
from typing import Any

__all__ = ["table_rows", "console_table", "markdown", "plot_ap", "plot_losses", "archive_runs", "write_json"]

#: files of each training folder that go into the log archive (small; no train_state.pt)
ARCHIVED = ("train_stdout.log", "train_log.jsonl", "val_log.jsonl", "train_summary.json", "train_args.json",
            "config.json", "model.safetensors", "loss_curve.png")


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}"


def _num(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _ci(ci: Any) -> str:
    return "n/a" if not ci else f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _delta(d: Any) -> str:
    if not d:
        return "ref."
    return f"{100 * d['mean']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"


def table_rows(res: dict) -> list[dict[str, str]]:
    """One dict of formatted cells per run (split, seed), in the order the runs were listed."""
    rows = []
    for r in res["runs"]:
        c, t, v, tr = r["cost"], r.get("test") or {}, r.get("val") or {}, r.get("train") or {}
        rows.append({
            "split": str(r["split"]) + (f" (seed {r['seed']})" if len(res["config"]["train_seeds"]) > 1 else ""),
            "LoRA blocks": ",".join(map(str, c["lora_blocks"])) or "-",
            "shared blocks": f"{c['shared_blocks']}/{c['trunk_blocks']}",
            "trainable params": f"{c['trainable_params'] / 1e3:.1f}k (LoRA {c['lora_params'] / 1e3:.1f}k)",
            "trunk GFLOPs/window": f"{c['trunk_gflops']:.2f} ({c['flops_rel_split0']:.2f}x split 0, "
                                   f"{c['flops_rel_da3']:.2f}x DA3)",
            "test AP": _pct(t.get("AP")), "test AP50": _pct(t.get("AP50")), "test AP25": _pct(t.get("AP25")),
            "AP50 95% CI": _ci((t.get("ci") or {}).get("AP50")),
            "dAP50 vs ref [95% CI]": _delta((t.get("delta_vs_ref") or {}).get("AP50")) if t else "n/a",
            "val mv AP/AP50/AP25": "/".join(_pct(v.get(k)) for k in ("val_mv_AP", "val_mv_AP50", "val_mv_AP25")),
            "train loss": _num(tr.get("loss_tail_mean")), "val loss": _num(v.get("val_loss")),
            "steps": f"{r.get('steps_run', 'n/a')}/{res['config']['steps']}",
            "ms/step": _num(r.get("ms_per_step"), ".0f"), "wall s": _num(r.get("wall_s"), ".0f"),
            "fwd ms": _num(r.get("fwd_ms"), ".1f"), "status": r["status"],
        })
    return rows


def console_table(res: dict) -> str:
    keys = ["split", "LoRA blocks", "shared blocks", "trainable params", "trunk GFLOPs/window", "test AP",
            "test AP50", "test AP25", "dAP50 vs ref [95% CI]", "val mv AP/AP50/AP25", "train loss", "val loss",
            "steps", "wall s", "status"]
    rows = table_rows(res)
    width = {k: max(len(k), *(len(r[k]) for r in rows)) if rows else len(k) for k in keys}
    lines = ["  ".join(k.ljust(width[k]) for k in keys), "  ".join("-" * width[k] for k in keys)]
    lines += ["  ".join(r[k].ljust(width[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def markdown(res: dict) -> str:
    cfg = res["config"]
    rows = table_rows(res)
    keys = list(rows[0]) if rows else []
    md = [f"# LoRA split study ({cfg['size']}, DA3 weights from `{cfg['init_da3']}`)", "",
          "Command:", "", "```", res["command"], "```", "",
          f"- every split: seed(s) {cfg['train_seeds']}, {cfg['steps']} steps at batch {cfg['batch_size']}, "
          f"lr {cfg['lr']}, warm-up {cfg['warmup_steps']}, {cfg['scenes']} training scenes "
          f"(seeds {cfg['scene_seed']}..), {cfg['cameras']} cameras x {cfg['frames']} frames at "
          f"{cfg['width']}x{cfg['height']}; DA3 frozen, LoRA + instance head trained",
          f"- test: {res['test']['n_windows']} held-out windows (scene seeds {cfg['test_seeds']}), pooled ScanNet "
          f"AP over windows (score threshold {cfg['score_threshold']}); 95% CIs from {cfg['bootstrap']} bootstrap "
          "resamples of the windows (paired between splits: the same resamples); they cover the choice of "
          "test scenes, not the training seed",
          f"- val: the training loop's quick AP on {cfg['val_seeds']} (mean over windows)",
          f"- trunk GFLOPs: DA3 ViT blocks for both passes, one window of {cfg['cameras'] * cfg['frames']} views "
          "(fast3dis_ros.bench.suite.vit_flops; LoRA GEMMs excluded)",
          f"- device: {res['host']['device']}; parallel trainings: {cfg['parallel']}; study wall time "
          f"{res['wall_s']:.0f} s", ""]
    rd = res.get("render")
    if rd:
        md.insert(-1, f"- scenes: {rd['scenes']}, {rd['found_in_cache']} of them found in the cache, the rest "
                      f"rendered on {rd['device']} in {rd['s']:.0f} s"
                      + (f" (rendering on {rd['requested']} failed: {rd['fallback']})" if rd.get("fallback") else ""))
    if keys:
        md += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        md += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    if res.get("per_split"):
        md += ["", "## Mean over training seeds", "", "| split | seeds | test AP | AP50 | AP25 | sd AP50 |",
               "|---|---|---|---|---|---|"]
        for s in res["per_split"]:
            md.append(f"| {s['split']} | {s['n']} | {_pct(s['AP'])} | {_pct(s['AP50'])} | {_pct(s['AP25'])} | "
                      f"{_pct(s['AP50_sd'])} |")
    for w in res.get("warnings", []):
        md.insert(2, f"**WARNING: {w}**\n")
    md += ["", "![AP per split](lora_split_ap.png)", "", "![training loss](lora_split_loss.png)", ""]
    return "\n".join(md) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ap(res: dict, png: Path) -> Path:
    """Grouped bars: pooled test AP / AP50 / AP25 per run, 95% bootstrap intervals as error bars."""
    import numpy as np

    plt = _plt()
    runs = [r for r in res["runs"] if r.get("test")]
    keys = ("AP", "AP50", "AP25")
    x = np.arange(len(runs))
    w = 0.26
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(runs) + 2), 4.0))
    top = max([100 * (r["test"].get("ci", {}).get(k) or [0, r["test"][k]])[1] for r in runs for k in keys] + [0.0])
    ax.set_ylim(0, max(5.0, 1.15 * top))
    for i, k in enumerate(keys):
        vals = np.array([100 * r["test"][k] for r in runs])
        ci = [r["test"].get("ci", {}).get(k) for r in runs]
        lo = np.array([v - 100 * c[0] if c else 0.0 for v, c in zip(vals, ci)])
        hi = np.array([100 * c[1] - v if c else 0.0 for v, c in zip(vals, ci)])
        bars = ax.bar(x + (i - 1) * w, vals, w, label=k, yerr=np.clip(np.stack([lo, hi]), 0, None), capsize=3)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    multi = len(res["config"]["train_seeds"]) > 1
    ax.set_xticks(x, [f"split {r['split']}" + (f"\nseed {r['seed']}" if multi else "") +
                      f"\n{r['cost']['flops_rel_split0']:.2f}x FLOPs" for r in runs])
    ax.set_ylabel("pooled test AP (%)")
    ax.set_title(f"LoRA from block N ({res['test']['n_windows']} test windows, 95% bootstrap CI)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_losses(res: dict, png: Path) -> Path:
    """Training loss per step of every run (moving average over 25 steps), val loss as markers."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    for r in res["runs"]:
        d = Path(r["dir"])
        log = d / "train_log.jsonl"
        if not log.is_file():
            continue
        recs = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        if not recs:
            continue
        steps = np.array([x["step"] for x in recs])
        loss = np.array([float(x.get("loss", float("nan"))) for x in recs])
        k = min(25, len(loss))
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        label = f"split {r['split']}" + (f" seed {r['seed']}" if len(res["config"]["train_seeds"]) > 1 else "")
        line, = ax.plot(steps[k - 1:], smooth, label=label)
        vlog = d / "val_log.jsonl"
        if vlog.is_file():
            vr = [json.loads(l) for l in vlog.read_text().splitlines() if l.strip()]
            ax.plot([x["step"] for x in vr], [x.get("val_loss", float("nan")) for x in vr], "o--",
                    color=line.get_color(), ms=4, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (train: 25-step mean; o: val)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def archive_runs(res: dict, path: Path) -> Path:
    """Each run's logs + (LoRA + head) weights in one tar.gz (the device returns few files)."""
    with tarfile.open(path, "w:gz") as tar:
        for r in res["runs"]:
            d = Path(r["dir"])
            for name in ARCHIVED:
                f = d / name
                if f.is_file():
                    tar.add(f, arcname=f"{d.name}/{name}")
    return path


def write_json(res: dict, path: Path) -> Path:
    from fast3dis_ros.eval.report import to_jsonable

    path.write_text(json.dumps(to_jsonable(res), indent=2, allow_nan=False) + "\n")
    return path
