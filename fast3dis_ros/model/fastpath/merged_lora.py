"""A peft LoRA ``Linear`` with its adapter folded into one weight (inference: one GEMM per pass)."""

from __future__ import annotations

import torch
import torch.nn as nn


class MergedLoraLinear(nn.Module):
    """A peft LoRA ``Linear`` with its adapter folded in: ``W + scale * B @ A`` kept beside ``W``.

    ``_disable_adapters`` (peft's flag, flipped by ``DA3Backbone.set_adapters``) picks the frozen
    weight (pass 1, geometry) or the merged one (pass 2, features): one GEMM either way.
    """

    def __init__(self, lora_layer: nn.Module) -> None:
        super().__init__()
        base = lora_layer.get_base_layer()
        self.weight = base.weight
        self.bias = base.bias
        delta = lora_layer.get_delta_weight(lora_layer.active_adapters[0]).to(base.weight.dtype)
        self.register_buffer("merged_weight", (base.weight + delta).detach(), persistent=False)
        self._disable_adapters = bool(lora_layer.disable_adapters)  # peft's flag name: set_adapters flips both

    @property
    def disable_adapters(self) -> bool:
        """Read like peft's ``BaseTunerLayer.disable_adapters``."""
        return self._disable_adapters

    def active_weight(self) -> torch.Tensor:
        """The frozen weight in pass 1 (adapters off), the merged one in pass 2."""
        return self.weight if self._disable_adapters else self.merged_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.active_weight(), self.bias)
