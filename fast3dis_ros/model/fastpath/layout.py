"""A channels-last copy that ``torch.compile`` cannot fuse away (fast path only).

Why: in DA3's DPT head, Inductor inlines the producer of each bilinear upsampling (the residual
conv unit's add, the conv bias) into the upsampling kernel, which then recomputes it for each of the
four taps it gathers and writes the 128-256-channel result at 3-6x its bandwidth time (0.75 ms and
0.42 ms at 8 views, docs/BENCHMARKS.md 17). A plain ``.contiguous(memory_format=channels_last)`` does
not stop that (measured: same kernels). An opaque custom op does: the producer is written once, copied
channels-last, and the upsampling reads a realised channels-last map, the case ``experiments/exp_upsample.py``
times at 2-2.5x faster.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("fast3dis::channels_last_copy", mutates_args=())
def channels_last_copy(x: torch.Tensor) -> torch.Tensor:
    """A new channels-last tensor with ``x``'s values (a 4-D map)."""
    return x.clone(memory_format=torch.channels_last)


@channels_last_copy.register_fake
def _channels_last_copy_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)
