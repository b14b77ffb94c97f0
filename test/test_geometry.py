"""Cameras (projection, K scaling, SE(3) inverse, validity) and Sim(3) alignment."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from fast3dis_ros.geometry.align import (
    align_cameras, is_degenerate, rotation_angle_deg, sim3_decompose, sim3_inverse, sim3_matrix, umeyama,
)
from fast3dis_ros.geometry.cameras import (
    camera_center, check_K, check_rotation, check_se3, invert_se3, project, scale_K, transform_points,
    unproject, unproject_depth,
)


def rand_se3(rng, trans=2.0):
    T = np.eye(4)
    T[:3, :3] = Rotation.random(random_state=rng.integers(1 << 30)).as_matrix()
    T[:3, 3] = rng.uniform(-trans, trans, 3)
    return T


def rand_sim3(rng):
    s = float(np.exp(rng.uniform(-1.5, 1.5)))
    T = rand_se3(rng, 5.0)
    return sim3_matrix(s, T[:3, :3], T[:3, 3]), s


K0 = np.array([[500.0, 0, 320.0], [0, 480.0, 240.0], [0, 0, 1]])


def test_project_unproject_round_trip():
    rng = np.random.default_rng(0)
    uv = rng.uniform(0, 640, (100, 2))
    d = rng.uniform(0.2, 30, 100)
    p = unproject(K0, uv, d)
    assert np.allclose(p[:, 2], d)
    uv2, z = project(K0, p)
    assert np.allclose(uv2, uv, atol=1e-9) and np.allclose(z, d)
    # principal point lifts onto the optical axis (z forward, OpenCV)
    assert np.allclose(unproject(K0, np.array([[320.0, 240.0]]), np.array([2.0])), [[0, 0, 2]])
    # +x right, +y down
    uv3, _ = project(K0, np.array([[1.0, 1.0, 10.0]]))
    assert uv3[0, 0] == pytest.approx(370.0) and uv3[0, 1] == pytest.approx(288.0)
    # behind the camera -> nan
    uvb, _ = project(K0, np.array([[0.0, 0.0, -1.0]]))
    assert np.all(np.isnan(uvb))


def test_unproject_depth_grid():
    d = np.full((4, 5), 2.0, np.float32)
    P = unproject_depth(K0, d)
    assert P.shape == (4, 5, 3)
    assert np.allclose(P[2, 3], unproject(K0, np.array([3.0, 2.0]), np.array(2.0)))


def test_scale_K_matches_resized_projection():
    K = scale_K(K0, (480, 640), (240, 320))
    assert np.allclose(K, [[250, 0, 159.75], [0, 240, 119.75], [0, 0, 1]])
    # pixel centres map consistently: u' = (u + 0.5) * s - 0.5
    p = np.array([[0.3, -0.2, 4.0]])
    u_full, _ = project(K0, p)
    u_half, _ = project(K, p)
    assert np.allclose(u_half, (u_full + 0.5) * 0.5 - 0.5)
    # batched
    assert scale_K(np.stack([K0, K0]), (480, 640), (960, 1280)).shape == (2, 3, 3)


def test_invert_se3_and_centre():
    rng = np.random.default_rng(1)
    T = np.stack([rand_se3(rng) for _ in range(5)])
    Ti = invert_se3(T)
    assert np.allclose(T @ Ti, np.eye(4), atol=1e-12)
    c = camera_center(T)
    # the centre maps to the camera origin
    for k in range(5):
        assert np.allclose(transform_points(T[k], c[k]), 0, atol=1e-12)


def test_validity_checks_raise_with_reason():
    check_K(K0)
    check_se3(np.eye(4))
    with pytest.raises(ValueError, match="positive"):
        check_K(np.diag([-1.0, 1, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        check_K(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="shape"):
        check_K(np.eye(4))
    with pytest.raises(ValueError, match="improper"):
        check_rotation(np.diag([1.0, 1, -1]))
    with pytest.raises(ValueError, match="orthonormal"):
        check_rotation(np.eye(3) * 2)
    T = np.eye(4)
    T[3, 0] = 1
    with pytest.raises(ValueError, match="last row"):
        check_se3(T)


@pytest.mark.parametrize("seed", range(10))
def test_umeyama_recovers_sim3_with_noise(seed):
    rng = np.random.default_rng(seed)
    S, s = rand_sim3(rng)
    src = rng.uniform(-3, 3, (200, 3))
    dst = transform_points(S, src) + rng.normal(0, 0.01, (200, 3))
    s_est, R_est, t_est = umeyama(src, dst)
    _, R, t = sim3_decompose(S)
    assert s_est == pytest.approx(s, rel=5e-3)
    assert rotation_angle_deg(R_est, R) < 0.2
    assert np.allclose(t_est, t, atol=0.05 * max(1, s))
    # without scale on a rigid transform: exact-ish
    T = rand_se3(rng)
    s1, R1, t1 = umeyama(src, transform_points(T, src), with_scale=False)
    assert s1 == 1.0 and np.allclose(R1, T[:3, :3], atol=1e-9) and np.allclose(t1, T[:3, 3], atol=1e-9)


def test_sim3_inverse_and_decompose():
    rng = np.random.default_rng(3)
    S, s = rand_sim3(rng)
    assert np.allclose(S @ sim3_inverse(S), np.eye(4), atol=1e-10)
    assert sim3_decompose(S)[0] == pytest.approx(s)


def _cams_in_two_worlds(rng, centres, S_a_b):
    """Extrinsics of the same cameras in world a and world b = S_b_a(world a)."""
    s, R, t = sim3_decompose(S_a_b)
    A, B = [], []
    for c in centres:
        T_world_cam_a = rand_se3(rng)
        T_world_cam_a[:3, 3] = c
        T_cam_world_a = invert_se3(T_world_cam_a)
        # camera pose in world b: centre c_b = S^-1(c_a), R_world_cam_b = R^T R_world_cam_a
        T_world_cam_b = np.eye(4)
        T_world_cam_b[:3, :3] = R.T @ T_world_cam_a[:3, :3]
        T_world_cam_b[:3, 3] = transform_points(sim3_inverse(S_a_b), c)
        A.append(T_cam_world_a)
        B.append(invert_se3(T_world_cam_b))
    return np.stack(A), np.stack(B)


@pytest.mark.parametrize("seed", range(5))
def test_align_cameras_umeyama(seed):
    rng = np.random.default_rng(seed)
    S, s = rand_sim3(rng)
    A, B = _cams_in_two_worlds(rng, rng.uniform(-2, 2, (6, 3)), S)
    info = {}
    T = align_cameras(A, B, info=info)
    assert info["method"] == "umeyama"
    assert np.allclose(T, S, atol=1e-8)
    # with noise on centres
    B_noisy = B.copy()
    B_noisy[:, :3, 3] += rng.normal(0, 1e-3, (6, 3))
    T2 = align_cameras(A, B_noisy)
    assert sim3_decompose(T2)[0] == pytest.approx(s, rel=0.05)


@pytest.mark.parametrize("n", [1, 2])
def test_align_cameras_degenerate_falls_back_to_orientation(n):
    rng = np.random.default_rng(7)
    S, s = rand_sim3(rng)
    A, B = _cams_in_two_worlds(rng, rng.uniform(-2, 2, (n, 3)), S)
    info = {}
    T = align_cameras(A, B, scale=s if n == 1 else None, info=info)
    assert info["method"] == "orientation"
    assert info["scale_source"] == ("given" if n == 1 else "centres")
    assert np.allclose(T, S, atol=1e-8)
    # one view, no scale: unit scale, rotation + translation still consistent for the camera
    if n == 1:
        T1 = align_cameras(A, B)
        assert sim3_decompose(T1)[0] == 1.0
        assert np.allclose(transform_points(T1, camera_center(B)), camera_center(A), atol=1e-9)


def test_collinear_is_degenerate():
    line = np.outer(np.linspace(0, 1, 5), [1.0, 2.0, 3.0])
    assert is_degenerate(line) and is_degenerate(line[:2])
    assert not is_degenerate(np.eye(3))
    rng = np.random.default_rng(9)
    S, s = rand_sim3(rng)
    A, B = _cams_in_two_worlds(rng, line, S)
    info = {}
    T = align_cameras(A, B, info=info)
    assert info["method"] == "orientation" and np.allclose(T, S, atol=1e-8)


def test_align_cameras_rejects_bad_input():
    with pytest.raises(ValueError):
        align_cameras(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))
    with pytest.raises(ValueError):
        align_cameras(np.full((1, 4, 4), np.nan), np.eye(4)[None])
