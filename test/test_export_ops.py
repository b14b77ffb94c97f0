"""The exportable replacements of ``linalg.inv_ex`` and ``nanmedian`` / ``median`` (issue 25) against the
ops they replaced, on random inputs of the shapes and value ranges the forward sees."""

from __future__ import annotations

import torch

from fast3dis_ros.model.median import lower_median, masked_lower_median
from fast3dis_ros.model.head.pixel_decoder import scene_normalization
from fast3dis_ros.model.head.projection import inverse_3x3, rigid_inverse


def _random_intrinsics(n: int, g: torch.Generator) -> torch.Tensor:
    K = torch.zeros(n, 3, 3)
    K[:, 0, 0] = 100 + 900 * torch.rand(n, generator=g)
    K[:, 1, 1] = K[:, 0, 0] * (0.8 + 0.4 * torch.rand(n, generator=g))
    K[:, 0, 2] = 50 + 500 * torch.rand(n, generator=g)
    K[:, 1, 2] = 50 + 400 * torch.rand(n, generator=g)
    K[:, 0, 1] = torch.randn(n, generator=g)  # skew: the closed form must not assume it is zero
    K[:, 2, 2] = 1.0
    return K


def _random_rigid(n: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.linalg.det(q))[:, None, None]  # proper rotations
    T = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    T[:, :3, :3] = q
    T[:, :3, 3] = 20 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return T.float()


def test_inverse_3x3_matches_linalg_inv_on_intrinsics():
    g = torch.Generator().manual_seed(0)
    K = _random_intrinsics(4096, g)
    ref = torch.linalg.inv_ex(K).inverse
    got = inverse_3x3(K)
    # relative to the largest entry of each inverse (fp32 rounding of the cofactor products)
    dev = ((got - ref).abs().amax((-1, -2)) / ref.abs().amax((-1, -2))).max().item()
    assert dev < 1e-6, dev
    assert torch.allclose(got @ K, torch.eye(3).expand_as(K), atol=1e-5)


def test_rigid_inverse_matches_linalg_inv_on_se3():
    g = torch.Generator().manual_seed(1)
    T = _random_rigid(4096, g)
    ref = torch.linalg.inv_ex(T).inverse
    got = rigid_inverse(T)
    assert (got - ref).abs().max().item() < 2e-5  # translations up to ~80 m: a few fp32 ulps
    assert torch.equal(got[:, 3], ref.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(4096, 4))


def test_masked_lower_median_equals_nanmedian_bitwise():
    g = torch.Generator().manual_seed(2)
    for n in (1, 2, 7, 100, 1001):
        x = 10 * torch.randn(5, n, 3, generator=g)
        valid = torch.rand(5, n, 3, generator=g) > 0.3
        valid[:, 0] = True  # at least one valid entry per slice
        ref = torch.nanmedian(torch.where(valid, x, torch.full_like(x, float("nan"))), dim=1).values
        assert torch.equal(masked_lower_median(x, valid, dim=1), ref)
    x = torch.randn(3, 7, generator=g)
    assert torch.equal(masked_lower_median(x, torch.zeros_like(x, dtype=torch.bool), 1), torch.full((3,), float("inf")))


def test_lower_median_equals_torch_median_bitwise():
    g = torch.Generator().manual_seed(3)
    for v in (1, 2, 3, 4, 8, 33):
        x = torch.rand(6, v, generator=g)
        assert torch.equal(lower_median(x, dim=1), torch.median(x, dim=1).values)


def _nanmedian_scene_normalization(points_world, patch_hw):
    """The former implementation (nanmedian), kept here as the reference."""
    import torch.nn.functional as F

    B, V = points_world.shape[:2]
    p = F.interpolate(points_world.flatten(0, 1).float(), size=patch_hw, mode="nearest")
    p = p.view(B, V, 3, -1).permute(0, 1, 3, 2).reshape(B, -1, 3)
    finite = torch.isfinite(p).all(-1, keepdim=True)
    p = torch.where(finite, p, torch.full_like(p, float("nan")))
    c = torch.nanmedian(p, dim=1).values
    s = torch.nanmedian((p - c[:, None]).norm(dim=-1), dim=1).values.clamp_min(1e-6)
    empty = ~finite.any(dim=1).squeeze(-1)
    c = torch.where(empty[:, None], torch.zeros_like(c), c)
    s = torch.where(empty, torch.ones_like(s), s)
    return c, s


def test_scene_normalization_equals_former_nanmedian_version():
    g = torch.Generator().manual_seed(4)
    pts = 5 * torch.randn(3, 4, 3, 28, 42, generator=g)
    pts[0, 1, :, 3:9, 5:20] = float("nan")  # holes
    pts[1, :, 2, :, :7] = float("inf")
    pts[2] = float("nan")  # a scene without any finite point
    c, s = scene_normalization(pts, (4, 6))
    c_ref, s_ref = _nanmedian_scene_normalization(pts, (4, 6))
    assert torch.equal(c, c_ref) and torch.equal(s, s_ref)
    assert torch.equal(c[2], torch.zeros(3)) and s[2].item() == 1.0
