"""MapFusion on a synthetic scene with a known Sim(3) between window worlds; PipelineRunner accounting."""

import threading
import time

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from fast3dis_ros.geometry.align import sim3_decompose, sim3_inverse, sim3_matrix
from fast3dis_ros.geometry.cameras import invert_se3, transform_points
from fast3dis_ros.pipeline.frames import CameraFrame, WindowPrediction
from fast3dis_ros.pipeline.fusion import MapFusion
from fast3dis_ros.pipeline.runner import PipelineRunner

H, W = 48, 64
K = np.array([[40.0, 0, 31.5], [0, 40.0, 23.5], [0, 0, 1]])
SPHERES = [(np.array([-0.8, 0.0, 4.0]), 0.5), (np.array([0.7, 0.3, 4.5]), 0.6), (np.array([0.0, -0.6, 3.2]), 0.35)]
WALL_Z = 6.0


def look_pose(centre, yaw_deg):
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("y", yaw_deg, degrees=True).as_matrix()
    T[:3, 3] = centre
    return T  # T_map_cam


def render(T_map_cam):
    """z-depth and instance labels (1-based sphere index) of the spheres in front of a wall."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)  # z = 1
    d = d_cam @ T_map_cam[:3, :3].T
    o = T_map_cam[:3, 3]
    depth = (WALL_Z - o[2]) / d[..., 2]
    labels = np.zeros((H, W), np.int32)
    for k, (c, r) in enumerate(SPHERES):
        oc = o - c
        a = np.sum(d * d, -1)
        b = 2 * np.sum(d * oc, -1)
        cc = oc @ oc - r * r
        disc = b * b - 4 * a * cc
        lam = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf)
        hit = (lam > 0) & (lam < depth)
        depth = np.where(hit, lam, depth)
        labels[hit] = k + 1
    return depth.astype(np.float32), labels


# the rig: 2 cameras, frame sets move along x/y (not collinear with the rig baseline)
def view_pose(cam, t):
    base = np.array([0.15 * t, 0.05 * t * t, 0.0])
    return look_pose(base + (np.array([-0.2, 0, 0]) if cam == "a" else np.array([0.2, 0.05, 0])),
                     -5 * t + (8 if cam == "a" else -8))


def make_pred(window_index, set_ids, S_world_map=np.eye(4), perm=None, known=None):
    """Prediction of a window covering frame sets ``set_ids`` expressed in world = S_world_map(map)."""
    s, R, t = sim3_decompose(S_world_map)
    cams, stamps, depths, labels, Tcw = [], [], [], [], []
    for k in set_ids:
        for cam in ("a", "b"):
            T_map_cam = view_pose(cam, k)
            depth, lab = render(T_map_cam)
            T_world_cam = np.eye(4)
            T_world_cam[:3, :3] = R @ T_map_cam[:3, :3]
            T_world_cam[:3, 3] = transform_points(S_world_map, T_map_cam[:3, 3])
            cams.append(cam)
            stamps.append(1000 + k)
            depths.append(depth * s)
            if perm is not None:
                lab = np.where(lab > 0, np.asarray(perm)[np.maximum(lab - 1, 0)], 0).astype(np.int32)
            labels.append(lab)
            Tcw.append(invert_se3(T_world_cam))
    V = len(cams)
    return WindowPrediction(
        window_index, max(stamps), cams, [f"{c}_optical_frame" for c in cams], stamps,
        np.full((V, H, W, 3), 128, np.uint8), np.stack(depths), np.ones((V, H, W), np.float32),
        np.repeat(K[None], V, 0), np.stack(Tcw), np.stack(labels), np.full(len(SPHERES), 0.9, np.float32),
        T_world_cam_known=known,
    )


def rand_sim3(seed):
    rng = np.random.default_rng(seed)
    return sim3_matrix(float(np.exp(rng.uniform(-1, 1))), Rotation.random(random_state=seed).as_matrix(),
                       rng.uniform(-3, 3, 3))


@pytest.mark.parametrize("window_size,method_hint", [(2, "orientation"), (3, "umeyama")])
def test_two_windows_known_sim3_and_stable_ids(window_size, method_hint):
    S = rand_sim3(11)
    fusion = MapFusion(voxel_size=0.05, max_points=200_000, min_score=0.3, match_iou=0.2)
    sets1 = list(range(window_size))
    sets2 = [k + 1 for k in sets1]
    r1 = fusion.integrate(make_pred(0, sets1))
    assert r1.align_method == "first" and np.allclose(r1.T_map_window, np.eye(4))
    ids1 = r1.id_map
    assert sorted(ids1) == [1, 2, 3] and sorted(ids1.values()) == [1, 2, 3]
    perm = [3, 1, 2]  # window 2 calls sphere k "perm[k]"
    r2 = fusion.integrate(make_pred(1, sets2, S_world_map=S, perm=perm))
    assert r2.align_method == "shared_views" and r2.n_shared_views == 2 * (window_size - 1)
    assert r2.info["method"] == method_hint
    assert np.allclose(r2.T_map_window, sim3_inverse(S), atol=1e-4)
    assert r2.scale == pytest.approx(1 / sim3_decompose(S)[0], rel=1e-4)
    # ids stable: sphere k has the same global id in both windows
    for k in range(3):
        assert r2.id_map[perm[k]] == ids1[k + 1]
    # camera poses recovered in map
    for v, k in enumerate([k for k in sets2 for _ in ("a", "b")]):
        cam = ["a", "b"][v % 2]
        assert np.allclose(r2.T_map_cam[v], view_pose(cam, k), atol=1e-4)
    # window cloud lies on the true surfaces in map coordinates
    wc = r2.window_cloud
    for k, (c, rad) in enumerate(SPHERES):
        pts = wc.xyz[wc.instance == ids1[k + 1]]
        assert len(pts) > 5
        assert np.abs(np.linalg.norm(pts - c, axis=1) - rad).max() < 0.05
    summaries = {s.id: s for s in r2.instances}
    assert sorted(summaries) == [1, 2, 3]
    for k, (c, rad) in enumerate(SPHERES):
        sm = summaries[ids1[k + 1]]
        assert np.all(sm.bbox_min >= c - rad - 0.05) and np.all(sm.bbox_max <= c + rad + 0.05)
        assert sm.views_seen >= 2 * window_size and sm.score == pytest.approx(0.9)
    assert fusion.events.as_dict() == {}


def test_no_overlap_keeps_previous_and_known_pose_fallback():
    S = rand_sim3(5)
    T_known_map = rand_sim3(6)
    T_known_map[:3, :3] /= sim3_decompose(T_known_map)[0]  # rigid known world (e.g. odom)

    def known(set_ids):
        return np.stack([T_known_map @ view_pose(c, k) for k in set_ids for c in ("a", "b")])

    f = MapFusion(voxel_size=0.05, use_known_poses=True)
    f.integrate(make_pred(0, [0, 1], known=known([0, 1])))
    r = f.integrate(make_pred(1, [5, 6], S_world_map=S, known=known([5, 6])))  # no shared view
    assert r.align_method == "known_poses"
    assert np.allclose(r.T_map_window, sim3_inverse(S), atol=1e-4)
    f2 = MapFusion(voxel_size=0.05)
    r1 = f2.integrate(make_pred(0, [0, 1]))
    r2 = f2.integrate(make_pred(1, [5, 6], S_world_map=S))
    assert r2.align_method == "previous" and np.allclose(r2.T_map_window, r1.T_map_window)
    assert f2.events.as_dict() == {"no_overlap": 1}


def test_running_map_bounded():
    f = MapFusion(voxel_size=0.05, max_points=800)
    for i in range(5):
        r = f.integrate(make_pred(i, [i, i + 1]))
        assert len(r.map_cloud) <= 800
    assert f.map.evicted > 0 and r.info["map_voxels"] == 800
    assert len(r.window_cloud) > 0 and r.map_cloud.frame_id == "map"


# ---------------------------------------------------------------- runner
def fake_predict(delay=0.0, fail_every=0):
    def predict(window):
        if delay:
            time.sleep(delay)
        if fail_every and window.index % fail_every == fail_every - 1:
            raise RuntimeError("boom")
        ids = [fs.index for fs in window.frame_sets]
        p = make_pred(window.index, ids)
        p.view_stamps_ns = [f.stamp_ns for f in window.views]
        p.cameras = [f.camera for f in window.views]
        return p
    return predict


def frames(n, jitter_ms=2):
    rng = np.random.default_rng(0)
    img = np.zeros((H, W, 3), np.uint8)
    out = []
    for k in range(n):
        for cam in ("a", "b"):
            out.append(CameraFrame(cam, k * 100_000_000 + int(rng.integers(0, jitter_ms)) * 1_000_000, img))
    out.insert(5, CameraFrame("zz", 0, img))
    return out


def check_invariant(acc):
    fs = acc["frame_sets"]
    assert fs["received"] == fs["processed"] + sum(fs["dropped"].values()) + fs["in_flight"]


def test_runner_sync_mode_processes_everything():
    results = []
    r = PipelineRunner(["a", "b"], fake_predict(), slop_ns=10_000_000, window_size=3, stride=2,
                       fusion=dict(voxel_size=0.1), sync_mode=True, on_fusion=lambda res, p: results.append(res))
    for f in frames(10):
        r.feed(f)
        check_invariant(r.accounting())
    r.flush()
    acc = r.accounting()
    check_invariant(acc)
    assert acc["frame_sets"] == {"received": 10, "processed": 10, "dropped": {}, "in_flight": 0}
    assert acc["frames"]["dropped"] == {"unknown_camera": 1}
    assert len(results) == 5  # windows at sets 2, 4, 6, 8 + flush tail
    ids = {s.id for s in results[-1].instances}
    assert ids == {1, 2, 3}


def test_runner_async_slow_engine_accounting():
    lock = threading.Lock()
    seen = []
    r = PipelineRunner(["a", "b"], fake_predict(delay=0.15, fail_every=4), slop_ns=10_000_000, window_size=2,
                       stride=1, fusion=dict(voxel_size=0.1), sync_mode=False, queue_depth=1,
                       on_fusion=lambda res, p: (lock.acquire(), seen.append(res.window_index), lock.release()))
    for f in frames(20):
        r.feed(f)
        time.sleep(0.01)
    check_invariant(r.accounting())
    assert r.flush(timeout=20)
    acc = r.accounting()
    check_invariant(acc)
    fs = acc["frame_sets"]
    assert fs["in_flight"] == 0 and fs["received"] == 20
    assert fs["processed"] > 0 and fs["dropped"].get("queue_full", 0) > 0
    assert acc["windows"]["engine"]["drops"].get("queue_full", 0) > 0
    assert r.stop(1.0)


def test_runner_stride_gt_window_counts_not_windowed():
    r = PipelineRunner(["a", "b"], fake_predict(), slop_ns=10_000_000, window_size=1, stride=3,
                       fusion=dict(voxel_size=0.1), sync_mode=True)
    for f in frames(7):
        r.feed(f)
    r.flush()
    fs = r.accounting()["frame_sets"]
    # windows at sets 0, 3, 6 -> 3 processed; 1, 2, 4, 5 never windowed
    assert fs == {"received": 7, "processed": 3, "dropped": {"not_windowed": 4}, "in_flight": 0}


def test_voxel_map_evicts_least_recently_seen():
    from fast3dis_ros.pipeline.fusion import VoxelMap

    vm = VoxelMap(0.1, max_points=5)

    def add(keys, tick):
        k = np.asarray(keys, np.int64)
        n = len(k)
        vm.integrate(k, np.zeros((n, 3)), np.zeros((n, 3)), np.ones(n), np.zeros(n, np.uint32),
                     np.zeros(n, np.float32), tick)

    add([1, 2, 3], 1)
    add([4, 5], 2)
    add([3, 6], 3)  # 3 is re-seen; 6 is new -> 6 voxels, evict one of the tick-1 voxels (1 or 2)
    assert len(vm) == 5 and vm.evicted == 1
    assert {3, 4, 5, 6} <= set(vm.keys.tolist()) and list(vm.keys) == sorted(vm.keys)
    assert vm.n[vm.keys.tolist().index(3)] == 2
    add([7, 8, 9, 10, 11], 4)
    assert vm.keys.tolist() == [7, 8, 9, 10, 11]
