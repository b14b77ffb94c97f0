"""DA3's DPT head (depth branch) with two fast-path layout options; otherwise ``model/da3/dpt_head.py``'s ops.

* ``pe_conv`` (fold the full-resolution UV embedding through the first output conv): the conv is linear
  and its zero padding pads the sum as it pads each term, so ``conv(up + pe) = conv(up) + conv_nobias(pe)``.
  The 128-channel full-resolution map is then never summed with an fp32 embedding (which made it fp32,
  twice the bytes, before the conv cast it back), and the per-forward work drops to a 32-channel add.
  Rounding-level change, so the exact path keeps DA3's order.
* ``nhwc``: every bilinear upsampling reads a realised channels-last map (``layout.channels_last_copy``,
  opaque to Inductor): Inductor's upsampling kernel is 2-2.5x faster on it at the DPT head's shapes than
  with its producer fused in (``experiments/exp_upsample.py``, docs/BENCHMARKS.md 17). Same values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from depth_anything_3.model.dualdpt import DualDPT
from depth_anything_3.model.utils.head_utils import custom_interpolate

from fast3dis_ros.model.da3.dpt_head import (
    dpt_activations,
    dpt_output_hw,
    dpt_output_map,
    dpt_refine,
    dpt_stage_maps,
    run_fusion_block,
)
from fast3dis_ros.model.fastpath.layout import channels_last_copy


def dpt_pe_conv(head: DualDPT, pe_full: torch.Tensor) -> torch.Tensor:
    """The full-resolution UV embedding through ``output_conv2``'s first conv, without its bias, in fp32:
    the term ``fast_dualdpt_main(pe_conv=...)`` adds after that conv instead of adding the embedding
    before it. ``(1, C_out, h, w)``; depends on the conv weight, so cache it by the weight's version."""
    first = head.scratch.output_conv2[0]
    with torch.autocast(pe_full.device.type, enabled=False):
        return nn.functional.conv2d(pe_full.float(), first.weight.float(), None, first.stride, first.padding,
                                    first.dilation, first.groups)


def fusion_block_nhwc(block: nn.Module, *xs: torch.Tensor, size=None) -> torch.Tensor:
    """DA3's ``FeatureFusionBlock.forward`` with its upsampling input realised channels-last. Same ops,
    same order, same values."""
    y = xs[0]
    if block.has_residual and len(xs) > 1 and block.resConfUnit1 is not None:
        y = block.skip_add.add(y, block.resConfUnit1(xs[1]))
    y = channels_last_copy(block.resConfUnit2(y))
    if size is None and block.size is None:
        up_kwargs = {"scale_factor": 2}
    else:
        up_kwargs = {"size": block.size if size is None else size}
    y = custom_interpolate(y, **up_kwargs, mode="bilinear", align_corners=block.align_corners)
    return block.out_conv(y)


def fast_dualdpt_main(head: DualDPT, feats: list[torch.Tensor], H: int, W: int,
                      pos_embeds: list[torch.Tensor] | None = None, pe_conv: torch.Tensor | None = None,
                      nhwc: bool = False) -> dict[str, torch.Tensor]:
    """``dualdpt_main`` on one chunk, with the full-resolution embedding folded in as ``pe_conv`` (when
    given) and channels-last upsampling inputs (``nhwc``); see the module docstring."""
    sc = head.scratch
    out = dpt_refine(sc, dpt_stage_maps(head, feats, H, W, pos_embeds), fusion_block_nhwc if nhwc else run_fusion_block)
    out = sc.output_conv1(out)
    if nhwc:
        out = channels_last_copy(out)
    fused = custom_interpolate(out, dpt_output_hw(head, H, W), mode="bilinear", align_corners=True)
    if head.pos_embed and pe_conv is not None:
        fmap = sc.output_conv2[1:](sc.output_conv2[0](fused) + pe_conv).permute(0, 2, 3, 1)
    else:
        fmap = dpt_output_map(head, fused, H, W, pos_embeds)
    return dpt_activations(head, fmap)
