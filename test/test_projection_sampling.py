"""Projection, grid conventions and visibility-masked multi-view sampling of the instance head."""

import math

import torch

from fast3dis_ros.model.head.decoder import AnchorSamplingAttention, aggregate_views, sample_multiview
from fast3dis_ros.model.head.projection import (
    grid_to_pixel,
    masked_softmax,
    pixel_to_grid,
    project,
    unproject_depth,
)

H, W = 42, 56  # 3 x 4 patches of 14


def _K(f=40.0):
    return torch.tensor([[f, 0.0, 27.0], [0.0, f, 20.0], [0.0, 0.0, 1.0]])


def _T(R, c):
    """T_cam_world for a camera with rotation R (world->cam) at world position c."""
    T = torch.eye(4)
    T[:3, :3] = R
    T[:3, 3] = -R @ torch.as_tensor(c, dtype=torch.float32)
    return T


def _rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def cameras():
    """cam0 at origin looking +z; cam1 at x=0.4, yawed; cam2 at y=-0.3; cam3 looking -z (point behind);
    cam4 far to the side (point outside its image)."""
    Ts = [
        _T(torch.eye(3), [0.0, 0.0, 0.0]),
        _T(_rot_y(0.15), [0.4, 0.0, 0.1]),
        _T(torch.eye(3), [0.0, -0.3, 0.5]),
        _T(_rot_y(math.pi), [0.0, 0.0, 0.0]),
        _T(torch.eye(3), [10.0, 0.0, 0.0]),
    ]
    T = torch.stack(Ts)[None]
    K = _K().expand(1, 5, 3, 3).clone()
    return K, T


def position_maps(h, w, V, extra=None):
    """(1, V, 2 or 3, h, w) maps whose value is the image-pixel (u, v) of each feature cell centre
    (optionally + a per-view constant channel)."""
    j = (torch.arange(w) + 0.5) * W / w - 0.5
    i = (torch.arange(h) + 0.5) * H / h - 0.5
    u = j[None, :].expand(h, w)
    v = i[:, None].expand(h, w)
    m = torch.stack([u, v])[None, None].expand(1, V, 2, h, w).clone()
    if extra is not None:
        c = torch.as_tensor(extra, dtype=torch.float32)[None, :, None, None, None].expand(1, V, 1, h, w)
        m = torch.cat([m, c], dim=2)
    return m


def manual_project(p, K, T):
    pc = T[:3, :3] @ p + T[:3, 3]
    return (K @ (pc / pc[2]))[:2], pc[2]


def test_project_matches_manual_and_visibility():
    K, T = cameras()
    P = torch.tensor([[0.1, 0.05, 3.0]])[None]
    uv, z, vis = project(P, K, T, (H, W))
    assert uv.shape == (1, 1, 5, 2) and z.shape == (1, 1, 5) and vis.shape == (1, 1, 5)
    for v in range(5):
        uv_m, z_m = manual_project(P[0, 0], K[0, v], T[0, v])
        assert torch.allclose(z[0, 0, v], z_m, atol=1e-5)
        if z_m > 0:
            assert torch.allclose(uv[0, 0, v], uv_m, atol=1e-4)
    assert vis[0, 0].tolist() == [True, True, True, False, False]


