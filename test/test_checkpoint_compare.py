"""In-window geometry error of eval/checkpoint_compare.py: zero for GT up to a Sim(3), large for bad depth."""

from __future__ import annotations

import numpy as np
import pytest

from fast3dis_ros.data.bags import GroundTruth
from fast3dis_ros.data.synthetic import SceneConfig, generate_scene
from fast3dis_ros.eval.checkpoint_compare import _named_checkpoints, table_lines, window_geometry_errors
from fast3dis_ros.core.frames import WindowPrediction


@pytest.fixture(scope="module")
def scene_gt():
    sc = generate_scene(SceneConfig(seed=3, n_frames=2, width=56, height=42, n_objects=6, rig_variety=True))
    gt = GroundTruth()
    for fi, fr in enumerate(sc.frames):
        for v in fr:
            gt.depth.setdefault(v.camera, {})[fi] = v.depth
            gt.instance.setdefault(v.camera, {})[fi] = v.instance
            gt.T_world_cam.setdefault(v.camera, {})[fi] = v.T_world_cam
            gt.K[v.camera] = v.K
    return sc, gt


def _prediction(sc, s: float, R: np.ndarray, t: np.ndarray, depth_gain: dict[int, float] | None = None):
    """GT window seen in another frame: x' = s R x + t (depth scaled by s), optional per-view depth errors."""
    views = [v for fr in sc.frames for v in fr]
    T_cw, depth = [], []
    for i, v in enumerate(views):
        T = np.eye(4)
        T[:3, :3] = R @ v.T_world_cam[:3, :3]
        T[:3, 3] = s * R @ v.T_world_cam[:3, 3] + t
        T_cw.append(np.linalg.inv(T))
        depth.append(s * v.depth * (depth_gain or {}).get(i, 1.0))
    V = len(views)
    h, w = views[0].depth.shape
    return WindowPrediction(
        window_index=0, stamp_ns=0, cameras=[v.camera for v in views], frame_ids=[v.camera for v in views],
        view_stamps_ns=[v.frame_index for v in views], images=np.zeros((V, h, w, 3), np.uint8),
        depth=np.stack(depth).astype(np.float32), depth_conf=np.ones((V, h, w), np.float32),
        K=np.stack([v.K for v in views]), T_cam_world=np.stack(T_cw), labels=np.zeros((V, h, w), np.int32),
        scores=np.zeros(0, np.float32))


def _rot(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def test_gt_geometry_in_another_sim3_frame_has_zero_error(scene_gt):
    sc, gt = scene_gt
    e = window_geometry_errors(_prediction(sc, 0.37, _rot(0.8), np.array([1.0, -2.0, 0.5])), gt)
    assert e is not None and e.n_points > 500
    assert e.point_median < 1e-4 and e.centre_median < 1e-4
    assert e.scale == pytest.approx(1 / 0.37, rel=1e-5)


def test_wrong_depth_on_some_views_shows_as_metres(scene_gt):
    sc, gt = scene_gt
    # two of six views 40 % too far: no single Sim(3) can fit them and the others
    e = window_geometry_errors(_prediction(sc, 1.0, np.eye(3), np.zeros(3), {1: 1.4, 4: 1.4}), gt)
    assert e.point_median > 0.05
    assert e.centre_median > 0.01


def test_views_without_ground_truth_are_skipped(scene_gt):
    sc, _ = scene_gt
    assert window_geometry_errors(_prediction(sc, 1.0, np.eye(3), np.zeros(3)), GroundTruth()) is None


def test_checkpoint_names_and_table(tmp_path):
    with pytest.raises(FileNotFoundError):
        _named_checkpoints([f"old={tmp_path}"])
    lines = table_lines({"old": {"point_err_median_m": 0.69, "centre_err_median_m": float("nan"),
                                 "per_window": {"AP50": 0.208}}})
    assert lines[0] == "| metric | old |"
    assert "| in-window point error, median (m) | 0.690 |" in lines
    assert "| camera centre error, median (m) | n/a |" in lines
    assert "| per-window AP50 (%) | 20.8 |" in lines


def test_reuse_refuses_other_settings(tmp_path):
    import json

    from fast3dis_ros.eval.checkpoint_compare import _parse, _reused_results, _settings

    args = _parse(["--checkpoint", "x=y", "--out", str(tmp_path), "--seeds", "7000-7001"])
    prev = {**_settings(args), "results": {"old": {"point_err_median_m": 0.7}}}
    f = tmp_path / "compare.json"
    f.write_text(json.dumps(prev))
    args.reuse = str(f)
    assert _reused_results(args) == {"old": {"point_err_median_m": 0.7}}
    args.seeds = "7000-7002"
    with pytest.raises(ValueError, match="scored with"):
        _reused_results(args)
