"""Window-to-map linking (issue 16): 2D mask overlap on shared views, split / merge decisions, vote spread,
rig extrinsics, and the plain TF tree the replay reads them with."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from test_fusion import SPHERES, make_pred, rand_sim3

from fast3dis_ros.geometry.cameras import invert_se3
from fast3dis_ros.geometry.tf_tree import TransformLookupError, TransformTree
from fast3dis_ros.pipeline.fusion import MapFusion
from fast3dis_ros.pipeline.linking import LinkParams, ViewLabelMemory, associate, overlap_2d, overlap_3d
from fast3dis_ros.geometry.rig import frame_set_groups, rig_scale, rigidify

NO_3D = (np.zeros((0, 0)), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))


def scramble_geometry(pred, seed):
    """Geometry that no alignment can repair: random pose per view, depth x 3."""
    rng = np.random.default_rng(seed)
    T = np.repeat(np.eye(4)[None], len(pred.cameras), 0)
    T[:, :3, :3] = Rotation.random(len(pred.cameras), random_state=seed).as_matrix()
    T[:, :3, 3] = rng.uniform(-5, 5, (len(pred.cameras), 3))
    pred.T_cam_world = T
    pred.depth = pred.depth * 3.0
    return pred


def sphere_ids(cloud, k, tol=0.08):
    """Instance ids (> 0) of the cloud points on sphere ``k``, with their counts."""
    c, r = SPHERES[k]
    on = np.abs(np.linalg.norm(cloud.xyz.astype(np.float64) - c, axis=1) - r) < tol
    return dict(zip(*np.unique(cloud.instance[on & (cloud.instance > 0)], return_counts=True)))


# ---------------------------------------------------------------- association on shared views
@pytest.mark.parametrize("link_2d", [True, False])
def test_shared_views_link_whatever_the_geometry(link_2d):
    f = MapFusion(voxel_size=0.05, link_2d=link_2d)
    r1 = f.integrate(make_pred(0, [0, 1, 2]))
    perm = [2, 3, 1]
    r2 = f.integrate(scramble_geometry(make_pred(1, [1, 2, 3], S_world_map=rand_sim3(4), perm=perm), 0))
    info = r2.info["linking"]
    assert info["window_instances"] == 3
    if link_2d:  # every sphere keeps its id through the two shared frame sets
        assert all(r2.id_map[perm[k]] == r1.id_map[k + 1] for k in range(3))
        assert info["linked_instances"] == 3 and info["linked_2d"] == 3
        assert f.link_stats()["linking_rate"] == 1.0
    else:  # voxel overlap alone: the scrambled points meet nothing
        assert info["linked_instances"] == 0 and set(r2.id_map.values()) == {4, 5, 6}
        assert f.link_stats()["linking_rate"] == 0.0


def test_overlap_2d_counts_pixels():
    win = [np.array([[1, 1, 2, 0]]), np.array([[2, 2, 0, 0]])]
    mapped = [np.array([[7, 7, 7, 9]]), np.array([[9, 0, 0, 0]])]
    inter, wl, ml, pw, pm = overlap_2d(win, mapped)
    assert wl.tolist() == [1, 2] and ml.tolist() == [7, 9]
    assert inter.tolist() == [[2, 0], [1, 1]] and pw.tolist() == [2, 3] and pm.tolist() == [3, 2]


def _assoc(win_img, map_img, **kw):
    o2d = overlap_2d([win_img], [map_img])
    return associate(np.unique(win_img), o2d, NO_3D, LinkParams(**kw))


def test_merge_decision_window_label_over_two_map_ids():
    m = np.zeros((10, 20), np.int64)
    m[:, :12] = 5  # the map split one object into ids 5 and 7
    m[:, 12:] = 7
    w = np.ones((10, 20), np.int64)
    a = _assoc(w, m)
    assert a.id_map == {1: 5} and a.merges == [(5, [7])] and a.counts["merges"] == 1
    assert _assoc(w, m, decisions=False).merges == []


def test_no_merge_when_another_window_label_claims_the_id():
    m = np.zeros((10, 20), np.int64)
    m[:, :10], m[:, 10:] = 5, 7
    w = np.ones((10, 20), np.int64)
    w[:, 15:] = 2  # the window itself sees a second object inside id 7
    a = _assoc(w, m)
    assert a.merges == [] and a.id_map[1] == 5 and a.id_map[2] == 7


def test_split_and_fragment_decisions():
    m = np.zeros((10, 40), np.int64)
    m[:, :40] = 5
    w = np.zeros((10, 40), np.int64)
    w[:, :20], w[:, 20:34], w[:, 34:37] = 1, 2, 3  # 50 %, 35 %, 7.5 % of id 5
    a = _assoc(w, m)
    assert a.id_map[1] == 5
    assert a.splits == [(2, 5)] and a.id_map[2] == 0  # a large part of a linked id: a new id
    assert a.absorbed == [(3, 5)] and a.id_map[3] == 5  # a fragment keeps the id
    assert a.counts["splits"] == 1 and a.counts["absorbed"] == 1


def test_blended_score_falls_back_to_voxels_without_shared_views():
    o3d = overlap_3d(np.array([1, 1, 1, 2]), np.array([4, 4, 0, 0]), np.array([0, 0, 0, 0, 3]))
    a = associate(np.array([1, 2]), overlap_2d([], []), o3d, LinkParams())
    assert a.id_map == {1: 4, 2: 0} and a.evidence == {1: "3d"}


def test_view_label_memory_relabels_and_bounds():
    mem = ViewLabelMemory(capacity=2, stride=2)
    mem.put(("a", 1), np.full((4, 4), 7))
    mem.put(("a", 2), np.full((4, 4), 8))
    mem.relabel({7: 3})
    assert mem.get(("a", 1)).shape == (2, 2) and np.all(mem.get(("a", 1)) == 3)
    mem.put(("a", 3), np.zeros((4, 4)))
    assert mem.get(("a", 1)) is None and len(mem) == 2


# ---------------------------------------------------------------- merges in the map, vote spread
def split_sphere0(pred):
    """Label sphere 0 as two instances (left / right of its centre column), label 4 the right part."""
    for v in range(len(pred.cameras)):
        lab = pred.labels[v]
        cols = np.nonzero(lab == 1)[1]
        if len(cols):
            right = (lab == 1) & (np.arange(lab.shape[1])[None] > np.median(cols))
            lab[right] = 4
    pred.scores = np.append(pred.scores, np.float32(0.9))
    return pred


def test_merge_relabels_map_voxels_and_tracks():
    f = MapFusion(voxel_size=0.05)
    r1 = f.integrate(split_sphere0(make_pred(0, [0, 1, 2])))
    a, b = r1.id_map[1], r1.id_map[4]
    assert set(sphere_ids(r1.map_cloud, 0)) == {a, b}
    votes_b = f.map.votes[f.map.inst == b]
    r2 = f.integrate(make_pred(1, [1, 2, 3]))  # the whole sphere as one instance on the shared views
    assert r2.info["linking"]["merges"] == 1 and f.merged_into == {b: a} and f.current_id(b) == a
    assert list(sphere_ids(r2.map_cloud, 0)) == [a]  # one id on the whole object
    assert b not in f.tracker.tracks and b not in {s.id for s in r2.instances}
    assert f.map.votes[f.map.inst == a].sum() >= votes_b.sum()  # merged voxels keep their votes
    assert f.link_stats()["merges"] == 1 and f.link_stats()["merged_ids"] == 1


def jittered(pred, deg, seed):
    """Geometry a little off: every view's orientation turned by about ``deg`` degrees at random."""
    rng = np.random.default_rng(seed)
    T_wc = invert_se3(pred.T_cam_world)
    for v in range(len(T_wc)):
        rv = np.deg2rad(deg) * rng.normal(size=3) / np.sqrt(3)
        T_wc[v, :3, :3] = Rotation.from_rotvec(rv).as_matrix() @ T_wc[v, :3, :3]
    pred.T_cam_world = invert_se3(T_wc)
    return pred


