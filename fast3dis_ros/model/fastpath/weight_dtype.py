"""Store a module's GEMM/conv weights in the autocast dtype ahead of time (the fast path only).

Why: under ``torch.autocast(dtype=bf16)`` every fp32 weight of a linear or convolution is cast to
bf16 on every forward, one small kernel per weight and a full read + write of it. For DA3-Large's
ViT blocks that is 300 M parameters per pass (0.9 ms of GPU time at 8 views on an H100), and the DPT
and instance heads add about 190 tiny cast kernels (0.3 ms; ``docs/BENCHMARKS.md`` 16b). Casting once gives the same
GEMM inputs (autocast would have produced exactly these bf16 weights), so outputs are unchanged up to
which kernels Inductor picks. Norms, embeddings and free parameters keep fp32, as autocast keeps them.

Only for modules that always run under autocast in that dtype: a bf16 weight met by an fp32 input
outside autocast is a dtype error, not a silent slowdown.
"""

from __future__ import annotations

import torch
import torch.nn as nn

#: Module types whose ``weight``/``bias`` (and any ``merged_weight`` buffer) autocast casts per forward.
CAST_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def store_weights_in(module: nn.Module, dtype: torch.dtype, extra_types: tuple[type[nn.Module], ...] = ()) -> int:
    """Cast every ``CAST_TYPES`` (+ ``extra_types``) submodule of ``module`` to ``dtype``; returns how many."""
    kinds = CAST_TYPES + tuple(extra_types)
    n = 0
    for mod in module.modules():
        if isinstance(mod, kinds):
            mod.to(dtype)
            n += 1
    return n
