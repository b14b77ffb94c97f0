"""Geometry-injected DPT-style pixel decoder.

Per view (views are independent images here, so the decoder is view-permutation equivariant):

1. *Reassemble* (DPT): tap i (``(B, V, C_i, h, w)`` at patch resolution) -> 1x1 conv -> resample to
   4x, 2x, 1x, 1/2x patch resolution (conv-transpose 4/4, conv-transpose 2/2, identity, 3x3 conv
   stride 2) -> 3x3 conv to ``hidden_dim``.
2. *Geometry injection*: the lifted point map (``points_world``), area-pooled to the deepest level
   (1/2x), expressed in the normalised scene frame ``(p - center) / scale`` (see `anchors.py`),
   Fourier-encoded, plus the centred log depth-confidence, goes through a small conv MLP and is
   added to the deepest level (last layer zero-initialised, so it starts as plain DPT).
3. *Fusion* top-down with DPT feature-fusion blocks (residual conv units, bilinear upsampling to
   the next level's size, so odd sizes work).
4. Outputs: ``mask_features (B, V, mask_dim, H // mask_stride, W // mask_stride)`` (3x3 conv of the
   finest fused map, bilinearly resized), and ``multi_scale``: the fused maps at 1/2x, 1x, 2x patch
   resolution (``(B, V, hidden_dim, h_l, w_l)``, coarse to fine) for the decoder's cross-attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fast3dis_ros.model.head.config import InstanceHeadConfig
from fast3dis_ros.model.median import masked_lower_median


def fourier_features(x: Tensor, bands: int, dim: int = -1) -> Tensor:
    """``[x, sin(f_k x), cos(f_k x)]`` with ``f_k = pi/2 * 2^k``, k < bands, along ``dim``.

    The lowest frequency has period 4 normalised units (the span of a typical scene, [-2, 2]).
    Output size along ``dim``: ``D * (1 + 2 * bands)``.
    """
    if bands <= 0:
        return x
    x_m = x.movedim(dim, -1)
    freqs = (math.pi / 2) * (2.0 ** torch.arange(bands, device=x.device, dtype=x.dtype))
    xf = (x_m[..., None] * freqs).flatten(-2)  # (..., D*bands)
    out = torch.cat([x_m, torch.sin(xf), torch.cos(xf)], dim=-1)
    return out.movedim(-1, dim)


class ResidualConvUnit(nn.Module):
    """DPT residual conv unit: x + conv(relu(conv(relu(x))))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """DPT fusion: out = RCU2(upsample(top) + RCU1(skip)); with no top: RCU2(skip)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.rcu1 = ResidualConvUnit(dim)
        self.rcu2 = ResidualConvUnit(dim)
        self.out_conv = nn.Conv2d(dim, dim, 1)

    def forward(self, skip: Tensor, top: Tensor | None = None) -> Tensor:
        x = self.rcu1(skip)
        if top is not None:
            x = x + F.interpolate(top, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.out_conv(self.rcu2(x))


def _reassemble(in_ch: int, out_ch: int, level: int) -> nn.Module:
    proj = nn.Conv2d(in_ch, out_ch, 1)
    if level == 0:
        resample = nn.ConvTranspose2d(out_ch, out_ch, 4, stride=4)
    elif level == 1:
        resample = nn.ConvTranspose2d(out_ch, out_ch, 2, stride=2)
    elif level == 2:
        resample = nn.Identity()
    else:
        resample = nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1)
    return nn.Sequential(proj, resample)


def scene_normalization(points_world: Tensor, patch_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Robust scene frame from a point map: ``center (B, 3)``, ``scale (B,)``.

    Points are nearest-sampled per view to the patch grid (same pixels in every view, so the
    statistics are a function of the *set* of views: permutation invariant), then
    ``center`` = coordinate-wise median, ``scale`` = median distance to ``center`` (>= 1e-6).
    Non-finite points are ignored.
    """
    B, V = points_world.shape[:2]
    p = F.interpolate(points_world.flatten(0, 1).float(), size=patch_hw, mode="nearest")  # (BV,3,h,w)
    p = p.view(B, V, 3, -1).permute(0, 1, 3, 2).reshape(B, -1, 3)  # (B, N, 3)
    finite = torch.isfinite(p).all(-1, keepdim=True)
    # masked lower medians: the same values as boolean indexing (and as the former nanmedian), without
    # a data-dependent shape (a host sync, no CUDA-graph capture) and exportable to ONNX (model/median.py)
    c = masked_lower_median(p, finite.expand_as(p), dim=1)  # (B, 3); inf when a scene has no finite point
    s = masked_lower_median((p - c[:, None]).norm(dim=-1), finite[..., 0], dim=1).clamp_min(1e-6)
    empty = ~finite.any(dim=1).squeeze(-1)  # (B,)
    c = torch.where(empty[:, None], torch.zeros_like(c), c)
    s = torch.where(empty, torch.ones_like(s), s)
    return c.to(points_world.dtype), s.to(points_world.dtype)


def normalize_points(points: Tensor, center: Tensor, scale: Tensor, channel_dim: int = 2) -> Tensor:
    """``(p - center) / scale`` with the xyz axis at ``channel_dim`` of a ``(B, ...)`` tensor."""
    shape = [1] * points.dim()
    shape[0] = points.shape[0]
    shape[channel_dim] = 3
    c = center.view(shape)
    s = scale.view([points.shape[0]] + [1] * (points.dim() - 1))
    return (points - c) / s


def log_conf(conf: Tensor) -> Tensor:
    """Centred log-confidence per scene: ``log(conf) - mean(log(conf))`` (scale free)."""
    lc = torch.log(conf.clamp_min(1e-6))
    return lc - lc.flatten(1).mean(1).view([-1] + [1] * (conf.dim() - 1))


