"""rosbag2 io through rosbags: scene round trip (mcap + sqlite3), encodings, BagWriter, corrupt bags."""

import json
import os
import shutil

import cv2
import numpy as np
import pytest

from fast3dis_ros.data.bags import (
    BagReadError,
    BagWriter,
    _OpenBag,
    bag_topics,
    image_dict,
    make_pointcloud2,
    read_camera_streams,
    read_ground_truth,
    write_scene_bag,
)
from fast3dis_ros.data.synthetic import SceneConfig, generate_scene

START = 1_700_000_000_000_000_000
PERIOD = 100_000_000  # 10 Hz


@pytest.fixture(scope="module")
def scene():
    return generate_scene(SceneConfig(n_cameras=2, n_frames=3, width=20, height=14, n_objects=6, seed=11))


@pytest.fixture(scope="module", params=["mcap", "sqlite3"])
def bag(request, scene, tmp_path_factory):
    path = tmp_path_factory.mktemp("bags") / f"scene_{request.param}"
    counts = write_scene_bag(scene, path, storage=request.param, rate_hz=10.0, start_ns=START)
    return path, counts, request.param


def test_topics_types_and_counts(bag, scene):
    path, counts, storage = bag
    assert any(p.suffix == (".mcap" if storage == "mcap" else ".db3") for p in path.iterdir())
    topics = bag_topics(path)
    expected = {"/fast3dis_gt/instances": ("std_msgs/msg/String", 1), "/tf": ("tf2_msgs/msg/TFMessage", 3),
                "/tf_static": ("tf2_msgs/msg/TFMessage", 1)}
    for cam in scene.camera_names:
        expected[f"/{cam}/image_raw"] = ("sensor_msgs/msg/Image", 3)
        expected[f"/{cam}/camera_info"] = ("sensor_msgs/msg/CameraInfo", 3)
        expected[f"/{cam}/depth_gt"] = ("sensor_msgs/msg/Image", 3)
        expected[f"/{cam}/instance_gt"] = ("sensor_msgs/msg/Image", 3)
    assert topics == expected
    assert counts == {k: v[1] for k, v in expected.items()}


def test_camera_stream_roundtrip(bag, scene):
    path, _, _ = bag
    items = list(read_camera_streams(path, cameras=scene.camera_names))
    assert len(items) == 3 * (2 * 2 + 1) + 1  # image + info per camera, one tf per frame, one tf_static
    for it in items:
        fi = (it.stamp_ns - START) // PERIOD
        assert (it.stamp_ns - START) % PERIOD == 0 and 0 <= fi < 3
        if it.kind == "image":
            cam = it.topic.split("/")[1]
            assert it.frame_id == f"{cam}_optical_frame"
            v = scene.view(fi, cam)
            assert it.data.dtype == np.uint8 and np.array_equal(it.data, v.rgb)
        elif it.kind == "camera_info":
            cam = it.topic.split("/")[1]
            v = scene.view(fi, cam)
            assert np.array_equal(it.data["K"], v.K)
            assert np.array_equal(it.data["P"][:, :3], v.K) and np.all(it.data["P"][:, 3] == 0)
            assert it.data["distortion_model"] == "plumb_bob" and np.all(it.data["D"] == 0)
            assert (it.data["width"], it.data["height"]) == (20, 14)
        elif it.topic == "/tf_static":  # the rig: base_link -> <cam>_optical_frame
            assert it.kind == "tf" and {t["child"] for t in it.data} == {f"{c}_optical_frame" for c in scene.camera_names}
            for t in it.data:
                assert t["parent"] == "base_link"
                assert np.abs(t["T"] - scene.T_rig_cam[t["child"].replace("_optical_frame", "")]).max() < 1e-12
        else:  # the rig pose: map -> base_link at the frame's stamp
            assert it.kind == "tf" and it.topic == "/tf"
            assert [(t["parent"], t["child"], t["stamp_ns"]) for t in it.data] == [("map", "base_link", it.stamp_ns)]
            assert np.abs(it.data[0]["T"] - scene.T_world_rig[fi]).max() < 1e-12
    # explicit topics + no tf
    only = list(read_camera_streams(path, topics=["/left/image_raw"], include_tf=False))
    assert [i.topic for i in only] == ["/left/image_raw"] * 3
    with pytest.raises(BagReadError, match="not in bag"):
        list(read_camera_streams(path, topics=["/nope/image_raw"]))


