"""torch Datasets of multi-view training samples from three on-disk layouts.

Every dataset yields a dict of ``V = n_views`` views:

- ``images``: uint8 (V, H, W, 3) RGB when ``image_format="uint8"``; float32 (V, 3, H, W) normalised with
  ImageNet mean/std (what DA3 expects) when ``image_format="float"``.
- ``depth``: float32 (V, H, W) metric z-depth, 0 where unknown; ``depth_valid`` bool (V, H, W).
- ``instance``: int64 (V, H, W), 0 = background/unknown. Ids are consistent across the views of a sample;
  with ``relabel=True`` (default) they are renumbered 1..M in order of first appearance id.
- ``K``: float32 (V, 3, 3) pinhole at the output resolution; ``T_cam_world``: float32 (V, 4, 4)
  (OpenCV optical axes; world frame of the source data).
- ``scene`` (str) and ``frames`` (list of str): provenance.

Layouts
-------
(a) :class:`SyntheticWindowDataset`: folders written by :func:`fast3dis_ros.data.synthetic.write_dataset`
    (``scene.json`` + ``views/*.npz``); windows of consecutive frames x rig cameras, frame-major (the
    order of ``pipeline.frames.Window``).
(b) :class:`AriaSyntheticDataset`: Aria Synthetic Environments (ASE), one folder per scene::

        <scene>/rgb/vignette0000000.jpg        RGB, fisheye (Fisheye624), 704x704 (or 1408)
        <scene>/depth/depth0000000.png         uint16 millimetres, distance along the ray (range)
        <scene>/instances/instance0000000.png  uint16/uint8 instance ids, 0 = none
        <scene>/trajectory.csv                 MPS-style columns tx/ty/tz/qx/qy/qz/qw_world_device;
                                               row i is the pose of frame i

    The RGB calibration is the fixed ASE one (projectaria_tools ``get_ase_rgb_calibration``: Fisheye624,
    f = 297.64, c = (357.66, 349.19) at 704 px, 6 radial + 2 tangential terms; T_device_camera from the
    same provider), scaled to the stored image size. Images are rectified to a pinhole of
    ``image_size`` and ``rect_hfov_deg``; T_world_cam = T_world_device @ T_device_camera.
    Assumptions (no ASE data here to check against): depth is range along the ray
    (``depth_is_range=True`` converts it to z-depth; pass False if your copy stores z-depth);
    images are not rotated (the upright display rotation of the ASE tutorials is *not* applied).
(c) :class:`ScanNetPPDataset`: ScanNet++ scenes::

        <scene>/dslr/resized_images/<name>.JPG (or resized_undistorted_images/)
        <scene>/dslr/nerfstudio/transforms.json (or transforms_undistorted.json)
            fl_x fl_y cx cy w h camera_model [k1..k4], frames: [{file_path, transform_matrix, is_bad}]
            transform_matrix = camera-to-world, nerfstudio/OpenGL axes (x right, y up, z back)
        <scene>/dslr/render_depth/<stem>.png     optional uint16 mm z-depth (toolkit render)
        <scene>/dslr/render_instance/<stem>.png  optional uint16 instance ids (toolkit render of the
                                                 mesh annotation; ScanNet++ ships none in 2D)
        <scene>/iphone/rgb/frame_000000.jpg, iphone/depth/frame_000000.png (uint16 mm, low-res),
        <scene>/iphone/pose_intrinsic_imu.json {frame: {intrinsic 3x3, aligned_pose 4x4 c2w}}
            (``source="iphone"``; aligned_pose assumed in ARKit/OpenGL axes like nerfstudio)

    OPENCV_FISHEYE images with non-zero k1..k4 are undistorted to a pinhole with the same K (cv2.fisheye).
    Missing depth/instance maps give zeros and ``depth_valid`` False.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fast3dis_ros.geometry.rotations import matrix_from_quat_xyzw
from fast3dis_ros.data.synthetic import read_view_npz

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiViewDataset",
    "SyntheticWindowDataset",
    "AriaSyntheticDataset",
    "ScanNetPPDataset",
    "ase_fisheye624_project",
    "ASE_RGB_PARAMS_704",
    "ASE_T_DEVICE_CAMERA",
    "find_scene_dirs",
]

from fast3dis_ros.model.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402  (one definition)
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])  # flips camera y and z: OpenGL/nerfstudio <-> OpenCV


# ----------------------------------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------------------------------
class _View(dict):
    """rgb (H,W,3) uint8, depth (H,W) float32, instance (H,W) int, K (3,3), T_world_cam (4,4), name."""


def _resize_view(v: _View, size: tuple[int, int] | None) -> _View:
    if size is None:
        return v
    import cv2

    H, W = int(size[0]), int(size[1])
    h, w = v["rgb"].shape[:2]
    if (h, w) == (H, W):
        return v
    sx, sy = W / w, H / h
    out = _View(v)
    out["rgb"] = cv2.resize(v["rgb"], (W, H), interpolation=cv2.INTER_AREA if sx < 1 else cv2.INTER_LINEAR)
    out["depth"] = cv2.resize(v["depth"], (W, H), interpolation=cv2.INTER_NEAREST)
    out["instance"] = cv2.resize(v["instance"].astype(np.int32), (W, H), interpolation=cv2.INTER_NEAREST)
    K = np.array(v["K"], dtype=np.float64)
    K[0, 0] *= sx
    K[1, 1] *= sy
    K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    out["K"] = K
    return out


class MultiViewDataset(Dataset):
    """Base class: subclasses fill ``self.samples`` (list of (scene, [view keys])) and ``load_view``."""

    def __init__(self, image_size: tuple[int, int] | None = None, image_format: str = "uint8", relabel: bool = True,
                 transform: Callable[[dict], dict] | None = None):
        if image_format not in ("uint8", "float"):
            raise ValueError("image_format must be 'uint8' or 'float'")
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.image_format = image_format
        self.relabel = relabel
        self.transform = transform
        self.samples: list[tuple[str, list[Any]]] = []

    def load_view(self, scene: str, key: Any) -> _View:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        if idx < 0:
            idx += len(self)
        scene, keys = self.samples[idx]
        views = [_resize_view(self.load_view(scene, k), self.image_size) for k in keys]
        rgb = np.stack([v["rgb"] for v in views])
        depth = np.stack([v["depth"] for v in views]).astype(np.float32)
        depth = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
        inst = np.stack([v["instance"] for v in views]).astype(np.int64)
        if self.relabel:
            ids = np.unique(inst)
            ids = ids[ids != 0]
            lut = np.zeros(int(ids.max()) + 1 if ids.size else 1, dtype=np.int64)
            lut[ids] = np.arange(1, ids.size + 1)
            inst = lut[inst]
        T_cam_world = np.stack([np.linalg.inv(v["T_world_cam"]) for v in views])
        images = torch.from_numpy(np.ascontiguousarray(rgb))
        if self.image_format == "float":
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            images = (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        out = {
            "images": images,
            "depth": torch.from_numpy(depth),
            "depth_valid": torch.from_numpy(depth > 0),
            "instance": torch.from_numpy(inst),
            "K": torch.from_numpy(np.stack([v["K"] for v in views]).astype(np.float32)),
            "T_cam_world": torch.from_numpy(T_cam_world.astype(np.float32)),
            "scene": scene,
            "frames": [str(v["name"]) for v in views],
        }
        return self.transform(out) if self.transform is not None else out


def _windows(n_items: int, n_views: int, stride: int, step: int = 1) -> list[list[int]]:
    span = (n_views - 1) * step + 1
    return [[s + i * step for i in range(n_views)] for s in range(0, n_items - span + 1, max(1, stride))]


def find_scene_dirs(root: str | Path, marker: str | Sequence[str]) -> list[Path]:
    """``root`` itself if it holds ``marker``, else its sorted sub-folders that do."""
    root = Path(root)
    markers = [marker] if isinstance(marker, str) else list(marker)
    if any((root / m).exists() for m in markers):
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    return sorted(p for p in root.iterdir() if p.is_dir() and any((p / m).exists() for m in markers))


def _read_png(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return img


def _read_rgb(path: Path) -> np.ndarray:
    img = _read_png(path)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[..., :3]
    return np.ascontiguousarray(img[..., ::-1])


def _frame_number(name: str) -> int:
    m = re.findall(r"(\d+)", name)
    return int(m[-1]) if m else -1


# ----------------------------------------------------------------------------------------------------
# (a) synthetic folders
# ----------------------------------------------------------------------------------------------------
class SyntheticWindowDataset(MultiViewDataset):
    """Windows of ``ceil(n_views / n_cameras)`` consecutive frames x cameras (frame-major), first n_views."""

    def __init__(self, root: str | Path, n_views: int = 6, stride: int = 1, cameras: Sequence[str] | None = None,
                 **kw):
        super().__init__(**kw)
        self.scenes: dict[str, dict] = {}
        for d in find_scene_dirs(root, "scene.json"):
            meta = json.loads((d / "scene.json").read_text())
            cams = list(cameras) if cameras is not None else list(meta["camera_names"])
            unknown = set(cams) - set(meta["camera_names"])
            if unknown:
                raise ValueError(f"{d}: cameras {sorted(unknown)} not in {meta['camera_names']}")
            self.scenes[str(d)] = meta
            nf = int(meta["n_frames"])
            per = math.ceil(n_views / len(cams))
            for w in _windows(nf, per, stride):
                keys = [(f, c) for f in w for c in cams][:n_views]
                self.samples.append((str(d), keys))
        if not self.scenes:
            raise FileNotFoundError(f"{root}: no synthetic scene folders (scene.json) found")

    def load_view(self, scene: str, key) -> _View:
        f, cam = key
        meta = self.scenes[scene]
        rel = meta["views"][f][meta["camera_names"].index(cam)]
        z = read_view_npz(Path(scene) / rel)  # np.load's arrays at ~3/4 of its CPU (DataLoader workers)
        return _View(rgb=z["rgb"], depth=z["depth"], instance=z["instance"], K=z["K"],
                     T_world_cam=z["T_world_cam"], name=f"f{f:04d}_{cam}")


# ----------------------------------------------------------------------------------------------------
# (b) Aria Synthetic Environments
# ----------------------------------------------------------------------------------------------------
# [f, cx, cy, k0..k5, p0, p1, s0..s3] at 704x704 (projectaria_tools AseCalibrationProvider).
ASE_RGB_PARAMS_704 = np.array([
    297.6375381033778, 357.6599197217746, 349.1922497127481, 0.3650890375644368, -0.1738082418112771,
    -0.7534945484033189, 2.434788882752295, -2.57786220300886, 0.8788483538598834, 0.0008005198595407136,
    -0.000294237814554143, 0.0, 0.0, 0.0, 0.0])


ASE_T_DEVICE_CAMERA = np.eye(4)
ASE_T_DEVICE_CAMERA[:3, :3] = matrix_from_quat_xyzw([0.326409343828490850, 0.029274992008313648,
                                                    0.033361059956531547, 0.9441858687689326])
ASE_T_DEVICE_CAMERA[:3, 3] = [-0.007530096566173914, -0.010908549841580260, -0.003598063315542823]


def ase_fisheye624_project(xyz: np.ndarray, params: np.ndarray = ASE_RGB_PARAMS_704) -> np.ndarray:
    """Fisheye624 projection (Aria FisheyeRadTanThinPrism, single focal) of camera-frame points (..., 3)."""
    p = np.asarray(params, dtype=np.float64)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    r = np.hypot(x, y)
    th = np.arctan2(r, z)
    th2 = th * th
    poly = np.zeros_like(th)
    for k in p[3:9][::-1]:
        poly = poly * th2 + k
    thd = th * (1.0 + th2 * poly)
    scale = np.divide(thd, r, out=np.ones_like(r), where=r > 1e-12)
    u, v = x * scale, y * scale
    r2 = u * u + v * v
    t = 2.0 * (u * p[9] + v * p[10])
    ud = u + t * u + r2 * p[9] + p[11] * r2 + p[12] * r2 * r2
    vd = v + t * v + r2 * p[10] + p[13] * r2 + p[14] * r2 * r2
    return np.stack([p[0] * ud + p[1], p[0] * vd + p[2]], -1)


class AriaSyntheticDataset(MultiViewDataset):
    """ASE scenes rectified to pinhole views; windows of n_views frames ``frame_step`` apart."""

    def __init__(self, root: str | Path, n_views: int = 4, stride: int = 1, frame_step: int = 1,
                 image_size: tuple[int, int] = (378, 378), rect_hfov_deg: float = 90.0, depth_is_range: bool = True,
                 **kw):
        super().__init__(image_size=None, **kw)
        self.out_size = (int(image_size[0]), int(image_size[1]))
        self.rect_hfov_deg = rect_hfov_deg
        self.depth_is_range = depth_is_range
        self.scenes: dict[str, dict] = {}
        self._maps: dict[int, tuple] = {}
        for d in find_scene_dirs(root, "trajectory.csv"):
            frames = sorted((p for p in (d / "rgb").glob("vignette*.jpg")), key=lambda p: _frame_number(p.name))
            if not frames:
                continue
            poses = self._read_trajectory(d / "trajectory.csv")
            nums = [_frame_number(p.name) for p in frames]
            keep = [i for i, n in enumerate(nums) if 0 <= n < len(poses)]
            self.scenes[str(d)] = {"frames": [frames[i] for i in keep], "numbers": [nums[i] for i in keep], "poses": poses}
            for w in _windows(len(keep), n_views, stride, frame_step):
                self.samples.append((str(d), w))
        if not self.scenes:
            raise FileNotFoundError(f"{root}: no ASE scene folders (trajectory.csv + rgb/vignette*.jpg) found")

    @staticmethod
    def _read_trajectory(path: Path) -> list[np.ndarray]:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        T = np.tile(np.eye(4), (len(rows), 1, 1))
        if rows:
            T[:, :3, :3] = matrix_from_quat_xyzw([[float(r[f"q{a}_world_device"]) for a in "xyzw"] for r in rows])
            T[:, :3, 3] = [[float(r[f"t{a}_world_device"]) for a in "xyz"] for r in rows]
        return list(T @ ASE_T_DEVICE_CAMERA)

    def rectified_K(self) -> np.ndarray:
        H, W = self.out_size
        f = (W / 2.0) / math.tan(math.radians(self.rect_hfov_deg) / 2.0)
        return np.array([[f, 0.0, (W - 1) / 2.0], [0.0, f, (H - 1) / 2.0], [0.0, 0.0, 1.0]])

    def _rect_maps(self, src_size: int):
        if src_size not in self._maps:
            H, W = self.out_size
            K = self.rectified_K()
            u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
            rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
            s = src_size / 704.0
            p = ASE_RGB_PARAMS_704.copy()
            p[0] *= s
            p[1:3] = s * (p[1:3] + 0.5) - 0.5
            uv = ase_fisheye624_project(rays, p)
            theta = np.arctan(np.linalg.norm(rays[..., :2], axis=-1))
            ok = (theta <= 1.0) & (uv >= 0).all(-1) & (uv <= src_size - 1).all(-1)
            mx = np.where(ok, uv[..., 0], -1).astype(np.float32)
            my = np.where(ok, uv[..., 1], -1).astype(np.float32)
            self._maps[src_size] = (mx, my, np.linalg.norm(rays, axis=-1).astype(np.float32), ok)
        return self._maps[src_size]

    def load_view(self, scene: str, key: int) -> _View:
        import cv2

        meta = self.scenes[scene]
        rgb_path = meta["frames"][key]
        num = meta["numbers"][key]
        d = Path(scene)
        rgb = _read_rgb(rgb_path)
        src = rgb.shape[0]
        mx, my, ray_norm, ok = self._rect_maps(src)
        stem = rgb_path.name.replace("vignette", "")
        rgb_r = cv2.remap(rgb, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        depth_r = np.zeros(self.out_size, np.float32)
        dp = d / "depth" / ("depth" + stem.replace(".jpg", ".png"))
        if dp.is_file():
            dm = _read_png(dp).astype(np.float32) / 1000.0
            depth_r = cv2.remap(dm, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            if self.depth_is_range:
                depth_r = depth_r / ray_norm
        inst_r = np.zeros(self.out_size, np.int32)
        ip = d / "instances" / ("instance" + stem.replace(".jpg", ".png"))
        if ip.is_file():
            im = _read_png(ip).astype(np.int32)
            if im.ndim == 3:
                im = im[..., 0]
            inst_r = cv2.remap(im.astype(np.float32), mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=0).astype(np.int32)
        depth_r[~ok] = 0.0
        inst_r[~ok] = 0
        return _View(rgb=rgb_r, depth=depth_r, instance=inst_r, K=self.rectified_K(), T_world_cam=meta["poses"][num],
                     name=rgb_path.name)


# ----------------------------------------------------------------------------------------------------
# (c) ScanNet++
# ----------------------------------------------------------------------------------------------------
class ScanNetPPDataset(MultiViewDataset):
    """ScanNet++ DSLR (nerfstudio transforms) or iPhone (pose_intrinsic_imu.json) frames, n_views per sample."""

    def __init__(self, root: str | Path, n_views: int = 4, stride: int = 1, frame_step: int = 1, source: str = "dslr",
                 include_bad: bool = False, **kw):
        super().__init__(**kw)
        if source not in ("dslr", "iphone"):
            raise ValueError("source must be 'dslr' or 'iphone'")
        self.source = source
        self.scenes: dict[str, dict] = {}
        marker = "dslr/nerfstudio" if source == "dslr" else "iphone/rgb"
        for d in find_scene_dirs(root, marker):
            meta = self._scan_dslr(d, include_bad) if source == "dslr" else self._scan_iphone(d)
            if not meta["frames"]:
                continue
            self.scenes[str(d)] = meta
            for w in _windows(len(meta["frames"]), n_views, stride, frame_step):
                self.samples.append((str(d), w))
        if not self.scenes:
            raise FileNotFoundError(f"{root}: no ScanNet++ scenes with {marker} found")

    @staticmethod
    def _scan_dslr(d: Path, include_bad: bool) -> dict:
        ns = d / "dslr" / "nerfstudio"
        und = (ns / "transforms_undistorted.json").is_file() and (d / "dslr" / "resized_undistorted_images").is_dir()
        tj = json.loads((ns / ("transforms_undistorted.json" if und else "transforms.json")).read_text())
        img_dir = d / "dslr" / ("resized_undistorted_images" if und else "resized_images")
        K = np.array([[tj["fl_x"], 0.0, tj["cx"]], [0.0, tj["fl_y"], tj["cy"]], [0.0, 0.0, 1.0]])
        dist = np.array([tj.get(k, 0.0) for k in ("k1", "k2", "k3", "k4")], dtype=np.float64)
        fisheye = (not und) and tj.get("camera_model", "") == "OPENCV_FISHEYE" and bool(np.any(dist != 0))
        frames = []
        for fr in sorted(tj.get("frames", []), key=lambda f: f["file_path"]):
            if fr.get("is_bad", False) and not include_bad:
                continue
            name = Path(fr["file_path"]).name
            T = np.asarray(fr["transform_matrix"], dtype=np.float64) @ GL_TO_CV
            frames.append({"rgb": img_dir / name, "stem": Path(name).stem, "T_world_cam": T, "K": K})
        return {"frames": frames, "dist": dist if fisheye else None, "size": (int(tj["h"]), int(tj["w"])),
                "depth_dir": d / "dslr" / "render_depth", "inst_dir": d / "dslr" / "render_instance"}

    @staticmethod
    def _scan_iphone(d: Path) -> dict:
        pj = json.loads((d / "iphone" / "pose_intrinsic_imu.json").read_text())
        frames = []
        for key in sorted(pj):
            e = pj[key]
            T = np.asarray(e.get("aligned_pose", e.get("pose")), dtype=np.float64) @ GL_TO_CV
            frames.append({"rgb": d / "iphone" / "rgb" / f"{key}.jpg", "stem": key, "T_world_cam": T,
                           "K": np.asarray(e["intrinsic"], dtype=np.float64)})
        return {"frames": frames, "dist": None, "size": None, "depth_dir": d / "iphone" / "depth",
                "inst_dir": d / "iphone" / "render_instance"}

    def load_view(self, scene: str, key: int) -> _View:
        import cv2

        meta = self.scenes[scene]
        fr = meta["frames"][key]
        rgb = _read_rgb(fr["rgb"])
        h, w = rgb.shape[:2]
        K = fr["K"].copy()
        depth = np.zeros((h, w), np.float32)
        inst = np.zeros((h, w), np.int32)
        dp = meta["depth_dir"] / f"{fr['stem']}.png"
        if dp.is_file():
            depth = _read_png(dp).astype(np.float32) / 1000.0
            if depth.shape != (h, w):  # iPhone depth is low-res
                depth = cv2.resize(depth, (w, h), interpolation=cv2.INTER_NEAREST)
        ip = meta["inst_dir"] / f"{fr['stem']}.png"
        if ip.is_file():
            inst = _read_png(ip).astype(np.int32)
            if inst.ndim == 3:
                inst = inst[..., 0]
            if inst.shape != (h, w):
                inst = cv2.resize(inst, (w, h), interpolation=cv2.INTER_NEAREST)
        if meta["dist"] is not None:
            m1, m2 = cv2.fisheye.initUndistortRectifyMap(K, meta["dist"], np.eye(3), K, (w, h), cv2.CV_32FC1)
            rgb = cv2.remap(rgb, m1, m2, cv2.INTER_LINEAR)
            depth = cv2.remap(depth, m1, m2, cv2.INTER_NEAREST)
            inst = cv2.remap(inst.astype(np.float32), m1, m2, cv2.INTER_NEAREST).astype(np.int32)
        return _View(rgb=rgb, depth=depth, instance=inst, K=K, T_world_cam=fr["T_world_cam"], name=fr["stem"])
