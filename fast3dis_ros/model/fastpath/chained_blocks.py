"""ViT blocks that hand their last residual add to the next block (the fast path only, opt-in).

Why: each DA3 block ends with ``x = x + ls2(mlp(norm2(x)))`` and the next one starts with
``norm1(x)``. Compiled block by block, those are two kernels: the add writes the fp32 token stream and
the LayerNorm reads it straight back (about 1.6 ms of an 8-view DA3-Large forward, ``docs/BENCHMARKS.md``
16b). A block that returns ``(x_mid, delta)`` with ``x_out = x_mid + ls2(delta)`` lets the next block
do the add inside its own compiled graph, where it fuses with ``norm1``: one read of each input, and
the stream is written once.

Eager arithmetic is DA3's, op for op (the same add and multiply, in the same order), so outputs are
bit-identical. A block whose output DA3's trunk looks at (a tap, the reference-view reorder, the camera
token, the end of a pass) is run *closing* (``close=True``): it does its own last add inside its compiled
graph and returns plain tokens. Adding a pending pair up outside the graphs instead (``tokens_of``, kept
as the safety net) costs two eager kernels each time: measured on the H100, that ate more than the
fusion saved (``docs/BENCHMARKS.md`` 17).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class PendingTokens:
    """Block output not yet added up: ``tokens() == x_mid + delta * gamma`` (``gamma`` None: no layer scale)."""

    x_mid: torch.Tensor
    delta: torch.Tensor
    gamma: torch.Tensor | None

    def tokens(self) -> torch.Tensor:
        return self.x_mid + (self.delta if self.gamma is None else self.delta * self.gamma)


def tokens_of(x: "torch.Tensor | PendingTokens | None") -> "torch.Tensor | None":
    """The tokens themselves, adding a pending residual up if there is one."""
    return x.tokens() if isinstance(x, PendingTokens) else x


def layer_scale_gamma(ls: nn.Module) -> torch.Tensor | None:
    """DA3's ``LayerScale`` factor, None for ``Identity`` (DA3 built without layer scale)."""
    if isinstance(ls, nn.Identity):
        return None
    gamma = getattr(ls, "gamma", None)
    if gamma is None or getattr(ls, "inplace", False):
        raise TypeError(f"unsupported layer scale {ls!r}")
    return gamma


class ChainedBlock(nn.Module):
    """A DA3 ``Block`` (inference) that starts with the previous block's pending add and ends with its own.

    ``forward(x_mid, delta, gamma, pos) -> (x_mid', delta')``: the input tokens are ``x_mid + delta * gamma``
    (or ``x_mid`` alone when ``delta`` is None); the block's output is ``x_mid' + delta' * ls2.gamma``.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        for ls in (block.ls1, block.ls2):
            layer_scale_gamma(ls)  # fail early on an unsupported layer scale

    def forward(self, x_mid: torch.Tensor, delta: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
                pos: torch.Tensor | None = None, close: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``close``: return ``(tokens, None)``, the block's last add done here as DA3 does it (compiled,
        one more graph per block structure: Dynamo specialises on the flag)."""
        b = self.block
        x = x_mid if delta is None else x_mid + (delta if gamma is None else delta * gamma)
        x = x + b.ls1(b.attn(b.norm1(x), pos=pos, attn_mask=None))
        if close:
            return x + b.ls2(b.mlp(b.norm2(x))), None
        return x, b.mlp(b.norm2(x))

    def out_gamma(self) -> torch.Tensor | None:
        return layer_scale_gamma(self.block.ls2)


def run_chained(chained: ChainedBlock, x: "torch.Tensor | PendingTokens", kind: str,
                pos: torch.Tensor | None, close: bool = False) -> "PendingTokens | torch.Tensor":
    """DA3's ``process_attention`` for a chained block: the same (B, S, N, C) <-> per-view / all-views
    reshapes (views, no copies), applied to the pending pair. ``close``: plain tokens out."""
    if isinstance(x, PendingTokens):
        B, S, N, C = x.x_mid.shape
        x_mid, delta, gamma = x.x_mid, x.delta, x.gamma
    else:
        B, S, N, C = x.shape
        x_mid, delta, gamma = x, None, None
    shape = (B * S, N, C) if kind == "local" else (B, S * N, C)
    if pos is not None:
        pos = pos.reshape(B * S, N, pos.shape[-1]) if kind == "local" else pos.reshape(B, S * N, pos.shape[-1])
    out_mid, out_delta = chained(x_mid.reshape(shape), None if delta is None else delta.reshape(shape), gamma, pos,
                                 close)
    if close:
        return out_mid.view(B, S, N, C)
    return PendingTokens(out_mid.view(B, S, N, C), out_delta.view(B, S, N, C), chained.out_gamma())