def test_ground_truth_roundtrip(bag, scene):
    path, _, _ = bag
    gt = read_ground_truth(path)
    assert gt.instances == [i.to_dict() for i in scene.instances]
    assert gt.meta["cameras"] == scene.camera_names
    assert np.allclose(np.asarray(gt.meta["T_rig_cam"]["left"]), scene.T_rig_cam["left"])
    assert gt.cameras == sorted(scene.camera_names)
    for cam in scene.camera_names:
        assert sorted(gt.depth[cam]) == [START + i * PERIOD for i in range(3)]
        assert np.array_equal(gt.K[cam], scene.view(0, cam).K)
        for fi in range(3):
            v = scene.view(fi, cam)
            st = START + fi * PERIOD
            assert gt.depth[cam][st].dtype == np.float32 and np.array_equal(gt.depth[cam][st], v.depth)
            # the camera pose composed from map -> base_link (/tf) and base_link -> <cam> (/tf_static)
            assert np.abs(gt.T_world_cam[cam][st] - v.T_world_cam).max() < 1e-9
            assert gt.instance[cam][st].dtype == np.int32 and np.array_equal(gt.instance[cam][st], v.instance)
            assert np.abs(gt.T_world_cam[cam][st] - v.T_world_cam).max() < 1e-12


@pytest.mark.parametrize("storage,fname", [("mcap", "t.mcap"), ("sqlite3", "t.db3")])
def test_truncated_bag_raises_bag_read_error(scene, tmp_path, storage, fname):
    path = tmp_path / "b"
    write_scene_bag(scene, path, storage=storage)
    data = next(p for p in path.iterdir() if p.suffix in (".mcap", ".db3"))
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(BagReadError, match="truncated or corrupt") as ei:
        list(read_camera_streams(path))
    assert str(path) in str(ei.value)
    with pytest.raises(BagReadError):
        read_ground_truth(path)


def test_missing_bag_and_metadata(tmp_path, scene):
    with pytest.raises(BagReadError, match="no such rosbag2"):
        list(read_camera_streams(tmp_path / "none"))
    path = tmp_path / "b"
    write_scene_bag(scene, path)
    os.remove(path / "metadata.yaml")
    with pytest.raises(BagReadError, match="metadata.yaml"):
        list(read_camera_streams(path))


def test_existing_path_needs_overwrite(tmp_path, scene):
    write_scene_bag(scene, tmp_path / "b")
    with pytest.raises(FileExistsError):
        write_scene_bag(scene, tmp_path / "b")
    write_scene_bag(scene, tmp_path / "b", overwrite=True, storage="sqlite3")
    assert bag_topics(tmp_path / "b")["/tf"] == ("tf2_msgs/msg/TFMessage", 3)


