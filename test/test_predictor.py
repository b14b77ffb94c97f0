"""Predictor (window -> WindowPrediction), postprocessing and the CPU smoke run of fast3dis-bench."""

import numpy as np
import pytest
import torch

from fast3dis_ros.inference.postprocess import instances_from_queries
from fast3dis_ros.inference.predictor import Predictor, processing_hw
from fast3dis_ros.core.frames import CameraFrame, FrameSet, Window, WindowPrediction


@pytest.fixture(scope="module")
def predictor():
    return Predictor.random_tiny(seed=0, score_threshold=0.0)


def make_window(n_sets=2, cams=("front", "left"), h=90, w=120, with_K=True, poses=False, seed=0):
    rng = np.random.default_rng(seed)
    K = np.array([[80.0, 0, (w - 1) / 2], [0, 80.0, (h - 1) / 2], [0, 0, 1]])
    sets = []
    for i in range(n_sets):
        frames = []
        for j, c in enumerate(cams):
            T = np.eye(4)
            T[0, 3] = 0.3 * i + 0.1 * j
            frames.append(
                CameraFrame(
                    camera=c, stamp_ns=1000 * i + j, image=rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                    frame_id=f"{c}_optical_frame", K=K if with_K else None, T_world_cam=T if poses else None,
                )
            )
        sets.append(FrameSet(index=i, stamp_ns=1000 * i + len(cams), frames=frames))
    return Window(index=7, frame_sets=sets)


def check_prediction(p: WindowPrediction, V, hw):
    H, W = hw
    assert p.images.shape == (V, H, W, 3) and p.images.dtype == np.uint8
    assert p.depth.shape == (V, H, W) and p.depth.dtype == np.float32 and np.isfinite(p.depth).all()
    assert p.depth_conf.shape == (V, H, W) and p.depth_conf.dtype == np.float32
    assert p.K.shape == (V, 3, 3) and p.K.dtype == np.float64
    assert p.T_cam_world.shape == (V, 4, 4) and p.T_cam_world.dtype == np.float64
    assert p.labels.shape == (V, H, W) and p.labels.dtype == np.int32
    assert p.scores.dtype == np.float32 and p.scores.ndim == 1
    N = p.n_instances
    assert p.labels.min() >= 0 and p.labels.max() <= N
    assert set(np.unique(p.labels)) - {0} == set(range(1, N + 1))  # every instance owns pixels
    assert np.all(np.diff(p.scores) <= 0)  # best first
    assert p.engine_ms > 0


def test_predict_window(predictor):
    win = make_window()
    p = predictor.predict(win)
    hw = processing_hw(90, 120, predictor.process_size)
    assert hw == (56, 70)
    check_prediction(p, 4, hw)
    assert p.n_instances > 0  # threshold 0 keeps every query with pixels
    assert p.window_index == 7 and p.stamp_ns == win.stamp_ns
    assert p.cameras == ["front", "left", "front", "left"] and p.frame_ids[1] == "left_optical_frame"
    assert p.view_stamps_ns == [0, 1, 1000, 1001]
    np.testing.assert_allclose(p.T_cam_world[0], np.eye(4), atol=1e-6)  # world = view 0
    # given K is rescaled to the processing resolution (pixel-centre consistent)
    np.testing.assert_allclose(p.K[0], [[80 * 70 / 120, 0, 34.5], [0, 80 * 56 / 90, 27.5], [0, 0, 1]], rtol=1e-6)
    assert not p.depth_scale_metric


def test_predict_with_known_poses_and_arrays(predictor):
    win = make_window(poses=True)
    p = predictor.predict(win)
    T_world_cam = np.stack([f.T_world_cam for f in win.views])
    np.testing.assert_allclose(p.T_cam_world, np.linalg.inv(T_world_cam), atol=1e-12)
    assert p.depth_scale_metric
    imgs = np.stack([f.image for f in win.views])
    q = predictor.predict_arrays(imgs)
    check_prediction(q, 4, (56, 70))
    np.testing.assert_array_equal(q.images, p.images)
    # poses without K are refused; windows without K simply run uncalibrated
    with pytest.raises(ValueError):
        predictor.predict_arrays(imgs, poses=T_world_cam)
    check_prediction(predictor.predict(make_window(with_K=False, poses=True)), 4, (56, 70))


def test_score_threshold_drops_everything():
    pr = Predictor.random_tiny(seed=0, score_threshold=1.01)
    p = pr.predict(make_window(n_sets=1))
    assert p.n_instances == 0 and (p.labels == 0).all()


def test_postprocess_known_masks():
    V, Hm, Wm = 2, 4, 4
    masks = torch.full((3, V, Hm, Wm), -10.0)
    masks[0, 0, :2] = 10.0  # query 0: top half of view 0
    masks[1, :, 2:] = 8.0  # query 1: bottom half of both views
    masks[2, 1, :2] = 10.0  # query 2: low objectness -> dropped
    logits = torch.tensor([3.0, 5.0, -5.0])
    labels, scores, q = instances_from_queries(logits, masks, (8, 8), score_threshold=0.5)
    assert q.tolist() == [1, 0]  # sorted by score: query 1 (higher objectness) first
    torch.testing.assert_close(scores, torch.sigmoid(logits[[1, 0]]) * torch.sigmoid(torch.tensor([8.0, 10.0])))
    assert labels.dtype == torch.int32 and labels.shape == (V, 8, 8)
    assert (labels[0, :3] == 2).all() and (labels[0, 5:] == 1).all() and (labels[1, 5:] == 1).all()
    assert (labels[1, :3] == 0).all()


def test_bench_cpu_tiny(capsys, tmp_path):
    from fast3dis_ros.bench.suite import main

    out = tmp_path / "b.json"
    assert main(["--size", "tiny", "--device", "cpu", "--views", "1", "3", "--height", "42", "--width", "56",
                 "--warmup", "0", "--iters", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "views" in text and "da3_ms" in text and "floor_f3d" in text
    import json

    res = json.loads(out.read_text())
    assert [r["views"] for r in res["rows"]] == [1, 3]
    assert all(isinstance(r["fast3dis_ms"], float) and r["fast3dis_ms"] > 0 for r in res["rows"])
    assert res["rows"][1]["floor_fast3dis_ms"] > res["rows"][1]["floor_da3_ms"] > 0
