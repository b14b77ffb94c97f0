"""Issue 18, the plain-Python parts (no DDS): geometry guard, stamp outliers vs. sustained time jumps,
the sync's byte bound, calibration plausibility and distortion, -p parsing, fusion's depth ratio across
processing resolutions, the no-finite-output streak. The DDS tests are test_reliability_attacks.py."""

import numpy as np
import pytest

from fast3dis_ros.geometry.calibration import check_intrinsics, distortion_shift_px
from fast3dis_ros.pipeline.frame_guard import FrameGeometryGuard
from fast3dis_ros.core.frames import CameraFrame
from fast3dis_ros.pipeline.sync import ApproximateTimeSync

MS = 1_000_000
SEC = 1_000_000_000


def test_geometry_guard_rejects_odd_frames_and_follows_a_sustained_change():
    g = FrameGeometryGuard(min_side=16, max_aspect=8.0, confirm_frames=3)
    assert g.check("a", 48, 64).accept
    assert g.check("a", 1, 1).reason == "image_too_small" and g.check("a", 1, 4000).reason == "image_too_small"
    assert g.check("a", 20, 400).reason == "image_aspect"
    v = g.check("a", 64, 48)  # portrait from a landscape camera
    assert not v.accept and v.reason == "shape_changed" and "48x64" in v.detail
    assert g.check("a", 48, 64).accept  # back to normal: the odd one did not move anything
    assert [g.check("a", 96, 128).accept for _ in range(3)] == [False, False, True]  # sustained: followed
    assert g.shape("a") == (96, 128) and g.check("b", 64, 48).accept  # per camera


def _frames(sync, cams, t_ns, clock):
    out = []
    for c in cams:
        out += sync.push(CameraFrame(c, t_ns, np.zeros((4, 4, 3), np.uint8)))
    return out


def test_lone_outlier_stamps_are_dropped_without_reset():
    now = [0]
    resets = []
    s = ApproximateTimeSync(["a", "b"], 10 * MS, jump_confirm=3, clock=lambda: now[0],
                            on_reset=lambda: resets.append(1))
    t = 1_700_000_000 * SEC
    sets = 0
    for k in range(5):
        sets += len(_frames(s, "ab", t + k * 100 * MS, now))
        now[0] += 100 * MS
    for bad in (t + 10**6 * SEC, 1 * SEC, (2**31 - 1) * SEC):
        s.push(CameraFrame("a", bad, np.zeros((4, 4, 3), np.uint8)))
        for k in range(4):
            sets += len(_frames(s, "ab", t + (5 + k) * 100 * MS, now))
            now[0] += 100 * MS
        t += 4 * 100 * MS
    assert s.drops.as_dict() == {"stamp_outlier": 3} and s.resets == 0 and not resets
    assert sets == 5 + 12


def test_sustained_jump_back_resets_once_and_keeps_the_new_frames():
    now = [0]
    s = ApproximateTimeSync(["a", "b"], 10 * MS, jump_confirm=3, clock=lambda: now[0])
    t = 1000 * SEC
    for k in range(4):
        _frames(s, "ab", t + k * 100 * MS, now)
        now[0] += 100 * MS
    got = []
    for k in range(3):  # 10 s back, both cameras: the third frame confirms it
        got += _frames(s, "ab", t - 10 * SEC + k * 100 * MS, now)
        now[0] += 100 * MS
    assert s.resets == 1 and s.last_jump["direction"] == "back"
    assert [fs.stamp_ns for fs in got] == [t - 10 * SEC + k * 100 * MS for k in range(3)]  # none lost
    # a forward gap that matches the elapsed time (every camera stalled 5 s) is no jump at all
    now[0] += 5 * SEC
    assert len(_frames(s, "ab", t - 10 * SEC + 5300 * MS, now)) == 1 and s.forward_jumps == 0


def test_sync_byte_bound_drops_oldest_of_the_fullest_camera():
    img = np.zeros((100, 100, 3), np.uint8)  # 30000 bytes
    s = ApproximateTimeSync(["a", "b"], 10 * MS, queue_size=1000, max_bytes=100_000)
    for k in range(20):  # b is dead
        s.push(CameraFrame("a", (k + 1) * 100 * MS, img))
    assert s.pending_bytes() == 90_000 and s.pending_count() == 3
    assert s.drops.as_dict() == {"queue_bytes_overflow": 17}