class GeometryInjection(nn.Module):
    """Conv MLP on [Fourier(normalised xyz), centred log conf] -> hidden_dim (last layer zero init)."""

    def __init__(self, hidden_dim: int, bands: int) -> None:
        super().__init__()
        self.bands = bands
        in_ch = 3 * (1 + 2 * bands) + 1
        self.mlp = nn.Sequential(
            nn.Conv2d(in_ch, hidden_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, hidden_dim, 1)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, points_norm: Tensor, lconf: Tensor) -> Tensor:
        """points_norm ``(N, 3, h, w)``, lconf ``(N, 1, h, w)`` -> ``(N, hidden, h, w)``."""
        x = torch.cat([fourier_features(points_norm.clamp(-8, 8), self.bands, dim=1), lconf], dim=1)
        return self.mlp(x.to(self.mlp[0].weight.dtype))


class GeometryPixelDecoder(nn.Module):
    """See module docstring."""

    def __init__(self, cfg: InstanceHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_dim
        self.reassemble = nn.ModuleList(
            [_reassemble(cin, cout, i) for i, (cin, cout) in enumerate(zip(cfg.in_channels, cfg.reassemble_channels))]
        )
        self.layer_rn = nn.ModuleList([nn.Conv2d(c, D, 3, padding=1, bias=False) for c in cfg.reassemble_channels])
        self.geometry = GeometryInjection(D, cfg.geometry_fourier_bands)
        self.fusion = nn.ModuleList([FeatureFusionBlock(D) for _ in range(4)])
        self.mask_proj = nn.Sequential(nn.Conv2d(D, D, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(D, cfg.mask_dim, 1))

    def _forward_images(self, feats: list[Tensor], geo: Tensor, lconf: Tensor, mask_hw: tuple[int, int]):
        """feats: 4 x ``(N, C_i, h, w)``; geo/lconf at the deepest level. Returns (mask_feat, [l3, l2, l1])."""
        levels = [rn(re(f)) for f, re, rn in zip(feats, self.reassemble, self.layer_rn)]  # 4h, 2h, h, h/2
        deep = levels[3]
        geo = F.adaptive_avg_pool2d(geo, deep.shape[-2:])
        lconf = F.adaptive_avg_pool2d(lconf, deep.shape[-2:])
        levels[3] = deep + self.geometry(geo, lconf).to(deep.dtype)
        p3 = self.fusion[3](levels[3])
        p2 = self.fusion[2](levels[2], p3)
        p1 = self.fusion[1](levels[1], p2)
        p0 = self.fusion[0](levels[0], p1)
        mask_feat = self.mask_proj(p0)
        if mask_feat.shape[-2:] != mask_hw:
            mask_feat = F.interpolate(mask_feat, size=mask_hw, mode="bilinear", align_corners=False)
        return mask_feat, [p3, p2, p1]

    def forward(
        self,
        features: list[Tensor],
        points_world: Tensor,
        conf: Tensor,
        center: Tensor,
        scale: Tensor,
        image_size: tuple[int, int],
    ) -> dict:
        """
        Args:
            features: 4 x ``(B, V, C_i, h, w)``.  points_world ``(B, V, 3, H, W)``, conf ``(B, V, H, W)``.
            center ``(B, 3)``, scale ``(B,)``: the scene frame (`scene_normalization`).
        Returns dict: ``mask_features (B, V, mask_dim, H//s, W//s)``, ``multi_scale`` list of
        ``num_feature_levels`` maps ``(B, V, hidden, h_l, w_l)`` coarse -> fine, ``points_norm_deep``
        ``(B, V, 3, h3, w3)`` normalised points at the deepest level, ``lconf_deep (B, V, 1, h3, w3)``.
        """
        if len(features) != 4:
            raise ValueError(f"expected 4 backbone taps, got {len(features)}")
        B, V = features[0].shape[:2]
        h, w = features[0].shape[-2:]
        H, W = image_size
        s = self.cfg.mask_stride
        mask_hw = (H // s, W // s)
        # deepest level size of a stride-2 conv (pad 1, k 3) on (h, w)
        deep_hw = ((h + 1) // 2, (w + 1) // 2)
        # pool geometry first at patch resolution (cheap), normalise, then pool to the deepest level
        pts = F.adaptive_avg_pool2d(points_world.flatten(0, 1), deep_hw).view(B, V, 3, *deep_hw)
        pts = normalize_points(pts, center, scale, channel_dim=2)
        lc = log_conf(conf)
        lc = F.adaptive_avg_pool2d(lc.flatten(0, 1)[:, None], deep_hw).view(B, V, 1, *deep_hw)

        flat = [f.flatten(0, 1) for f in features]
        geo_f, lc_f = pts.flatten(0, 1), lc.flatten(0, 1)
        N = B * V
        chunk = self.cfg.view_chunk if self.cfg.view_chunk > 0 else N
        mask_parts, ms_parts = [], []
        for i in range(0, N, chunk):
            mf, ms = self._forward_images([f[i : i + chunk] for f in flat], geo_f[i : i + chunk], lc_f[i : i + chunk], mask_hw)
            mask_parts.append(mf)
            ms_parts.append(ms)
        mask_features = torch.cat(mask_parts).view(B, V, -1, *mask_hw)
        L = self.cfg.num_feature_levels
        multi_scale = []
        for lvl in range(3):
            m = torch.cat([p[lvl] for p in ms_parts])
            multi_scale.append(m.view(B, V, *m.shape[1:]))
        return {
            "mask_features": mask_features,
            "multi_scale": multi_scale[:L],
            "points_norm_deep": pts,
            "lconf_deep": lc,
        }
