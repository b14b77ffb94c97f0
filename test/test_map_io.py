"""Map files (geometry/map_io.py) and instance queries (geometry/map_query.py), without ROS.

PCD files are read back with pypcd4 (a PCD reader from PyPI that follows PCL's format), PLY files with a
header parser that follows the PLY spec (element / property lines, binary little endian payload).
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from fast3dis_ros.geometry.map_io import MapSaveError, instance_path, pcd_bytes, save_cloud
from fast3dis_ros.geometry.map_query import InstanceQuery, InstanceQueryError, points_of, query_instances
from fast3dis_ros.core.frames import InstanceCloud, InstanceSummary

PLY_TYPES = {"float": "<f4", "uchar": "u1", "uint": "<u4"}


def make_cloud(n: int = 300, seed: int = 0) -> InstanceCloud:
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
    inst = rng.choice(np.array([0, 3, 7, 12], np.uint32), size=n)
    score = rng.random(n).astype(np.float32)
    return InstanceCloud("map", 123_456_789, xyz, rgb, inst, score)


def read_ply(path) -> np.ndarray:
    data = open(path, "rb").read()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    assert lines[0] == "ply" and lines[1] == "format binary_little_endian 1.0"
    n = next(int(ln.split()[2]) for ln in lines if ln.startswith("element vertex"))
    props = [ln.split()[1:] for ln in lines if ln.startswith("property")]
    dt = np.dtype([(name, PLY_TYPES[t]) for t, name in props])
    assert len(data) - end == n * dt.itemsize, "payload size does not match the header"
    return np.frombuffer(data, dt, count=n, offset=end)


def test_pcd_is_read_by_pypcd4_with_instance_field(tmp_path):
    from pypcd4 import PointCloud

    cloud = make_cloud()
    (f,) = save_cloud(cloud, str(tmp_path / "map.pcd"))
    pc = PointCloud.from_path(f)
    assert pc.fields == ("x", "y", "z", "rgb", "instance", "score")
    assert pc.types[pc.fields.index("instance")] == np.dtype("uint32")
    assert pc.points == len(cloud)
    arr = pc.numpy()
    np.testing.assert_array_equal(arr[:, :3].astype(np.float32), cloud.xyz)
    np.testing.assert_array_equal(arr[:, 4].astype(np.uint32), cloud.instance)
    np.testing.assert_allclose(arr[:, 5], cloud.score, rtol=0, atol=0)
    # PCL packs rgb into the float's bytes: 0x00RRGGBB
    rgb_u32 = arr[:, 3].astype(np.float32).view(np.uint32)
    np.testing.assert_array_equal((rgb_u32 >> 16) & 0xFF, cloud.rgb[:, 0])
    np.testing.assert_array_equal(rgb_u32 & 0xFF, cloud.rgb[:, 2])


def test_ply_round_trip(tmp_path):
    cloud = make_cloud(seed=1)
    (f,) = save_cloud(cloud, str(tmp_path / "map.ply"))
    arr = read_ply(f)
    np.testing.assert_array_equal(np.stack([arr["x"], arr["y"], arr["z"]], 1), cloud.xyz)
    np.testing.assert_array_equal(np.stack([arr["red"], arr["green"], arr["blue"]], 1), cloud.rgb)
    np.testing.assert_array_equal(arr["instance"], cloud.instance)
    np.testing.assert_array_equal(arr["score"], cloud.score)


@pytest.mark.parametrize("ext", [".ply", ".pcd"])
def test_per_instance_files_hold_exactly_their_points(tmp_path, ext):
    cloud = make_cloud(seed=2)
    files = save_cloud(cloud, str(tmp_path / f"room{ext}"), per_instance=True)
    ids = sorted(set(cloud.instance.tolist()) - {0})
    assert files == [tmp_path / f"room{ext}"] + [instance_path(tmp_path / f"room{ext}", i) for i in ids]
    assert files[1].name == f"room_instance_{ids[0]}{ext}"
    for gid, f in zip(ids, files[1:]):
        if ext == ".ply":
            inst = read_ply(f)["instance"]
        else:
            from pypcd4 import PointCloud

            inst = PointCloud.from_path(f).numpy()[:, 4].astype(np.uint32)
        assert len(inst) == int(np.sum(cloud.instance == gid))
        assert set(inst.tolist()) == {gid}


@pytest.mark.parametrize("bad,why", [
    ("", "empty path"),
    ("relative/map.ply", "not absolute"),
    ("/no/such/folder/map.ply", "does not exist"),
    ("{tmp}/map.xyz", "unknown extension"),
    ("{tmp}", "unknown extension"),
])
def test_bad_paths_are_refused_with_the_reason(tmp_path, bad, why):
    with pytest.raises(MapSaveError, match=why):
        save_cloud(make_cloud(), bad.format(tmp=tmp_path))
    assert os.listdir(tmp_path) == []


def test_unwritable_place_is_refused():
    """/proc passes the permission check for root but takes no files: the write itself fails, cleanly."""
    with pytest.raises(MapSaveError, match="cannot write '/proc/fast3dis_map.pcd'"):
        save_cloud(make_cloud(), "/proc/fast3dis_map.pcd")
    assert not os.path.exists("/proc/fast3dis_map.pcd")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see the /proc case above")
def test_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(MapSaveError, match="not writable"):
            save_cloud(make_cloud(), str(ro / "map.pcd"))
    finally:
        ro.chmod(stat.S_IRWXU)
    assert os.listdir(ro) == []


def test_failure_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    """An OSError in the middle of a per-instance save (disk full) removes every temporary and writes
    nothing under the final names."""
    import fast3dis_ros.geometry.map_io as mio

    real_fdopen = os.fdopen
    calls = {"n": 0}

    def failing_fdopen(fd, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.close(fd)
            raise OSError(28, "No space left on device")
        return real_fdopen(fd, *a, **k)

    monkeypatch.setattr(mio.os, "fdopen", failing_fdopen)
    with pytest.raises(MapSaveError, match="No space left on device; nothing was written"):
        save_cloud(make_cloud(), str(tmp_path / "map.pcd"), per_instance=True)
    assert os.listdir(tmp_path) == []


def test_empty_map_is_refused(tmp_path):
    empty = InstanceCloud("map", 0, np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8),
                          np.zeros(0, np.uint32), np.zeros(0, np.float32))
    with pytest.raises(MapSaveError, match="empty"):
        save_cloud(empty, str(tmp_path / "map.ply"))
    assert os.listdir(tmp_path) == []


def test_pcd_header_counts_match_payload():
    cloud = make_cloud(n=17)
    b = pcd_bytes(cloud)
    head, _, payload = b.partition(b"DATA binary\n")
    assert b"POINTS 17\n" in head and b"TYPE F F F F U F\n" in head
    assert len(payload) == 17 * 24


# ------------------------------------------------------------------ queries
def summaries() -> list[InstanceSummary]:
    def s(i, score, c):
        c = np.asarray(c, np.float64)
        return InstanceSummary(i, score, c, c - 0.1, c + 0.1, 10 * i, 2)

    return [s(3, 0.9, [0, 0, 0]), s(7, 0.4, [2, 0, 0]), s(12, 0.7, [0, 5, 1])]


def ids(res) -> list[int]:
    return [int(r.id) for r in res]


def test_query_filters():
    inst = summaries()
    assert ids(query_instances(inst, InstanceQuery())) == [3, 7, 12]
    assert ids(query_instances(inst, InstanceQuery(ids=[12, 3]))) == [3, 12]
    assert ids(query_instances(inst, InstanceQuery(min_score=0.5))) == [3, 12]
    box = (np.array([-1.0, -1, -1]), np.array([2.5, 1, 1]))
    assert ids(query_instances(inst, InstanceQuery(box=box))) == [3, 7]
    assert ids(query_instances(inst, InstanceQuery(box=box, min_score=0.5))) == [3]


def test_query_box_in_another_frame():
    """Box frame 'b' is the map shifted by +10 in x (T_b_map translates by +10): the box around x=12 in
    'b' holds the instance at map x=2 only."""
    T_b_map = np.eye(4)
    T_b_map[0, 3] = 10.0
    box = (np.array([11.5, -1, -1]), np.array([12.5, 1, 1]))
    assert ids(query_instances(summaries(), InstanceQuery(box=box, T_box_map=T_b_map))) == [7]
    assert ids(query_instances(summaries(), InstanceQuery(box=box))) == []


@pytest.mark.parametrize("q,why", [
    (InstanceQuery(ids=[3, 99]), r"unknown instance id\(s\) \[99\]"),
    (InstanceQuery(box=(np.array([1.0, 0, 0]), np.array([0.0, 1, 1]))), "box min > max along x"),
    (InstanceQuery(box=(np.array([0.0, 0, np.nan]), np.array([1.0, 1, 1]))), "finite"),
    (InstanceQuery(min_score=float("nan")), "not finite"),
])
def test_query_errors(q, why):
    with pytest.raises(InstanceQueryError, match=why):
        query_instances(summaries(), q)


def test_query_on_empty_map_says_so():
    with pytest.raises(InstanceQueryError, match="map is empty"):
        query_instances([], InstanceQuery())


def test_points_of_selects_labelled_points():
    cloud = make_cloud(seed=4)
    sub = points_of(cloud, [3, 12])
    assert len(sub) == int(np.sum(np.isin(cloud.instance, [3, 12])))
    assert set(sub.instance.tolist()) == {3, 12}
    assert len(points_of(cloud, [])) == 0
