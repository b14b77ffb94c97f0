"""DA3's DualDPT head, depth branch only: a transcription of ``DualDPT.forward`` / ``_forward_impl`` (v0.1.1).

DA3 computes DualDPT's ray branch and then discards it when a camera decoder exists; this transcription
skips it and leaves depth and confidence bit-identical. It is cut into the pieces the fast path reuses
(``model/fastpath/dpt_head.py`` changes only how the refinement blocks read their input and where the
full-resolution embedding is added), so the two share every other op.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from addict import Dict as ADict
from depth_anything_3.model.dualdpt import DualDPT
from depth_anything_3.model.utils.head_utils import create_uv_grid, custom_interpolate, position_grid_to_embed

from fast3dis_ros.model.da3 import internals

#: ``f(head, feats, H, W, pos_embeds) -> {depth, depth_conf}`` on one chunk of views (``dualdpt_main`` or
#: a runner's faster equivalent).
DptChunk = Callable[..., dict]


def uv_pos_embed(channels: int, h: int, w: int, H: int, W: int, dtype: torch.dtype, device: torch.device,
                 ratio: float = 0.1) -> torch.Tensor:
    """The ``(1, channels, h, w)`` UV embedding ``DualDPT._add_pos_embed`` adds to an ``h x w`` map of an
    ``H x W`` image (``dtype``: the map's; the embedding itself comes out fp32, as in DA3). Same ops."""
    pe = create_uv_grid(w, h, aspect_ratio=W / H, dtype=dtype, device=device)
    pe = position_grid_to_embed(pe, channels) * ratio
    return pe.permute(2, 0, 1)[None]


def dpt_output_hw(head: DualDPT, H: int, W: int) -> tuple[int, int]:
    """The size of the DPT head's output map (and of its full-resolution UV embedding) for ``H x W``."""
    ph, pw = H // head.patch_size, W // head.patch_size
    return int(ph * head.patch_size / head.down_ratio), int(pw * head.patch_size / head.down_ratio)


def dpt_stage_maps(head: DualDPT, feats: list[torch.Tensor], H: int, W: int,
                   pos_embeds: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The 4 tapped token maps normed, projected, embedded and resized (the loop of ``_forward_impl``).

    ``pos_embeds``: the 4 stage maps' and the full-resolution map's UV embeddings (``uv_pos_embed``),
    computed once per shape instead of on every forward; None: DA3's ``_add_pos_embed``. Same sums."""
    B, _, C = feats[0].shape
    ph, pw = H // head.patch_size, W // head.patch_size
    resized = []
    for stage_idx, take_idx in enumerate(head.intermediate_layer_idx):
        x = feats[take_idx][:, 0:]
        x = head.norm(x)
        x = x.permute(0, 2, 1).reshape(B, C, ph, pw)
        x = head.projects[stage_idx](x)
        if head.pos_embed:
            x = internals.dpt_add_pos_embed(head, x, W, H) if pos_embeds is None else x + pos_embeds[stage_idx]
        x = head.resize_layers[stage_idx](x)
        resized.append(x)
    return resized


def run_fusion_block(block: nn.Module, *xs: torch.Tensor, size=None) -> torch.Tensor:
    """DA3's ``FeatureFusionBlock`` as DA3 calls it."""
    return block(*xs, size=size)


def dpt_refine(scratch: nn.Module, resized: list[torch.Tensor], fuse=run_fusion_block) -> torch.Tensor:
    """The refinement pyramid (``layerN_rn`` + ``refinenet4..1``); ``fuse`` runs one fusion block."""
    sc = scratch
    l1_rn, l2_rn, l3_rn, l4_rn = (sc.layer1_rn(resized[0]), sc.layer2_rn(resized[1]), sc.layer3_rn(resized[2]),
                                  sc.layer4_rn(resized[3]))
    out = fuse(sc.refinenet4, l4_rn, size=l3_rn.shape[2:])
    out = fuse(sc.refinenet3, out, l3_rn, size=l2_rn.shape[2:])
    out = fuse(sc.refinenet2, out, l2_rn, size=l1_rn.shape[2:])
    return fuse(sc.refinenet1, out, l1_rn)


def dpt_output_map(head: DualDPT, fused: torch.Tensor, H: int, W: int,
                   pos_embeds: list[torch.Tensor] | None) -> torch.Tensor:
    """The full-resolution map plus its UV embedding through ``output_conv2``, channels last (DA3's order)."""
    if head.pos_embed:
        fused = internals.dpt_add_pos_embed(head, fused, W, H) if pos_embeds is None else fused + pos_embeds[-1]
    return head.scratch.output_conv2(fused).permute(0, 2, 3, 1)


def dpt_activations(head: DualDPT, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
    """Depth and confidence from the output map (DA3's activations)."""
    pred = internals.dpt_activation(head, fmap[..., :-1], head.activation)
    conf = internals.dpt_activation(head, fmap[..., -1], head.conf_activation)
    return {head.head_main: pred.squeeze(-1), f"{head.head_main}_conf": conf}


def dualdpt_main(head: DualDPT, feats: list[torch.Tensor], H: int, W: int,
                 pos_embeds: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``DualDPT._forward_impl`` without the auxiliary (ray) branch on one chunk; same ops, same order."""
    out = head.scratch.output_conv1(dpt_refine(head.scratch, dpt_stage_maps(head, feats, H, W, pos_embeds)))
    fused = custom_interpolate(out, dpt_output_hw(head, H, W), mode="bilinear", align_corners=True)
    return dpt_activations(head, dpt_output_map(head, fused, H, W, pos_embeds))


def dualdpt_depth_only(head: DualDPT, feats, H: int, W: int, chunk_size: int = 8, impl: DptChunk | None = None,
                       pos_embeds: list[torch.Tensor] | None = None) -> ADict:
    """``DualDPT.forward`` (same chunking, so cuDNN sees the same shapes) returning depth + conf only.

    ``impl``: the per-chunk function (default ``dualdpt_main``; the backbone passes its runner's)."""
    impl = impl or dualdpt_main
    B, S, N, C = feats[0][0].shape
    flat = [f[0].reshape(B * S, N, C) for f in feats]
    if chunk_size is None or chunk_size >= S:
        out = impl(head, flat, H, W, pos_embeds)
        return ADict({k: v.reshape(B, S, *v.shape[1:]) for k, v in out.items()})
    parts = [impl(head, [f[s0 : min(s0 + chunk_size, B * S)] for f in flat], H, W, pos_embeds)
             for s0 in range(0, B * S, chunk_size)]
    out = {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
    return ADict({k: v.view(B, S, *v.shape[1:]) for k, v in out.items()})
