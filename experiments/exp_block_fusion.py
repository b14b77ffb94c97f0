"""Experiment: the fast path's block-level fusions at a small window, one at a time, with profiles.

A development tool (not part of the suite) that decides which fast-path options to keep and records
why in docs/BENCHMARKS.md. On the lent GPU it prints:
  * the fc1 GEMM of an 8-view DA3-Large block alone, with a separate GELU, and with cuBLASLt's GELU
    epilogue (``torch._addmm_activation``), in TFLOP/s;
  * per variant: graphed forward time, deviation from the exact (DA3-identical) path, a profile
    (stages, top kernels) and the instance head's own top kernels.
Variants (each a fresh model through ``Fast3DIS.compile_for_inference``):
  s3      the fast path as of the third session (fp32 block weights under autocast, DA3's Mlp, eager taps)
  cast    + block linear weights stored in bf16
  gelu    + fc1 and GELU as one GEMM (tanh GELU)
  taps    + compiled tap post-processing
  heads   + DPT-head, camera-decoder and instance-head weights stored in bf16
  new     + q/k LayerNorm and RoPE in one pass (``fast_attention.py``)
  dptpe   + the DPT head's full-resolution UV embedding added after its first output conv
          (``compile_for_inference(fold_dpt_pe=True)``)
  nhwc    + the DPT head's upsamplings read channels-last maps (``compile_for_inference(dpt_nhwc=True)``;
          = what ``compile_for_inference(weight_dtype=bf16)`` does now)
  chain   + each block's last residual add done by the next block (``compile_for_inference(chain=True)``)

    python experiments/exp_block_fusion.py --views 8 --variants new s3 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import defaultdict
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def _time_ms(fn, iters: int = 50) -> float:
    """Mean ms per call on the GPU (CUDA events after a warm-up; ``bench_profile._rate`` with 1 "FLOP")."""
    from fast3dis_ros.bench.profile import _rate

    return 1e3 / _rate(fn, 1e12, iters, torch.device("cuda"))


def gelu_epilogue(device, m: int, k: int = 1024, n: int = 4096) -> dict:
    """fc1 at the window's shape: GEMM + bias, + separate tanh GELU, and with the fused epilogue."""
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.03
    b = torch.randn(n, device=device, dtype=torch.bfloat16)
    flops = 2 * m * k * n
    res = {
        "addmm_ms": _time_ms(lambda: torch.addmm(b, x, w.t())),
        "addmm_then_gelu_ms": _time_ms(lambda: F.gelu(torch.addmm(b, x, w.t()), approximate="tanh")),
        "addmm_activation_gelu_ms": _time_ms(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)),
    }
    for key in list(res):
        res[key.replace("_ms", "_tflops")] = flops / (res[key] / 1e3) / 1e12
    ref = F.gelu(torch.addmm(b, x, w.t()).float(), approximate="tanh")
    res["max_abs_vs_tanh_gelu"] = float((torch._addmm_activation(b, x, w.t(), use_gelu=True).float() - ref).abs().max())
    return res


