"""eval/output_bag.py TF messages: rigid part of a Sim(3), ROS (x, y, z, w) quaternion with w >= 0."""

import numpy as np
from scipy.spatial.transform import Rotation

from fast3dis_ros.eval.output_bag import OutputBagWriter, rigid_from_sim3
from fast3dis_ros.geometry.rotations import matrix_from_quat_xyzw


def test_tf_message_drops_sim3_scale_and_keeps_rotation(tmp_path):
    Rs = Rotation.random(4, random_state=0).as_matrix()
    Rs[3] = np.diag([-1.0, -1.0, 1.0])  # 180 deg about z
    T = np.tile(np.eye(4), (4, 1, 1))
    T[:, :3, :3] = np.array([0.5, 1.0, 2.0, 3.0])[:, None, None] * Rs
    T[:, :3, 3] = np.arange(12.0).reshape(4, 3)
    R0, t0 = rigid_from_sim3(T[2])
    np.testing.assert_allclose(R0, Rs[2], atol=1e-14)
    np.testing.assert_array_equal(t0, [6, 7, 8])
    msg = OutputBagWriter(tmp_path / "never_opened").tf_message("map", [f"c{i}" for i in range(4)], T,
                                                                 [10, 11, 12, 13])
    assert [t.child_frame_id for t in msg.transforms] == ["c0", "c1", "c2", "c3"]
    assert [t.header.stamp.sec * 10**9 + t.header.stamp.nanosec for t in msg.transforms] == [10, 11, 12, 13]
    for Ti, Ri, tf in zip(T, Rs, msg.transforms):
        r, tr = tf.transform.rotation, tf.transform.translation
        q = np.array([r.x, r.y, r.z, r.w])
        assert q[3] >= 0 and abs(np.linalg.norm(q) - 1) < 1e-15
        np.testing.assert_allclose(matrix_from_quat_xyzw(q), Ri, atol=1e-14)
        np.testing.assert_array_equal([tr.x, tr.y, tr.z], Ti[:3, 3])
    np.testing.assert_allclose(q, [0, 0, 1, 0], atol=1e-15)
