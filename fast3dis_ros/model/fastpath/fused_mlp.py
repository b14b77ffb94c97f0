"""The ViT MLP's first linear and its GELU as one GEMM (the fast path's epilogue fusion).

Why: in an 8-view DA3-Large forward, the GELU after ``fc1`` is a separate pass over a
(7,784 x 4,096) activation in every one of the 36 block runs: 2.4 ms of a 43.5 ms compiled forward
(``docs/BENCHMARKS.md`` 15b), pure memory traffic. cuBLASLt can apply bias + GELU in the GEMM's
epilogue while the tile is still in registers, so the activation is written once and never re-read.
PyTorch reaches that epilogue through ``torch._addmm_activation(..., use_gelu=True)``, which uses the
tanh approximation of GELU (DA3 uses the exact erf form: the two differ by less than 5e-4 absolute,
below bf16's rounding step at the activations' scale). The call is wrapped in a custom op so that
``torch.compile`` keeps it as one opaque kernel instead of decomposing it back into GEMM + GELU.

Used only by ``accelerate.py`` (``FastPathOptions.fuse``); the exact (DA3-identical) path keeps
DA3's own ``Mlp``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fast3dis_ros.model.fastpath.merged_lora import MergedLoraLinear
from fast3dis_ros.model.fastpath.block_patch import replace_in_blocks


@torch.library.custom_op("fast3dis::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x @ weight.T + bias, approximate="tanh")`` over the last dim of ``x``; one GEMM on CUDA."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        y = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)
    else:  # CPU has no fused epilogue: the same function in two steps
        y = F.gelu(torch.addmm(bias, x2, weight.t()), approximate="tanh")
    return y.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _linear_gelu_tanh_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def active_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a plain or merged-LoRA linear layer multiplies by now (``MergedLoraLinear`` picks its
    frozen or merged copy by its adapter flag, as its own ``forward`` does)."""
    return linear.active_weight() if isinstance(linear, MergedLoraLinear) else linear.weight


class FusedGeluMlp(nn.Module):
    """Drop-in for DA3's ``Mlp`` (fc1 -> GELU -> fc2, no dropout at inference) with fc1 + GELU fused.

    Computes in the dtype of ``fc1``'s weight (the fast path casts the block weights to the autocast
    dtype first), so the custom op never depends on the ambient autocast state.
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        if not is_fusable_mlp(mlp):
            raise ValueError(f"not a GELU Mlp with a plain or merged-LoRA fc1 and biases: {mlp!r}")
        self.fc1 = mlp.fc1
        self.fc2 = mlp.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1 = active_weight(self.fc1)
        h = linear_gelu_tanh(x.to(w1.dtype), w1, self.fc1.bias.to(w1.dtype))
        return self.fc2(h)


def is_fusable_mlp(mlp: nn.Module) -> bool:
    """DA3's ``Mlp`` with an erf/tanh GELU, biases on fc1 and inactive dropout (what the fusion replaces).

    ``fc1`` must be a plain ``nn.Linear`` or a ``MergedLoraLinear``: an unmerged peft LoRA layer would be
    multiplied by its base weight alone, silently dropping the adapter, so such blocks are not fused.
    """
    act = getattr(mlp, "act", None)
    fc1 = getattr(mlp, "fc1", None)
    drop = getattr(mlp, "drop", None)
    return (
        isinstance(act, nn.GELU)
        and (type(fc1) is nn.Linear or isinstance(fc1, MergedLoraLinear))
        and getattr(fc1, "bias", None) is not None
        and hasattr(mlp, "fc2")
        and (drop is None or not isinstance(drop, nn.Dropout) or drop.p == 0.0 or not mlp.training)
    )


def fuse_block_mlps(blocks: nn.ModuleList) -> int:
    """Replace every fusable ``blk.mlp`` in ``blocks`` by a ``FusedGeluMlp``; returns how many."""
    return replace_in_blocks(blocks, "mlp", FusedGeluMlp, is_fusable_mlp)
