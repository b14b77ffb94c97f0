"""The exportable replacements of ``linalg.inv_ex`` and ``nanmedian`` / ``median`` (issue 25) against the
ops they replaced, on random inputs of the shapes and value ranges the forward sees.

The order statistics have two paths (model/median.py): sort in PyTorch, a TopK-free radix selection while a
graph is exported. ``exporting`` switches a test to the export path without exporting."""

from __future__ import annotations

import pytest
import torch

from fast3dis_ros.model.head.anchors import sorted_quantiles
from fast3dis_ros.model.median import kth_smallest_by_radix_select, lower_median, masked_lower_median
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


@pytest.fixture(params=["pytorch", "export"])
def exporting(request, monkeypatch):
    """Run the test on the PyTorch path (sort) and on the path taken while exporting (radix selection)."""
    if request.param == "export":
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    return request.param


def _hard_values(kind: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """float32 values of the kinds an exact selection can get wrong."""
    x = 10 * torch.randn(shape, generator=g)
    if kind == "ties":  # few distinct values, each many times, +-0 among them
        x = torch.randint(-3, 4, shape, generator=g).float() * 0.5
        x[x == 0] = torch.where(torch.rand(int((x == 0).sum()), generator=g) > 0.5, 0.0, -0.0)
    elif kind == "tiny":  # subnormals and the smallest normals
        x = x * 1e-39
    elif kind == "huge":  # up to ~1e38: exponents near the top of float32
        x = x * 3e36
    elif kind == "spread":  # magnitudes over the whole range, both signs
        x = torch.sign(x) * torch.pow(10.0, torch.empty(shape).uniform_(-44, 38, generator=g))
    elif kind == "padded":  # +inf entries (the masked median's padding)
        x[torch.rand(shape, generator=g) < 0.4] = float("inf")
    return x


@pytest.mark.parametrize("kind", ["normal", "ties", "tiny", "huge", "spread", "padded"])
def test_kth_smallest_by_radix_select_equals_sort_for_every_rank_kind(kind):
    g = torch.Generator().manual_seed(10)
    for n in (1, 2, 3, 4, 31, 32, 999, 1000, 4097):  # odd and even sizes, above TensorRT's 3840
        x = _hard_values(kind, (6, n), g)
        ranks = torch.stack([torch.zeros((), dtype=torch.int64), torch.tensor(n - 1), torch.tensor((n - 1) // 2),
                             torch.tensor(n // 2), torch.randint(0, n, (), generator=g), torch.randint(0, n, (), generator=g)])
        ref = x.sort(dim=1).values.gather(1, ranks[:, None]).squeeze(1)
        got = kth_smallest_by_radix_select(x, ranks, dim=1)
        assert torch.equal(got, ref), (kind, n, got, ref)


def test_kth_smallest_by_radix_select_along_an_inner_dim_with_scalar_rank():
    g = torch.Generator().manual_seed(11)
    x = _hard_values("ties", (2, 3001, 3), g)
    assert torch.equal(kth_smallest_by_radix_select(x, torch.tensor(1500), dim=1), torch.median(x, dim=1).values)


def test_masked_lower_median_equals_nanmedian_bitwise(exporting):
    g = torch.Generator().manual_seed(2)
    for n in (1, 2, 7, 100, 1001):
        x = 10 * torch.randn(5, n, 3, generator=g)
        valid = torch.rand(5, n, 3, generator=g) > 0.3
        valid[:, 0] = True  # at least one valid entry per slice
        ref = torch.nanmedian(torch.where(valid, x, torch.full_like(x, float("nan"))), dim=1).values
        assert torch.equal(masked_lower_median(x, valid, dim=1), ref)
    x = torch.randn(3, 7, generator=g)
    assert torch.equal(masked_lower_median(x, torch.zeros_like(x, dtype=torch.bool), 1), torch.full((3,), float("inf")))
    for kind in ("ties", "spread"):  # ties, +-0, both signs over the whole float32 range; n even and odd
        for n in (3888, 3889):
            x = _hard_values(kind, (2, n, 3), g)
            valid = torch.rand(2, n, 3, generator=g) > 0.5
            ref = torch.nanmedian(torch.where(valid, x, torch.full_like(x, float("nan"))), dim=1).values
            assert torch.equal(masked_lower_median(x, valid, dim=1), ref), (kind, n)


def test_lower_median_equals_torch_median_bitwise(exporting):
    g = torch.Generator().manual_seed(3)
    for v in (1, 2, 3, 4, 8, 33):
        x = torch.rand(6, v, generator=g)
        assert torch.equal(lower_median(x, dim=1), torch.median(x, dim=1).values)
    x = _hard_values("ties", (4, 5000), g)
    assert torch.equal(lower_median(x, dim=1), torch.median(x, dim=1).values)


def test_sorted_quantiles_equal_torch_quantile(exporting):
    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 7, 4032):  # 4032 = the anchor statistics' points of 16 views at 504x378
        x = _hard_values("normal", (2, 3, n), g).clamp(-8, 8)
        ref = torch.quantile(x, torch.tensor([0.05, 0.5, 0.95]), dim=-1)
        assert torch.equal(sorted_quantiles(x, (0.05, 0.5, 0.95)), ref), n


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


def test_scene_normalization_equals_former_nanmedian_version(exporting):
    g = torch.Generator().manual_seed(4)
    pts = 5 * torch.randn(3, 4, 3, 28, 42, generator=g)
    pts[0, 1, :, 3:9, 5:20] = float("nan")  # holes
    pts[1, :, 2, :, :7] = float("inf")
    pts[2] = float("nan")  # a scene without any finite point
    c, s = scene_normalization(pts, (4, 6))
    c_ref, s_ref = _nanmedian_scene_normalization(pts, (4, 6))
    assert torch.equal(c, c_ref) and torch.equal(s, s_ref)
    assert torch.equal(c[2], torch.zeros(3)) and s[2].item() == 1.0


class _OrderStatistics(torch.nn.Module):
    """The two order-statistic entry points of the forward, as a graph of their own."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return masked_lower_median(x, valid, dim=1), sorted_quantiles(x[..., 0].clamp(-8, 8), (0.05, 0.5, 0.95))


def test_exported_order_statistics_are_exact_in_onnxruntime_without_topk(tmp_path):
    """The export path as onnxruntime runs it (opset 18): equal to torch's nanmedian / quantile on 5000
    points (above TensorRT's TopK limit) with ties, +-0 and both signs, and no TopK in the graph."""
    import onnx
    import onnxruntime as ort

    n = 5000
    program = torch.onnx.export(_OrderStatistics(), (torch.randn(2, n, 3), torch.ones(2, n, 3, dtype=torch.bool)),
                                dynamo=True, opset_version=18, optimize=True, verify=False)
    program.save(str(tmp_path / "order_statistics.onnx"))
    ops = {node.op_type for node in onnx.load(str(tmp_path / "order_statistics.onnx")).graph.node}
    assert "TopK" not in ops and "Sort" not in ops, ops
    sess = ort.InferenceSession(str(tmp_path / "order_statistics.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    g = torch.Generator().manual_seed(6)
    for kind in ("normal", "ties", "spread"):
        x = _hard_values(kind, (2, n, 3), g)
        valid = torch.rand(2, n, 3, generator=g) > 0.4
        valid[1, : n // 2 + 1] = False  # an even number of valid entries in one slice, odd in others
        median, quantiles = sess.run(None, {names[0]: x.numpy(), names[1]: valid.numpy()})
        ref = torch.nanmedian(torch.where(valid, x, torch.full_like(x, float("nan"))), dim=1).values
        assert torch.equal(torch.from_numpy(median), ref), kind
        if kind != "spread":  # the forward clamps to [-8, 8]; lerp across 1e-44..1e38 rounds differently in ORT
            ref_q = torch.quantile(x[..., 0].clamp(-8, 8), torch.tensor([0.05, 0.5, 0.95]), dim=-1)
            assert torch.equal(torch.from_numpy(quantiles), ref_q), kind
