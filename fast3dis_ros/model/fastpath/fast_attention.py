"""DA3's ViT attention with the q/k LayerNorm and the 2D RoPE in one pass (the fast path only).

Why: DA3 normalises q and k over the head dim (``qk_norm``) and then rotates them (2D RoPE). RoPE
reads each feature's partner ``d +- 16`` of the *normalised* row, which a compiler cannot take from
the registers of the norm's reduction, so Inductor writes the normalised q and k in fp32 and reads
them back in a second kernel: three kernels and ~190 MB of traffic per block at 8 views, 2.1 ms of an
8-view DA3-Large forward (``docs/BENCHMARKS.md`` 16b). But the norm is affine per row, so the
partner of a normalised feature is the normalised partner of the raw feature:

    rope(ln(t)) = ln(t) * cos + rot(ln(t)) * sin
    rot(ln(t))  = (perm(t) - mean) * rstd * rot(w) + rot(b)

with ``perm`` the partner permutation, ``rot`` the same with RoPE's signs, and ``mean``/``rstd`` the
row's statistics. Written that way, every term is a load of the raw qkv buffer or a per-row statistic,
and the norm, the rotation and the cast fuse into a single kernel that reads q (or k) once and writes
it once, already in the dtype and layout the attention kernel takes.

Same arithmetic as DA3 up to fp32 rounding order; used by ``accelerate.py`` (``FastPathOptions.fuse``)
only. The exact (DA3-identical) path keeps DA3's own ``Attention``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fast3dis_ros.model.fastpath.block_patch import replace_in_blocks
from fast3dis_ros.model.da3.grid_rope import GridRope


def partner_perm(t: torch.Tensor) -> torch.Tensor:
    """Each feature's RoPE partner: within each half of the head dim (vertical, horizontal), the two
    quarters swap (DA3's ``_rotate_features`` without its sign)."""
    q = t.shape[-1] // 4
    a, b, c, d = t.split(q, dim=-1)
    return torch.cat((b, a, d, c), dim=-1)


def rope_signs(head_dim: int, device: torch.device) -> torch.Tensor:
    """The sign ``rot`` puts on each partner: ``-`` on the first quarter of each half, ``+`` on the second."""
    q = head_dim // 4
    s = torch.ones(head_dim, device=device)
    s[:q] = -1.0
    s[2 * q: 3 * q] = -1.0
    return s


def rope_tables(rope: GridRope, positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(cos, sin)`` of shape ``(B, N, 1, head_dim)`` in fp32: DA3's vertical table for the
    first half of the head dim (position y), horizontal for the second (position x)."""
    cos_c, sin_c = rope.frequency_tables(head_dim // 2, rope.table_len, positions.device, torch.float32)
    y, x = positions[..., 0], positions[..., 1]
    cos = torch.cat((F.embedding(y, cos_c), F.embedding(x, cos_c)), dim=-1)
    sin = torch.cat((F.embedding(y, sin_c), F.embedding(x, sin_c)), dim=-1)
    return cos[:, :, None, :], sin[:, :, None, :]


def norm_rope(t: torch.Tensor, norm: nn.Module, cos: torch.Tensor, sin: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``rope(norm(t))`` in fp32 for ``t`` of shape ``(B, N, H, head_dim)``, written as loads of ``t``
    and per-row statistics only (see the module docstring). ``norm``: a ``LayerNorm`` over the head dim
    or ``Identity``."""
    t = t.float()
    tp = partner_perm(t)
    if isinstance(norm, nn.LayerNorm):
        var, mean = torch.var_mean(t, dim=-1, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + norm.eps)
        w = norm.weight.float() if norm.weight is not None else torch.ones_like(signs)
        b = norm.bias.float() if norm.bias is not None else torch.zeros_like(signs)
        normed = (t - mean) * rstd * w + b
        partner = (tp - mean) * rstd * (signs * partner_perm(w)) + signs * partner_perm(b)
    elif isinstance(norm, nn.Identity):
        normed, partner = t, signs * tp
    else:
        raise TypeError(f"fused q/k norm + RoPE supports LayerNorm or Identity, not {type(norm).__name__}")
    return normed * cos + partner * sin


class FusedNormRopeAttention(nn.Module):
    """Drop-in for DA3's ``Attention`` (same submodules, same outputs up to fp32 rounding order) with the
    q/k norm, RoPE and the cast to the attention dtype fused (``norm_rope``). Without positions (blocks
    before ``rope_start``) or with an attention mask, it runs DA3's own forward."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        if not is_fusable_attention(attn):
            raise ValueError(f"not a DA3 Attention with a GridRope and a LayerNorm/Identity q/k norm: {attn!r}")
        self.inner = attn
        self.register_buffer("signs", rope_signs(_head_dim(attn), attn.qkv.weight.device), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.inner
        if pos is None or attn_mask is not None or a.rope is None or a.rope.table_len is None:
            return a(x, pos=pos, attn_mask=attn_mask)
        B, N, C = x.shape
        H = a.num_heads
        Dh = C // H
        qkv = a.qkv(x).reshape(B, N, 3, H, Dh)
        q, k, v = qkv.unbind(2)  # (B, N, H, Dh) views of the qkv buffer
        cos, sin = rope_tables(a.rope, pos, Dh)
        dt = qkv.dtype  # the attention runs in the GEMM's dtype (bf16 under autocast), as in DA3
        q = norm_rope(q, a.q_norm, cos, sin, self.signs).to(dt)
        k = norm_rope(k, a.k_norm, cos, sin, self.signs).to(dt)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           dropout_p=a.attn_drop.p if self.training else 0.0)
        return a.proj_drop(a.proj(o.transpose(1, 2).reshape(B, N, C)))


def is_fusable_attention(attn: nn.Module) -> bool:
    """DA3's ``Attention`` (fused SDPA path) with a ``GridRope`` (blocks without RoPE have nothing to
    fuse) and q/k norms that are ``LayerNorm`` or ``Identity`` over the head dim."""
    needed = ("qkv", "q_norm", "k_norm", "proj", "num_heads", "rope", "fused_attn")
    if not all(hasattr(attn, n) for n in needed) or not attn.fused_attn:
        return False
    norms_ok = all(isinstance(n, (nn.LayerNorm, nn.Identity)) for n in (attn.q_norm, attn.k_norm))
    return norms_ok and isinstance(attn.rope, GridRope) and _head_dim(attn) % 4 == 0


def _head_dim(attn: nn.Module) -> int:
    """q/k/v width per head (``qkv`` may be a ``MergedLoraLinear``, which has no ``out_features``)."""
    return attn.qkv.weight.shape[0] // 3 // attn.num_heads


def fuse_block_attention(blocks: nn.ModuleList) -> int:
    """Replace every fusable ``blk.attn`` in ``blocks`` by a ``FusedNormRopeAttention``; returns how many."""
    return replace_in_blocks(blocks, "attn", FusedNormRopeAttention, is_fusable_attention)
