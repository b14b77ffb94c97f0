"""fast3dis-bench: time and memory of plain DA3 vs the whole FAST3DIS forward, per window size.

For each view count: (a) plain ``DepthAnything3Net`` forward (a separate module holding the very same
DA3 weights), (b) ``Fast3DIS`` forward (shared prefix + geometry pass + LoRA feature pass + instance
head), (c) the backbone part of (b) alone. Median of ``--iters`` timed runs after ``--warmup``; CUDA
timings use events, peak memory is ``torch.cuda.max_memory_allocated`` (weights + activations of the
measured model). On CPU the memory column is the process RSS growth (psutil) or 'n/a'.

``floor_*_ms``: arithmetic floor of the ViT trunk alone, FLOPs / ``--peak-tflops`` (default: H100 SXM
dense bf16, 989 TFLOP/s): 2 x (block parameters) x tokens + attention (4 N^2 D per local block per
view, 4 (V N)^2 D per global block); FAST3DIS runs blocks >= first_lora_block twice.
Random weights unless ``--da3-weights`` is given (speed does not depend on the values).

Example (H100): ``fast3dis-bench --size large --views 8 32 50 64 --dtype bf16 --json bench.json``
CPU smoke test: ``fast3dis-bench --size tiny --device cpu --views 2 4 --height 56 --width 70 --iters 2``
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def vit_flops(backbone, views: int, height: int, width: int, shared_split: int | None) -> float:
    """FLOPs of the DA3 ViT trunk for one window (B=1). ``shared_split``: blocks >= it run twice."""
    vit = backbone.vit
    D = vit.embed_dim
    N = (height // 14) * (width // 14) + 1 + vit.num_register_tokens
    last = max(backbone.out_layers) + 1
    total = 0.0
    for i in range(last):
        blk = vit.blocks[i]
        params = sum(p.numel() for n, p in blk.named_parameters() if n.endswith("weight") and p.dim() == 2 and "lora_" not in n)
        lin = 2.0 * params * views * N
        if vit.alt_start != -1 and i >= vit.alt_start and i % 2 == 1:
            att = 4.0 * (views * N) ** 2 * D
        else:
            att = 4.0 * views * N * N * D
        reps = 2 if shared_split is not None and i >= shared_split else 1
        total += reps * (lin + att)
    return total


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
            try:
                import psutil

                proc = psutil.Process()
                rss0 = proc.memory_info().rss
            except ImportError:  # pragma: no cover
                proc = None
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000.0)
            mem = (proc.memory_info().rss - rss0) / 2**30 if proc is not None else "n/a"
        return {"ms": statistics.median(times), "peak_gib": mem, "times_ms": times}
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return {"ms": "OOM", "peak_gib": "OOM"}
        raise


def build(args) -> tuple[Any, Any, Any]:
    from fast3dis_ros.model.backbone import build_da3_net
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
    ap.add_argument("--first-lora-block", type=int, default=None)
    ap.add_argument("--da3-weights", default=None, help="DA3 weights folder/hub id (default: random)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--cuda-graphs", action="store_true", help="torch.compile mode=reduce-overhead")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for the arithmetic floor (H100 bf16 dense)")
    ap.add_argument("--skip-plain", action="store_true", help="do not time plain DA3")
    args = ap.parse_args(argv)

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
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))

    t0 = time.perf_counter()
    cfg, model, plain = build(args)
    model.to(device)
    plain.to(device)
    build_s = time.perf_counter() - t0
    split = model.backbone.lora_start
    f_model, f_plain, f_bb = model, plain, model.backbone.forward_both
    if args.compile or args.cuda_graphs:
        mode = "reduce-overhead" if args.cuda_graphs else None
        f_model = torch.compile(model, mode=mode)
        f_plain = torch.compile(plain, mode=mode)

    rows = []
    print(
        f"# fast3dis-bench size={args.size} device={device} dtype={args.dtype} {args.height}x{args.width} "
        f"first_lora_block={split}/{model.backbone.vit.n_blocks} queries={getattr(cfg.head, 'num_queries', '?')} "
        f"build={build_s:.1f}s"
    )
    if device.type == "cuda":
        print(f"# gpu: {torch.cuda.get_device_name(device)}")
    hdr = f"{'views':>5} {'da3_ms':>9} {'f3d_ms':>9} {'bb_ms':>9} {'ratio':>6} {'da3_GiB':>8} {'f3d_GiB':>8} {'floor_da3':>9} {'floor_f3d':>9}"
    print(hdr)
    for V in args.views:
        g = torch.Generator().manual_seed(V)
        x = torch.randn(1, V, 3, args.height, args.width, generator=g).to(device)

        def run_plain():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                return f_plain(x)

        def run_f3d():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                return f_model(x)

        def run_bb():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                return f_bb(x)

        a = {"ms": "skipped", "peak_gib": "skipped"} if args.skip_plain else measure(run_plain, device, args.warmup, args.iters)
        b = measure(run_f3d, device, args.warmup, args.iters)
        c = measure(run_bb, device, min(args.warmup, 1), args.iters)
        ratio = b["ms"] / a["ms"] if isinstance(a["ms"], float) and isinstance(b["ms"], float) else "n/a"
        fl_a = vit_flops(model.backbone, V, args.height, args.width, None) / (args.peak_tflops * 1e12) * 1e3
        fl_b = vit_flops(model.backbone, V, args.height, args.width, split) / (args.peak_tflops * 1e12) * 1e3
        row = {
            "views": V, "da3_ms": a["ms"], "fast3dis_ms": b["ms"], "backbone_ms": c["ms"], "ratio": ratio,
            "da3_peak_gib": a["peak_gib"], "fast3dis_peak_gib": b["peak_gib"],
            "floor_da3_ms": fl_a, "floor_fast3dis_ms": fl_b,
        }
        rows.append(row)

        def f(v, nd=1):
            return f"{v:.{nd}f}" if isinstance(v, float) else str(v)

        print(
            f"{V:>5} {f(a['ms']):>9} {f(b['ms']):>9} {f(c['ms']):>9} {f(ratio, 2):>6} {f(a['peak_gib'], 2):>8} "
            f"{f(b['peak_gib'], 2):>8} {f(fl_a, 2):>9} {f(fl_b, 2):>9}",
            flush=True,
        )
        del x
    result = {
        "size": args.size, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": args.dtype, "height": args.height, "width": args.width, "first_lora_block": split,
        "depth": model.backbone.vit.n_blocks, "warmup": args.warmup, "iters": args.iters,
        "compile": args.compile, "cuda_graphs": args.cuda_graphs, "peak_tflops": args.peak_tflops,
        "torch": torch.__version__, "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
