"""Learnable 3D anchors + content queries, conditioned on global scene context.

Normalised scene frame: every scene is expressed as ``p_norm = (p_world - center) / scale`` with
``center`` the coordinate-wise median of the point map and ``scale`` the median distance of the
points to it (`pixel_decoder.scene_normalization`). Anchors are learned and refined in this frame,
so one set of anchors transfers across scenes of any size/units/placement (a DA3 "up to scale"
reconstruction and a metric one look the same); ``anchor_world = center + scale * anchor_norm``.
The frame is a function of the *set* of points, hence invariant to the order of the views.

Global context: mean- and max-pooled deepest pixel-decoder features (over views and pixels) plus
point statistics of the normalised point map (per-axis 5/50/95 % quantiles and std, mean centred
log-confidence is 0 by construction so it is not used) -> MLP -> context vector ``g``. Per query,
``anchor = anchor_param + MLP_a([query_feat, g])`` (last layer zero-initialised) and
``content = query_feat + MLP_c([query_feat, g])``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from fast3dis_ros.model.head.config import InstanceHeadConfig
from fast3dis_ros.model.head.pixel_decoder import fourier_features
from fast3dis_ros.model.median import order_statistics


class MLP(nn.Module):
    """Plain MLP (ReLU between layers), detectron2/Mask2Former style."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class FourierPositionEncoding3D(nn.Module):
    """3D position (normalised units) -> ``dim``: MLP on ``[x, sin(f_k x), cos(f_k x)]``,
    ``f_k = pi/2 * 2^k`` (k < bands; lowest period 4 units)."""

    def __init__(self, bands: int, dim: int) -> None:
        super().__init__()
        self.bands = bands
        self.mlp = MLP(3 * (1 + 2 * bands), dim, dim, 2)

    def forward(self, xyz: Tensor) -> Tensor:
        return self.mlp(fourier_features(xyz, self.bands, dim=-1))


NUM_POINT_STATS = 12


def sorted_quantiles(x: Tensor, qs: tuple[float, ...]) -> Tensor:
    """``torch.quantile(x, qs, dim=-1)`` ('linear'), bit for bit, for a float32 ``x`` without NaN.

    ``torch.quantile`` with a tensor of levels checks their range on the device and copies them
    from the host: two synchronisations, and no CUDA-graph capture. The ranks are computed on the
    host in float32, as ``torch.quantile`` computes them on the device. The order statistics come
    from ``model/median.order_statistics`` (a sort; no ``TopK`` in an exported graph, see there).
    """
    n = x.shape[-1]
    ranks = [np.float32(q) * np.float32(n - 1) for q in qs]
    bounds = [(int(np.floor(r)), int(np.ceil(r))) for r in ranks]
    needed = sorted({i for b in bounds for i in b})
    stat = dict(zip(needed, order_statistics(x, needed, dim=-1)))
    out = [torch.lerp(stat[lo], stat[hi], float(r - np.float32(lo))) for r, (lo, hi) in zip(ranks, bounds)]
    return torch.stack(out)


def point_statistics(points_norm: Tensor) -> Tensor:
    """``points_norm (B, V, 3, h, w)`` -> ``(B, 12)``: per-axis 5/50/95 % quantiles and std."""
    B = points_norm.shape[0]
    p = points_norm.transpose(1, 2).reshape(B, 3, -1).float()
    p = torch.nan_to_num(p, nan=0.0, posinf=8.0, neginf=-8.0).clamp(-8, 8)
    q = sorted_quantiles(p, (0.05, 0.5, 0.95))  # (3q, B, 3axis)
    std = p.std(dim=-1, unbiased=False)  # (B, 3)
    return torch.cat([q.permute(1, 2, 0).reshape(B, 9), std], dim=-1).to(points_norm.dtype)


class AnchorQueryGenerator(nn.Module):
    """Initial anchors ``(B, Q, 3)`` (normalised frame) and content queries ``(B, Q, D)``."""

    def __init__(self, cfg: InstanceHeadConfig) -> None:
        super().__init__()
        Q, D = cfg.num_queries, cfg.hidden_dim
        r = cfg.anchor_init_range
        self.anchors = nn.Parameter(torch.empty(Q, 3).uniform_(-r, r))
        self.query_feat = nn.Parameter(torch.randn(Q, D) * 0.02)
        self.context = MLP(2 * D + NUM_POINT_STATS, D, D, 2)
        self.anchor_shift = MLP(2 * D, D, 3, 2)
        self.content_shift = MLP(2 * D, D, D, 2)
        nn.init.zeros_(self.anchor_shift.layers[-1].weight)
        nn.init.zeros_(self.anchor_shift.layers[-1].bias)

    def forward(self, deep_features: Tensor, points_norm_deep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """deep_features ``(B, V, D, h, w)``, points_norm_deep ``(B, V, 3, h', w')``.

        Returns anchors ``(B, Q, 3)``, content ``(B, Q, D)``, context ``(B, D)``.
        """
        B = deep_features.shape[0]
        f = deep_features.transpose(1, 2).flatten(2)  # (B, D, V*h*w)
        ctx_in = torch.cat([f.mean(-1), f.amax(-1), point_statistics(points_norm_deep).to(f.dtype)], dim=-1)
        g = self.context(ctx_in)  # (B, D)
        qf = self.query_feat[None].expand(B, -1, -1)
        h = torch.cat([qf, g[:, None].expand_as(qf)], dim=-1)
        anchors = self.anchors[None] + self.anchor_shift(h)
        content = qf + self.content_shift(h)
        return anchors, content, g
