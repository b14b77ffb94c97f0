"""Every use of a private DA3 or peft member, in one place (each has no public equivalent in the pinned
versions: depth-anything-3 0.1.1, peft; see ``version.py``).

Why it exists: the backbone runs DA3's network in pieces (stem, blocks up to a split, the rest twice,
then the heads), which DA3's public ``forward`` cannot do. Keeping the private calls here means a DA3 or
peft upgrade has one small file to re-check, not the whole backbone.
"""

from __future__ import annotations

import torch
import torch.nn as nn


# ---------------------------------------------------------------------------------------------- DA3 net
def process_depth_head(net: nn.Module, feats, H: int, W: int):
    """``DepthAnything3Net._process_depth_head``: DualDPT with its ray branch (the generic path)."""
    return net._process_depth_head(feats, H, W)


def process_camera_estimation(net: nn.Module, feats, H: int, W: int, output):
    """``DepthAnything3Net._process_camera_estimation``: the camera decoder on the last tap's camera token."""
    return net._process_camera_estimation(feats, H, W, output)


def process_mono_sky_estimation(net: nn.Module, output):
    """``DepthAnything3Net._process_mono_sky_estimation`` (a no-op for the any-view models)."""
    return net._process_mono_sky_estimation(output)


# ---------------------------------------------------------------------------------------------- DualDPT
def dpt_add_pos_embed(head: nn.Module, x: torch.Tensor, W: int, H: int) -> torch.Tensor:
    """``DualDPT._add_pos_embed``: adds the UV position embedding of an ``H x W`` image to map ``x``."""
    return head._add_pos_embed(x, W, H)


def dpt_activation(head: nn.Module, x: torch.Tensor, activation: str) -> torch.Tensor:
    """``DualDPT._apply_activation_single`` (exp for depth, expp1 for confidence)."""
    return head._apply_activation_single(x, activation)


# ---------------------------------------------------------------------------------------------- peft
def set_adapter_disabled(layer: nn.Module, disabled: bool) -> None:
    """Switch one LoRA layer's adapter off/on. peft's public ``enable_adapters`` also flips
    ``requires_grad`` of the adapter weights, which training must keep; so the flag itself is set."""
    layer._disable_adapters = bool(disabled)


def adapter_disabled(layer: nn.Module) -> bool:
    """peft's public read-only view of the same flag (``BaseTunerLayer.disable_adapters``)."""
    return bool(layer.disable_adapters)
