"""The backbone's one injection point: the object that runs a ViT block, finishes a tap and runs a DPT chunk.

``DA3Backbone`` owns DA3's control flow (stem, view reordering, camera token, taps, heads) and hands the
heavy steps to ``backbone.runner``. ``ExactRunner`` (the default) does each step as DA3 does, so the
backbone is DA3 to the bit. The fast path (``model/fastpath/accelerate.py``) installs a runner that does
the same steps compiled, fused, chained or in bf16; nothing in the backbone knows about those options.

Why an object and not flags: every speed option used to be a branch inside the forward; a runner keeps
the transcription readable and makes "exact vs fast" one swap (``backbone.runner = ExactRunner()``).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Protocol

import torch
import torch.nn as nn
from depth_anything_3.model.reference_view_selector import restore_original_order

from fast3dis_ros.model.da3.dpt_head import dualdpt_main


def autocast_off(device_type: str) -> ContextManager:
    """DA3 runs its camera encoder and heads in fp32; ``meta`` (shape-only runs) has no autocast."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def finish_tap(norm: nn.Module, tap_local: torch.Tensor | None, tap_x: torch.Tensor, ref_idx: torch.Tensor | None,
               skip_tokens: int, hw: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``DinoVisionTransformer.get_intermediate_layers`` post-processing of one tap -> ``(tok, cam)``.

    DA3: ``out = cat([local_x, x])``, restored to the original view order; ``cam = out[:, :, 0]``;
    ``tok = cat([out[..., :D], norm(out[..., D:])])`` without the first ``skip_tokens`` tokens (camera
    + register tokens). The same values, computed on the slices that are kept (the norm and the
    restore act per token and per view, so slicing first changes nothing). ``hw``: also reshape
    ``tok`` to channels-first ``(B, S, C, h, w)`` maps.
    """
    if ref_idx is not None:  # gather first: compiled, the gather becomes indexed loads of the next kernels
        tap_x = restore_original_order(tap_x, ref_idx)
        tap_local = None if tap_local is None else restore_original_order(tap_local, ref_idx)
    raw_cam = tap_x[:, :, 0] if tap_local is None else torch.cat([tap_local[:, :, 0], tap_x[:, :, 0]], dim=-1)
    body = tap_x[:, :, skip_tokens:]
    tok = norm(body) if tap_local is None else torch.cat([tap_local[:, :, skip_tokens:], norm(body)], dim=-1)
    if hw is not None:
        B, S, _N, C = tok.shape
        tok = tok.transpose(-1, -2).reshape(B, S, C, *hw)
    return tok, raw_cam


class TrunkRunner(Protocol):
    """What ``DA3Backbone`` delegates. A runner may return a stand-in for the tokens from ``run_block``
    (the chained fast path returns a pending residual); the backbone asks ``tokens`` for the tokens
    themselves wherever it reads them."""

    #: DA3's DPT head and camera decoder run under the caller's autocast (True) or in fp32 as DA3 does.
    head_autocast: bool

    def scope(self) -> ContextManager:
        """The context every backbone forward (and the instance head) runs in."""

    def head_context(self, device_type: str) -> ContextManager:
        """The autocast state DA3's DPT head and camera decoder run in."""

    def run_block(self, vit: nn.Module, i: int, x: Any, kind: str, pos: torch.Tensor | None, observed: bool) -> Any:
        """ViT block ``i`` as DA3's ``process_attention(x, blk, kind, pos)``. ``observed``: the trunk reads
        this block's output other than as the next block's input (``backbone.output_observed``)."""

    def tokens(self, x: Any) -> torch.Tensor:
        """The ``(B, S, N, D)`` tokens of what ``run_block`` returned."""

    def finish_tap(self, norm: nn.Module, tap_local: torch.Tensor | None, tap_x: torch.Tensor,
                   ref_idx: torch.Tensor | None, skip_tokens: int,
                   hw: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``finish_tap``'s values."""

    def dpt_chunk(self, head: nn.Module, feats: list[torch.Tensor], H: int, W: int,
                  pos_embeds: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``dualdpt_main``'s values on one chunk of views."""


class ExactRunner:
    """DA3's semantics, op for op: the default runner (outputs bit-identical to ``DepthAnything3Net``)."""

    head_autocast = False

    def scope(self) -> ContextManager:
        return contextlib.nullcontext()

    def head_context(self, device_type: str) -> ContextManager:
        return contextlib.nullcontext() if self.head_autocast else autocast_off(device_type)

    def run_block(self, vit: nn.Module, i: int, x: torch.Tensor, kind: str, pos: torch.Tensor | None,
                  observed: bool) -> torch.Tensor:
        return vit.process_attention(x, vit.blocks[i], kind, pos=pos, attn_mask=None)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def finish_tap(self, norm, tap_local, tap_x, ref_idx, skip_tokens, hw):
        return finish_tap(norm, tap_local, tap_x, ref_idx, skip_tokens, hw)

    def dpt_chunk(self, head, feats, H, W, pos_embeds):
        return dualdpt_main(head, feats, H, W, pos_embeds)