@pytest.mark.parametrize("K,why", [
    ([[1e-30, 0, 32], [0, 1e-30, 24]], "focal"), ([[1e300, 0, 32], [0, 1e300, 24]], "focal"),
    ([[60, 0, -1e6], [0, 60, 24]], "principal point"), ([[60, 1e6, 32], [0, 60, 24]], "skew"),
    ([[60, 0, 32], [0, 600, 24]], "pixel aspect")])
def test_implausible_intrinsics(K, why):
    K = np.array(K + [[0, 0, 1]], np.float64)
    assert why in check_intrinsics(K, 64, 48)
    assert check_intrinsics(np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]]), 64, 48) is None


def test_distortion_shift():
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    assert distortion_shift_px("plumb_bob", [0] * 5, K, 640, 480) == 0.0
    # radial only: the corner moves by |k1| r^2 * r (normalised) * f pixels
    s = distortion_shift_px("plumb_bob", [-0.3, 0, 0, 0, 0], K, 640, 480)
    r2 = (320 / 500) ** 2 + (240 / 500) ** 2
    assert s == pytest.approx(0.3 * r2 * np.sqrt(r2) * 500, rel=1e-6)
    assert distortion_shift_px("equidistant", [0, 0, 0, 0], K, 640, 480) > 10  # fisheye even with D = 0
    assert distortion_shift_px("kannala_brandt", [0.1], K, 640, 480) is None


def test_command_line_parameters_parsed_as_rcl_does():
    from fast3dis_ros.ros.cli_params import command_line_parameters

    argv = ["node", "--ros-args", "--params-file", "x.yaml", "-p", "window_size:=4.5", "-p", "cameras:=[]",
            "--param", "fast3dis:seed:=3", "-p", "other_node:seed:=9", "--", "-p", "stride:=1",
            "--ros-args", "-p", "map_frame:=my map"]
    assert command_line_parameters(argv, "fast3dis") == {"window_size": 4.5, "cameras": [], "seed": 3,
                                                         "map_frame": "my map"}


def test_depth_ratio_across_processing_resolutions_is_not_skipped():
    """A shared view processed at another resolution (the window's view 0 was portrait): the depth ratio
    is taken on the resampled map, counted, never silently replaced by the camera centres."""
    from fast3dis_ros.pipeline.fusion import MapFusion, _ViewRecord

    f = MapFusion(depth_ratio_stride=1)
    rec_depth = np.full((12, 16), 4.0)
    rec = _ViewRecord.__new__(_ViewRecord)
    rec.depth_map_units = rec_depth

    class P:
        depth = np.full((1, 16, 12), 2.0)  # same view, processed portrait
    assert f._depth_ratio(P, [(0, rec)]) == pytest.approx(2.0)
    assert f.events.as_dict() == {"depth_ratio_resampled": 1}


def test_no_finite_output_streak():
    import copy

    import test_fusion as tf

    from fast3dis_ros.pipeline.runner import PipelineRunner

    def predict(window):
        p = tf.make_pred(window.index, [fs.index % 10 for fs in window.frame_sets])
        p.view_stamps_ns = [v.stamp_ns for v in window.views]
        p.cameras = [v.camera for v in window.views]
        bad = copy.copy(p)
        bad.depth = np.full_like(p.depth, np.nan)
        return bad if window.index < 4 else p

    r = PipelineRunner(["a", "b"], predict, slop_ns=10 * MS, window_size=2, stride=2, sync_mode=True)
    streak = []
    for k in range(10):
        for c in "ab":
            r.feed(CameraFrame(c, (k + 1) * 100 * MS, np.zeros((4, 4, 3), np.uint8)))
        streak.append(r.nonfinite_windows_in_a_row)
    assert streak == [0, 1, 1, 2, 2, 3, 3, 4, 4, 0]


def test_forward_abort_hits_only_the_marked_thread_and_is_released():
    import threading

    import torch

    from fast3dis_ros.model.interrupt import ForwardAborted, abort_forwards, release

    lin = torch.nn.Linear(2, 2)
    started, go = threading.Event(), threading.Event()
    out = {}

    def worker():
        started.set()
        go.wait(10)
        try:
            lin(torch.zeros(1, 2))
            out["r"] = "ran"
        except ForwardAborted:
            out["r"] = "aborted"
    t = threading.Thread(target=worker)
    t.start()
    started.wait(10)
    abort_forwards(t)
    lin(torch.zeros(1, 2))  # this thread is not affected
    go.set()
    t.join(10)
    release(t)
    assert out["r"] == "aborted" and not torch.nn.modules.module._global_forward_pre_hooks