@pytest.mark.parametrize("link_2d", [True, False])
def test_votes_do_not_spread_an_object_over_ids(link_2d):
    """Why ids spread: with 2 degrees of orientation error per view the voxel IoU stays below the link
    threshold, so every window gives each sphere a new id, whose votes take the voxels its points reach
    (new ones, or old ones they outvote) while the rest keep older ids: 5 windows, 5 ids per sphere. Linked
    on the shared views, every window votes for the same id."""
    f = MapFusion(voxel_size=0.05, link_2d=link_2d)
    f.integrate(make_pred(0, [0, 1]))
    for i in range(1, 5):
        r = f.integrate(jittered(make_pred(i, [i, i + 1]), 2.0, i))
    n_ids = [len(sphere_ids(r.map_cloud, k)) for k in range(3)]
    if link_2d:
        assert n_ids == [1, 1, 1] and f.link_stats()["linking_rate"] == 1.0
    else:
        assert min(n_ids) >= 4 and f.link_stats()["linking_rate"] == 0.0


# ---------------------------------------------------------------- rig extrinsics
def rig_views(scale, noise=0.0, seed=0):
    """3 cameras on a rig (10 cm apart, yawed), 2 frame sets; poses in window units (metres / scale)."""
    rng = np.random.default_rng(seed)
    mount = []
    for yaw, x in ((0, 0.0), (60, 0.1), (-60, -0.1)):
        T = np.eye(4)
        T[:3, :3] = Rotation.from_euler("y", yaw, degrees=True).as_matrix()
        T[:3, 3] = (x, 0.02, 0.05 * abs(x) * 10)
        mount.append(T)
    cams, T_cw, T_rc = [], [], []
    for k in range(2):
        rig = np.eye(4)
        rig[:3, :3] = Rotation.from_euler("y", 20 * k, degrees=True).as_matrix()
        rig[:3, 3] = (0.5 * k, 0, 0.2 * k)
        for c, M in zip("abc", mount):
            T_wc = rig @ M
            T_wc[:3, 3] /= scale
            if noise:
                T_wc[:3, :3] = Rotation.from_rotvec(rng.normal(0, noise, 3)).as_matrix() @ T_wc[:3, :3]
            cams.append(c)
            T_cw.append(invert_se3(T_wc))
            T_rc.append(M)
    return cams, np.stack(T_cw), np.stack(T_rc)


