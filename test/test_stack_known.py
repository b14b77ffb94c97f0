"""core.frames.stack_known / known_poses_of: how per-view known matrices reach the predictor and fusion."""

import numpy as np

from fast3dis_ros.core.frames import CameraFrame, known_poses_of, stack_known
from fast3dis_ros.geometry.rig import rig_extrinsics_of


def _frame(cam, T_world_cam=None, T_rig_cam=None):
    f = CameraFrame(cam, 5, np.zeros((4, 4, 3), np.uint8))
    f.T_world_cam, f.T_rig_cam = T_world_cam, T_rig_cam
    return f


def test_unknown_views_keep_their_index_as_nan():
    T = np.diag([1.0, 2.0, 3.0, 1.0])
    out = known_poses_of([_frame("a"), _frame("b", T_world_cam=T)])
    assert out.shape == (2, 4, 4) and out.dtype == np.float64
    assert np.isnan(out[0]).all() and np.array_equal(out[1], T)
    K = np.eye(3)
    ks = stack_known([K, None, K], (3, 3))
    assert [bool(np.isfinite(k).all()) for k in ks] == [True, False, True]


def test_nothing_known_is_none():
    views = [_frame("a"), _frame("b")]
    assert known_poses_of(views) is None and rig_extrinsics_of(views) is None and stack_known([], (3, 3)) is None


def test_rig_extrinsics_use_the_same_rule():
    T = np.eye(4)
    T[0, 3] = 0.1
    out = rig_extrinsics_of([_frame("a", T_rig_cam=T), _frame("b")])
    assert np.array_equal(out[0], T) and np.isnan(out[1]).all()
