"""Multi-view Datasets: synthetic folders, fake Aria Synthetic Environments and ScanNet++ layouts."""

import csv
import json

import cv2
import numpy as np
import pytest
import torch

from fast3dis_ros.data.datasets import (
    ASE_RGB_PARAMS_704,
    ASE_T_DEVICE_CAMERA,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AriaSyntheticDataset,
    ScanNetPPDataset,
    SyntheticWindowDataset,
    ase_fisheye624_project,
)
from fast3dis_ros.data.synthetic import SceneConfig, generate_scene, write_dataset


# ----------------------------------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    scenes = []
    for i in range(2):
        sc = generate_scene(SceneConfig(n_cameras=2, n_frames=4, width=24, height=18, n_objects=8, seed=20 + i))
        write_dataset(sc, root / f"scene_{i:04d}")
        scenes.append(sc)
    return root, scenes


def test_synthetic_windows_shapes_values(synth):
    root, scenes = synth
    ds = SyntheticWindowDataset(root, n_views=5, relabel=False)  # 3 frames x 2 cams -> first 5 views
    assert len(ds) == 2 * (4 - 3 + 1)
    s = ds[1]
    assert s["images"].shape == (5, 18, 24, 3) and s["images"].dtype == torch.uint8
    assert s["depth"].shape == (5, 18, 24) and s["depth"].dtype == torch.float32
    assert s["instance"].shape == (5, 18, 24) and s["instance"].dtype == torch.int64
    assert s["K"].shape == (5, 3, 3) and s["T_cam_world"].shape == (5, 4, 4)
    assert s["frames"] == ["f0001_front", "f0001_left", "f0002_front", "f0002_left", "f0003_front"]
    sc = scenes[0]
    for i, (f, c) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]):
        v = sc.frames[f][c]
        assert np.array_equal(s["images"][i].numpy(), v.rgb)
        assert np.array_equal(s["depth"][i].numpy(), v.depth)
        assert np.array_equal(s["instance"][i].numpy(), v.instance)
        assert np.allclose(s["T_cam_world"][i].numpy(), np.linalg.inv(v.T_world_cam), atol=1e-5)
        assert np.allclose(s["K"][i].numpy(), v.K)
    assert bool(s["depth_valid"].all())