def test_rig_scale_and_rigidify():
    assert frame_set_groups(list("abcab")) == [[0, 1, 2], [3, 4]]
    cams, T_cw, T_rc = rig_views(scale=2.5)
    s, pairs = rig_scale(T_cw, T_rc, cams)
    assert s == pytest.approx(2.5, rel=1e-9) and pairs == 6
    cams, noisy, T_rc = rig_views(scale=2.5, noise=0.05)
    fixed = rigidify(noisy, T_rc, cams, 2.5)
    for g in frame_set_groups(cams):  # relative poses inside a frame set are the mounting's again
        for v in g[1:]:
            rel = fixed[g[0]] @ invert_se3(fixed[v])  # T_cam(g0)_cam(v)
            want = invert_se3(T_rc[g[0]]) @ T_rc[v]
            want[:3, 3] /= 2.5
            assert np.allclose(rel, want, atol=1e-9)
    T_rc[0] = np.nan  # an unknown camera: left as predicted, the others still rigid
    assert np.allclose(rigidify(noisy, T_rc, cams, 2.5)[0], noisy[0])


def test_rig_makes_the_map_metric():
    """Window worlds at arbitrary scales: with rig extrinsics the map is in metres from the first window on."""
    from test_fusion import view_pose

    f = MapFusion(voxel_size=0.05)
    centres, true = [], []
    for i, S in enumerate((rand_sim3(1), rand_sim3(2))):
        p = make_pred(i, [i, i + 1], S_world_map=S)
        # make_pred's rig: camera b relative to a as view_pose places them (its pose is the same per set)
        p.T_rig_cam_known = np.stack([np.linalg.inv(view_pose("a", k)) @ view_pose(c, k) for k in (i, i + 1)
                                      for c in ("a", "b")])
        r = f.integrate(p)
        assert r.info["rig_scale"] == pytest.approx(1 / np.cbrt(np.linalg.det(S[:3, :3])), rel=1e-6)
        centres += list(r.T_map_cam[:, :3, 3])
        true += [view_pose(c, k)[:3, 3] for k in (i, i + 1) for c in ("a", "b")]
    d_map = np.linalg.norm(np.subtract.outer(np.array(centres), np.array(centres)).diagonal(axis1=1, axis2=3), axis=-1)
    d_true = np.linalg.norm(np.subtract.outer(np.array(true), np.array(true)).diagonal(axis1=1, axis2=3), axis=-1)
    assert np.allclose(d_map, d_true, atol=1e-4)  # metres, across both windows


