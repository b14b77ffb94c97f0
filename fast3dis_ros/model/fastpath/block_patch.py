"""Swap one child module of every ViT block for a faster drop-in (the fast path's fusions use it)."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn


def replace_in_blocks(blocks: nn.ModuleList, child: str, replacement: type[nn.Module],
                      accepts: Callable[[nn.Module], bool]) -> int:
    """Set ``blk.<child> = replacement(blk.<child>)`` in every block whose child ``accepts`` says it can
    take and that is not already a ``replacement``; returns how many were replaced (0 on a second call)."""
    n = 0
    for blk in blocks:
        mod = getattr(blk, child, None)
        if mod is not None and not isinstance(mod, replacement) and accepts(mod):
            setattr(blk, child, replacement(mod))
            n += 1
    return n
