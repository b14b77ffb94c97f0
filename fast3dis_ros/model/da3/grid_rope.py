"""DA3's 2D RoPE without its per-block host synchronisation.

``RotaryPositionEmbedding2D.forward`` (DA3 v0.1.1, ``dinov2/layers/rope.py``) sizes its cos/sin table
with ``int(positions.max()) + 1``: a device-to-host copy in every attention block (24-36 per FAST3DIS
forward). Each one drains the GPU queue, so the CPU's kernel launches for the next block are exposed,
and it makes the forward impossible to capture in a CUDA graph or to trace with ``torch.compile``.

The positions are always a patch grid (+1 when DA3 prepends special tokens), so the table size is
known on the host from the image size. ``GridRope`` takes it from ``table_len`` when set and falls
back to DA3's data-dependent size otherwise. The table values are computed elementwise from
``arange``, so a table of the same length (what :func:`rope_table_len` gives) is bit-identical to
DA3's and the outputs do not change at all.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from depth_anything_3.model.dinov2.layers.rope import RotaryPositionEmbedding2D


class GridRope(RotaryPositionEmbedding2D):
    """``RotaryPositionEmbedding2D`` whose table length comes from the host (``table_len``)."""

    table_len: int | None = None

    def frequency_tables(self, dim: int, length: int, device: torch.device, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(cos, sin)`` tables of ``length`` rows for a ``dim``-wide half (DA3's computation)."""
        return self._compute_frequency_components(dim, length, device, dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.table_len is None:  # unknown grid: DA3's own (synchronising) path
            return super().forward(tokens, positions)
        feature_dim = tokens.size(-1) // 2
        cos_comp, sin_comp = self.frequency_tables(feature_dim, self.table_len, tokens.device, tokens.dtype)
        vertical, horizontal = tokens.chunk(2, dim=-1)
        vertical = self._apply_1d_rope(vertical, positions[..., 0], cos_comp, sin_comp)
        horizontal = self._apply_1d_rope(horizontal, positions[..., 1], cos_comp, sin_comp)
        return torch.cat((vertical, horizontal), dim=-1)


def rope_table_len(grid_h: int, grid_w: int, patch_start_idx: int) -> int:
    """Length of a cos/sin table that covers every position DA3 uses for a ``grid_h x grid_w`` grid.

    Local blocks see grid positions (``+1`` when special tokens come first), global blocks DA3's
    ``pos_nodiff`` (0 or 1), so DA3 itself builds tables of ``max(grid_h, grid_w) + shift`` and
    ``1 + shift`` rows; row ``i`` does not depend on the length, so one table of the larger length
    serves both with identical values.
    """
    shift = 1 if patch_start_idx > 0 else 0
    return max(grid_h, grid_w) + shift


def install_grid_rope(vit: nn.Module) -> GridRope | None:
    """Replace the ViT's shared RoPE module with a :class:`GridRope` of the same frequency and scaling,
    everywhere it is referenced (the ViT and each attention that uses it). RoPE has no parameters or
    buffers, so the state dict does not change; returns the module in use."""
    rope = getattr(vit, "rope", None)
    if rope is None or isinstance(rope, GridRope):
        return rope
    grid = GridRope(frequency=rope.base_frequency, scaling_factor=rope.scaling_factor)
    holders = [m for m in vit.modules() if getattr(m, "rope", None) is rope]
    for m in holders:
        setattr(m, "rope", grid)
    return grid