# ---------------------------------------------------------------- TF tree
def test_transform_tree_chain_static_root_and_tolerance():
    tree = TransformTree()
    M = np.eye(4)
    M[:3, 3] = (0.1, 0, 0)
    tree.add("base_link", "cam_optical_frame", M, static=True)
    for t, x in ((100, 1.0), (200, 2.0)):
        P = np.eye(4)
        P[:3, 3] = (x, 0, 0)
        tree.add("map", "base_link", P, t)
    assert np.allclose(tree.lookup("map", "cam_optical_frame", 205, tolerance_ns=10)[:3, 3], (2.1, 0, 0))
    assert np.allclose(tree.lookup("cam_optical_frame", "map", 100)[:3, 3], (-1.1, 0, 0))
    root, T = tree.static_root("cam_optical_frame")
    assert root == "base_link" and np.allclose(T, M)
    with pytest.raises(TransformLookupError):
        tree.lookup("map", "cam_optical_frame", 150, tolerance_ns=10)
    with pytest.raises(TransformLookupError):
        tree.lookup("map", "nowhere", 100)
    with pytest.raises(ValueError):
        tree.add("map", "x", np.full((4, 4), np.nan))


def test_fusion_puts_the_cameras_of_a_frame_set_back_on_the_rig():
    from test_fusion import view_pose

    rng = np.random.default_rng(5)
    p = make_pred(0, [0, 1], S_world_map=rand_sim3(3))
    T_wc = invert_se3(p.T_cam_world)
    for v in range(len(T_wc)):  # 2-3 degrees of orientation error per camera (centres kept)
        T_wc[v, :3, :3] = Rotation.from_rotvec(rng.normal(0, 0.03, 3)).as_matrix() @ T_wc[v, :3, :3]
    p.T_cam_world = invert_se3(T_wc)
    p.T_rig_cam_known = np.stack([np.linalg.inv(view_pose("a", k)) @ view_pose(c, k) for k in (0, 1)
                                  for c in ("a", "b")])
    r = MapFusion(voxel_size=0.05).integrate(p)
    for k in (0, 1):  # camera b seen from camera a: the known mounting, in metres
        rel = np.linalg.inv(r.T_map_cam[2 * k]) @ r.T_map_cam[2 * k + 1]
        assert np.allclose(rel, np.linalg.inv(view_pose("a", k)) @ view_pose("b", k), atol=1e-9)
    in_rel = (np.linalg.inv(T_wc[0]) @ T_wc[1])[:3, :3]  # the input's relative rotation was off
    assert not np.allclose(in_rel, (np.linalg.inv(r.T_map_cam[0]) @ r.T_map_cam[1])[:3, :3], atol=1e-3)
