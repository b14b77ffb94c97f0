"""Experiment: the DPT head's bilinear upsamplings at an 8-view window's shapes, several ways.

The 8-view fast-path profile (docs/BENCHMARKS.md 17) shows DA3's DPT head spending 0.75 ms and 0.42 ms
in two Inductor upsampling kernels that move 0.25 and 0.39 GB: 3-5x their bandwidth time. This times,
per shape, with and without the 3x3 conv that follows:
  eager        ``F.interpolate`` (aten's CUDA kernel), NCHW and channels-last input
  compiled     the same through ``torch.compile`` (Inductor's decomposition into index + lerp)
  gemm         the separable form ``A_h @ X @ A_w^T`` as two bf16 GEMMs with interpolation matrices
               split into a bf16 high and low part (so the weights are exact to ~2^-17)
and the largest deviation of each from fp32 ``F.interpolate``.

    python experiments/exp_upsample.py --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

SHAPES = {  # (N, C, h, w) -> (H, W): refinenet1's x2 upsampling, and the output_conv1 map to the image size
    "refinenet1": ((8, 256, 108, 144), (216, 288)),
    "to_image": ((8, 128, 216, 288), (378, 504)),
}


def _ms(fn, iters: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def interp_matrix(n_in: int, n_out: int, device) -> torch.Tensor:
    """(n_out, n_in) bilinear weights of ``align_corners=True`` resampling, fp64."""
    pos = torch.arange(n_out, dtype=torch.float64, device=device) * ((n_in - 1) / max(n_out - 1, 1))
    lo = pos.floor().clamp(max=n_in - 1).long()
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = pos - lo
    a = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    a[torch.arange(n_out), lo] += 1 - frac
    a[torch.arange(n_out), hi] += frac
    return a


def split_bf16(a: torch.Tensor) -> torch.Tensor:
    """``[hi; lo]`` stacked along dim 0 with ``hi + lo == a`` to ~2^-17: one GEMM does both parts."""
    hi = a.to(torch.bfloat16)
    lo = (a - hi.double()).to(torch.bfloat16)
    return torch.cat([hi, lo], 0)


def gemm_upsample(x: torch.Tensor, ah2: torch.Tensor, aw2: torch.Tensor) -> torch.Tensor:
    """Separable bilinear upsampling as two GEMMs (x: (N, C, h, w) bf16) -> (N, C, H, W) bf16."""
    N, C, h, w = x.shape
    W2 = aw2.shape[0] // 2
    H2 = ah2.shape[0] // 2
    t = x.reshape(N * C * h, w) @ aw2.t()  # (NCh, 2W): hi and lo parts side by side
    t = (t[:, :W2].float() + t[:, W2:].float()).to(torch.bfloat16).view(N * C, h, W2)
    u = torch.matmul(ah2, t)  # (NC, 2H, W)
    return (u[:, :H2].float() + u[:, H2:].float()).to(torch.bfloat16).view(N, C, H2, W2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    res: dict = {}
    for name, ((N, C, h, w), (H, W)) in SHAPES.items():
        x = torch.randn(N, C, h, w, device=dev, dtype=torch.bfloat16)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(C, 32 if name == "to_image" else 128, 3, padding=1).to(dev, torch.bfloat16)
        ref = F.interpolate(x.float(), (H, W), mode="bilinear", align_corners=True)
        ah2, aw2 = split_bf16(interp_matrix(h, H, dev)), split_bf16(interp_matrix(w, W, dev))

        def up(t):
            return F.interpolate(t, (H, W), mode="bilinear", align_corners=True)

        def up_conv(t):
            return conv(F.interpolate(t, (H, W), mode="bilinear", align_corners=True))

        def gemm_conv(t):
            return conv(gemm_upsample(t, ah2, aw2).contiguous(memory_format=torch.channels_last))

        c_up = torch.compile(up, dynamic=False)
        c_up_conv = torch.compile(up_conv, dynamic=False)
        variants = {
            "eager_nchw": (up, x), "eager_cl": (up, x_cl), "compiled_nchw": (c_up, x), "compiled_cl": (c_up, x_cl),
            "gemm": (lambda t: gemm_upsample(t, ah2, aw2), x),
            "conv_alone_cl": (conv, up(x_cl).contiguous(memory_format=torch.channels_last)),
            "eager_up+conv_cl": (up_conv, x_cl), "compiled_up+conv_nchw": (c_up_conv, x),
            "compiled_up+conv_cl": (c_up_conv, x_cl), "gemm_up+conv": (gemm_conv, x),
        }
        row = {"bytes_out_gb": N * C * H * W * 2 / 1e9}
        for vname, (fn, inp) in variants.items():
            try:
                row[vname + "_ms"] = _ms(lambda: fn(inp))
                if "conv" not in vname:
                    row[vname + "_max_abs"] = float((fn(inp).float() - ref).abs().max())
            except Exception as e:  # noqa: BLE001
                row[vname + "_ms"] = repr(e)[:200]
        res[name] = row
        print(name, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