def test_synthetic_relabel_float_resize(synth):
    root, scenes = synth
    raw = SyntheticWindowDataset(root / "scene_0001", n_views=4, relabel=False)[0]
    ds = SyntheticWindowDataset(root / "scene_0001", n_views=4, image_format="float", image_size=(9, 12),
                                cameras=["front"])
    assert len(ds) == 1  # 4 frames of one camera
    s = ds[0]
    assert s["images"].shape == (4, 3, 9, 12) and s["images"].dtype == torch.float32
    assert s["depth"].shape == (4, 9, 12)
    K0 = scenes[1].frames[0][0].K
    assert s["K"][0, 0, 0].item() == pytest.approx(K0[0, 0] * 0.5, rel=1e-6)
    assert s["K"][0, 0, 2].item() == pytest.approx((K0[0, 2] + 0.5) * 0.5 - 0.5, rel=1e-6)
    # relabel: consistent 1..M across views, bijective with the raw ids
    rel = SyntheticWindowDataset(root / "scene_0001", n_views=4)[0]["instance"].numpy()
    orig = raw["instance"].numpy()
    ids = np.unique(rel)
    assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, ids.size))
    pairs = set(zip(orig.ravel().tolist(), rel.ravel().tolist()))
    assert len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})
    assert (0, 0) in pairs
    # float normalisation matches uint8 data
    one = SyntheticWindowDataset(root / "scene_0001", n_views=1, image_format="float")[0]["images"][0]
    u8 = scenes[1].frames[0][0].rgb
    want = (u8[3, 4, 1] / 255.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert one[1, 3, 4].item() == pytest.approx(want, abs=1e-5)


def test_synthetic_dataloader_batches(synth):
    from torch.utils.data import DataLoader

    ds = SyntheticWindowDataset(synth[0], n_views=4, image_format="float")
    batch = next(iter(DataLoader(ds, batch_size=2, shuffle=False)))
    assert batch["images"].shape == (2, 4, 3, 18, 24) and batch["T_cam_world"].shape == (2, 4, 4, 4)
    assert batch["instance"].shape == (2, 4, 18, 24) and len(batch["scene"]) == 2


def test_synthetic_errors(tmp_path, synth):
    with pytest.raises(FileNotFoundError):
        SyntheticWindowDataset(tmp_path)
    with pytest.raises(ValueError):
        SyntheticWindowDataset(synth[0], cameras=["rear"])


# ----------------------------------------------------------------------------------------------------
# Aria Synthetic Environments
# ----------------------------------------------------------------------------------------------------
def _write_ase(root, n=3, size=64):
    d = root / "0"
    for sub in ("rgb", "depth", "instances"):
        (d / sub).mkdir(parents=True)
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        img[:, : size // 2] = (200, 10, 10)  # left half red (RGB)
        img[:, size // 2:] = (10, 10, 200)
        cv2.imwrite(str(d / "rgb" / f"vignette{i:07d}.jpg"), img[..., ::-1])
        cv2.imwrite(str(d / "depth" / f"depth{i:07d}.png"), np.full((size, size), 2000 + 100 * i, np.uint16))
        inst = np.zeros((size, size), np.uint16)
        inst[:, : size // 2] = 3
        inst[:, size // 2:] = 700
        cv2.imwrite(str(d / "instances" / f"instance{i:07d}.png"), inst)
    with open(d / "trajectory.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["graph_uid", "tracking_timestamp_us", "utc_timestamp_ns", "tx_world_device", "ty_world_device",
                    "tz_world_device", "qx_world_device", "qy_world_device", "qz_world_device", "qw_world_device"])
        for i in range(n):
            s = np.sin(0.25), np.cos(0.25)  # 0.5 rad yaw about z for frame 1
            q = (0, 0, s[0], s[1]) if i == 1 else (0, 0, 0, 1)
            w.writerow(["g", i * 100000, 0, float(i), 0.5, 1.5, *q])
    return d


def test_ase_fisheye_projection_centre():
    uv = ase_fisheye624_project(np.array([[0.0, 0.0, 1.0], [0.1, 0.0, 1.0]]))
    assert np.allclose(uv[0], ASE_RGB_PARAMS_704[1:3])
    assert uv[1, 0] > uv[0, 0] and abs(uv[1, 1] - uv[0, 1]) < 0.1  # +x goes right


def test_ase_reader(tmp_path):
    _write_ase(tmp_path, n=3, size=64)
    ds = AriaSyntheticDataset(tmp_path, n_views=2, image_size=(24, 32), relabel=False)
    assert len(ds) == 2
    s = ds[1]
    assert s["images"].shape == (2, 24, 32, 3) and s["depth"].shape == (2, 24, 32)
    assert s["frames"] == ["vignette0000001.jpg", "vignette0000002.jpg"]
    K = s["K"][0].numpy().astype(np.float64)
    assert K[0, 0] == pytest.approx(16.0, rel=1e-6) and K[0, 2] == pytest.approx(15.5)
    valid = s["depth_valid"][0].numpy()
    assert valid.mean() > 0.9
    # range 2.1 m -> z-depth = range / |(x, y, 1)|
    v, u = np.nonzero(valid)
    ray = np.sqrt(((u - K[0, 2]) / K[0, 0]) ** 2 + ((v - K[1, 2]) / K[1, 1]) ** 2 + 1)
    assert np.allclose(s["depth"][0].numpy()[v, u] * ray, 2.1, atol=1e-5)
    inst = s["instance"][0].numpy()
    assert set(np.unique(inst)) <= {0, 3, 700}
    assert np.all(inst[:, :10][valid[:, :10]] == 3) and np.all(inst[:, -10:][valid[:, -10:]] == 700)
    img = s["images"][0].numpy().astype(int)
    assert img[12, 4, 0] > 150 and img[12, 4, 2] < 60  # left stays red (no BGR swap, no flip)
    # pose: T_world_cam = T_world_device @ T_device_camera (frame 1 yawed by 30 deg)
    Twd = np.eye(4)
    Twd[:3, :3] = [[np.cos(0.5), -np.sin(0.5), 0], [np.sin(0.5), np.cos(0.5), 0], [0, 0, 1]]
    Twd[:3, 3] = [1.0, 0.5, 1.5]
    want = np.linalg.inv(Twd @ ASE_T_DEVICE_CAMERA)
    assert np.allclose(s["T_cam_world"][0].numpy(), want, atol=1e-5)
    # relabel + z-depth option
    s2 = AriaSyntheticDataset(tmp_path, n_views=3, image_size=(24, 32), depth_is_range=False)[0]
    assert set(np.unique(s2["instance"].numpy())) <= {0, 1, 2}
    assert np.allclose(s2["depth"][0].numpy()[s2["depth_valid"][0].numpy()], 2.0)


# ----------------------------------------------------------------------------------------------------
# ScanNet++
# ----------------------------------------------------------------------------------------------------
def _write_scannetpp(root, fisheye=False, n=3, h=20, w=30):
    d = root / "abc123"
    (d / "dslr" / "resized_images").mkdir(parents=True)
    (d / "dslr" / "nerfstudio").mkdir(parents=True)
    (d / "dslr" / "render_depth").mkdir(parents=True)
    (d / "dslr" / "render_instance").mkdir(parents=True)
    frames = []
    for i in range(n):
        name = f"DSC{i:05d}.JPG"
        img = np.full((h, w, 3), (30 * i, 100, 200), np.uint8)
        cv2.imwrite(str(d / "dslr" / "resized_images" / name), img[..., ::-1])
        cv2.imwrite(str(d / "dslr" / "render_depth" / f"DSC{i:05d}.png"), np.full((h, w), 1500 + i, np.uint16))
        inst = np.zeros((h, w), np.uint16)
        inst[5:10, 5:15] = 42 + i
        cv2.imwrite(str(d / "dslr" / "render_instance" / f"DSC{i:05d}.png"), inst)
        c2w_gl = np.eye(4)
        c2w_gl[:3, 3] = [i, 2.0, 0.0]
        frames.append({"file_path": f"images/{name}", "transform_matrix": c2w_gl.tolist(), "is_bad": i == n - 1 and n > 3})
    tj = {"fl_x": 25.0, "fl_y": 24.0, "cx": 14.5, "cy": 9.5, "w": w, "h": h,
          "camera_model": "OPENCV_FISHEYE", "k1": 0.05 if fisheye else 0.0, "k2": 0.0, "k3": 0.0, "k4": 0.0,
          "frames": frames}
    (d / "dslr" / "nerfstudio" / "transforms.json").write_text(json.dumps(tj))
    return d


def test_scannetpp_dslr(tmp_path):
    _write_scannetpp(tmp_path, n=4)
    ds = ScanNetPPDataset(tmp_path, n_views=2, relabel=False)
    assert len(ds) == 2  # the is_bad frame is skipped -> 3 frames
    s = ds[0]
    assert s["images"].shape == (2, 20, 30, 3)
    assert s["frames"] == ["DSC00000", "DSC00001"]
    assert np.array_equal(s["K"][0].numpy(), np.array([[25, 0, 14.5], [0, 24, 9.5], [0, 0, 1]], np.float32))
    assert np.allclose(s["depth"][1].numpy(), 1.501)
    inst = s["instance"][1].numpy()
    assert np.all(inst[5:10, 5:15] == 43) and inst.sum() == 43 * 50
    assert tuple(s["images"][1, 0, 0].tolist()) == pytest.approx((30, 100, 200), abs=3)
    # nerfstudio (OpenGL) c2w -> OpenCV: T_world_cam = c2w @ diag(1,-1,-1,1)
    T_wc = np.diag([1.0, -1.0, -1.0, 1.0])
    T_wc[:3, 3] = [1.0, 2.0, 0.0]
    assert np.allclose(s["T_cam_world"][1].numpy(), np.linalg.inv(T_wc), atol=1e-6)
    # a point 1.5 m in front of camera 1 (OpenCV +z) is in front in world (-z of OpenGL camera)
    p = np.linalg.inv(s["T_cam_world"][1].numpy()) @ np.array([0, 0, 1.5, 1])
    assert np.allclose(p[:3], [1.0, 2.0, -1.5], atol=1e-5)
    assert len(ScanNetPPDataset(tmp_path, n_views=2, include_bad=True)) == 3


def test_scannetpp_fisheye_undistort_and_missing_maps(tmp_path):
    d = _write_scannetpp(tmp_path, fisheye=True, n=2)
    for p in (d / "dslr" / "render_depth").iterdir():
        p.unlink()
    s = ScanNetPPDataset(tmp_path, n_views=2, image_size=(10, 15))[0]
    assert s["images"].shape == (2, 10, 15, 3)
    assert not bool(s["depth_valid"].any())
    assert set(np.unique(s["instance"].numpy())) <= {0, 1, 2}
    assert int(s["instance"].max()) == 2  # both instances survive undistortion + relabel


def test_scannetpp_iphone(tmp_path):
    d = tmp_path / "s1" / "iphone"
    (d / "rgb").mkdir(parents=True)
    (d / "depth").mkdir()
    poses = {}
    for i in range(3):
        key = f"frame_{i:06d}"
        cv2.imwrite(str(d / "rgb" / f"{key}.jpg"), np.full((16, 12, 3), 128, np.uint8))
        cv2.imwrite(str(d / "depth" / f"{key}.png"), np.full((8, 6), 800, np.uint16))
        c2w = np.eye(4)
        c2w[0, 3] = i
        poses[key] = {"intrinsic": [[10.0, 0, 5.5], [0, 10.0, 7.5], [0, 0, 1]], "aligned_pose": c2w.tolist()}
    (d / "pose_intrinsic_imu.json").write_text(json.dumps(poses))
    ds = ScanNetPPDataset(tmp_path, n_views=3, source="iphone")
    assert len(ds) == 1
    s = ds[0]
    assert s["images"].shape == (3, 16, 12, 3) and s["depth"].shape == (3, 16, 12)
    assert np.allclose(s["depth"].numpy(), 0.8)
    assert s["T_cam_world"][2, 0, 3].item() == pytest.approx(-2.0)
