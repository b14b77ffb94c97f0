"""InstanceHead: shapes, config round trip, view-permutation equivariance."""

import math

import pytest
import torch

from fast3dis_ros.model.head.config import InstanceHeadConfig
from fast3dis_ros.model.head.instance_head import InstanceHead
from fast3dis_ros.model.head.projection import unproject_depth

H, W = 56, 70  # 4 x 5 patches of 14


def make_scene(B, V, C=32, seed=0, dtype=torch.float32):
    """Cameras on an arc looking at the origin region; random depth lifted to a point map."""
    g = torch.Generator().manual_seed(seed)
    h, w = H // 14, W // 14
    feats = [torch.randn(B, V, C, h, w, generator=g, dtype=dtype) for _ in range(4)]
    K = torch.tensor([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]], dtype=dtype).expand(B, V, 3, 3).clone()
    T = torch.zeros(B, V, 4, 4, dtype=dtype)
    for v in range(V):
        a = 0.3 * v
        R = torch.tensor([[math.cos(a), 0, -math.sin(a)], [0, 1, 0], [math.sin(a), 0, math.cos(a)]], dtype=dtype)
        c = torch.tensor([2.5 * math.sin(a), 0.1 * v, -2.5 * math.cos(a) + 2.5], dtype=dtype)
        T[:, v, :3, :3] = R
        T[:, v, :3, 3] = -R @ c
        T[:, v, 3, 3] = 1
    depth = 2.0 + torch.rand(B, V, H, W, generator=g, dtype=dtype)
    pts = unproject_depth(depth, K, T)
    conf = 1.0 + torch.rand(B, V, H, W, generator=g, dtype=dtype) * 3
    return feats, pts, conf, K, T


def test_config_roundtrip_and_validation():
    cfg = InstanceHeadConfig.tiny()
    d = cfg.to_dict()
    assert InstanceHeadConfig.from_dict(d) == cfg
    assert InstanceHeadConfig().num_queries == 80 and InstanceHeadConfig().num_decoder_layers == 6
    with pytest.raises(ValueError):
        InstanceHeadConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError):
        InstanceHeadConfig(in_channels=[8, 8, 8])


@pytest.mark.parametrize("V", [1, 2, 5])
def test_shapes(V):
    torch.manual_seed(0)
    cfg = InstanceHeadConfig.tiny()
    head = InstanceHead(cfg).eval()
    B, Q = 2, cfg.num_queries
    feats, pts, conf, K, T = make_scene(B, V)
    with torch.no_grad():
        out = head(feats, pts, conf, K, T, (H, W))
    hm, wm = H // cfg.mask_stride, W // cfg.mask_stride
    assert out["pred_logits"].shape == (B, Q)
    assert out["pred_masks"].shape == (B, Q, V, hm, wm)
    assert out["anchors"].shape == (B, Q, 3)
    assert out["mask_features"].shape == (B, V, cfg.mask_dim, hm, wm)
    assert out["points"].shape == (B, V, 3, hm, wm) and out["point_conf"].shape == (B, V, hm, wm)
    assert len(out["aux_outputs"]) == cfg.num_decoder_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (B, Q)
        assert aux["pred_masks"].shape == (B, Q, V, hm, wm)
        assert aux["anchors"].shape == (B, Q, 3)
    for k in ("pred_logits", "pred_masks", "anchors"):
        assert torch.isfinite(out[k]).all()
    # anchors in world = center + scale * normalised
    assert torch.allclose(
        out["anchors"], out["scene_center"][:, None] + out["scene_scale"][:, None, None] * out["anchors_norm"], atol=1e-5
    )
    with torch.no_grad():
        out2 = head(feats, pts, conf, K, T, (H, W), return_aux=False)
    assert out2["aux_outputs"] == [] and torch.allclose(out2["pred_masks"], out["pred_masks"])


def test_view_chunking_matches():
    torch.manual_seed(0)
    cfg = InstanceHeadConfig.tiny()
    head = InstanceHead(cfg).eval()
    feats, pts, conf, K, T = make_scene(1, 5)
    with torch.no_grad():
        a = head(feats, pts, conf, K, T, (H, W))
        head.pixel_decoder.cfg.view_chunk = 2
        b = head(feats, pts, conf, K, T, (H, W))
    assert torch.allclose(a["pred_masks"], b["pred_masks"], atol=1e-5)


def test_view_permutation_equivariance():
    torch.manual_seed(0)
    cfg = InstanceHeadConfig.tiny()
    head = InstanceHead(cfg).double().eval()
    with torch.no_grad():  # make the learned parts non-trivial (several are zero-initialised)
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    B, V = 2, 5
    feats, pts, conf, K, T = make_scene(B, V, dtype=torch.float64)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        o = head(feats, pts, conf, K, T, (H, W))
        op = head([f[:, perm] for f in feats], pts[:, perm], conf[:, perm], K[:, perm], T[:, perm], (H, W))
    assert torch.allclose(o["pred_logits"], op["pred_logits"], atol=1e-8)
    assert torch.allclose(o["anchors"], op["anchors"], atol=1e-8)
    assert torch.allclose(o["pred_masks"][:, :, perm], op["pred_masks"], atol=1e-7)
    for a, b in zip(o["aux_outputs"], op["aux_outputs"]):
        assert torch.allclose(a["pred_masks"][:, :, perm], b["pred_masks"], atol=1e-7)
    # the views actually matter (the test is not vacuous)
    o1 = None
    with torch.no_grad():
        o1 = head([f[:, :4] for f in feats], pts[:, :4], conf[:, :4], K[:, :4], T[:, :4], (H, W))
    assert not torch.allclose(o["pred_logits"], o1["pred_logits"], atol=1e-6)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    head = InstanceHead(InstanceHeadConfig.tiny()).eval()
    feats, pts, conf, K, T = make_scene(1, 3)
    with torch.no_grad():
        ref = head(feats, pts, conf, K, T, (H, W))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(feats, pts, conf, K, T, (H, W))
    assert torch.isfinite(out["pred_masks"].float()).all()
    scale = ref["pred_masks"].abs().max()
    assert (out["pred_masks"].float() - ref["pred_masks"]).abs().max() < 0.1 * scale
    assert torch.allclose(out["anchors"].float(), ref["anchors"], atol=1e-2)
