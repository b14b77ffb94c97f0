"""Robot-style rosbag2 files for the issue 19 tests, written here with rosbags (not ``write_scene_bag``).

They differ from the synthetic bags the way real robot bags do: namespaced topics, other frame ids, a
camera without CameraInfo, raw and compressed images of one camera, a half-rate camera, stamp jitter,
messages in receive order, bgr8 / rgb8 / jpeg, non-consecutive instance ids, sqlite3 storage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from fast3dis_ros.data.bags import (CAMERA_INFO, COMPRESSED, GT_INSTANCES_TOPIC, IMAGE, STRING, TF, BagWriter,
                                    camera_info_dict, image_dict, tf_message_dict)

T0 = 1_700_000_000_000_000_000
PERIOD = 100_000_000  # 10 Hz


@dataclass
class RobotBag:
    """How to write the scene. Per-camera dicts default to: raw rgb8, CameraInfo, every frame, no jitter."""

    storage: str = "mcap"
    ns: str = ""  # topic namespace, e.g. "/robot"
    frame: str = "{cam}_optical_frame"  # header frame_id (also the GT TF child unless tf_child is set)
    tf_child: str | None = None
    no_info: tuple = ()  # cameras without CameraInfo
    transports: dict = field(default_factory=dict)  # cam -> ("raw",) | ("compressed",) | ("raw", "compressed")
    encodings: dict = field(default_factory=dict)  # cam -> rgb8 | bgr8 (raw)
    every: dict = field(default_factory=dict)  # cam -> publish every n-th frame (2: half rate)
    offset_ns: dict = field(default_factory=dict)  # cam -> stamp offset (jitter or clock skew)
    receive_delay_ns: dict = field(default_factory=dict)  # cam -> log time = stamp + delay (receive order)
    gt: bool = True
    gt_json_K: bool = False  # also put K per camera in the GT JSON
    id_scale: int = 1  # GT instance ids multiplied by this (non-consecutive ids)


def _jpeg(rgb: np.ndarray) -> np.ndarray:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.ravel()


def write_robot_bag(path, scene, spec: RobotBag) -> dict[str, int]:
    """Write ``scene`` (``data.synthetic.SyntheticScene``) as ``spec`` says; returns messages per topic."""
    with BagWriter(path, storage=spec.storage) as w:
        if spec.gt:
            payload = {"instances": [dict(i.to_dict(), id=int(i.id) * spec.id_scale) for i in scene.instances],
                       "cameras": list(scene.camera_names)}
            if spec.gt_json_K:
                payload["K"] = {v.camera: v.K.tolist() for v in scene.frames[0]}
            w.write(GT_INSTANCES_TOPIC, STRING, {"data": json.dumps(payload)}, T0)
        for fi, frame in enumerate(scene.frames):
            tfs = []
            for v in frame:
                cam = v.camera
                if fi % spec.every.get(cam, 1):
                    continue
                st = T0 + fi * PERIOD + spec.offset_ns.get(cam, 0)
                log_t = st + spec.receive_delay_ns.get(cam, 0)
                fid = spec.frame.format(cam=cam)
                base = f"{spec.ns}/{cam}"
                h, wd = v.rgb.shape[:2]
                for tr in spec.transports.get(cam, ("raw",)):
                    if tr == "raw":
                        enc = spec.encodings.get(cam, "rgb8")
                        img = np.ascontiguousarray(v.rgb[..., ::-1]) if enc == "bgr8" else v.rgb
                        w.write(f"{base}/image_raw", IMAGE, image_dict(img, enc, fid, st), log_t)
                    else:
                        msg = {"header": {"stamp": {"sec": st // 10**9, "nanosec": st % 10**9}, "frame_id": fid},
                               "format": "rgb8; jpeg compressed bgr8", "data": _jpeg(v.rgb)}
                        w.write(f"{base}/image_raw/compressed", COMPRESSED, msg, log_t)
                if cam not in spec.no_info:
                    w.write(f"{base}/camera_info", CAMERA_INFO, camera_info_dict(v.K, wd, h, fid, st), log_t)
                if spec.gt:
                    w.write(f"{base}/depth_gt", IMAGE, image_dict(v.depth.astype(np.float32), "32FC1", fid, st), log_t)
                    w.write(f"{base}/instance_gt", IMAGE,
                            image_dict((v.instance * spec.id_scale).astype(np.int32), "32SC1", fid, st), log_t)
                    tfs.append(("map", (spec.tf_child or spec.frame).format(cam=cam), v.T_world_cam, st))
            if tfs:
                msg = {"transforms": [tf_message_dict([(p, c, T)], s)["transforms"][0] for p, c, T, s in tfs]}
                w.write("/tf", TF, msg, max(s for *_, s in tfs))
        return dict(w.counts)


def wide_yaw_scene(n_frames: int = 4, width: int = 64, height: int = 48, seed: int = 5,
                   fovs_deg=(70.0, 90.0, 55.0)):
    """3 cameras at yaw 0 / +50 / -50 deg, each with its own K (horizontal field of view ``fovs_deg``):
    the default scene re-rendered per camera with its own intrinsics."""
    from fast3dis_ros.data.synthetic import (RenderedView, SceneConfig, generate_scene, intrinsics_from_fov,
                                             render_view)

    cfg = SceneConfig(n_cameras=3, n_frames=n_frames, width=width, height=height, seed=seed,
                      camera_yaws_deg=(0.0, 50.0, -50.0), camera_names=("front", "left", "right"))
    scene = generate_scene(cfg)
    for frame in scene.frames:
        for ci, v in enumerate(frame):
            K = intrinsics_from_fov(width, height, fovs_deg[ci])
            if np.allclose(K, v.K):
                continue
            rgb, depth, inst = render_view(scene.geometry, K, v.T_world_cam, width, height)
            frame[ci] = RenderedView(v.camera, v.frame_index, rgb, depth, inst, K, v.T_world_cam)
    return scene
