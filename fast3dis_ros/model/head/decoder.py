"""Anchored query decoder with anchor-sampling cross-attention (Deformable-DETR style, in 3D).

Cross-attention of query q (anchor ``a_q``, normalised frame) per head h:

* sample points ``s_{q,h,p} = a_q + offset_{q,h,p}`` (p < num_sampling_points; offsets predicted
  from the query, in normalised units), lifted to world ``center + scale * s`` and projected into
  every view with the given cameras (`projection.project`);
* bilinear sampling (``grid_sample``, align_corners=False) of the value maps of every feature level
  at those pixels -> ``f_{q,h,v,p,l}``;
* weights: ``softmax`` over the *visible* (view, point, level) triples of
  ``A_h(query)[p, l] + w_h . f_{q,h,v,p,l}`` (query-driven point/level logits as in
  Deformable-DETR plus a learned content score of each view's sample).  A sample whose point is
  behind a camera or outside its image has weight exactly 0; a query with no visible sample gets an
  exactly-zero update (its output is multiplied by the "any visible" flag).

The softmax is a symmetric function of the views, so the decoder is invariant to view order.
Cost: O(Q * heads * points * levels * V) samples -- linear in queries x views, no dense attention.
Anchors are refined after every layer: ``a <- a + MLP(x)`` (normalised units), detached between
layers (Deformable-DETR's iterative refinement; each layer's anchors get their own loss).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fast3dis_ros.model.head.anchors import MLP
from fast3dis_ros.model.head.config import InstanceHeadConfig
from fast3dis_ros.model.head.projection import masked_softmax, pixel_to_grid, project, sample_views


def sample_multiview(
    values: list[Tensor],
    points_world: Tensor,
    K: Tensor,
    T_cam_world: Tensor,
    image_size: tuple[int, int],
    num_groups: int = 1,
    eps: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Project world points into every view and bilinearly sample every level there.

    Args:
        values: L maps ``(B, V, G*C, h_l, w_l)`` covering the whole image.
        points_world: ``(B, G, N, 3)`` -- group g samples channel block g of the values.
    Returns:
        samples ``(B, G, N, V, L, C)`` and visible ``(B, G, N, V)`` (bool).
    """
    B, G, N, _ = points_world.shape
    V = K.shape[1]
    uv, _, vis = project(points_world.reshape(B, G * N, 3), K, T_cam_world, image_size, eps)
    grid = pixel_to_grid(uv, image_size).view(B, G, N, V, 2).permute(0, 3, 1, 2, 4)  # (B,V,G,N,2)
    out = []
    for val in values:
        C = val.shape[2] // G
        val = val.view(B, V, G, C, *val.shape[-2:])
        out.append(sample_views(val, grid))  # (B,V,G,N,C)
    samples = torch.stack(out, dim=-2)  # (B,V,G,N,L,C)
    return samples.permute(0, 2, 3, 1, 4, 5), vis.view(B, G, N, V)