def stage_kernels(fn, stage: str, steps: int = 2, top: int = 25) -> list[dict]:
    """The top kernels launched inside one ``f3d.*`` profiler range (per forward)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    def walk(e):
        for k in e.kernels:
            acc[k.name][0] += k.duration
            acc[k.name][1] += 1
        for c in e.cpu_children:
            walk(c)

    for evt in prof.events():
        if evt.name == stage:
            walk(evt)
    ranked = sorted(acc.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"name": n[:110], "ms": v[0] / 1e3 / steps, "count": int(v[1] // steps)} for n, v in ranked]


VARIANTS = ("s3", "cast", "gelu", "taps", "heads", "new", "dptpe", "nhwc", "chain")


def apply_variant(model, variant: str) -> None:
    """Cumulative: each variant adds one change to the one before it in ``VARIANTS``."""
    from fast3dis_ros.model.fastpath.accelerate import cast_block_linears
    from fast3dis_ros.model.fastpath.fast_attention import FusedNormRopeAttention
    from fast3dis_ros.model.fastpath.fused_mlp import fuse_block_mlps

    if variant in ("heads", "new", "dptpe", "nhwc", "chain"):
        model.compile_for_inference(weight_dtype=torch.bfloat16, chain=variant == "chain",
                                    fold_dpt_pe=variant in ("dptpe", "nhwc", "chain"),
                                    dpt_nhwc=variant in ("nhwc", "chain"))
        if variant == "heads":  # undo the fused q/k norm + RoPE (blocks compile lazily, at the first call)
            for blk in model.backbone.vit.blocks:
                if isinstance(blk.attn, FusedNormRopeAttention):
                    blk.attn = blk.attn.inner
        return
    model.compile_for_inference(weight_dtype=None)  # s3: no cast, no fusion (taps undone below)
    bb = model.backbone
    rank = VARIANTS.index(variant)
    if rank >= 1:
        cast_block_linears(bb, torch.bfloat16)
    if rank >= 2:
        fuse_block_mlps(bb.vit.blocks)
    if rank < 3:
        bb.runner.tap_fn = None  # eager taps, as before


def measured_floor(model, x) -> dict:
    """The bench's measured-rate floor at this window, with cuDNN's conv benchmark mode off and on."""
    from fast3dis_ros.bench.suite import vit_flops_parts, window_rates
    from fast3dis_ros.bench.profile import flop_count, measured_floor_ms

    V, H, W = x.shape[1], x.shape[-2], x.shape[-1]

    def run_ref():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x, return_aux=False)

    total = flop_count(run_ref)["total"]
    bb = model.backbone
    parts = vit_flops_parts(bb, V, H, W, bb.lora_start)
    out = {"tflop": total / 1e12}
    for bench_mode in (False, True):
        torch.backends.cudnn.benchmark = bench_mode
        rates = window_rates(bb, x.device, torch.bfloat16, V, H, W, iters=10)
        out[f"cudnn_benchmark={bench_mode}"] = {"rates": rates, "floor_ms": measured_floor_ms(total, parts, rates)}
    torch.backends.cudnn.benchmark = False
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=["new", "s3"],
                    choices=list(VARIANTS) + [f"{v}+cudnn" for v in VARIANTS],
                    help="'+cudnn': with torch.backends.cudnn.benchmark on (cuDNN times its conv algorithms)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile", nargs="*", default=None, help="variants to profile (default: all)")
    ap.add_argument("--no-floor", action="store_true", help="skip the FLOP count and measured-rate floor")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from fast3dis_ros.bench.suite import build, measure, output_deviation
    from fast3dis_ros.bench.profile import format_profile, stage_profile
    from fast3dis_ros.model.fastpath.cuda_graph import GraphedForward

    device = torch.device("cuda")
    V, H, W = args.views, 378, 504
    tokens = V * ((H // 14) * (W // 14) + 1)
    results: dict = {"gelu_epilogue": gelu_epilogue(device, tokens), "variants": {}}
    print("# fc1 + GELU at", tokens, "tokens:", json.dumps({k: round(v, 4) for k, v in results["gelu_epilogue"].items()}),
          flush=True)

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)

    save()
    bargs = SimpleNamespace(size="large", first_lora_block=None, da3_weights=None)
    x = torch.randn(1, V, 3, H, W, generator=torch.Generator().manual_seed(V)).to(device)
    reference = None
    for variant in args.variants:
        base, _, extra = variant.partition("+")
        t0 = time.perf_counter()
        _, model, plain = build(bargs)
        del plain
        model.to(device)
        if reference is None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, return_aux=False)
            reference = {k: out[k].float().clone() for k in ("depth", "pred_logits", "pred_masks")}
            if not args.no_floor:
                results["floor"] = measured_floor(model, x)
                print("# measured-rate floor:", json.dumps(results["floor"]), flush=True)
        torch.backends.cudnn.benchmark = extra == "cudnn"
        apply_variant(model, base)
        fn = lambda im, K=None, T_cam_world=None: model(im, K, T_cam_world, return_aux=False)  # noqa: E731
        gf = GraphedForward(fn, amp_dtype=torch.bfloat16, max_graphs=1)
        res = measure(lambda: gf(x), device, 4, args.iters)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            fast = model(x, return_aux=False)
        dev = output_deviation(fast, reference)
        print(f"## {variant}: {V} views graphed {res['ms']:.2f} ms, peak {res['peak_gib']:.2f} GiB "
              f"({time.perf_counter() - t0:.0f} s with compilation); deviation {dev}", flush=True)
        results["variants"][variant] = {"ms": res["ms"], "times_ms": res["times_ms"], "peak_gib": res["peak_gib"],
                                        "deviation": dev}
        save()

        if args.profile is None or variant in args.profile:
            def run_eager():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(x, return_aux=False)

            prof = stage_profile(run_eager, device, top=40)
            print(format_profile(f"{variant}, {V} views, compiled, eager launch", prof, None, 989.0), flush=True)
            head = stage_kernels(run_eager, "f3d.instance_head")
            print("# instance head top kernels:", *(f"{k['ms']:.3f} ms x{k['count']} {k['name']}" for k in head),
                  sep="\n#   ", flush=True)
            dpt = stage_kernels(run_eager, "f3d.geometry_head")
            print("# DPT head top kernels:", *(f"{k['ms']:.3f} ms x{k['count']} {k['name']}" for k in dpt),
                  sep="\n#   ", flush=True)
            results["variants"][variant].update(profile=prof, instance_head_kernels=head, dpt_head_kernels=dpt)
            save()
        del gf, model, fast
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
