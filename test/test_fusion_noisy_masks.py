"""Fusion rules for the network's noisy masks (issue 16): an instance vote outweighs a background vote, and an
instance's published score grows with the number of windows that saw it."""

import numpy as np
import pytest

from fast3dis_ros.core.frames import WindowPrediction
from fast3dis_ros.pipeline.fusion import MapFusion
from fast3dis_ros.pipeline.tracker import InstanceTracker

H, W = 12, 16


def _plane_window(index: int, labels: np.ndarray, scores=None) -> WindowPrediction:
    """One view of a plane 2 m in front of a fixed camera; a new stamp per window (no shared view: every
    window keeps the first window's alignment, so all of them fill the same voxels)."""
    K = np.array([[20.0, 0, (W - 1) / 2], [0, 20.0, (H - 1) / 2], [0, 0, 1]])
    n = int(labels.max())
    return WindowPrediction(index, 1000 * index, ["cam0"], ["cam0"], [1000 * index],
                            np.zeros((1, H, W, 3), np.uint8), np.full((1, H, W), 2.0, np.float32),
                            np.ones((1, H, W), np.float32), K[None], np.eye(4)[None],
                            labels[None].astype(np.int32),
                            np.full(n, 0.9, np.float32) if scores is None else np.asarray(scores, np.float32))


def _left_half_object() -> np.ndarray:
    lab = np.zeros((H, W), np.int32)
    lab[:, : W // 2] = 1
    return lab


def _map_object_voxels(instance_vote_weight: float, background_windows: int) -> tuple[int, int]:
    """(voxels labelled with an instance, all voxels) after one window that sees the object and
    ``background_windows`` whose masks miss it."""
    f = MapFusion(voxel_size=0.05, min_score=0.3, pixel_stride=1, workers=1,
                  instance_vote_weight=instance_vote_weight)
    f.integrate(_plane_window(0, _left_half_object()))
    for k in range(background_windows):
        f.integrate(_plane_window(k + 1, np.zeros((H, W), np.int32)))
    inst = f.map.inst
    return int(np.count_nonzero(inst)), len(inst)


def test_missed_mask_does_not_erase_an_object_seen_once():
    seen_once, total = _map_object_voxels(5.0, background_windows=2)
    assert total > 20
    only_first, _ = _map_object_voxels(5.0, background_windows=0)
    assert only_first > 10
    assert seen_once == only_first  # two windows that missed it do not outvote the one that saw it
    # plain point majority (weight 1): the two background votes take every one of its voxels
    assert _map_object_voxels(1.0, background_windows=2)[0] == 0


def test_enough_background_votes_still_win():
    """The weight is a ratio, not a lock: 5 x the points of one instance vote lose to 6 background votes."""
    assert _map_object_voxels(5.0, background_windows=6)[0] == 0
    assert _map_object_voxels(5.0, background_windows=4)[0] > 10


def test_instance_vote_weight_must_be_positive():
    with pytest.raises(ValueError, match="instance_vote_weight"):
        MapFusion(instance_vote_weight=0.0)


# ---------------------------------------------------------------------------------- support-weighted score
def test_support_score_ranks_an_id_seen_by_more_windows_first():
    t = InstanceTracker()
    for w in range(3):
        t.update(1, 0.6, 1, w)  # linked in three windows
    t.update(2, 0.9, 1, 2)  # one window only
    assert t.support_score(1, 3) == pytest.approx(0.6)
    assert t.support_score(2, 3) == pytest.approx(0.3)
    assert t.support_score(2, 0) == pytest.approx(0.9)  # 0: the score alone
    assert t.support_score(99, 3) == 0.0


def test_windows_seen_counts_windows_not_labels():
    """Two labels of one window mapped to one id (an absorbed fragment) are one window of support."""
    t = InstanceTracker()
    t.update(5, 0.7, 2, 0)
    t.update(5, 0.6, 1, 0)
    assert t.tracks[5].windows_seen == 1 and t.tracks[5].views_seen == 3
    t.update(5, 0.6, 1, 1)
    assert t.tracks[5].windows_seen == 2


def test_published_score_is_support_weighted():
    """Object A (left half) in every window, object B (right half) in the first only: B's published score is a
    third of its network score, A keeps its own."""
    both = np.zeros((H, W), np.int32)
    both[:, : W // 2] = 1
    both[:, W // 2:] = 2
    only_a = np.zeros((H, W), np.int32)
    only_a[:, : W // 2] = 1
    f = MapFusion(voxel_size=0.05, min_score=0.3, pixel_stride=1, workers=1, support_windows=3)
    res = f.integrate(_plane_window(0, both, [0.6, 0.9]))
    for k in (1, 2):
        res = f.integrate(_plane_window(k, only_a, [0.6]))
        assert res.id_map == {1: 1}  # linked (same voxels)
    score = {i.id: i.score for i in res.instances}
    assert set(score) == {1, 2}
    assert score[1] == pytest.approx(0.6) and score[2] == pytest.approx(0.3)
