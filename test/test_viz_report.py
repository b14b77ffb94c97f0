"""Renders, PNG panels, PLY io (fast3dis_ros.eval.viz) and the report writer (fast3dis_ros.eval.report)."""

import json
import time

import numpy as np
import pytest
from PIL import Image

from fast3dis_ros.eval.metrics import depth_metrics, instance_ap
from fast3dis_ros.eval.report import curves_from_results, write_report
from fast3dis_ros.eval.viz import (
    BACKGROUND_COLOR,
    colorize_labels,
    depth_to_color,
    label_color,
    look_at_camera,
    read_ply,
    render_cloud_perspective_png,
    render_cloud_topdown_png,
    save_masks_comparison_png,
    save_views_png,
    write_ply,
)


def test_label_colors_stable_and_distinct():
    lab = np.array([[0, 1, 2], [3, 1, 0]])
    c = colorize_labels(lab)
    assert c.shape == (2, 3, 3) and c.dtype == np.uint8
    assert (c[0, 0] == BACKGROUND_COLOR).all() and (c[1, 2] == BACKGROUND_COLOR).all()
    assert (c[0, 1] == c[1, 1]).all()
    cols = label_color(np.arange(1, 41))
    assert len({tuple(x) for x in cols}) == 40  # 40 distinct colours
    assert (colorize_labels(np.array([7]))[0] == label_color(7)).all()  # independent of other ids


def test_depth_to_color():
    d = np.linspace(1, 5, 20).reshape(4, 5).astype(np.float32)
    d[0, 0] = 0
    c = depth_to_color(d)
    assert c.shape == (4, 5, 3) and (c[0, 0] == 0).all()
    assert not (c[3, 4] == c[1, 1]).all()


def test_panels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (3, 20, 30, 3), dtype=np.uint8)
    p = save_views_png(imgs, tmp_path / "views.png")
    assert Image.open(p).size == (2 * 30 + 3 * 4, 2 * 20 + 3 * 4)
    gt = np.zeros((3, 20, 30), np.int32)
    gt[:, 5:15, 5:15] = 2
    pred = gt[:, ::2, ::2]  # low-resolution prediction
    p = save_masks_comparison_png(imgs, pred, gt, tmp_path / "cmp.png")
    im = np.asarray(Image.open(p))
    assert im.shape == (3 * 20 + 4 * 4, 3 * 30 + 4 * 4, 3)
    # column 2 (pred overlay) at an object pixel is blended toward label 2's colour
    y, x = 4 + 10, 4 + 30 + 4 + 10
    expect = np.round(0.45 * imgs[0, 10, 10].astype(float) + 0.55 * label_color(2).astype(float))
    assert np.abs(im[y, x].astype(float) - expect).max() <= 1
    assert (im[4 + 0, 4 + 30 + 4 + 0] == imgs[0, 0, 0]).all()  # label 0 leaves rgb unchanged


def _cloud():
    """Three separated squares of points on the plane z = 4, labels 1..3."""
    pts, lab = [], []
    for k, cx in enumerate([-1.5, 0.0, 1.5]):
        g = np.stack(np.meshgrid(np.linspace(-0.3, 0.3, 30), np.linspace(-0.3, 0.3, 30)), -1).reshape(-1, 2)
        pts.append(np.c_[g[:, 0] + cx, g[:, 1], np.full(len(g), 4.0)])
        lab.append(np.full(len(g), k + 1))
    return np.concatenate(pts), np.concatenate(lab)


def test_perspective_render_colors_at_projected_points(tmp_path):
    xyz, lab = _cloud()
    cols = label_color(lab)
    W, H = 160, 120
    K = np.array([[80.0, 0, W / 2], [0, 80.0, H / 2], [0, 0, 1]])
    T = np.eye(4)
    img = render_cloud_perspective_png(xyz, cols, tmp_path / "p.png", camera={"K": K, "T_cam_world": T}, size=(W, H))
    assert Image.open(tmp_path / "p.png").size == (W, H)
    assert np.asarray(Image.open(tmp_path / "p.png")).tolist() == img.tolist()
    bg = np.array([255, 255, 255])
    assert (img != bg).any(axis=-1).mean() > 0.025  # 3 squares of ~13x13 px (+ splat growth)
    for k, cx in enumerate([-1.5, 0.0, 1.5]):  # square centres project to u = 80 + 20 cx, v = 60
        u, v = int(80 * cx / 4 + W / 2), int(H / 2)
        assert (img[v, u] == label_color(k + 1)).all()
    assert (img[5, 5] == bg).all()
    # a nearer point occludes: put a label-9 point right in front of the middle square's centre
    img2 = render_cloud_perspective_png(np.r_[xyz, [[0.0, 0.0, 2.0]]], np.r_[cols, label_color([9])], tmp_path / "p2.png", camera={"K": K, "T_cam_world": T}, size=(W, H), point_radius=0)
    assert (img2[60, 80] == label_color(9)).all()
    # automatic camera and look_at: the cloud is in view
    img3 = render_cloud_perspective_png(xyz, cols, tmp_path / "p3.png", size=(200, 150))
    assert img3.shape == (150, 200, 3) and (img3 != bg).any(axis=-1).mean() > 0.02
    Tl = look_at_camera([0, 0, 0], [0, 0, 5])
    assert np.allclose(Tl, np.eye(4))


