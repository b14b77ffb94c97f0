"""fast3dis-bench: time and memory of plain DA3 vs the whole FAST3DIS forward, per window size.

For each view count: (a) plain ``DepthAnything3Net`` forward (a separate module holding the very same
DA3 weights), (b) ``Fast3DIS`` forward (shared prefix + geometry pass + LoRA feature pass + instance
head), (c) the backbone part of (b) alone. Median of ``--iters`` timed runs after ``--warmup``; CUDA
timings use events, peak memory is ``torch.cuda.max_memory_allocated`` (weights + activations of the
measured model; with ``--suite`` plain DA3 leaves the GPU once it is no longer timed). On CPU the memory
column is the peak process RSS growth during the timed runs (psutil, sampled every 5 ms) or 'n/a'.

``floor_*_ms``: arithmetic floor of the ViT trunk alone, FLOPs / ``--peak-tflops`` (default: H100 SXM
dense bf16, 989 TFLOP/s): 2 x (block parameters) x tokens + attention (4 N^2 D per local block per
view, 4 (V N)^2 D per global block); FAST3DIS runs blocks >= first_lora_block twice.
Random weights unless ``--da3-weights`` is given (speed does not depend on the values).

``--baseline``: the HDBSCAN clustering baseline (``eval.baseline.cluster_window``) on the same views: the
FAST3DIS forward's depth is lifted with its own cameras (intrinsics + extrinsics) and its pixel decoder
``mask_features`` are the per-pixel features; parameters as in ``eval.evaluate.run_baseline``
(``min_cluster_size = max(20, valid pixels // 400)``, ``--baseline-max-points`` clustered points). Time is
split into the network forward (the FAST3DIS forward timed above) + clustering on the host (numpy/hdbscan,
after the device->host copy, which is reported too); memory is the forward's peak GPU memory and the peak
host RSS while clustering (psutil, sampled every 5 ms).

``--node``: also the node-side CPU figures of ``fast3dis_ros.ros.bench_node`` (PointCloud2 packing, Image
conversion, sync, fusion, end-to-end overhead), with their targets.

``--suite gpu|cpu``: everything in one command with fixed sizes, then one "target vs measured" table:
GPU = DA3-Large bf16 504x378, views 8 16 32 50 64 128 (warmup 2, iters 5), then 256 350 (warmup 1, iters 1,
OOM caught; plain DA3 and the backbone-only column skipped above 128 views), the baseline at 8 and 32
views, the node figures. Targets: FAST3DIS/DA3 time ratio at 32 views <= 1.6; 50 views <= 1.0 s; 350 views
<= 30 s and <= 60 GiB; 8 views <= 1.5 x the arithmetic floor. CPU = the tiny model at small sizes (the same
rows; the GPU-only targets are reported as not applicable).

Example (H100): ``fast3dis-bench --size large --views 8 32 50 64 --dtype bf16 --json bench.json``
All figures (H100): ``fast3dis-bench --suite gpu --json bench_gpu.json``
CPU smoke test: ``fast3dis-bench --size tiny --device cpu --views 2 4 --height 56 --width 70 --iters 2``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import torch

from fast3dis_ros.bench.profile import flop_count, floor_ms, measured_floor_ms, measured_rates

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def tokens_per_view(vit, height: int, width: int) -> int:
    """Tokens one view puts through the DA3 ViT: its patches, the camera token and the register tokens."""
    return (height // 14) * (width // 14) + 1 + vit.num_register_tokens


def window_rates(backbone, device: torch.device, dtype: torch.dtype, views: int, height: int, width: int,
                 iters: int) -> dict[str, float]:
    """``bench_profile.measured_rates`` on a ``views``-view window's shapes for this DA3 backbone: its
    block GEMMs and attention, and a 3x3 conv at the DPT head's width on 4x-patch-grid maps."""
    vit = backbone.vit
    conv_ch = next(m for m in backbone.net.head.scratch.refinenet1.modules() if isinstance(m, torch.nn.Conv2d)).out_channels
    return measured_rates(device, dtype, views, tokens_per_view(vit, height, width), vit.embed_dim,
                          vit.blocks[0].attn.num_heads, (4 * height // 14, 4 * width // 14), conv_ch, iters=iters)


def output_deviation(out: dict, reference: dict) -> dict[str, float]:
    """How far a forward's outputs are from a reference forward's (the exact path): depth relative error,
    logit and mask-logit absolute error, and the share of mask pixels with the same sign."""
    rel = (out["depth"].float() - reference["depth"]).abs() / reference["depth"].abs().clamp_min(1e-6)
    return {
        "depth_max_rel": float(rel.max()), "depth_median_rel": float(rel.median()),
        "logits_max_abs": float((out["pred_logits"].float() - reference["pred_logits"]).abs().max()),
        "masks_max_abs": float((out["pred_masks"].float() - reference["pred_masks"]).abs().max()),
        "mask_sign_agreement": float(((out["pred_masks"].float() > 0) == (reference["pred_masks"] > 0)).float().mean()),
    }


def vit_flops_parts(backbone, views: int, height: int, width: int, shared_split: int | None) -> dict[str, float]:
    """FLOPs of the DA3 ViT trunk for one window (B=1) by kind: ``linear`` (the GEMMs), ``attn_global``
    (all views' tokens in one sequence) and ``attn_local`` (one sequence per view). The kinds run at
    different kernel rates, which the measured-rate floor needs. ``shared_split``: blocks >= it run twice."""
    vit = backbone.vit
    from fast3dis_ros.model.da3.backbone import block_kind

    D = vit.embed_dim
    N = tokens_per_view(vit, height, width)
    last = max(backbone.out_layers) + 1
    parts = {"linear": 0.0, "attn_global": 0.0, "attn_local": 0.0}
    for i in range(last):
        blk = vit.blocks[i]
        params = sum(p.numel() for n, p in blk.named_parameters() if n.endswith("weight") and p.dim() == 2 and "lora_" not in n)
        reps = 2 if shared_split is not None and i >= shared_split else 1
        parts["linear"] += reps * 2.0 * params * views * N
        if block_kind(vit.alt_start, i) == "global":
            parts["attn_global"] += reps * 4.0 * (views * N) ** 2 * D
        else:
            parts["attn_local"] += reps * 4.0 * views * N * N * D
    return parts


def vit_flops(backbone, views: int, height: int, width: int, shared_split: int | None) -> float:
    """FLOPs of the DA3 ViT trunk for one window (B=1). ``shared_split``: blocks >= it run twice."""
    return sum(vit_flops_parts(backbone, views, height, width, shared_split).values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> dict[str, Any]:
    """Median wall time (ms) and peak memory of ``fn``; {'error': 'OOM'} when it runs out of memory."""
    try:
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            mem = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            with RssPeak() as rss:
                for _ in range(iters):
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1000.0)
            mem = (rss.peak - rss.start_rss) / 2**30 if rss.available else "n/a"
        return {"ms": statistics.median(times), "peak_gib": mem, "times_ms": times}
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return {"ms": "OOM", "peak_gib": "OOM"}
        raise


def build(args) -> tuple[Any, Any, Any]:
    from fast3dis_ros.model.da3.backbone import build_da3_net
    from fast3dis_ros.model.config import Fast3disConfig
    from fast3dis_ros.model.fast3dis import Fast3DIS

    overrides: dict[str, Any] = {}
    if args.first_lora_block is not None:
        overrides["first_lora_block"] = args.first_lora_block
    if args.da3_weights:
        overrides["pretrained"] = args.da3_weights
    cfg = Fast3disConfig.for_size(args.size, **overrides)
    cfg.train_backbone = False
    torch.manual_seed(0)
    model = Fast3DIS(cfg).eval()
    plain = build_da3_net(cfg.backbone).eval()
    plain.load_state_dict(model.backbone.da3_state_dict(), strict=True)
    plain.requires_grad_(False)
    model.requires_grad_(False)
    return cfg, model, plain


class RssPeak:
    """Peak host RSS (bytes) of this process while active, sampled every ``period`` s by a thread."""

    def __init__(self, period: float = 0.005):
        self.period = period
        self.start_rss = self.peak = 0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:  # pragma: no cover
            self._proc = None

    @property
    def available(self) -> bool:
        return self._proc is not None

    def _rss(self) -> int:
        return self._proc.memory_info().rss if self._proc is not None else 0

    def __enter__(self) -> "RssPeak":
        self.start_rss = self.peak = self._rss()
        self._stop.clear()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join()
        self.peak = max(self.peak, self._rss())


def run_baseline(model, device: torch.device, dtype, amp: bool, V: int, height: int, width: int, *, warmup: int,
                 max_points: int, fwd: dict | None = None) -> dict:
    """One row of the HDBSCAN baseline at ``V`` views (see module doc). ``fwd``: the FAST3DIS forward row of
    the main table at the same size (its median time / peak memory are reused); else measured here."""
    from fast3dis_ros.eval.baseline import cluster_window

    g = torch.Generator().manual_seed(V)
    x = torch.randn(1, V, 3, height, width, generator=g).to(device)

    def run_f3d():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            return model(x)

    if fwd is None or not isinstance(fwd.get("ms"), float):
        fwd = measure(run_f3d, device, warmup, 1)
        fwd_src = "measured here (1 run)"
    else:
        fwd_src = "FAST3DIS forward of the main table"
    if not isinstance(fwd.get("ms"), float):
        return {"views": V, "forward_ms": fwd.get("ms"), "cluster_ms": "n/a", "total_s": "n/a",
                "forward_peak_gib": fwd.get("peak_gib"), "error": "forward failed"}
    # outputs for the clustering (one more forward, not timed), then device -> host
    out = run_f3d()
    _sync(device)
    t0 = time.perf_counter()
    depth = out["depth"][0].float().cpu().numpy()
    K = out["intrinsics"][0].double().cpu().numpy()
    T = out["extrinsics"][0].double().cpu().numpy()
    feats = out["mask_features"][0].float().cpu().numpy()
    to_host_ms = (time.perf_counter() - t0) * 1e3
    del out, x
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    valid = np.isfinite(depth) & (depth > 0)
    kw = dict(min_cluster_size=max(20, int(valid.sum() // 400)), max_points=int(max_points))
    with RssPeak() as rss:
        t0 = time.perf_counter()
        _, scores, timing = cluster_window(depth, K, T, feats, valid=valid, **kw)
        cluster_ms = (time.perf_counter() - t0) * 1e3
    fwd_ms = float(fwd["ms"])
    return {
        "views": V, "forward_ms": fwd_ms, "forward_source": fwd_src, "to_host_ms": to_host_ms,
        "cluster_ms": cluster_ms, "total_s": (fwd_ms + to_host_ms + cluster_ms) / 1e3,
        "forward_peak_gib": fwd["peak_gib"], "forward_mem": "cuda max_memory_allocated" if device.type == "cuda"
        else "process RSS growth",
        "cluster_rss_peak_gib": rss.peak / 2**30, "cluster_rss_delta_gib": (rss.peak - rss.start_rss) / 2**30,
        "features": f"mask_features {tuple(feats.shape)}", "n_points": timing.get("n_points"),
        "n_clustered": timing.get("n_clustered"), "n_clusters": timing.get("n_clusters"),
        "timing_ms": {k: v for k, v in timing.items() if k.endswith("_ms")}, **kw,
    }


def _f(v, nd=1):
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


#: the measured-rate floor times global attention over all tokens: cheap up to here, seconds beyond
MEASURED_FLOOR_MAX_VIEWS = 64

SUITES = {
    # views, warmup, iters; big views: warmup 1 iters 1, plain DA3 + backbone-only skipped; baseline views
    "gpu": dict(size="large", dtype="bf16", height=378, width=504, views=[8, 16, 32, 50, 64, 128], warmup=2,
                iters=5, big_views=[256, 350], baseline_views=[8, 32], plain_max_views=128, cuda_graphs=True,
                profile=[8], fast_views=[8]),
    "cpu": dict(size="tiny", dtype="fp32", height=126, width=168, views=[2, 4, 8], warmup=1, iters=3,
                big_views=[16], baseline_views=[2, 8], plain_max_views=8, cuda_graphs=False, profile=[4]),
}


def _row_at(rows: list[dict], V: int) -> dict | None:
    return next((r for r in rows if r["views"] == V), None)


def targets(result: dict) -> list[dict]:
    """The 'target vs measured' rows of a suite (bench_node.row format)."""
    from fast3dis_ros.ros.bench_node import row

    rows, out = result["rows"], []
    gpu = result["device"].startswith("cuda")
    na = "n/a (cpu: GPU target)"
    rv = 32 if _row_at(rows, 32) else max([r["views"] for r in rows if isinstance(r["ratio"], float)] or [32])
    r32 = _row_at(rows, rv)
    ratio = r32["ratio"] if r32 else "not run"
    out.append(row(f"ratio_f3d_da3_{rv}v", ratio, "x", "<= 1.6x" + ("" if rv == 32 else " (at 32v)"),
                   1.6 if rv == 32 else None, {"what": f"FAST3DIS / plain DA3 forward time at {rv} views"}))
    r50 = _row_at(rows, 50)
    v50 = r50["fast3dis_ms"] / 1e3 if r50 and isinstance(r50["fast3dis_ms"], float) else (r50["fast3dis_ms"] if r50 else "not run")
    g_ = "" if gpu else " (GPU)"
    out.append(row("f3d_50v_time", v50, "s", "<= 1.0 s" + g_, 1.0 if gpu else None,
                   {"what": "FAST3DIS forward at 50 views", "note": "" if gpu else na}))
    r350 = _row_at(rows, 350)
    v350 = r350["fast3dis_ms"] / 1e3 if r350 and isinstance(r350["fast3dis_ms"], float) else (r350["fast3dis_ms"] if r350 else "not run")
    m350 = r350["fast3dis_peak_gib"] if r350 else "not run"
    out.append(row("f3d_350v_time", v350, "s", "<= 30 s" + g_, 30.0 if gpu else None,
                   {"what": "FAST3DIS forward at 350 views (1 run after 1 warm-up)", "note": "" if gpu else na}))
    out.append(row("f3d_350v_memory", m350, "GiB", "<= 60 GiB" + g_, 60.0 if gpu else None,
                   {"what": "peak GPU memory (max_memory_allocated, weights included) at 350 views",
                    "note": "" if gpu else na}))
    r8s = [r for r in rows if r["views"] == 8 and isinstance(r["fast3dis_ms"], float)]
    floor8, floor_what = None, ""
    full = [r["floor_full_fast3dis_ms"] for r in r8s if isinstance(r.get("floor_full_fast3dis_ms"), float)]
    if full:  # the whole forward's FLOPs when counted, else the ViT trunk's (a lower floor)
        floor8, floor_what = full[0], "whole-forward FLOPs"
    elif r8s:
        floor8, floor_what = r8s[0]["floor_fast3dis_ms"], "ViT-trunk FLOPs only"
    best8 = min(r8s, key=lambda r: r["fast3dis_ms"]) if r8s else None
    x8 = best8["fast3dis_ms"] / floor8 if best8 and floor8 else "not run"
    out.append(row("f3d_8v_vs_floor", x8, "x floor", "<= 1.5x" + g_, 1.5 if gpu else None,
                   {"what": f"FAST3DIS forward at 8 views (fastest mode) / arithmetic floor ({floor_what}) at "
                            f"{result['peak_tflops']} TFLOP/s", "floor_ms": floor8,
                    "ms": best8["fast3dis_ms"] if best8 else None, "mode": best8.get("mode") if best8 else None,
                    "all_8v_ms": {r.get("mode", "?"): r["fast3dis_ms"] for r in r8s},
                    "note": "" if gpu else na}))
    mfloor = [r["floor_measured_fast3dis_ms"] for r in r8s if isinstance(r.get("floor_measured_fast3dis_ms"), float)]
    xm8 = best8["fast3dis_ms"] / mfloor[0] if best8 and mfloor else "not run"
    out.append(row("f3d_8v_vs_measured_floor", xm8, "x floor", "<= 1.5x" + g_, 1.5 if gpu else None,
                   {"what": "FAST3DIS forward at 8 views (fastest mode) / the same whole-forward FLOPs at the rates "
                            "this device's GEMM, attention and convolution kernels reach on the window's shapes "
                            "(bench_profile.measured_rates, same run)",
                    "floor_ms": mfloor[0] if mfloor else None, "ms": best8["fast3dis_ms"] if best8 else None,
                    "rates_tflops": next((r.get("measured_tflops") for r in r8s if r.get("measured_tflops")), None),
                    "note": "" if gpu else na}))
    for b in result.get("baseline_rows", []):
        f3d = b.get("forward_ms")
        speed = b["total_s"] * 1e3 / f3d if isinstance(b.get("total_s"), float) and isinstance(f3d, float) else "n/a"
        out.append(row(f"hdbscan_{b['views']}v_total", b.get("total_s"), "s", "reference", None,
                       {"what": "HDBSCAN baseline: forward + to host + clustering", "forward_ms": f3d,
                        "cluster_ms": b.get("cluster_ms"), "cluster_rss_peak_gib": b.get("cluster_rss_peak_gib"),
                        "forward_peak_gib": b.get("forward_peak_gib"), "x_fast3dis": speed}))
    return out


def print_targets(trows: list[dict], notes: list[str]) -> None:
    from fast3dis_ros.ros.bench_node import format_rows

    print("#\n# ===== target vs measured =====")
    print(format_rows(trows))
    for n in notes:
        print(f"# note: {n}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fast3dis-bench", description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="large", choices=["tiny", "small", "base", "large", "giant"])
    ap.add_argument("--views", type=int, nargs="+", default=[8, 32, 50, 64])
    ap.add_argument("--height", type=int, default=378)
    ap.add_argument("--width", type=int, default=504)
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", default=None, help="draw time and peak memory against views to this PNG")
    ap.add_argument("--first-lora-block", type=int, default=None)
    ap.add_argument("--da3-weights", default=None, help="DA3 weights folder/hub id (default: random)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (default mode)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="replay captured CUDA graphs (model.fastpath.cuda_graph.GraphedForward, what the node runs) up to "
                         "--graph-max-views; plain DA3 then runs as the backbone's sync-free transcription")
    ap.add_argument("--compile-blocks", action="store_true",
                    help="torch.compile each DA3 ViT block and the DPT head (fastpath.accelerate), both "
                         "models; FAST3DIS's LoRA folded into its weights (fastpath.accelerate.merge_lora)")
    ap.add_argument("--compile-head", action="store_true", help="torch.compile the instance head (one graph)")
    ap.add_argument("--head-autocast", action="store_true",
                    help="run DA3's DPT head / camera decoder under autocast (DA3 runs them in fp32)")
    ap.add_argument("--fast-views", type=int, nargs="*", default=[],
                    help="after everything else: these view counts again with --compile-blocks --compile-head "
                         "--head-autocast (+ graphs), with the deviation from the exact path (CUDA only)")
    ap.add_argument("--fast-unchained", action="store_true",
                    help="after the --fast-views rows, the same rows without chained blocks (compile_for_inference "
                         "chains them): the chain's gain in the same run")
    ap.add_argument("--graph-max-views", type=int, default=64, help="larger windows run eagerly (default 64)")
    ap.add_argument("--profile", type=int, nargs="*", default=[],
                    help="view counts to profile (per-stage GPU time, kernels, FLOPs by part; bench_profile)")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count per view count")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for the arithmetic floor (H100 bf16 dense)")
    ap.add_argument("--skip-plain", action="store_true", help="do not time plain DA3")
    ap.add_argument("--baseline", action="store_true", help="also the HDBSCAN clustering baseline per view count")
    ap.add_argument("--baseline-views", type=int, nargs="+", default=None,
                    help="default: every --views entry (with --suite: the suite's, 8 32 on gpu)")
    ap.add_argument("--baseline-max-points", type=int, default=8000,
                    help="points HDBSCAN clusters (the rest by nearest neighbour); as eval.evaluate")
    ap.add_argument("--big-views", type=int, nargs="*", default=[],
                    help="extra view counts run with warmup 1 / iters 1, without plain DA3 and backbone-only")
    ap.add_argument("--node", action="store_true", help="also the node-side CPU figures (fast3dis_ros.ros.bench_node)")
    ap.add_argument("--no-node", action="store_true", help="with --suite: skip the node figures")
    ap.add_argument("--suite", choices=sorted(SUITES), default=None,
                    help="every figure with fixed sizes + a target vs measured table (overrides size/views/...)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads on cpu (default 2)")
    args = ap.parse_args(argv)

    plain_max_views = None
    if args.suite:
        sv = SUITES[args.suite]
        args.size, args.height, args.width, args.views = sv["size"], sv["height"], sv["width"], list(sv["views"])
        args.warmup, args.iters, args.big_views = sv["warmup"], sv["iters"], list(sv["big_views"])
        args.baseline = True
        if args.baseline_views is None:  # an explicit --baseline-views wins
            args.baseline_views = list(sv["baseline_views"])
        plain_max_views = sv["plain_max_views"]
        args.cuda_graphs = args.cuda_graphs or sv["cuda_graphs"]
        args.profile = args.profile or list(sv["profile"])
        args.fast_views = args.fast_views or list(sv.get("fast_views", []))
        args.node = not args.no_node
        if args.suite == "gpu":
            if args.device == "cpu":
                ap.error("--suite gpu needs CUDA (use --suite cpu on a machine without GPU)")
            args.dtype = sv["dtype"]
        else:
            args.device = "cpu"
            args.dtype = sv["dtype"]
    if args.height % 14 or args.width % 14:
        ap.error("--height and --width must be multiples of 14")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA requested but not available")
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    dtype = DTYPES[args.dtype]
    amp = dtype != torch.float32
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), args.threads)))
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    cfg, model, plain = build(args)
    model.to(device)
    plain.to(device)
    build_s = time.perf_counter() - t0
    split = model.backbone.lora_start
    c_model, c_plain = model, plain
    if args.compile:
        c_model, c_plain = torch.compile(model), torch.compile(plain)
    plain_bb = None
    if args.cuda_graphs and device.type == "cuda":
        from dataclasses import replace as dc_replace

        from fast3dis_ros.model.da3.backbone import DA3Backbone

        # stock DepthAnything3Net.forward synchronises with the host (its RoPE, its camera encoder) and
        # cannot be captured; the backbone's transcription of it is bit-identical (test_backbone) and
        # sync-free. With its ray branch on it does the same work as stock DA3.
        plain_bb = DA3Backbone(dc_replace(cfg.backbone, lora_rank=0, pretrained=None), net=plain)
        plain_bb.skip_ray_branch = False

    def exact_reference(V: int) -> tuple[torch.Tensor, dict]:
        """DA3-identical outputs at ``V`` views (before any fast option), to report the deviation."""
        g0 = torch.Generator().manual_seed(V)
        x0 = torch.randn(1, V, 3, args.height, args.width, generator=g0).to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            ref_out = model(x0, return_aux=False)
        return x0, {k: ref_out[k].float().clone() for k in ("depth", "pred_logits", "pred_masks")}

    def enable_fast(compile_blocks: bool, compile_head: bool, head_autocast: bool) -> None:
        """The options of ``Fast3DIS.compile_for_inference`` (what the node's ``compile`` runs); plain DA3
        gets the ones that apply to it."""
        from fast3dis_ros.model.fast3dis import fast_path_weight_dtype

        weight_dtype = fast_path_weight_dtype(device, dtype if amp else None)  # as Predictor(compile=True)
        from fast3dis_ros.model.fastpath.accelerate import FastPathOptions, accelerate

        runner = model.compile_for_inference(blocks=compile_blocks, head=compile_head, merge_lora=compile_blocks,
                                             dpt_bf16=head_autocast, weight_dtype=weight_dtype)
        if plain_bb is not None:  # the same runner options; its heads keep fp32 weights
            accelerate(plain_bb, FastPathOptions(
                compile_blocks=compile_blocks, compile_dpt=compile_blocks,
                block_dtype=weight_dtype if compile_blocks else None, chain=runner.chained is not None,
                head_autocast=head_autocast, fold_dpt_pe=runner.fold_dpt_pe, dpt_nhwc=runner.dpt_nhwc))

    def deviation_from(x0, reference) -> dict:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            fast_out = model(x0, return_aux=False)
        return {"views": x0.shape[1], **output_deviation(fast_out, reference)}

    fast_label = "+".join(n for n, on in (("merge+compile", args.compile_blocks), ("head-compile", args.compile_head),
                                          ("head-bf16", args.head_autocast)) if on)
    deviation = unchained_deviation = None
    x0 = reference = None
    if fast_label:  # the whole table runs the fast path
        x0, reference = exact_reference(args.views[0])
        enable_fast(args.compile_blocks, args.compile_head, args.head_autocast)

    def f3d_call(x, K=None, T_cam_world=None):
        return c_model(x, K=K, T_cam_world=T_cam_world, return_aux=False)

    def plain_call(x, K=None, T_cam_world=None):
        return plain_bb.forward_geometry(x, K, T_cam_world) if plain_bb is not None else c_plain(x)

    def bb_call(x, K=None, T_cam_world=None):
        return model.backbone.forward_both(x, K, T_cam_world)

    def runner(fn, x, graphs: bool) -> Callable[[], Any]:
        """A no-argument timed call: eager under autocast, or replaying a captured CUDA graph."""
        if graphs:
            from fast3dis_ros.model.fastpath.cuda_graph import GraphedForward

            g = GraphedForward(fn, amp_dtype=dtype if amp else None, max_graphs=1)
            run = lambda: g(x)  # noqa: E731
            run.graphed = g
            return run

        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                return fn(x)

        return run

    rows: list[dict] = []
    profiles: list[dict] = []
    baseline_rows: list[dict] = []

    def run_settings() -> dict[str, Any]:
        """What this run measured with (written into the final JSON and every partial one)."""
        return {
            "size": args.size, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": args.dtype, "height": args.height, "width": args.width, "first_lora_block": split,
            "depth": model.backbone.vit.n_blocks, "warmup": args.warmup, "iters": args.iters,
            "compile": args.compile, "cuda_graphs": args.cuda_graphs, "peak_tflops": args.peak_tflops,
            "torch": torch.__version__,
        }

    def save_partial(stage: str) -> None:
        """Write what is measured so far to ``--json`` (``"partial": true``): a run killed by a time limit
        (the lent GPU's 10-minute calls) still leaves its finished rows. The final write replaces it."""
        if not args.json:
            return
        snap = {"partial": True, "stage": stage, **run_settings(), "rows": rows, "profiles": profiles,
                "baseline_rows": baseline_rows, "notes": notes, "elapsed_s": time.perf_counter() - t_start}
        with open(args.json, "w") as fh:
            json.dump(snap, fh, indent=2, default=_json_default)
    notes: list[str] = []
    print(
        f"# fast3dis-bench size={args.size} device={device} dtype={args.dtype} {args.height}x{args.width} "
        f"first_lora_block={split}/{model.backbone.vit.n_blocks} queries={getattr(cfg.head, 'num_queries', '?')} "
        f"build={build_s:.1f}s" + (f" suite={args.suite}" if args.suite else "")
    )
    if device.type == "cuda":
        print(f"# gpu: {torch.cuda.get_device_name(device)}")
    hdr = f"{'views':>5} {'da3_ms':>9} {'f3d_ms':>9} {'bb_ms':>9} {'ratio':>6} {'da3_GiB':>8} {'f3d_GiB':>8} {'floor_da3':>9} {'floor_f3d':>9} {'full_da3':>9} {'full_f3d':>9} {'mfl_f3d':>8} {'mode':>6}"
    print(hdr, flush=True)
    plan = [(V, args.warmup, args.iters, False) for V in args.views] + [(V, 1, 1, True) for V in args.big_views]
    skipped_plain_big = []
    plain_on_device = True
    rates_cache: dict[int, dict[str, float]] = {}

    def rates_at(V: int) -> dict[str, float]:
        """This device's measured kernel rates on a ``V``-view window's shapes (for the measured-rate floor)."""
        if V not in rates_cache:
            rates_cache[V] = window_rates(model.backbone, device, dtype, V, args.height, args.width,
                                          iters=10 if device.type == "cuda" else 3)
        return rates_cache[V]

    def uses_graphs(V: int) -> bool:
        return args.cuda_graphs and device.type == "cuda" and V <= args.graph_max_views

    def _skips_plain(V: int, big: bool) -> bool:
        return args.skip_plain or big or (plain_max_views is not None and V > plain_max_views)

    def measure_row(step: int, V: int, warmup: int, iters: int, big: bool, label: str, flops: bool = True) -> dict:
        nonlocal plain_on_device
        g = torch.Generator().manual_seed(V)
        x = torch.randn(1, V, 3, args.height, args.width, generator=g).to(device)

        graphs = uses_graphs(V)
        run_plain, run_f3d, run_bb = (runner(fn, x, graphs) for fn in (plain_call, f3d_call, bb_call))

        def guarded(fn, w, it):
            try:
                return measure(fn, device, w, it)
            except Exception as e:  # noqa: BLE001  -- a suite must survive one failing size
                if not (big or args.suite):
                    raise
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                return {"ms": f"error: {type(e).__name__}", "peak_gib": "error", "error": repr(e)[:500]}

        skip_a = _skips_plain(V, big)
        if skip_a and not args.skip_plain:
            skipped_plain_big.append(V)
        if (args.suite and device.type == "cuda" and plain_on_device and step < len(plan)
                and all(_skips_plain(p_[0], p_[3]) for p_ in plan[step:])):
            plain.to("cpu")  # its weights would count in the FAST3DIS peak memory
            plain_on_device = False
            torch.cuda.empty_cache()
            notes.append(f"plain DA3 moved off the GPU from {V} views on (not in the peak memory)")
        def timed(run, w, it):
            res = guarded(run, w, it)
            g = getattr(run, "graphed", None)
            if g is not None:  # free this graph's memory pool before the next measurement
                res["graph_captures"], res["graph_failures"] = g.captures, list(g.failures)
                run.graphed = None
                del g
                gc.collect()
                torch.cuda.empty_cache()
            return res

        a = {"ms": "skipped", "peak_gib": "skipped"} if skip_a else timed(run_plain, warmup, iters)
        b = timed(run_f3d, warmup, iters)
        c = {"ms": "skipped", "peak_gib": "skipped"} if big else timed(run_bb, min(warmup, 1), iters)
        ratio = b["ms"] / a["ms"] if isinstance(a["ms"], float) and isinstance(b["ms"], float) else "n/a"
        parts_a = vit_flops_parts(model.backbone, V, args.height, args.width, None)
        parts_b = vit_flops_parts(model.backbone, V, args.height, args.width, split)
        fl_a = floor_ms(sum(parts_a.values()), args.peak_tflops)
        fl_b = floor_ms(sum(parts_b.values()), args.peak_tflops)
        flops_a = flops_b = "n/a"
        if flops and not (big or args.no_flops):  # whole-forward FLOPs (one extra eager forward each)
            flops_b = flop_count(runner(f3d_call, x, False))["total"]
            if not skip_a:
                flops_a = flop_count(runner(plain_call, x, False))["total"]
        full_a = floor_ms(flops_a, args.peak_tflops) if isinstance(flops_a, float) else "n/a"
        full_b = floor_ms(flops_b, args.peak_tflops) if isinstance(flops_b, float) else "n/a"
        mfloor_a = mfloor_b = "n/a"  # the same FLOPs at the rates this device's kernels reach on these shapes
        rates = None
        if isinstance(flops_b, float) and V <= MEASURED_FLOOR_MAX_VIEWS:
            rates = rates_at(V)
            mfloor_b = measured_floor_ms(flops_b, parts_b, rates)
            if isinstance(flops_a, float):
                mfloor_a = measured_floor_ms(flops_a, parts_a, rates)
        row = {
            "views": V, "da3_ms": a["ms"], "fast3dis_ms": b["ms"], "backbone_ms": c["ms"], "ratio": ratio,
            "da3_peak_gib": a["peak_gib"], "fast3dis_peak_gib": b["peak_gib"],
            "floor_da3_ms": fl_a, "floor_fast3dis_ms": fl_b, "warmup": warmup, "iters": iters,
            "flops_da3": flops_a, "flops_fast3dis": flops_b, "floor_full_da3_ms": full_a,
            "floor_full_fast3dis_ms": full_b, "floor_measured_da3_ms": mfloor_a, "floor_measured_fast3dis_ms": mfloor_b,
            "measured_tflops": rates,
            "cuda_graphs": graphs, "mode": label,
            "fast3dis_times_ms": b.get("times_ms"), "plain_weights_on_device": plain_on_device,
        }
        for k, m in (("da3", a), ("fast3dis", b)):
            if m.get("graph_failures"):
                row[f"{k}_graph_failures"] = m["graph_failures"]
        for k, m in (("da3_error", a), ("fast3dis_error", b), ("backbone_error", c)):
            if "error" in m:
                row[k] = m["error"]
        rows.append(row)
        save_partial(f"row {V} views {label}")
        print(
            f"{V:>5} {_f(a['ms']):>9} {_f(b['ms']):>9} {_f(c['ms']):>9} {_f(ratio, 2):>6} {_f(a['peak_gib'], 2):>8} "
            f"{_f(b['peak_gib'], 2):>8} {_f(fl_a, 2):>9} {_f(fl_b, 2):>9} {_f(full_a, 2):>9} {_f(full_b, 2):>9} "
            f"{_f(mfloor_b, 2):>8} {label:>6}",
            flush=True,
        )
        del x
        return row

    for step, (V, warmup, iters, big) in enumerate(plan):
        measure_row(step, V, warmup, iters, big, ("graph" if uses_graphs(V) else "eager")
                    + (f"+{fast_label}" if fast_label else ""))
    if reference is not None:
        deviation = deviation_from(x0, reference)
        print(f"# deviation of the fast path from the exact one at {args.views[0]} views: {deviation}")
        x0 = reference = None
    if skipped_plain_big:
        notes.append(f"plain DA3 not timed at {skipped_plain_big} views (saves time; the ratio target is at 32)")
    if args.big_views:
        notes.append(f"views {args.big_views}: warmup 1, iters 1; backbone-only column skipped")

    def plain_back_on_device() -> None:
        """The suite moves plain DA3 off the GPU for its biggest windows; later sections time it again."""
        nonlocal plain_on_device
        if not plain_on_device:
            plain.to(device)
            plain_on_device = True

    if args.profile:
        plain_back_on_device()
    for V in args.profile:
        from fast3dis_ros.bench.profile import format_profile, stage_profile

        g = torch.Generator().manual_seed(V)
        x = torch.randn(1, V, 3, args.height, args.width, generator=g).to(device)
        # eager only: a graph replay is one launch, which the profiler cannot split by stage
        for what, fn in (("FAST3DIS", f3d_call), ("plain DA3", plain_call)):
            run = runner(fn, x, False)
            try:
                prof = stage_profile(run, device)
                flops = flop_count(run)
            except Exception as e:  # noqa: BLE001 -- a profile must not sink the suite
                notes.append(f"profile {what} {V}v eager failed: {e!r:.300}")
                continue
            title = f"{what}, {V} views, eager, {args.height}x{args.width} {args.dtype}"
            print(format_profile(title, prof, flops, args.peak_tflops), flush=True)
            profiles.append({"what": what, "views": V, "mode": "eager", **prof, "flops": flops})
            save_partial(f"profile {what} {V} views")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        del x

    if args.baseline:
        bviews = args.baseline_views or [r["views"] for r in rows]
        print(f"# HDBSCAN baseline (mask_features, max_points={args.baseline_max_points}); forward on {device}, "
              f"clustering on the host CPU")
        print(f"{'views':>5} {'fwd_ms':>9} {'host_ms':>8} {'clust_ms':>9} {'total_s':>8} {'fwd_GiB':>8} "
              f"{'rss_GiB':>8} {'points':>9} {'clusters':>8}", flush=True)
        for V in bviews:
            try:
                b = run_baseline(model, device, dtype, amp, V, args.height, args.width, warmup=min(args.warmup, 1),
                                 max_points=args.baseline_max_points, fwd=_fwd_of(_row_at(rows, V)))
            except Exception as e:  # noqa: BLE001
                if not args.suite:
                    raise
                b = {"views": V, "error": repr(e)[:500], "forward_ms": "error", "cluster_ms": "error",
                     "total_s": "error"}
            baseline_rows.append(b)
            save_partial(f"baseline {V} views")
            print(f"{V:>5} {_f(b.get('forward_ms')):>9} {_f(b.get('to_host_ms')):>8} {_f(b.get('cluster_ms')):>9} "
                  f"{_f(b.get('total_s'), 2):>8} {_f(b.get('forward_peak_gib'), 2):>8} "
                  f"{_f(b.get('cluster_rss_peak_gib'), 2):>8} {str(b.get('n_points')):>9} "
                  f"{str(b.get('n_clusters')):>8}", flush=True)
    if args.fast_views and device.type == "cuda" and not fast_label:
        fast_label = "merge+compile+head-compile+head-bf16"
        plain_back_on_device()
        x0, reference = exact_reference(args.fast_views[0])
        enable_fast(True, True, True)
        print(f"# fast path ({fast_label}): compiled at the first call of each window shape", flush=True)
        print(hdr, flush=True)
        # --fast-unchained: the same fast path without chained residuals after it, same run, same floor
        for variant in [""] + (["-chain"] if args.fast_unchained else []):
            if variant == "-chain":
                model.backbone.runner.unchain()
            for V in args.fast_views:
                t0 = time.perf_counter()
                measure_row(len(plan), V, args.warmup + 1, args.iters, False,
                            ("graph+" if uses_graphs(V) else "eager+") + fast_label + variant, flops=False)
                rows[-1]["wall_incl_compile_s"] = time.perf_counter() - t0
            dev = deviation_from(x0, reference)
            print(f"# deviation of the fast path{variant} from the exact one at {args.fast_views[0]} views: {dev}")
            if variant:
                unchained_deviation = dev
            else:
                deviation = dev
        x0 = reference = None
    result = {
        **run_settings(), "rows": rows, "suite": args.suite, "argv": list(sys.argv if argv is None else argv),
        "cpu_count": os.cpu_count(), "loadavg": _loadavg(),
    }
    if args.baseline:
        result["baseline_rows"] = baseline_rows
    if profiles:
        result["profiles"] = profiles
    result["compile_blocks"], result["head_autocast"] = args.compile_blocks, args.head_autocast
    result["compile_head"] = args.compile_head
    if deviation is not None:
        result["fast_path_deviation"] = deviation
    if unchained_deviation is not None:
        result["fast_path_unchained_deviation"] = unchained_deviation
    del model, plain, c_model, c_plain, plain_bb
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.node:
        from fast3dis_ros.ros.bench_node import format_rows, run_node_bench

        print("# node-side figures (CPU)")
        print(format_rows([], header=True), flush=True)
        node = run_node_bench(log=lambda s: print(s, flush=True))
        result["node"] = node
    if args.suite:
        trows = targets(result)
        if args.node:
            trows += [r for r in result["node"]["rows"]]
        result["targets"] = trows
        notes.append("node figures are CPU wall-clock on this host (load average recorded in the JSON)")
        result["notes"] = notes
        print_targets(trows, notes)
    result["wall_s"] = time.perf_counter() - t_start
    print(f"# total wall time {result['wall_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=_json_default)
    if args.plot:
        from fast3dis_ros.bench.plot import plot_curves

        print(f"# time and memory against views: {plot_curves(result, args.plot)}")
    return 0


def _fwd_of(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"ms": row["fast3dis_ms"], "peak_gib": row["fast3dis_peak_gib"]}


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
