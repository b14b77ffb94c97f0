"""Where a FAST3DIS forward's time goes: per-stage GPU time, kernel counts, FLOPs and arithmetic floors.

Used by ``fast3dis-bench --profile V`` to back the small-window target with evidence. Three views of
one forward:

* ``flop_count``: FLOPs by module (``torch.utils.flop_counter``: matmuls, convolutions, attention)
  -> the **arithmetic floor** = FLOPs / peak tensor throughput. This is the whole forward's floor
  (ViT trunk, DA3's DPT head and camera decoder, our pixel decoder and instance head), not just the
  ViT trunk's.
* ``stage_profile``: ``torch.profiler`` over a few forwards; the ``f3d.*`` ranges in the model
  (``backbone.stage``) give CPU time, GPU kernel time and kernel launches per stage; "GPU busy" =
  summed kernel time / wall time shows whether a run is launch-bound (low) or arithmetic-bound.
* ``top_kernels``: the kernels that dominate GPU time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable

import torch


def flop_count(fn: Callable[[], Any], depth: int = 12) -> dict[str, Any]:
    """Total FLOPs of ``fn()`` and a per-module breakdown (module paths up to ``depth`` levels)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=depth)
    with counter:
        fn()
    per_module = {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return {"total": float(counter.get_total_flops()), "per_module": per_module}


def floor_ms(flops: float, peak_tflops: float) -> float:
    return flops / (peak_tflops * 1e12) * 1e3


def _rate(fn: Callable[[], Any], flops: float, iters: int, device: torch.device) -> float:
    """TFLOP/s of ``fn`` (``flops`` per call) after a warm-up: CUDA events on a GPU, wall clock on a CPU."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(iters):
            fn()
        e1.record()
        e1.synchronize()
        seconds = e0.elapsed_time(e1) / 1e3
        return flops * iters / seconds / 1e12
    best = float("inf")  # CPU: the fastest call, so a busy host does not lower the rate (and raise the floor)
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e12


def measured_rates(device: torch.device, dtype: torch.dtype, views: int, tokens_per_view: int, dim: int, heads: int,
                   conv_hw: tuple[int, int], conv_ch: int, iters: int = 20) -> dict[str, float]:
    """What this device's library kernels reach (TFLOP/s) on the shapes of one window's forward.

    Why: the spec-sheet peak (989 TFLOP/s dense bf16 on an H100 SXM) is not reachable by real kernels
    at these sizes: cuDNN's fused attention tops out near 400 TFLOP/s at head dim 64, cuBLAS reaches
    550-750 on the ViT's GEMMs. A floor at the rates the library kernels actually reach, measured in the
    same run, says how far the forward is from running only its arithmetic.
    Keys: ``linear`` (the ViT block GEMMs qkv, proj, fc1, fc2, FLOP-weighted), ``attn_global`` (one
    sequence of all views' tokens), ``attn_local`` (one sequence per view), ``conv`` (3x3
    ``conv_ch``->``conv_ch`` over ``views`` maps of ``conv_hw``, channels-last: the DPT heads' main work).
    """
    import torch.nn.functional as F

    kw = dict(device=device, dtype=dtype)
    n = views * tokens_per_view
    rates: dict[str, float] = {}
    with torch.inference_mode():
        x = torch.randn(n, dim, **kw)
        x4 = torch.randn(n, 4 * dim, **kw)
        seconds, flops = 0.0, 0.0
        for inp, out_f in ((x, 3 * dim), (x, dim), (x, 4 * dim), (x4, dim)):  # qkv, proj, fc1, fc2
            w = torch.randn(out_f, inp.shape[1], **kw)
            f = 2.0 * n * inp.shape[1] * out_f
            seconds += f / (_rate(lambda: F.linear(inp, w), f, iters, device) * 1e12)
            flops += f
        rates["linear"] = flops / seconds / 1e12
        hd = dim // heads
        for key, (b, seq) in (("attn_global", (1, n)), ("attn_local", (views, tokens_per_view))):
            q, k, v = (torch.randn(b, heads, seq, hd, **kw) for _ in range(3))
            rates[key] = _rate(lambda: F.scaled_dot_product_attention(q, k, v), 4.0 * b * heads * seq * seq * hd,
                               iters, device)
        img = torch.randn(views, conv_ch, *conv_hw, **kw).contiguous(memory_format=torch.channels_last)
        wc = torch.randn(conv_ch, conv_ch, 3, 3, **kw).contiguous(memory_format=torch.channels_last)
        rates["conv"] = _rate(lambda: F.conv2d(img, wc, padding=1),
                              2.0 * views * conv_ch * conv_ch * 9 * conv_hw[0] * conv_hw[1], iters, device)
    return rates


def measured_floor_ms(total_flops: float, vit_parts: dict[str, float], rates: dict[str, float]) -> float:
    """Floor at measured kernel rates: the ViT's GEMMs and attention at their own rates, everything else
    (DPT heads, camera decoder, instance head: mostly convolutions) at the convolution rate."""
    rest = max(0.0, total_flops - sum(vit_parts.values()))
    t = sum(vit_parts[k] / (rates[k] * 1e12) for k in ("linear", "attn_global", "attn_local"))
    return (t + rest / (rates["conv"] * 1e12)) * 1e3


def _events_by_stage(prof) -> dict[str, dict[str, float]]:
    """Per ``f3d.*`` range: CPU ms, GPU kernel ms and kernel launches (summed over profiled steps)."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"cpu_ms": 0.0, "gpu_ms": 0.0, "kernels": 0, "calls": 0})
    for evt in prof.events():
        if not evt.name.startswith("f3d."):
            continue
        row = out[evt.name]
        row["calls"] += 1
        row["cpu_ms"] += evt.time_range.elapsed_us() / 1e3

        def walk(e):
            n, t = len(e.kernels), sum(k.duration for k in e.kernels)
            for c in e.cpu_children:
                cn, ct = walk(c)
                n, t = n + cn, t + ct
            return n, t

        n, t = walk(evt)
        row["kernels"] += n
        row["gpu_ms"] += t / 1e3
    return dict(out)


def stage_profile(fn: Callable[[], Any], device: torch.device, steps: int = 3, top: int = 15) -> dict[str, Any]:
    """Profile ``steps`` calls of ``fn`` (after one warm-up): per-stage table, top kernels, GPU busy."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    total_kernel_us, n_kernels = 0.0, 0
    for evt in prof.events():
        for k in evt.kernels:
            kernels[k.name][0] += k.duration
            kernels[k.name][1] += 1
            total_kernel_us += k.duration
            n_kernels += 1
    stages = {name: {k: (v / steps if k != "calls" else v // steps) for k, v in row.items()}
              for name, row in _events_by_stage(prof).items()}
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "wall_ms": wall_ms,
        "gpu_kernel_ms": total_kernel_us / 1e3 / steps,
        "kernels_per_forward": n_kernels / steps,
        "gpu_busy": (total_kernel_us / 1e3 / steps) / wall_ms if wall_ms > 0 else None,
        "stages": stages,
        "top_kernels": [{"name": n[:110], "ms": v[0] / 1e3 / steps, "count": int(v[1] // steps)} for n, v in ranked],
    }


def format_profile(title: str, prof: dict[str, Any], flops: dict[str, Any] | None, peak_tflops: float) -> str:
    lines = [f"# profile: {title}",
             f"#   wall {prof['wall_ms']:.1f} ms/forward, GPU kernel time {prof['gpu_kernel_ms']:.1f} ms "
             f"({100 * (prof['gpu_busy'] or 0):.0f}% busy), {prof['kernels_per_forward']:.0f} kernels/forward"]
    if flops:
        lines.append(f"#   {flops['total'] / 1e12:.3f} TFLOP -> arithmetic floor {floor_ms(flops['total'], peak_tflops):.2f} ms "
                     f"at {peak_tflops:.0f} TFLOP/s")
    lines.append(f"#   {'stage':<26} {'cpu_ms':>8} {'gpu_ms':>8} {'kernels':>8}")
    for name, r in sorted(prof["stages"].items(), key=lambda kv: -kv[1]["gpu_ms"]):
        lines.append(f"#   {name:<26} {r['cpu_ms']:>8.2f} {r['gpu_ms']:>8.2f} {r['kernels']:>8.0f}")
    lines.append(f"#   top kernels: {'ms':>7} {'count':>6}  name")
    for k in prof["top_kernels"]:
        lines.append(f"#   {'':<12} {k['ms']:>7.2f} {k['count']:>6}  {k['name']}")
    if flops:
        lines.append("#   FLOPs by part (GFLOP, floor ms):")
        for name, f in flop_groups(flops).items():
            lines.append(f"#   {'':<12} {f / 1e9:>10.1f} {floor_ms(f, peak_tflops):>7.2f}  {name}")
    return "\n".join(lines)


# module path prefixes (FlopCounterMode names) -> readable part names; both model roots are covered
FLOP_GROUPS = {
    "DA3 ViT trunk": ("Fast3DIS.backbone.net.backbone", "DepthAnything3Net.backbone"),
    "DA3 DPT head": ("Fast3DIS.backbone.net.head", "DepthAnything3Net.head"),
    "DA3 camera decoder": ("Fast3DIS.backbone.net.cam_dec", "DepthAnything3Net.cam_dec"),
    "DA3 camera encoder": ("Fast3DIS.backbone.net.cam_enc", "DepthAnything3Net.cam_enc"),
    "pixel decoder": ("Fast3DIS.head.pixel_decoder",),
    "query generator": ("Fast3DIS.head.query_generator",),
    "anchor decoder": ("Fast3DIS.head.decoder",),
}


def flop_groups(flops: dict[str, Any]) -> dict[str, float]:
    """FLOPs per readable part; 'rest' = total minus the parts (mask dot products, lifting, ...)."""
    per = flops["per_module"]
    out = {}
    for label, prefixes in FLOP_GROUPS.items():
        # modules under the prefix whose own parent was not entered (DA3's trunk is driven block by
        # block, so only the blocks appear): sum the outermost ones to avoid double counting
        names = [n for n in per if any(n == p or n.startswith(p + ".") for p in prefixes)]
        outer = [n for n in names if not any(n != m and n.startswith(m + ".") for m in names)]
        f = sum(per[n] for n in outer)
        if f > 0:
            out[label] = f
    out["rest"] = max(0.0, flops["total"] - sum(out.values()))
    return out
