"""Experiment: variants of the compiled fast path at a small window, with profiles and measured peaks.

Not part of the suite; a development tool to decide which fast-path options to keep. Prints, for the
lent GPU: measured bf16 GEMM / attention throughput at the ViT's shapes (for a measured-rate floor),
then per variant: graphed time, deviation from the exact path, and a profile (stages, top kernels).

    python scripts/exp_fast_path.py --views 8 --variants default trunk_bf16 trunk_bf16+cl
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def gemm_tflops(m: int, k: int, n: int, device, iters: int = 50) -> float:
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        a @ b
    e1.record()
    e1.synchronize()
    return 2 * m * k * n * iters / (e0.elapsed_time(e1) / 1e3) / 1e12


def sdpa_tflops(b: int, h: int, n: int, d: int, device, backend=None, iters: int = 30) -> float:
    from torch.nn.attention import sdpa_kernel

    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    ctx = sdpa_kernel(backend) if backend is not None else torch.autocast("cuda", enabled=False)
    with ctx:
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(iters):
            F.scaled_dot_product_attention(q, k, v)
        e1.record()
        e1.synchronize()
    return 4 * b * h * n * n * d * iters / (e0.elapsed_time(e1) / 1e3) / 1e12


def calibrate(device, V: int, tokens_per_view: int) -> dict:
    from torch.nn.attention import SDPBackend

    N = V * tokens_per_view
    out = {
        "gemm_8192": gemm_tflops(8192, 8192, 8192, device),
        "gemm_qkv": gemm_tflops(N, 1024, 3072, device),
        "gemm_proj": gemm_tflops(N, 1024, 1024, device),
        "gemm_fc1": gemm_tflops(N, 1024, 4096, device),
        "gemm_fc2": gemm_tflops(N, 4096, 1024, device),
    }
    for name, be in (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            out[f"attn_global_{name}"] = sdpa_tflops(1, 16, N, 64, device, be)
            out[f"attn_local_{name}"] = sdpa_tflops(V, 16, tokens_per_view, 64, device, be)
        except Exception as e:  # noqa: BLE001
            out[f"attn_{name}_error"] = repr(e)[:200]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=["default", "trunk_bf16", "trunk_bf16+cl"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from fast3dis_ros.bench import build, measure
    from fast3dis_ros.bench_profile import format_profile, stage_profile
    from fast3dis_ros.model.cuda_graph import GraphedForward

    device = torch.device("cuda")
    V, H, W = args.views, 378, 504
    t0 = time.perf_counter()
    cal = calibrate(device, V, (H // 14) * (W // 14) + 1)
    print("# measured TFLOP/s:", json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in cal.items()}),
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    from fast3dis_ros.bench import vit_flops_parts
    from fast3dis_ros.bench_profile import flop_count, measured_floor_ms, measured_rates

    rates = measured_rates(device, V, (H // 14) * (W // 14) + 1, 1024, 16, (H // 14 * 4, W // 14 * 4))
    print("# measured rates:", {k: round(v, 1) for k, v in rates.items()}, flush=True)
    bargs = SimpleNamespace(size="large", first_lora_block=None, da3_weights=None)
    g = torch.Generator().manual_seed(V)
    x = torch.randn(1, V, 3, H, W, generator=g).to(device)
    reference = None
    results = {"calibration": cal, "variants": {}}
    for variant in args.variants:
        t0 = time.perf_counter()
        _, model, plain = build(bargs)
        del plain
        model.to(device)
        if reference is None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, return_aux=False)
            reference = {k: out[k].float().clone() for k in ("depth", "pred_logits", "pred_masks")}

            def run_ref():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(x, return_aux=False)

            total = flop_count(run_ref)["total"]
            parts = vit_flops_parts(model.backbone, V, H, W, model.backbone.lora_start)
            floor_m = measured_floor_ms(total, parts, rates)
            print(f"# {V} views: {total / 1e12:.3f} TFLOP, vit parts {dict((k, round(v / 1e12, 3)) for k, v in parts.items())}, "
                  f"spec floor {total / 989e12 * 1e3:.2f} ms, measured-rate floor {floor_m:.2f} ms", flush=True)
            results["floor"] = {"total": total, "parts": parts, "rates": rates, "measured_floor_ms": floor_m}
        opts = set(variant.split("+"))
        model.compile_for_inference(trunk_dtype=torch.bfloat16 if "trunk_bf16" in opts else None,
                                    mode="max-autotune-no-cudagraphs" if "autotune" in opts else None)
        if "cl" in opts:
            model.backbone.net.head.to(memory_format=torch.channels_last)
            model.head.pixel_decoder.to(memory_format=torch.channels_last)
        fn = lambda im, K=None, T_cam_world=None: model(im, K, T_cam_world, return_aux=False)  # noqa: E731
        gf = GraphedForward(fn, amp_dtype=torch.bfloat16, max_graphs=1)
        res = measure(lambda: gf(x), device, 4, args.iters)
        compile_s = time.perf_counter() - t0
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            fast = model(x, return_aux=False)
        rel = (fast["depth"].float() - reference["depth"]).abs() / reference["depth"].abs().clamp_min(1e-6)
        dev = {
            "depth_max_rel": float(rel.max()), "depth_median_rel": float(rel.median()),
            "logits_max_abs": float((fast["pred_logits"].float() - reference["pred_logits"]).abs().max()),
            "mask_sign_agreement": float(((fast["pred_masks"].float() > 0) == (reference["pred_masks"] > 0)).float().mean()),
        }
        print(f"## {variant}: {V} views graphed {res['ms']:.2f} ms, peak {res['peak_gib']:.2f} GiB "
              f"(build+compile+measure {compile_s:.0f} s); deviation {dev}", flush=True)

        def run_eager():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x, return_aux=False)

        prof = stage_profile(run_eager, device, top=30)
        print(format_profile(f"{variant}, {V} views, compiled, eager launch", prof, None, 989.0), flush=True)
        results["variants"][variant] = {"ms": res["ms"], "times_ms": res["times_ms"], "peak_gib": res["peak_gib"],
                                        "deviation": dev, "profile": prof}
        del gf, model, fast
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
