"""Fast3DIS assembly on the tiny config: output contract, world frame, known cameras, training split."""

import pytest
import torch

from fast3dis_ros.model.da3.backbone import build_da3_net
from fast3dis_ros.model.config import Fast3disConfig
from fast3dis_ros.model.fast3dis import Fast3DIS, normalize_extrinsics, unproject_depth

H, W = 42, 56


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Fast3disConfig.tiny()
    cfg.train_backbone = False
    return Fast3DIS(cfg).eval()


def images(V, seed=1):
    return torch.randn(1, V, 3, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("V", [1, 2, 5])
def test_output_contract(model, V):
    with torch.no_grad():
        out = model(images(V))
    Q = model.cfg.head.num_queries
    assert out["depth"].shape == (1, V, H, W) and out["depth_conf"].shape == (1, V, H, W)
    assert out["intrinsics"].shape == (1, V, 3, 3) and out["extrinsics"].shape == (1, V, 4, 4)
    assert out["pred_logits"].shape == (1, Q)
    pm = out["pred_masks"]
    assert pm.shape[:3] == (1, Q, V) and pm.shape[3:] == (H // model.cfg.head.mask_stride, W // model.cfg.head.mask_stride)
    assert out["anchors"].shape == (1, Q, 3)
    assert len(out["aux_outputs"]) == model.cfg.head.num_decoder_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (1, Q) and aux["pred_masks"].shape == pm.shape
    # world = view 0's camera
    assert torch.equal(out["extrinsics"][0, 0], torch.eye(4))
    assert not out["metric"].item()
    for k in ("depth", "pred_logits", "pred_masks", "anchors"):
        assert torch.isfinite(out[k]).all(), k


def test_geometry_is_plain_da3(model):
    plain = build_da3_net(model.cfg.backbone).eval()
    plain.load_state_dict(model.backbone.da3_state_dict())
    x = images(3)
    with torch.no_grad():
        ref = plain(x)
        out = model(x)
    assert torch.equal(out["depth"], ref["depth"]) and torch.equal(out["depth_conf"], ref["depth_conf"])
    assert torch.equal(out["intrinsics"], ref["intrinsics"])
    # DA3's extrinsics re-expressed relative to view 0 (DA3's world is its reference view)
    T = torch.cat([ref["extrinsics"], torch.tensor([[[[0.0, 0, 0, 1]]]]).expand(1, 3, 1, 4)], 2)
    rel = T @ torch.linalg.inv(T[:, :1])
    torch.testing.assert_close(out["extrinsics"], rel, rtol=1e-4, atol=1e-5)


def test_unproject_roundtrip():
    K = torch.tensor([[50.0, 0, 27.5], [0, 50, 20.5], [0, 0, 1]]).expand(1, 2, 3, 3)
    T = torch.eye(4).repeat(1, 2, 1, 1)
    T[0, 1, :3, 3] = torch.tensor([0.5, 0.0, 0.1])
    depth = torch.rand(1, 2, H, W) + 1.0
    pts = unproject_depth(depth, K, T)  # (1,2,3,H,W) world
    p_cam = torch.einsum("vij,vjhw->vihw", T[0, :, :3, :3], pts[0]) + T[0, :, :3, 3, None, None]
    torch.testing.assert_close(p_cam[:, 2], depth[0])
    u = p_cam[:, 0] / p_cam[:, 2] * 50 + 27.5
    torch.testing.assert_close(u[0, 0], torch.arange(W, dtype=torch.float32), rtol=0, atol=1e-4)


def test_known_cameras(model):
    V = 3
    x = images(V)
    K = torch.tensor([[40.0, 0, 27.5], [0, 40, 20.5], [0, 0, 1]]).expand(1, V, 3, 3).clone()
    T = torch.eye(4).repeat(1, V, 1, 1)
    T[0, :, 0, 3] = torch.tensor([2.0, 1.0, -1.0])  # metric poses, not normalised
    Tn, med = normalize_extrinsics(T)
    assert torch.allclose(Tn[:, 0], torch.eye(4)) and med.item() == pytest.approx(1.0)
    with torch.no_grad():
        out = model(x, K=K, T_cam_world=T)
        free = model(x)
    assert torch.equal(out["extrinsics"], T) and torch.equal(out["intrinsics"], K)
    assert out["metric"].item()
    assert not torch.allclose(out["depth"], free["depth"])
    assert out["points_world"].shape == (1, V, 3, H, W)
    with pytest.raises(ValueError):
        model(x, T_cam_world=T)


def test_known_pose_depth_follows_the_pose_units(model):
    """Known poses in other units (the same rig, translations x 2.5) give depth x 2.5: the network sees the
    same normalised cameras (median camera distance 1), and ``Fast3DIS.forward`` maps its depth back to the
    poses' units (``* med``). Without that rescaling both depths would be equal."""
    V = 3
    x = images(V, seed=4)
    K = torch.tensor([[40.0, 0, 27.5], [0, 40, 20.5], [0, 0, 1]]).expand(1, V, 3, 3).clone()
    T = torch.eye(4).repeat(1, V, 1, 1)
    T[0, :, :3, 3] = torch.tensor([[0.0, 0.0, 0.0], [0.8, 0.1, 0.0], [-0.3, 0.6, 0.2]])
    T_big = T.clone()
    T_big[..., :3, 3] *= 2.5
    assert normalize_extrinsics(T_big)[1].item() == pytest.approx(2.5 * normalize_extrinsics(T)[1].item())
    with torch.no_grad():
        out, big = model(x, K=K, T_cam_world=T), model(x, K=K, T_cam_world=T_big)
    torch.testing.assert_close(big["depth"], 2.5 * out["depth"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(big["points_world"], 2.5 * out["points_world"], rtol=1e-4, atol=1e-4)
    assert torch.equal(big["extrinsics"], T_big)


def test_view_permutation(model):
    """>= 3 views: depth/conf permute with the views (DA3 picks its reference by content). Masks do not
    simply permute: the head's world frame is view 0's camera, which changes with the order."""
    x = images(4, seed=5)
    perm = torch.tensor([3, 1, 0, 2])
    with torch.no_grad():
        a = model(x)
        b = model(x[:, perm])
    torch.testing.assert_close(b["depth"], a["depth"][:, perm], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b["depth_conf"], a["depth_conf"][:, perm], rtol=1e-4, atol=1e-4)
    assert b["pred_masks"].shape == a["pred_masks"].shape


def test_trainable_split_and_gradients():
    torch.manual_seed(1)
    cfg = Fast3disConfig.tiny()
    cfg.train_backbone = False
    m = Fast3DIS(cfg)
    train = m.trainable_parameters()
    ids = {id(p) for p in train}
    names = {n for n, p in m.named_parameters() if id(p) in ids}
    assert all(n.startswith("head.") or "lora_" in n for n in names)
    assert any("lora_" in n for n in names) and any(n.startswith("head.") for n in names)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == names
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = m(images(2))
    loss = out["pred_logits"].sigmoid().mean() + out["pred_masks"].sigmoid().mean()
    loss.backward()
    lora_grads = [p.grad for n, p in m.named_parameters() if "lora_" in n]
    assert all(g is not None for g in lora_grads) and sum(g.abs().sum() for g in lora_grads) > 0
    assert all(p.grad is None for n, p in m.named_parameters() if n.startswith("backbone.") and "lora_" not in n)
    # tiny end-to-end: everything trains
    cfg2 = Fast3disConfig.tiny()
    assert cfg2.train_backbone
    m2 = Fast3DIS(cfg2)
    assert len(m2.trainable_parameters()) == len(list(m2.parameters()))