def test_topdown_render(tmp_path):
    xyz, lab = _cloud()
    # lay the squares on the ground y = 1 (OpenCV world: up = -y); x across, z depth
    ground = np.c_[xyz[:, 0], np.ones(len(xyz)), xyz[:, 1] + 4.0]
    img = render_cloud_topdown_png(ground, label_color(lab), tmp_path / "t.png", size=(300, 200), margin=0.0)
    assert img.shape == (200, 300, 3) and Image.open(tmp_path / "t.png").size == (300, 200)
    # x spans [-1.8, 1.8] over the 200 px short side... scale = 200 / 3.6, centre column 150
    s = 200 / 3.6
    for k, cx in enumerate([-1.5, 0.0, 1.5]):
        assert (img[100, int(150 + cx * s)] == label_color(k + 1)).all()


def test_million_point_render_is_fast(tmp_path):
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(1_000_000, 3)) + [0, 0, 5]
    cols = rng.integers(0, 255, (1_000_000, 3), dtype=np.uint8)
    t = time.perf_counter()
    render_cloud_perspective_png(xyz, cols, tmp_path / "big.png", size=(640, 480))
    assert time.perf_counter() - t < 10.0


def test_ply_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n = 1234
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    inst = rng.integers(0, 2**32 - 1, n, dtype=np.uint64).astype(np.uint32)
    score = rng.random(n).astype(np.float32)
    p = write_ply(tmp_path / "c.ply", xyz, rgb, inst, score)
    with open(p, "rb") as f:
        head = f.read(400).split(b"end_header\n")[0].decode()
    assert "binary_little_endian" in head and "property uint instance" in head and "property float score" in head
    d = read_ply(p)
    assert d["xyz"].shape == (n, 3) and np.array_equal(d["xyz"], xyz)
    assert np.array_equal(d["rgb"], rgb) and np.array_equal(d["instance"], inst) and np.array_equal(d["score"], score)
    assert d["instance"].dtype == np.uint32
    p2 = write_ply(tmp_path / "xyz.ply", xyz)
    d2 = read_ply(p2)
    assert set(d2) == {"xyz"} and np.array_equal(d2["xyz"], xyz)
    (tmp_path / "a.ply").write_text("ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\nproperty uint instance\nend_header\n1 2 3 4\n5 6 7 8\n")
    d3 = read_ply(tmp_path / "a.ply")
    assert d3["xyz"].tolist() == [[1, 2, 3], [5, 6, 7]] and d3["instance"].tolist() == [4, 8]


def test_write_report(tmp_path):
    gt = np.repeat(np.arange(4), 10)
    ap_a = instance_ap([(gt.copy(), np.array([0.9, 0.8, 0.7]), gt)])
    pred_b = np.where(gt == 3, 0, gt)
    ap_b = instance_ap([(pred_b, np.array([0.9, 0.8, 0.7]), gt)])
    dep = depth_metrics(np.full((1, 4, 4), 2.2), np.full((1, 4, 4), 2.0), scale="none", return_errors=True)
    metrics = {
        "methods": {
            "fast3dis": {k: ap_a[k] for k in ("AP", "AP50", "AP25")} | {"depth": {k: dep[k] for k in ("abs_rel", "delta1")}, "pose": {"auc3": 0.5, "auc30": 0.9}},
            "hdbscan": {k: ap_b[k] for k in ("AP", "AP50", "AP25")} | {"x": np.float32(np.nan)},
        },
        "meta": {"bag": "run.mcap", "views": np.int64(8)},
    }
    curves = {"fast3dis": curves_from_results(ap_a, dep), "hdbscan": curves_from_results(ap_b)}
    files = write_report(metrics, tmp_path / "rep", curves=curves)
    names = sorted(p.split("/")[-1] for p in files)
    assert names == sorted(["metrics.json", "report.md", "ap_bars.png", "pr_iou50.png", "pr_iou25.png", "depth_abs_rel_hist.png"])
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["methods"]["fast3dis"]["AP"] == pytest.approx(1.0) and m["methods"]["hdbscan"]["x"] is None
    assert m["methods"]["hdbscan"]["AP50"] == pytest.approx(ap_b["AP50"]) and m["meta"]["views"] == 8
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| fast3dis | 100.0 | 100.0 | 100.0 |" in md and "hdbscan" in md and "![pr_iou50.png]" in md
    for f in files:
        if f.endswith(".png"):
            im = np.asarray(Image.open(f).convert("RGB"))
            assert im.shape[0] > 100 and (im != 255).any()
    # a flat single-method dict works too
    files2 = write_report({"AP": 0.5, "AP50": 0.7, "AP25": 0.8}, tmp_path / "flat")
    assert any(f.endswith("ap_bars.png") for f in files2)
