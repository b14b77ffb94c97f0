"""`InstanceHead`: geometry-injected pixel decoder + anchored query decoder + mask/objectness heads.

Mask logits are ``(B, Q, V, H // mask_stride, W // mask_stride)`` (default stride 4, i.e. H/4 x W/4
of the processing resolution), obtained as ``einsum(mask_embed(query), mask_features)`` per view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fast3dis_ros.model.head.anchors import MLP, AnchorQueryGenerator, FourierPositionEncoding3D
from fast3dis_ros.model.head.decoder import AnchoredDecoder
from fast3dis_ros.model.head.config import InstanceHeadConfig
from fast3dis_ros.model.head.pixel_decoder import GeometryPixelDecoder, scene_normalization


class InstanceHead(nn.Module):
    """FAST3DIS instance head.

    forward(features, points_world, conf, intrinsics, T_cam_world, image_size, return_aux=True) -> dict:

    * ``pred_logits (B, Q)`` class-agnostic objectness logits;
    * ``pred_masks (B, Q, V, H//s, W//s)`` mask logits, ``s = cfg.mask_stride``;
    * ``anchors (B, Q, 3)`` final anchors in world coordinates; ``anchors_norm`` the same in the
      normalised scene frame;
    * ``aux_outputs``: list (``num_decoder_layers - 1`` entries, earliest first; empty when
      ``return_aux=False``) of dicts with ``pred_logits``, ``pred_masks``, ``anchors``, ``anchors_norm``;
    * ``mask_features (B, V, mask_dim, H//s, W//s)`` per-pixel embeddings (contrastive loss);
    * ``scene_center (B, 3)``, ``scene_scale (B,)``: the normalised frame (world = c + s * norm);
    * ``points (B, V, 3, H//s, W//s)`` world points and ``point_conf (B, V, H//s, W//s)``
      nearest-sampled at mask resolution (used by the criterion: anchor targets, overlap weights).
    """

    def __init__(self, cfg: InstanceHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_dim
        self.pixel_decoder = GeometryPixelDecoder(cfg)
        self.query_generator = AnchorQueryGenerator(cfg)
        self.pos_encoding = FourierPositionEncoding3D(cfg.fourier_bands, D)
        self.decoder = AnchoredDecoder(cfg, self.pos_encoding)
        self.decoder_norm = nn.LayerNorm(D)
        self.mask_embed = MLP(D, D, cfg.mask_dim, 3)
        self.objectness = nn.Linear(D, 1)

    def _predict(self, x: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor]:
        x = self.decoder_norm(x)
        logits = self.objectness(x).squeeze(-1)
        masks = torch.einsum("bqc,bvchw->bqvhw", self.mask_embed(x), mask_features)
        return logits, masks

    def forward(
        self,
        features: list[Tensor],
        points_world: Tensor,
        conf: Tensor,
        intrinsics: Tensor,
        T_cam_world: Tensor,
        image_size: tuple[int, int],
        return_aux: bool = True,
    ) -> dict:
        H, W = int(image_size[0]), int(image_size[1])
        B, V = features[0].shape[:2]
        h, w = features[0].shape[-2:]
        for name, t, shp in (
            ("points_world", points_world, (B, V, 3)),
            ("conf", conf, (B, V)),
            ("intrinsics", intrinsics, (B, V, 3, 3)),
            ("T_cam_world", T_cam_world, (B, V, 4, 4)),
        ):
            if tuple(t.shape[: len(shp)]) != shp:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected leading dims {shp}")
        # geometry (points, cameras, scene frame, projection) stays in >= float32 even when the
        # features are half precision: bf16 world coordinates would cost pixels after projection
        gdtype = torch.promote_types(features[0].dtype, torch.float32)
        points_world = points_world.to(gdtype)
        conf = conf.to(gdtype)
        K = intrinsics.to(gdtype)
        T = T_cam_world.to(gdtype)

        center, scale = scene_normalization(points_world, (h, w))
        pd = self.pixel_decoder(features, points_world, conf, center, scale, (H, W))
        mask_features, maps = pd["mask_features"], pd["multi_scale"]
        anchors0, content, _ = self.query_generator(maps[0], pd["points_norm_deep"])
        states, anchor_list = self.decoder(content, anchors0, maps, center, scale, K, T, (H, W))

        def to_world(a: Tensor) -> Tensor:
            return center[:, None] + scale[:, None, None] * a

        outs = []
        n_layers = len(states)
        for i, (x, a) in enumerate(zip(states, anchor_list)):
            if i < n_layers - 1 and not return_aux:
                continue
            logits, masks = self._predict(x, mask_features)
            outs.append({"pred_logits": logits, "pred_masks": masks, "anchors": to_world(a), "anchors_norm": a})
        final = outs[-1]
        hm, wm = mask_features.shape[-2:]
        points = F.interpolate(points_world.flatten(0, 1), size=(hm, wm), mode="nearest").view(B, V, 3, hm, wm)
        pconf = F.interpolate(conf.flatten(0, 1)[:, None], size=(hm, wm), mode="nearest").view(B, V, hm, wm)
        return {
            **final,
            "aux_outputs": outs[:-1],
            "mask_features": mask_features,
            "scene_center": center,
            "scene_scale": scale,
            "points": points,
            "point_conf": pconf,
        }