def test_grid_convention_roundtrip_and_corners():
    uv = torch.tensor([[-0.5, -0.5], [W - 0.5, H - 0.5], [(W - 1) / 2, (H - 1) / 2]])
    g = pixel_to_grid(uv, (H, W))
    assert torch.allclose(g, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(grid_to_pixel(g, (H, W)), uv, atol=1e-5)


def test_unproject_then_project_roundtrip():
    K, T = cameras()
    depth = torch.rand(1, 5, H, W) + 1.0
    pts = unproject_depth(depth, K, T)  # (1,5,3,H,W)
    assert pts.shape == (1, 5, 3, H, W)
    v = 1
    P = pts[:, v].flatten(2).transpose(1, 2)  # (1, HW, 3)
    uv, z, vis = project(P, K[:, v : v + 1], T[:, v : v + 1], (H, W))
    vv, uu = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    expect = torch.stack([uu, vv], -1).reshape(-1, 2).float()
    assert torch.allclose(uv[0, :, 0], expect, atol=1e-3)
    assert torch.allclose(z[0, :, 0], depth[0, v].flatten(), atol=1e-4)
    assert vis.all()


def test_anchor_samples_its_pixel_in_every_view():
    """A 3D point samples the feature whose value encodes its known projected pixel, in every view,
    at every level resolution."""
    K, T = cameras()
    K, T = K[:, :3], T[:, :3]
    values = [position_maps(h, w, 3) for (h, w) in [(2, 2), (3, 4), (6, 8), (12, 16)]]
    P = torch.tensor([[0.1, 0.05, 3.0], [-0.2, 0.1, 2.5]])[None, None]  # (B=1, G=1, N=2, 3)
    samples, vis = sample_multiview(values, P, K, T, (H, W))
    assert samples.shape == (1, 1, 2, 3, 4, 2) and vis.all()
    for n in range(2):
        for v in range(3):
            uv_m, _ = manual_project(P[0, 0, n], K[0, v], T[0, v])
            for lvl in range(4):
                h = values[lvl].shape[-2]
                w = values[lvl].shape[-1]
                # bilinear interpolation of a linear field is exact between the outer cell centres
                inner_u = (0.5 * W / w - 0.5) <= uv_m[0] <= (W - 0.5 * W / w - 0.5)
                inner_v = (0.5 * H / h - 0.5) <= uv_m[1] <= (H - 0.5 * H / h - 0.5)
                if inner_u and inner_v:
                    assert torch.allclose(samples[0, 0, n, v, lvl], uv_m, atol=1e-3), (n, v, lvl)
    # the finest level is always "inner" here: check explicitly it was tested
    uv, _, _ = project(P[:, 0], K, T, (H, W))
    assert torch.allclose(samples[0, 0, :, :, 3], uv[0], atol=1e-3)


def test_masked_aggregation_ignores_invisible_views():
    K, T = cameras()
    maps = [position_maps(6, 8, 5, extra=[1.0, 2.0, 3.0, 100.0, 1000.0])]
    P = torch.tensor([[0.1, 0.05, 3.0]])[None, None]
    samples, vis = sample_multiview(maps, P, K, T, (H, W))  # (1,1,1,5,1,3), vis (1,1,1,5)
    assert vis[0, 0, 0].tolist() == [True, True, True, False, False]
    logits = torch.zeros(1, 1, 1, 5)
    agg, any_vis = aggregate_views(samples[..., 0, :], logits, vis)
    expect = samples[0, 0, 0, :3, 0].mean(0)
    assert torch.allclose(agg[0, 0, 0], expect, atol=1e-5)
    assert agg[0, 0, 0, 2].item() == 2.0  # mean of the per-view constants 1, 2, 3 only
    # random logits: equals softmax over the visible views only
    logits = torch.randn(1, 1, 1, 5)
    agg, _ = aggregate_views(samples[..., 0, :], logits, vis)
    w = torch.softmax(logits[0, 0, 0, :3], 0)
    assert torch.allclose(agg[0, 0, 0], (w[:, None] * samples[0, 0, 0, :3, 0]).sum(0), atol=1e-5)
    # a point visible nowhere (behind every camera) gives exactly zero
    Pb = torch.tensor([[0.0, 0.0, -5.0]])[None, None]
    K3, T3 = K[:, [0, 2, 4]], T[:, [0, 2, 4]]
    s, v = sample_multiview([m[:, [0, 2, 4]] for m in maps], Pb, K3, T3, (H, W))
    assert not v.any()
    agg, any_vis = aggregate_views(s[..., 0, :], torch.randn(1, 1, 1, 3), v)
    assert torch.equal(agg, torch.zeros_like(agg)) and not any_vis.any()


def test_masked_softmax_no_nan_gradients():
    logits = torch.randn(4, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0] * 6, [1] * 6, [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    w = masked_softmax(logits * 50, mask)
    assert torch.allclose(w.sum(1), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert (w[~mask] == 0).all()
    (w * torch.randn(4, 6)).sum().backward()
    assert torch.isfinite(logits.grad).all()


def _attention(seed=0):
    torch.manual_seed(seed)
    att = AnchorSamplingAttention(dim=8, num_heads=2, num_points=3, num_levels=2, offset_radius=0.05, eps=1e-4)
    with torch.no_grad():  # non-trivial, content-dependent weights and offsets
        for p in att.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return att


def test_attention_module_invisible_views_contribute_nothing():
    K, T = cameras()
    torch.manual_seed(1)
    maps = [torch.randn(1, 5, 8, 3, 4), torch.randn(1, 5, 8, 6, 8)]
    att = _attention()
    q, pos = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    center, scale = torch.zeros(1, 3), torch.ones(1)
    anchors = torch.tensor([[[0.1, 0.05, 3.0], [-0.2, 0.1, 2.5], [0.0, 0.0, -4.0]]])  # last: behind cams 0-2, 4
    with torch.no_grad():
        vals = att.project_values(maps)
        out5 = att(q, pos, anchors, vals, center, scale, K, T, (H, W))
        sub = [0, 1, 2]
        out3 = att(q, pos, anchors, [v[:, sub] for v in vals], center, scale, K[:, sub], T[:, sub], (H, W))
        # views 3 (point behind) and 4 (outside image) change nothing for the first two queries
        assert torch.allclose(out5[:, :2], out3[:, :2], atol=1e-5)
        # the third query is visible nowhere among views 0-2 -> exactly zero update
        assert torch.equal(out3[0, 2], torch.zeros(8))
        # view permutation invariance
        perm = [4, 2, 0, 3, 1]
        outp = att(q, pos, anchors, [v[:, perm] for v in vals], center, scale, K[:, perm], T[:, perm], (H, W))
        assert torch.allclose(out5, outp, atol=1e-5)