def test_image_encodings_and_compressed(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    alpha = np.full((5, 7, 1), 9, np.uint8)
    cases = {
        "rgb8": (rgb, rgb),
        "bgr8": (rgb[..., ::-1], rgb),
        "rgba8": (np.concatenate([rgb, alpha], -1), rgb),
        "bgra8": (np.concatenate([rgb[..., ::-1], alpha], -1), rgb),
        "mono8": (rgb[..., 0], rgb[..., 0]),
        "16UC1": (rng.integers(0, 65535, (5, 7)).astype(np.uint16),) * 2,
        "32FC1": (rng.normal(size=(5, 7)).astype(np.float32),) * 2,
        "32SC1": (rng.integers(-5, 1 << 30, (5, 7)).astype(np.int32),) * 2,
    }
    path = tmp_path / "enc"
    with BagWriter(path, storage="sqlite3") as w:
        for enc, (arr, _) in cases.items():
            w.write(f"/{enc.lower()}", "sensor_msgs/Image", image_dict(arr, enc, "cam", 5), 5)
        # padded rows (step > width * bytes)
        padded = np.zeros((5, 7 * 3 + 3), np.uint8)
        padded[:, :21] = rgb.reshape(5, 21)
        msg = image_dict(rgb, "rgb8", "cam", 6)
        msg.update(step=24, data=padded.ravel())
        w.write("/padded", "sensor_msgs/msg/Image", msg, 6)
        # big endian float
        be = cases["32FC1"][0].astype(">f4")
        msg = image_dict(cases["32FC1"][0], "32FC1", "cam", 7)
        msg.update(is_bigendian=True, data=np.frombuffer(be.tobytes(), np.uint8))
        w.write("/bigendian", "sensor_msgs/msg/Image", msg, 7)
        solid = np.zeros((8, 8, 3), np.uint8) + np.array([200, 30, 60], np.uint8)  # jpeg: smooth content
        for fmt, ext, img in (("png", ".png", rgb), ("jpeg", ".jpg", solid)):
            ok, buf = cv2.imencode(ext, img[..., ::-1].copy())
            assert ok
            w.write(f"/c_{fmt}", "sensor_msgs/msg/CompressedImage",
                    {"header": {"stamp": {"sec": 0, "nanosec": 8}, "frame_id": "cam"}, "format": f"rgb8; {fmt} compressed bgr8",
                     "data": buf.ravel()}, 8)
    got = {i.topic: i for i in read_camera_streams(path, include_tf=False)}
    for enc, (_, want) in cases.items():
        arr = got[f"/{enc.lower()}"].data
        assert arr.dtype == want.dtype and np.array_equal(arr, want), enc
    assert np.array_equal(got["/padded"].data, rgb)
    assert np.array_equal(got["/bigendian"].data, cases["32FC1"][0])
    assert np.array_equal(got["/c_png"].data, rgb)
    assert got["/c_jpeg"].data.shape == (8, 8, 3)
    assert np.abs(got["/c_jpeg"].data.astype(int) - solid).max() < 8  # RGB order, not BGR


def test_bag_writer_pointcloud_markers_tf_string(tmp_path):
    pts = np.zeros(4, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4"), ("instance", "<u4"), ("score", "<f4")])
    pts["x"] = [1, 2, 3, 4]
    pts["instance"] = [0, 1, 1, 2]
    marker = {"header": {"frame_id": "map", "stamp": {"sec": 1, "nanosec": 0}}, "ns": "inst", "id": 3, "type": 1,
              "action": 0, "pose": {"position": {"x": 1.0}, "orientation": {"w": 1.0}},
              "scale": {"x": 0.5, "y": 0.5, "z": 0.5}, "color": {"r": 1.0, "a": 1.0}}
    path = tmp_path / "out"
    with BagWriter(path) as w:
        w.write("/fast3dis/cloud", "sensor_msgs/msg/PointCloud2", make_pointcloud2(pts, "map", 10), 10)
        w.write("/fast3dis/markers", "visualization_msgs/msg/MarkerArray", {"markers": [marker, dict(marker, id=4)]}, 10)
        w.write("/tf", "tf2_msgs/msg/TFMessage", {"transforms": [{"header": {"frame_id": "map"}, "child_frame_id": "x",
                                                                   "transform": {"rotation": {"w": 1.0}}}]}, 11)
        w.write("/note", "std_msgs/String", {"data": json.dumps({"a": 1})}, 12)
        with pytest.raises(ValueError, match="already carries"):
            w.write("/note", "sensor_msgs/msg/Image", {}, 13)
        with pytest.raises(KeyError):
            w.write("/x", "nope_msgs/msg/Thing", {}, 13)
    assert w.counts == {"/fast3dis/cloud": 1, "/fast3dis/markers": 1, "/tf": 1, "/note": 1}
    b = _OpenBag(path)
    try:
        msgs = {c.topic: m for c, _, m in b.messages(b.reader.connections)}
    finally:
        b.close()
    pc = msgs["/fast3dis/cloud"]
    assert [f.name for f in pc.fields] == ["x", "y", "z", "rgb", "instance", "score"]
    assert [f.datatype for f in pc.fields] == [7, 7, 7, 7, 6, 7] and pc.point_step == 24 and pc.width == 4
    back = np.frombuffer(pc.data.tobytes(), dtype=pts.dtype)
    assert np.array_equal(back, pts)
    ma = msgs["/fast3dis/markers"]
    assert [m.id for m in ma.markers] == [3, 4] and ma.markers[0].scale.x == 0.5 and ma.markers[0].pose.position.x == 1.0
    assert json.loads(msgs["/note"].data) == {"a": 1}


def test_custom_message_type(tmp_path):
    with BagWriter(tmp_path / "c") as w:
        w.register_msg("demo_msgs/msg/Score", "string name\nfloat32[] values\n")
        w.write("/s", "demo_msgs/msg/Score", {"name": "a", "values": [1.0, 2.5]}, 1)
    b = _OpenBag(tmp_path / "c")  # custom type registered from the bag's own definition
    try:
        (_, _, m), = list(b.messages(b.reader.connections))
    finally:
        b.close()
    assert m.name == "a" and np.allclose(m.values, [1.0, 2.5])


def test_tf_quaternions_non_unit_are_normalised_and_zero_is_a_bad_message(tmp_path):
    """/tf rotations read back in ROS (x, y, z, w) order; a non-unit quaternion is normalised (as tf2 and
    transforms3d do); a zero one cannot be a rotation: BagReadError, or a bad_message with skip_bad."""
    path = tmp_path / "tf"
    rot = {"x": 0.0, "y": 0.0, "z": 2.0, "w": 2.0}  # 90 deg about z, norm 2*sqrt(2)
    with BagWriter(path) as w:
        for i, r in enumerate([rot, {"x": 0.0, "y": 0.0, "z": 0.0, "w": 0.0}]):
            w.write("/tf", "tf2_msgs/msg/TFMessage", {"transforms": [{
                "header": {"frame_id": "map", "stamp": {"sec": i, "nanosec": 0}}, "child_frame_id": "base",
                "transform": {"translation": {"x": 1.0}, "rotation": r}}]}, i)
    good, bad = list(read_camera_streams(path, topics=["/tf"], skip_bad=True))
    np.testing.assert_allclose(good.data[0]["T"], [[0, -1, 0, 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                               atol=1e-15)
    assert bad.kind == "bad_message" and "quaternion" in bad.data
    with pytest.raises(BagReadError, match="quaternion"):
        list(read_camera_streams(path, topics=["/tf"]))
