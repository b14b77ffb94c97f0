"""geometry/rotations.py: quaternion (x, y, z, w) <-> rotation matrix, checked against hand-known
rotations, scipy and transforms3d, over random and near-180-degree rotations, batches, and
non-orthonormal input."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from fast3dis_ros.geometry.rotations import matrix_from_quat_xyzw, nearest_rotation, quat_xyzw_from_matrix

H = np.sqrt(0.5)

# (quaternion x, y, z, w; rotation matrix) known by hand
KNOWN = [
    ((0, 0, 0, 1), np.eye(3)),
    ((0, 0, H, H), np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]])),  # +90 deg about z
    ((H, 0, 0, H), np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0.0]])),  # +90 deg about x
    ((0, H, 0, H), np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0.0]])),  # +90 deg about y
    ((1, 0, 0, 0), np.diag([1, -1, -1.0])),  # 180 deg about x
    ((0, 1, 0, 0), np.diag([-1, 1, -1.0])),  # 180 deg about y
    ((0, 0, 1, 0), np.diag([-1, -1, 1.0])),  # 180 deg about z
    ((0.5, 0.5, 0.5, 0.5), np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0.0]])),  # 120 deg about (1,1,1): x->y->z
    # ROS optical frame in a body frame (x forward, z up): z_opt = x_body, x_opt = -y_body, y_opt = -z_body
    ((-0.5, 0.5, -0.5, 0.5), np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0.0]])),
]


def _random_quats(n, seed=0):
    q = np.random.default_rng(seed).normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _near_180(n, seed=1):
    """Rotations by pi - eps about random axes, eps from 1e-2 down to 0 (w from ~5e-3 down to 0)."""
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.pi - np.concatenate([[0.0, 1e-12, 1e-9, 1e-6], np.geomspace(1e-5, 1e-2, n - 4)])
    return Rotation.from_rotvec(axes * angles[:, None]).as_matrix()


def _same_rotation(q, p):
    """|<q, p>| = 1 for unit q, p: equal up to sign."""
    return np.abs(np.sum(q * p, axis=-1))


@pytest.mark.parametrize("q, R", KNOWN)
def test_known_rotations_both_ways(q, R):
    np.testing.assert_allclose(matrix_from_quat_xyzw(q), R, atol=1e-15)
    np.testing.assert_allclose(quat_xyzw_from_matrix(R), q, atol=1e-15)


def test_matches_scipy_and_transforms3d():
    t3d = pytest.importorskip("transforms3d.quaternions")
    q = _random_quats(200)
    R = matrix_from_quat_xyzw(q)
    np.testing.assert_allclose(R, Rotation.from_quat(q).as_matrix(), atol=1e-14)
    for qi, Ri in zip(q[:20], R[:20]):  # transforms3d is (w, x, y, z), one at a time
        np.testing.assert_allclose(Ri, t3d.quat2mat(np.roll(qi, 1)), atol=1e-14)
    Rs = Rotation.random(200, random_state=3).as_matrix()
    np.testing.assert_allclose(_same_rotation(quat_xyzw_from_matrix(Rs), Rotation.from_matrix(Rs).as_quat()), 1,
                               atol=1e-14)


def test_round_trip_random_and_sign_convention():
    q = _random_quats(1000)
    back = quat_xyzw_from_matrix(matrix_from_quat_xyzw(q))
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1, atol=1e-15)
    assert np.all(back[:, 3] >= 0)
    np.testing.assert_allclose(back, q * np.sign(q[:, 3:]), atol=1e-14)  # q with w >= 0
    Rs = Rotation.random(1000, random_state=4).as_matrix()
    np.testing.assert_allclose(matrix_from_quat_xyzw(quat_xyzw_from_matrix(Rs)), Rs, atol=1e-14)


def test_near_180_degree_rotations_keep_full_precision():
    Rs = _near_180(40)
    q = quat_xyzw_from_matrix(Rs)
    assert np.all(q[:, 3] >= 0) and np.all(q[:, 3] < 5.1e-3)
    np.testing.assert_allclose(matrix_from_quat_xyzw(q), Rs, atol=2e-15)
    np.testing.assert_allclose(_same_rotation(q, Rotation.from_matrix(Rs).as_quat()), 1, atol=1e-15)
    # (w = sqrt(1 + tr) / 2 and the vector part divided by 4 w is off by up to ~2e-7 in R here)
    angle = 2 * np.arctan2(np.linalg.norm(q[:, :3], axis=1), q[:, 3])
    np.testing.assert_allclose(angle, Rotation.from_matrix(Rs).magnitude(), atol=1e-15)


def test_exact_180_sign_is_the_largest_vector_component_positive():
    for axis in np.eye(3):
        R = 2 * np.outer(axis, axis) - np.eye(3)
        np.testing.assert_array_equal(quat_xyzw_from_matrix(R), [*axis, 0.0])
    a = np.array([0.6, -0.8, 0.0])  # |y| largest -> y > 0
    q = quat_xyzw_from_matrix(2 * np.outer(a, a) - np.eye(3))
    np.testing.assert_allclose(q, [-0.6, 0.8, 0, 0], atol=1e-15)


def test_batch_shapes():
    q = _random_quats(24).reshape(2, 3, 4, 4)
    R = matrix_from_quat_xyzw(q)
    assert R.shape == (2, 3, 4, 3, 3)
    back = quat_xyzw_from_matrix(R)
    assert back.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(back.reshape(-1, 4), np.stack([quat_xyzw_from_matrix(r) for r in R.reshape(-1, 3, 3)]))
    assert matrix_from_quat_xyzw([0, 0, 0, 1]).shape == (3, 3)
    assert quat_xyzw_from_matrix(np.eye(3)).shape == (4,)
    assert matrix_from_quat_xyzw(np.zeros((0, 4)) + 1).shape == (0, 3, 3)
    assert quat_xyzw_from_matrix(np.zeros((0, 3, 3))).shape == (0, 4)
    assert nearest_rotation(np.zeros((0, 3, 3))).shape == (0, 3, 3)
    # lists and ints are accepted; the result is float64
    assert matrix_from_quat_xyzw([[0, 0, 0, 2]]).dtype == np.float64


def test_non_unit_quaternions_are_normalised_and_bad_ones_raise():
    q = _random_quats(10)
    scale = np.geomspace(1e-5, 1e5, 10)[:, None]
    np.testing.assert_allclose(matrix_from_quat_xyzw(q * scale), matrix_from_quat_xyzw(q), atol=1e-14)
    np.testing.assert_allclose(matrix_from_quat_xyzw(-q), matrix_from_quat_xyzw(q), atol=1e-15)
    for bad in ([0, 0, 0, 0], [1e-7, 0, 0, 0], [np.nan, 0, 0, 1], [np.inf, 0, 0, 1]):
        with pytest.raises(ValueError, match="quaternion"):
            matrix_from_quat_xyzw(bad)
    with pytest.raises(ValueError, match="quaternion"):  # one bad one in a batch
        matrix_from_quat_xyzw(np.vstack([q, [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        matrix_from_quat_xyzw([0, 0, 1])


def test_non_orthonormal_matrices_go_to_the_nearest_rotation():
    Rs = Rotation.random(50, random_state=5).as_matrix()
    q = quat_xyzw_from_matrix(Rs)
    s = np.geomspace(1e-3, 1e3, 50)[:, None, None]
    np.testing.assert_allclose(quat_xyzw_from_matrix(s * Rs), q, atol=1e-14)  # Sim(3) block: scale dropped
    noisy = Rs + 1e-3 * np.random.default_rng(6).normal(size=Rs.shape)  # drift / shear
    Rn = nearest_rotation(noisy)
    np.testing.assert_allclose(Rn @ np.swapaxes(Rn, -1, -2), np.broadcast_to(np.eye(3), Rn.shape), atol=1e-14)
    np.testing.assert_allclose(np.linalg.det(Rn), 1, atol=1e-14)
    np.testing.assert_allclose(quat_xyzw_from_matrix(noisy), quat_xyzw_from_matrix(Rn), atol=1e-14)
    np.testing.assert_allclose(matrix_from_quat_xyzw(quat_xyzw_from_matrix(noisy)), Rs, atol=5e-3)
    # nearest rotation really is the closest: no random rotation near it is closer in the Frobenius norm
    d0 = np.linalg.norm(noisy - Rn, axis=(1, 2))
    for k in range(5):
        other = Rotation.from_rotvec(np.random.default_rng(k).normal(scale=1e-3, size=(50, 3))).as_matrix() @ Rn
        assert np.all(np.linalg.norm(noisy - other, axis=(1, 2)) >= d0 - 1e-15)
    # a reflection goes to the nearest proper rotation: diag(1, 1, -1) -> the identity
    np.testing.assert_allclose(quat_xyzw_from_matrix(np.diag([1.0, 1.0, -1.0])), [0, 0, 0, 1], atol=1e-15)
    assert np.linalg.det(nearest_rotation(-Rs[0])) == pytest.approx(1)
    with pytest.raises(ValueError, match="non-finite"):
        quat_xyzw_from_matrix(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="shape"):
        quat_xyzw_from_matrix(np.eye(4))