def aggregate_views(samples: Tensor, logits: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
    """Masked softmax aggregation over views (and any extra axes flattened with them).

    Args:
        samples: ``(..., V, C)``; logits ``(..., V)``; visible ``(..., V)`` bool.
    Returns:
        aggregated ``(..., C)`` (exactly 0 where nothing is visible), any_visible ``(...)``.
    """
    w = masked_softmax(logits, visible, dim=-1)
    return (w[..., None] * samples).sum(-2), visible.any(-1)


class AnchorSamplingAttention(nn.Module):
    """Multi-head, multi-level, multi-view sampling attention around 3D anchors (see module doc)."""

    def __init__(self, dim: int, num_heads: int, num_points: int, num_levels: int, offset_radius: float, eps: float) -> None:
        super().__init__()
        self.dim, self.H, self.P, self.L, self.eps = dim, num_heads, num_points, num_levels, eps
        self.head_dim = dim // num_heads
        self.sampling_offsets = nn.Linear(dim, num_heads * num_points * 3)
        self.attention_weights = nn.Linear(dim, num_heads * num_points * num_levels)
        self.view_score = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset(offset_radius)

    def _reset(self, radius: float) -> None:
        # Deformable-DETR init: zero weights, bias = fixed pattern of directions (here on a sphere:
        # Fibonacci points, different rotation per head), radius `offset_radius`.
        nn.init.zeros_(self.sampling_offsets.weight)
        n = self.H * self.P
        i = torch.arange(n, dtype=torch.float32) + 0.5
        phi = torch.acos(1 - 2 * i / n)
        theta = math.pi * (1 + 5**0.5) * i
        dirs = torch.stack([torch.cos(theta) * torch.sin(phi), torch.sin(theta) * torch.sin(phi), torch.cos(phi)], -1)
        # first point of each head at the anchor itself, the others around it
        dirs = dirs.view(self.H, self.P, 3) * radius
        dirs[:, 0] = 0.0
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(dirs.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        anchors: Tensor,
        values: list[Tensor],
        center: Tensor,
        scale: Tensor,
        K: Tensor,
        T_cam_world: Tensor,
        image_size: tuple[int, int],
    ) -> Tensor:
        """query/query_pos ``(B, Q, D)``, anchors ``(B, Q, 3)`` normalised, values L x ``(B, V, D, h, w)``
        (already value-projected, see `project_values`). Returns the update ``(B, Q, D)``."""
        B, Q, D = query.shape
        H, P, L = self.H, self.P, self.L
        V = K.shape[1]
        q = query + query_pos
        offsets = self.sampling_offsets(q).view(B, Q, H, P, 3)
        pts = anchors[:, :, None, None, :] + offsets  # (B,Q,H,P,3) normalised
        pts_w = center[:, None, None, None, :] + scale[:, None, None, None, None] * pts
        pts_w = pts_w.permute(0, 2, 1, 3, 4).reshape(B, H, Q * P, 3)
        samples, vis = sample_multiview(values, pts_w, K, T_cam_world, image_size, H, self.eps)
        # samples (B,H,Q*P,V,L,C), vis (B,H,Q*P,V)
        C = self.head_dim
        samples = samples.view(B, H, Q, P, V, L, C)
        vis = vis.view(B, H, Q, P, V, 1).expand(B, H, Q, P, V, L)
        a = self.attention_weights(q).view(B, Q, H, P, L).permute(0, 2, 1, 3, 4)[:, :, :, :, None, :]  # (B,H,Q,P,1,L)
        b = torch.einsum("bhqpvlc,hc->bhqpvl", samples, self.view_score)
        logits = a + b
        agg, any_vis = aggregate_views(
            samples.reshape(B, H, Q, P * V * L, C), logits.reshape(B, H, Q, P * V * L), vis.reshape(B, H, Q, P * V * L)
        )  # (B,H,Q,C), (B,H,Q)
        out = self.output_proj(agg.permute(0, 2, 1, 3).reshape(B, Q, D))
        return out * any_vis.any(1)[..., None].to(out.dtype)

    def project_values(self, maps: list[Tensor]) -> list[Tensor]:
        """value_proj as a 1x1 conv over ``(B, V, D, h, w)`` maps."""
        w = self.value_proj.weight
        return [torch.einsum("bvchw,dc->bvdhw", m, w) + self.value_proj.bias[None, None, :, None, None] for m in maps]


class AnchoredDecoderLayer(nn.Module):
    """self-attn (q = k = x + PE(anchor)) -> anchor-sampling cross-attn -> FFN; post-norm."""

    def __init__(self, cfg: InstanceHeadConfig) -> None:
        super().__init__()
        D = cfg.hidden_dim
        self.self_attn = nn.MultiheadAttention(D, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.cross_attn = AnchorSamplingAttention(
            D, cfg.num_heads, cfg.num_sampling_points, cfg.num_feature_levels, cfg.offset_init_radius, cfg.depth_eps
        )
        self.ffn = nn.Sequential(
            nn.Linear(D, cfg.dim_feedforward), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout), nn.Linear(cfg.dim_feedforward, D)
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pos, anchors, maps, center, scale, K, T_cam_world, image_size) -> Tensor:
        qk = x + pos
        x = self.norm1(x + self.drop(self.self_attn(qk, qk, x, need_weights=False)[0]))
        values = self.cross_attn.project_values(maps)
        x = self.norm2(x + self.drop(self.cross_attn(x, pos, anchors, values, center, scale, K, T_cam_world, image_size)))
        return self.norm3(x + self.drop(self.ffn(x)))


class AnchoredDecoder(nn.Module):
    """Stack of `AnchoredDecoderLayer` with per-layer anchor refinement."""

    def __init__(self, cfg: InstanceHeadConfig, pos_encoding: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AnchoredDecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.refine = nn.ModuleList(MLP(cfg.hidden_dim, cfg.hidden_dim, 3, 3) for _ in range(cfg.num_decoder_layers))
        for r in self.refine:
            nn.init.zeros_(r.layers[-1].weight)
            nn.init.zeros_(r.layers[-1].bias)
        self.pos_encoding = pos_encoding

    def forward(self, x, anchors, maps, center, scale, K, T_cam_world, image_size) -> tuple[list[Tensor], list[Tensor]]:
        """Returns per-layer query states and per-layer refined anchors (normalised), L entries each."""
        states, anchor_list = [], []
        ref = anchors  # layer 0 keeps the gradient to the initial anchors / context MLP
        for i, layer in enumerate(self.layers):
            pos = self.pos_encoding(ref)
            x = layer(x, pos, ref, maps, center, scale, K, T_cam_world, image_size)
            new = ref + self.refine[i](x)
            states.append(x)
            anchor_list.append(new)
            ref = new.detach()
        return states, anchor_list
