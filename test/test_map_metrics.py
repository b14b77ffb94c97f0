"""Map-cloud metrics, the oracle error budget and fast3dis-eval's new options (issue 16)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from fast3dis_ros.data.bags import GroundTruth, write_scene_bag
from fast3dis_ros.eval.map_metrics import GTSurface, fit_map_sim3, id_switches, linking_stats, score_map_cloud
from fast3dis_ros.eval.oracle import (ISSUE_TABLE_CONFIGS, OraclePredictor, all_oracle_configs, apply_oracle,
                                      parse_oracle)
from fast3dis_ros.geometry.align import sim3_matrix
from fast3dis_ros.core.frames import InstanceCloud, WindowPrediction


# ---------------------------------------------------------------------------------------------- fixtures
def _surface() -> tuple[GTSurface, np.ndarray, np.ndarray]:
    """A 4 x 4 m floor (background) with two 0.6 m cubes (GT 1, 2) on it, sampled every 2 cm."""
    g = np.arange(-2, 2, 0.02)
    fx, fy = np.meshgrid(g, g)
    floor = np.stack([fx.ravel(), fy.ravel(), np.zeros(fx.size)], 1)
    pts, lab = [floor], [np.zeros(len(floor), np.int64)]
    s = np.arange(0, 0.6, 0.02)
    a, b = np.meshgrid(s, s)
    for gid, x0 in ((1, -1.0), (2, 0.8)):
        faces = [np.stack([x0 + a.ravel(), b.ravel(), 0.6 + 0 * a.ravel()], 1),
                 np.stack([x0 + a.ravel(), 0 * a.ravel(), b.ravel()], 1),
                 np.stack([x0 + 0 * a.ravel(), a.ravel(), b.ravel()], 1)]
        f = np.concatenate(faces)
        pts.append(f)
        lab.append(np.full(len(f), gid))
    xyz, lab = np.concatenate(pts), np.concatenate(lab)
    from fast3dis_ros.eval.metrics import _voxel_majority, _voxelize

    vox, M = _voxelize(xyz, 0.05)
    n = np.bincount(vox, minlength=M)
    cxyz = np.stack([np.bincount(vox, weights=xyz[:, k], minlength=M) for k in range(3)], 1) / n[:, None]
    return GTSurface(cxyz, _voxel_majority(vox, lab, M), 0.05, xyz), xyz, lab


def _cloud(xyz, ids) -> InstanceCloud:
    return InstanceCloud("map", 0, np.asarray(xyz, np.float32), np.zeros((len(xyz), 3), np.uint8),
                         np.asarray(ids, np.uint32), np.full(len(xyz), 0.9, np.float32))


IDENT = (1.0, np.eye(3), np.zeros(3))


# ---------------------------------------------------------------------------------------------- map metrics
def test_perfect_map_scores_full_marks():
    surf, xyz, lab = _surface()
    r = score_map_cloud(_cloud(xyz, np.where(lab > 0, lab + 10, 0)), surf, IDENT)
    assert r["AP50"] == pytest.approx(1.0) and r["AP"] == pytest.approx(1.0)
    g, i = r["geometry"], r["instances"]
    assert g["pct_points_within_5cm"] == 1.0 and g["pct_gt_surface_covered"] == 1.0 and g["chamfer_m"] < 0.02
    assert (i["splits"], i["merges"], i["gt_objects"], i["map_ids"]) == (0, 0, 2, 2)
    assert i["unassigned_frac"] == 0.0


def test_map_in_a_scaled_frame_is_scored_after_its_sim3():
    """The map is the GT scene at half scale, rotated and shifted; the inverse Sim(3) gives full marks, the
    identity gives nothing (points far from the GT surface)."""
    surf, xyz, lab = _surface()
    R = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    t = np.array([3.0, -1.0, 0.5])
    map_xyz = 0.5 * xyz @ R.T + t
    inv = (2.0, R.T, -2.0 * R.T @ t)
    good = score_map_cloud(_cloud(map_xyz, lab), surf, inv)
    bad = score_map_cloud(_cloud(map_xyz, lab), surf, IDENT)
    assert good["AP50"] == pytest.approx(1.0) and good["geometry"]["pct_points_within_10cm"] == 1.0
    assert bad["AP50"] == 0.0 and bad["geometry"]["pct_points_within_10cm"] < 0.05


def test_splits_merges_offsets_and_missing_parts_are_counted():
    surf, xyz, lab = _surface()
    # object 1 split in two ids along z (id 5: top face + upper sides, id 6: lower sides), and id 6 also
    # covers all of object 2 (a merge)
    ids = np.where(lab == 1, np.where(xyz[:, 2] > 0.3, 5, 6), 0)
    ids = np.where(lab == 2, 6, ids)
    r = score_map_cloud(_cloud(xyz, ids), surf, IDENT)
    assert r["instances"]["splits"] == 1 and r["instances"]["merges"] == 1
    assert r["instances"]["gt_objects_split"] == 1 and r["instances"]["map_ids_merged"] == 1
    # IoU ~0.67 (object 1 / id 5) and ~0.75 (object 2 / id 6): both match at 0.5, neither at 0.8 and above
    assert r["AP50"] == pytest.approx(1.0) and r["AP"] < 0.65
    # a map of object 1 alone: object 2's GT voxels are uncovered, stay in the point set and cost recall
    keep = lab == 1
    r2 = score_map_cloud(_cloud(xyz[keep], lab[keep]), surf, IDENT)
    assert r2["instances"]["uncovered_frac"] == pytest.approx(0.5, abs=0.05)
    assert r2["n_gt"] == 2 and r2["AP50"] == pytest.approx(0.5, abs=0.01)
    # the whole map 25 cm off the surface (beyond tau = 10 cm): every label is background, AP 0
    r3 = score_map_cloud(_cloud(xyz + [0, 0, 0.25], lab), surf, IDENT)
    assert r3["AP50"] == 0.0 and r3["geometry"]["pct_points_within_10cm"] < 0.2


def test_linking_rate_and_id_switches():
    recs = [SimpleNamespace(fusion=SimpleNamespace(id_map=m)) for m in
            ({1: 1, 2: 2}, {1: 1, 2: 3, 3: 4}, {1: 2, 2: 4, 3: 5})]
    assert linking_stats(recs) == {"window_instances": 6, "linked": 3, "rate": 0.5}
    assert id_switches([{1: 1, 2: 2}, {1: 1, 2: 3}, {1: 4, 2: 3, 3: 9}])["id_switches"] == 2


def test_sim3_fit_recovers_scale_from_fused_camera_poses():
    rng = np.random.default_rng(0)
    S = sim3_matrix(2.5, np.eye(3), [1.0, 2.0, 0.0])  # GT <- map
    gt = GroundTruth()
    cams, stamps, T_map_cam = [], [], []
    for k in range(5):
        T = np.eye(4)
        T[:3, 3] = rng.uniform(-2, 2, 3)
        gt.T_world_cam.setdefault("c", {})[k] = T
        Tm = T.copy()
        Tm[:3, 3] = (np.linalg.inv(S) @ np.append(T[:3, 3], 1))[:3]
        cams.append("c"), stamps.append(k), T_map_cam.append(Tm)
    rec = SimpleNamespace(prediction=SimpleNamespace(cameras=cams, view_stamps_ns=stamps),
                          fusion=SimpleNamespace(T_map_cam=np.stack(T_map_cam)))
    fit = fit_map_sim3([rec], gt)
    assert fit["scale"] == pytest.approx(2.5) and fit["residual_m"] < 1e-9 and fit["n_views"] == 5


# ---------------------------------------------------------------------------------------------- oracle
def test_parse_oracle():
    assert parse_oracle("poses, masks") == ("masks", "poses")
    assert parse_oracle("all") == ("masks", "depth", "poses") and parse_oracle("none") == ()
    with pytest.raises(ValueError, match="unknown oracle part"):
        parse_oracle("masks,normals")
    assert len(all_oracle_configs()) == 8 and () in all_oracle_configs()
    assert set(ISSUE_TABLE_CONFIGS) <= set(all_oracle_configs())


def _pred_and_gt(V=2, h=6, w=8, H=12, W=16):
    gt = GroundTruth()
    rng = np.random.default_rng(1)
    K = np.array([[20.0, 0, 7.5], [0, 20.0, 5.5], [0, 0, 1]])
    for v in range(V):
        ins = np.zeros((H, W), np.int32)
        ins[:, :6], ins[:, 10:] = 7, 3
        gt.instance.setdefault(f"c{v}", {})[100] = ins
        gt.depth.setdefault(f"c{v}", {})[100] = np.full((H, W), 2.0 + v, np.float32)
        T = np.eye(4)
        T[:3, 3] = [v, 0, 0]
        gt.T_world_cam.setdefault(f"c{v}", {})[100] = T
        gt.K[f"c{v}"] = K
    pred = WindowPrediction(0, 100, [f"c{v}" for v in range(V)], [f"c{v}" for v in range(V)], [100] * V,
                            np.zeros((V, h, w, 3), np.uint8), rng.uniform(1, 3, (V, h, w)).astype(np.float32),
                            np.ones((V, h, w), np.float32), np.repeat(np.eye(3)[None], V, 0),
                            np.repeat(np.eye(4)[None], V, 0), rng.integers(0, 3, (V, h, w)).astype(np.int32),
                            np.array([0.8, 0.6], np.float32))
    return pred, gt


def test_oracle_replaces_exactly_the_named_parts():
    pred, gt = _pred_and_gt()
    rng = np.random.default_rng(0)
    d = apply_oracle(pred, gt, ("depth",), rng)
    np.testing.assert_array_equal(d.depth[1], 3.0)
    np.testing.assert_array_equal(d.labels, pred.labels)
    np.testing.assert_array_equal(d.T_cam_world, pred.T_cam_world)
    p = apply_oracle(pred, gt, ("poses",), rng)
    assert p.T_cam_world[1][0, 3] == -1.0 and p.K[0][0, 0] == pytest.approx(10.0)  # GT K at half resolution
    np.testing.assert_array_equal(p.depth, pred.depth)
    m = apply_oracle(pred, gt, ("masks",), rng)
    assert m.n_instances == 2 and set(np.unique(m.labels).tolist()) == {0, 1, 2}  # 0: GT background
    # the GT partition, under window-local ids
    assert len(np.unique(m.labels[:, :, :3])) == 1 and len(np.unique(m.labels[:, :, 5:])) == 1
    assert m.labels[0, 0, 0] != m.labels[0, 0, -1]
    assert pred.depth[1, 0, 0] != 3.0  # the input prediction is untouched


def test_oracle_mask_ids_are_shuffled_per_window():
    pred, gt = _pred_and_gt()
    firsts = set()
    orc = OraclePredictor(SimpleNamespace(predict=lambda w: pred), gt, ("masks",), seed=0)
    for k in range(12):
        firsts.add(int(orc.predict(SimpleNamespace(index=k)).labels[0, 0, 0]))
    assert firsts == {1, 2}  # the id of GT object 7 varies between windows
    assert orc.stats["views_replaced"] == 24


# ---------------------------------------------------------------------------------------------- fast3dis-eval
@pytest.fixture(scope="module")
def tiny_bag(tmp_path_factory):
    from fast3dis_ros.data.synthetic import SceneConfig, generate_scene

    root = tmp_path_factory.mktemp("bags")
    scene = generate_scene(SceneConfig(n_cameras=2, n_frames=6, width=112, height=84, seed=7020))
    write_scene_bag(scene, root / "gt")
    write_scene_bag(scene, root / "nogt", ground_truth=False)
    return root


def test_eval_oracle_table_and_map_metrics(tiny_bag, tmp_path, capsys):
    from fast3dis_ros.eval.evaluate import run

    out = tmp_path / "o"
    rc = run(["--bag", str(tiny_bag / "gt"), "--out", str(out), "--oracle", "masks,depth,poses", "--oracle-table",
              "issue", "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    f = m["methods"]["fast3dis"]
    assert m["meta"]["oracle"] == "masks+depth+poses" and m["meta"]["oracle_stats"]["views_without_gt"] == 0
    # all-GT: the published map is metric, on the GT surface, and scores like the lifted labels
    assert f["map_cloud"]["AP50"] > 0.9 and f["map_cloud"]["sim3"]["scale"] == pytest.approx(1.0, abs=1e-6)
    assert f["map_cloud"]["geometry"]["pct_points_within_5cm"] > 0.98
    # 2 windows of 4 frame sets x 2 cameras (6 frame sets, stride 2): per-window AP scores every view of every
    # window (12 distinct views, 16 window views)
    assert f["AP_per_window"]["n_views"] == 2 * 4 * 2
    rows = {r["oracle"]: r for r in m["oracle_table"]}
    assert set(rows) == {"masks+depth+poses", "depth+poses", "masks", "none"}
    assert rows["masks+depth+poses"]["map_AP50"] > 0.9 > rows["none"]["map_AP50"]
    assert rows["masks+depth+poses"]["linking"]["rate"] > 0.7
    report = (out / "report.md").read_text()
    assert "Error budget" in report and "Published map cloud" in report and "Lifted 3D instance AP" in report
    printed = capsys.readouterr().out
    assert "map50" in printed and "error budget" in printed


def test_eval_exits_nonzero_when_nothing_is_scored(tiny_bag, tmp_path, capsys):
    from fast3dis_ros.eval.evaluate import run

    args = ["--bag", str(tiny_bag / "nogt"), "--no-progress", "--window-size", "6", "--stride", "6"]
    assert run(args + ["--out", str(tmp_path / "a")]) == 3
    assert "nothing was scored: the bag has no ground truth" in capsys.readouterr().err
    assert run(args + ["--out", str(tmp_path / "b"), "--replay-only"]) == 0
    assert run(args + ["--out", str(tmp_path / "c"), "--oracle", "masks"]) == 2
    assert "need ground truth" in capsys.readouterr().err
    assert run(["--bag", str(tiny_bag / "gt"), "--out", str(tmp_path / "d"), "--oracle", "normals"]) == 2
