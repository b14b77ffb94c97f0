"""Training: overfitting, exact resume, gradient accumulation, geometry losses, targets, CLI smoke run.

CPU, tiny configuration, 56x42 images (3 cameras x 1-2 frames) so the whole file runs in well under a
minute on 2 cores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fast3dis_ros.geometry.rotations import matrix_from_quat_xyzw
from fast3dis_ros.train.geometry_losses import (
    GeometryLoss,
    depth_loss,
    intrinsics_loss,
    pose_loss,
    rotation_geodesic,
)
from fast3dis_ros.train.targets import build_targets

H, W = 42, 56


def _rand_rot(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 3) float32 uniform random rotations from Gaussian quaternions, read as (w, x, y, z)."""
    g = torch.Generator().manual_seed(seed)
    q_wxyz = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return torch.from_numpy(matrix_from_quat_xyzw(q_wxyz[:, [1, 2, 3, 0]].numpy())).float()


def _geo_batch(B=2, V=3, h=14, w=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    depth = torch.rand(B, V, h, w, generator=g) * 3 + 0.5
    T = torch.eye(4).repeat(B, V, 1, 1)
    T[..., :3, :3] = _rand_rot(B * V, seed).reshape(B, V, 3, 3)
    T[..., :3, 3] = torch.randn(B, V, 3, generator=g)
    K = torch.tensor([[20.0, 0, 7], [0, 20.0, 7], [0, 0, 1]]).repeat(B, V, 1, 1)
    return depth, T, K


# ---------------------------------------------------------------------------------- geometry losses
def test_geometry_losses_zero_for_perfect_prediction():
    depth, T, K = _geo_batch()
    gl = GeometryLoss()
    out = gl({"depth": depth, "depth_conf": torch.ones_like(depth), "extrinsics": T, "intrinsics": K},
             {"depth": depth, "T_cam_world": T, "K": K})
    for k, v in out.items():
        assert float(v) < 1e-5, (k, float(v))
    # scale invariance: depth and translations scaled together by 3 -> still zero
    T3 = T.clone()
    T3[..., :3, 3] *= 3
    out = gl({"depth": depth * 3, "depth_conf": torch.ones_like(depth), "extrinsics": T3, "intrinsics": K},
             {"depth": depth, "T_cam_world": T, "K": K})
    assert float(out["loss_geometry"]) < 1e-4
    # a rigid change of world frame (both sides) leaves relative poses untouched
    Tw = torch.eye(4)
    Tw[:3, :3] = _rand_rot(1, 5)[0]
    Tw[:3, 3] = torch.tensor([1.0, -2.0, 0.5])
    lt, lr = pose_loss(T @ Tw, T)
    assert float(lt) < 1e-4 and float(lr) < 1e-3


def test_geometry_losses_positive_for_wrong_prediction():
    depth, T, K = _geo_batch()
    noisy = depth * (1 + 0.3 * torch.rand_like(depth))
    assert float(depth_loss(noisy, depth)) > 0.01
    T2 = T.clone()
    T2[:, 1:, :3, 3] += 0.5
    lt, lr = pose_loss(T2, T)
    assert float(lt) > 0.1 and float(lr) < 1e-3
    T3 = T.clone()
    T3[:, 1:, :3, :3] = _rand_rot(4, 9).reshape(2, 2, 3, 3)
    lt, lr = pose_loss(T3, T)
    assert float(lr) > 0.1
    assert float(intrinsics_loss(K * 1.2, K, (14, 14))) > 0.1
    # confidence-weighted variant: loss c|r| - a log c is minimised near c = a/|r| (DA3 style)
    c = torch.full_like(depth, 2.0, requires_grad=True)
    l = depth_loss(noisy, depth, conf=c)
    l.backward()
    assert torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0


def test_rotation_geodesic_matches_angle_and_has_finite_grads():
    R = _rand_rot(1, 3)[0]
    for ang in (0.0, 0.3, 1.5, 3.0):
        Rz = torch.tensor([[math.cos(ang), -math.sin(ang), 0], [math.sin(ang), math.cos(ang), 0], [0, 0, 1.0]])
        assert abs(float(rotation_geodesic(R, R @ Rz)) - ang) < 1e-3
    Rp = R.clone().requires_grad_(True)
    rotation_geodesic(Rp, R).backward()
    assert torch.isfinite(Rp.grad).all()


# ---------------------------------------------------------------------------------- targets
def test_build_targets_masks_ids_and_small_objects():
    inst = torch.zeros(2, 3, 28, 28, dtype=torch.int32)
    inst[0, :, 4:12, 4:12] = 5  # 2x2 cells at 7x7
    inst[0, 1, 20, 20] = 7  # single pixel: kept through the nearest/argmax fallback
    inst[1, 2, :, :14] = 3
    t = build_targets(inst, (7, 7))
    assert t[0]["ids"].tolist() == [5, 7] and t[1]["ids"].tolist() == [3]
    assert t[0]["masks"].shape == (2, 3, 7, 7) and t[0]["masks"].dtype == torch.bool
    assert t[0]["masks"][0].sum().item() == 3 * 4
    assert t[0]["masks"][1].sum().item() == 1 and t[0]["masks"][1, 1].sum().item() == 1
    # columns 0..13 of 28 at 7x7 (4 px per cell): cells 0-2 fully covered, cell 3 exactly half (min_cover 0.5: in)
    assert t[1]["masks"][0, 2, :, :4].all() and not t[1]["masks"][0, 2, :, 4:].any()
    assert not t[1]["masks"][0, :2].any()
    t = build_targets(inst, (7, 7), max_instances=1)
    assert t[0]["ids"].tolist() == [5]


# ---------------------------------------------------------------------------------- trainer helpers
@pytest.fixture(scope="module")
def scenes():
    from fast3dis_ros.train.train import make_synthetic_scenes

    return make_synthetic_scenes([11, 12], cameras=3, frames=2, height=H, width=W, n_objects=6)


def _trainer(scenes, tmp_path, *, steps, n_scenes=1, frames=1, augment=False, lr=2e-3, accum=1, bs=1,
             geometry=True, warmup=2):
    from fast3dis_ros.model.config import Fast3disConfig
    from fast3dis_ros.train.data import SceneWindowDataset, TrainSampleDataset
    from fast3dis_ros.train.loop import TrainConfig, Trainer

    cfg = Fast3disConfig.tiny(process_res=W)
    base = SceneWindowDataset(scenes[:n_scenes], frames_per_sample=frames, window_step=100)
    ds = TrainSampleDataset(base, (H, W), augment=augment)
    tc = TrainConfig(steps=steps, batch_size=bs, accum_steps=accum, lr=lr, warmup_steps=warmup,
                     full_finetune=True, geometry_loss_weight=1.0 if geometry else 0.0, device="cpu",
                     amp="none", seed=0, progress=False, plot=False, log_every=0, out=str(tmp_path),
                     deterministic=True)
    return Trainer(cfg, tc, ds, None)


def test_overfit_one_sample_reduces_loss(scenes, tmp_path):
    tr = _trainer(scenes, tmp_path, steps=30, lr=3e-3)
    tr.fit()
    losses = [r["loss"] for r in tr.history]
    assert len(losses) == 30 and all(np.isfinite(losses))
    first, last = losses[0], float(np.mean(losses[-3:]))
    assert last < 0.7 * first, (first, last)
    # the geometry terms learn too
    assert tr.history[-1]["loss_depth"] < tr.history[0]["loss_depth"]


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resume_matches_uninterrupted_run(scenes, tmp_path):
    a = _trainer(scenes, tmp_path / "a", steps=4, n_scenes=2, augment=True)
    a.fit()
    b = _trainer(scenes, tmp_path / "b", steps=4, n_scenes=2, augment=True)
    b.fit(stop_at=2)
    assert b.step == 2 and (tmp_path / "b" / "train_state.pt").is_file()
    c = _trainer(scenes, tmp_path / "b", steps=4, n_scenes=2, augment=True)
    c.load(tmp_path / "b")
    assert c.step == 2
    c.fit()
    pa, pc = _params(a.model), _params(c.model)
    for n in pa:
        assert torch.allclose(pa[n], pc[n], atol=1e-5, rtol=1e-4), n
    # the log of the resumed run holds each step once
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    la = [r["loss"] for r in a.history]
    lc = [json.loads(l)["loss"] for l in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert np.allclose(la, lc, rtol=1e-4)


def test_grad_accumulation_equals_larger_batch(scenes, tmp_path):
    from fast3dis_ros.train.data import collate

    tr = _trainer(scenes, tmp_path, steps=1)
    s = tr.train_set[(0, 1)]
    # the same sample twice: the set loss normalises by the number of GT masks over the batch, so
    # 2 x batch 1 equals batch 2 exactly only when both halves hold the same number of instances
    tr.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    tr.accumulate([collate([s, s])])
    g_batch = {n: p.grad.clone() for n, p in tr.named_trainable if p.grad is not None}
    tr.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    tr.accumulate([collate([s]), collate([s])])
    g_acc = {n: p.grad.clone() for n, p in tr.named_trainable if p.grad is not None}
    assert g_batch.keys() == g_acc.keys() and len(g_batch) > 10
    num = sum(float((g_batch[n] - g_acc[n]).norm() ** 2) for n in g_batch) ** 0.5
    den = sum(float(g_batch[n].norm() ** 2) for n in g_batch) ** 0.5
    assert den > 0 and num / den < 1e-3, num / den


# ---------------------------------------------------------------------------------- CLI
def test_cli_smoke_run(tmp_path):
    from fast3dis_ros.train.train import main

    out = tmp_path / "ckpt"
    summary = main(["--synthetic", "2", "--steps", "3", "--size", "tiny", "--device", "cpu", "--out", str(out),
                    "--height", "42", "--width", "56", "--no-progress", "--val-seeds", "900000",
                    "--export", str(tmp_path / "export")])
    for f in ("config.json", "model.safetensors", "train_state.pt", "train_log.jsonl"):
        assert (out / f).is_file(), f
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 3
    recs = [json.loads(l) for l in lines]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in recs)
    assert summary["val"] and np.isfinite(summary["val"]["val_loss"])
    # the exported fp16 checkpoint loads through model/checkpoint.py
    from fast3dis_ros.model.checkpoint import load_checkpoint

    model, cfg = load_checkpoint(tmp_path / "export")
    imgs = torch.zeros(1, 3, 3, H, W)
    with torch.no_grad():
        o = model(imgs)
    assert o["pred_masks"].shape[:2] == (1, cfg.head.num_queries)
    # resume to 5 steps continues the log
    main(["--synthetic", "2", "--steps", "5", "--size", "tiny", "--device", "cpu", "--out", str(out),
          "--height", "42", "--width", "56", "--no-progress", "--val-seeds", "", "--resume"])
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 5
