"""Offline replay core shared by ``fast3dis-demo`` and ``fast3dis-eval`` (no ROS, no rclpy).

A rosbag2 (mcap or sqlite3) is read with ``data.bags.read_camera_streams`` and fed, at full speed, to the
same :class:`~fast3dis_ros.pipeline.runner.PipelineRunner` the node uses, in synchronous mode (every
window is processed, nothing is dropped for lack of time). Every result is written to an output bag
(``eval.output_bag``) exactly as the node would publish it.

Frames are built as the node builds them: RGB from the Image / CompressedImage, ``K`` from the camera's
CameraInfo with the same stamp (or the latest one) when its size matches the image
(``use_known_intrinsics``), ``frame_id`` from the header. Known poses are not used (node default).

Accounting (written as ``accounting.json``) covers every image message of the selected cameras:

``frames``: ``read`` = ``rejected`` (replay checks: ``undecodable`` -- an image message of the camera that
cannot be decoded (corrupt CDR, unsupported encoding, short buffer, bad jpeg/png): counted and logged, the
replay goes on --, ``image_size_mismatch`` -- size differs from the camera's CameraInfo or, without one,
from its first image --, ``empty_image``, ``zero_stamp``) +
``dropped_by_sync`` (per reason, see ``pipeline/sync.py``) + ``in_sets`` (+ ``pending``, 0 after flush);
``frame_sets`` (what the synchroniser emitted): ``received`` = ``processed`` + sum(``dropped``) (+
``in_flight``, 0 after flush). ``balanced`` is True when both identities hold.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from fast3dis_ros.core.frames import CameraFrame, Window, WindowPrediction

log = logging.getLogger(__name__)

__all__ = [
    "ReplayConfig",
    "ReplayResult",
    "WindowRecord",
    "camera_of_topic",
    "frames_from_bag",
    "replay_bag",
]

def camera_of_topic(topic: str) -> str:
    """``/front/image_raw`` -> ``front``; ``/robot/cam_a/image_raw/compressed`` -> ``robot/cam_a``;
    ``/front/camera_info`` -> ``front``."""
    parts = [p for p in topic.strip("/").split("/") if p]
    while parts and parts[-1] in ("image_raw", "compressed", "camera_info", "image", "image_rect", "image_color"):
        parts.pop()
    return "/".join(parts) if parts else topic.strip("/")


@dataclass
class ReplayConfig:
    cameras: list[str] | None = None  # None: every camera with an image topic in the bag
    image_topics: list[str] | None = None  # explicit image topics (camera name = camera_of_topic)
    window_size: int = 4  # frame sets per window
    stride: int = 2
    slop_ms: float = 50.0
    sync_queue_size: int = 10
    voxel_size: float = 0.02  # map voxel (map units)
    score_threshold: float = 0.5  # fusion min score (node: score_threshold)
    conf_threshold: float = 0.0
    max_map_points: int = 1_000_000
    use_known_intrinsics: bool = True
    map_frame: str = "map"
    max_frame_sets: int | None = None  # stop after this many image stamps per camera (None = all)


@dataclass
class WindowRecord:
    window_index: int
    prediction: WindowPrediction
    fusion: object  # pipeline.fusion.FusionResult
    engine_ms: float
    fusion_ms: float


@dataclass
class ReplayResult:
    cameras: list[str]
    records: list[WindowRecord]
    accounting: dict
    wall_s: float
    output_counts: dict = field(default_factory=dict)
    final: object | None = None  # last FusionResult

    @property
    def final_map(self):
        return None if self.final is None else self.final.map_cloud


# ----------------------------------------------------------------------------------------------------
def _discover_cameras(path, image_topics) -> list[str]:
    from fast3dis_ros.data.bags import bag_topics

    topics = bag_topics(path)
    if image_topics:
        missing = [t for t in image_topics if t not in topics]
        if missing:
            from fast3dis_ros.data.bags import BagReadError

            raise BagReadError(f"{path}: image topics not in bag: {missing} (bag has {sorted(topics)})")
        return [camera_of_topic(t) for t in image_topics]
    cams = []
    for t, (mt, _n) in sorted(topics.items()):
        if mt.replace("/msg/", "/") in ("sensor_msgs/Image", "sensor_msgs/CompressedImage") and \
                not t.endswith(("/depth_gt", "/instance_gt")) and "depth" not in t.split("/")[-1]:
            c = camera_of_topic(t)
            if c not in cams:
                cams.append(c)
    return cams


def frames_from_bag(path, cameras: list[str], image_topics: list[str] | None = None,
                    use_known_intrinsics: bool = True, counts: Counter | None = None,
                    rejected: Counter | None = None, max_per_camera: int | None = None
                    ) -> Iterable[CameraFrame]:
    """Yield CameraFrames in bag order (an image is held until its CameraInfo of the same stamp arrives
    or the camera's next image does). ``counts['read']`` counts image messages of the cameras;
    ``rejected`` counts frames refused by the checks in the module doc."""
    from fast3dis_ros.data.bags import read_camera_streams

    counts = Counter() if counts is None else counts
    rejected = Counter() if rejected is None else rejected
    cams = set(cameras)
    info: dict[str, dict] = {}
    first_size: dict[str, tuple[int, int]] = {}
    pending: dict[str, tuple] = {}  # cam -> (stamp, image, frame_id)
    n_cam: Counter = Counter()
    if image_topics:
        topics = list(image_topics) + [t.rsplit("/", 1)[0] + "/camera_info" for t in image_topics
                                       if not t.endswith("/compressed")]
        topics = [t for t in dict.fromkeys(topics)]
        from fast3dis_ros.data.bags import bag_topics

        have = bag_topics(path)
        topics = [t for t in topics if t in have]
        stream = read_camera_streams(path, topics=topics, include_tf=False, skip_bad=True)
    else:
        stream = read_camera_streams(path, cameras=cameras, include_tf=False, skip_bad=True)

    def emit(cam: str):
        stamp, img, fid = pending.pop(cam)
        h, w = img.shape[:2]
        if img.size == 0 or h == 0 or w == 0:
            rejected["empty_image"] += 1
            return None
        if stamp <= 0:
            rejected["zero_stamp"] += 1
            return None
        ci = info.get(cam)
        ref = (ci["height"], ci["width"]) if ci and ci["width"] > 0 and ci["height"] > 0 else first_size.get(cam)
        if ref is None:
            first_size[cam] = (h, w)
        elif (h, w) != tuple(ref):
            rejected["image_size_mismatch"] += 1
            log.warning("%s: image %dx%d at %d differs from the expected %dx%d: frame rejected", cam, w, h, stamp,
                        ref[1], ref[0])
            return None
        K = None
        if use_known_intrinsics and ci is not None and (ci["height"], ci["width"]) == (h, w):
            Kc = np.asarray(ci["K"], np.float64).reshape(3, 3)
            if np.isfinite(Kc).all() and Kc[0, 0] > 0 and Kc[1, 1] > 0:
                K = Kc
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.dtype != np.uint8:
            img = np.clip(img.astype(np.float64) / (256.0 if img.dtype == np.uint16 else 1.0), 0, 255).astype(np.uint8)
        return CameraFrame(cam, int(stamp), np.ascontiguousarray(img[..., :3]), frame_id=fid or f"{cam}_optical_frame",
                           K=K)

    for m in stream:
        cam = camera_of_topic(m.topic)
        if cam not in cams:
            continue
        if m.kind == "bad_message":
            counts["bad_camera_info"] += 1
            log.warning("%s: undecodable message ignored: %s", cam, m.data)
        elif m.kind == "camera_info":
            info[cam] = m.data
            if cam in pending and pending[cam][0] == m.stamp_ns:
                f = emit(cam)
                if f is not None:
                    yield f
        elif m.kind in ("image", "bad_image"):
            if max_per_camera is not None and n_cam[cam] >= max_per_camera:
                continue
            n_cam[cam] += 1
            counts["read"] += 1
            if m.kind == "bad_image":
                rejected["undecodable"] += 1
                log.warning("%s: undecodable image message dropped: %s", cam, m.data)
                continue
            if cam in pending:
                f = emit(cam)
                if f is not None:
                    yield f
            pending[cam] = (int(m.stamp_ns), m.data, m.frame_id)
    for cam in list(pending):
        f = emit(cam)
        if f is not None:
            yield f


def replay_bag(
    bag: str | Path,
    predictor,
    cfg: ReplayConfig | None = None,
    out_bag: str | Path | None = None,
    progress: bool = True,
    on_window: Callable[[WindowRecord], None] | None = None,
    keep_predictions: bool = True,
) -> ReplayResult:
    """Replay ``bag`` through a synchronous PipelineRunner; write outputs to ``out_bag`` (new folder)."""
    from fast3dis_ros.pipeline.fusion import MapFusion
    from fast3dis_ros.pipeline.runner import PipelineRunner
    from fast3dis_ros.eval.output_bag import OutputBagWriter

    cfg = cfg or ReplayConfig()
    t0 = time.perf_counter()
    cameras = list(cfg.cameras) if cfg.cameras else _discover_cameras(bag, cfg.image_topics)
    if cfg.image_topics and not cfg.cameras:
        cameras = [camera_of_topic(t) for t in cfg.image_topics]
    if not cameras:
        from fast3dis_ros.data.bags import BagReadError

        raise BagReadError(f"{bag}: no image topics found (give --cameras or --image-topics)")
    records: list[WindowRecord] = []
    writer = OutputBagWriter(out_bag) if out_bag is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="replay", unit="frame", leave=True)
    win_bar_state = {"n": 0}

    def on_fusion(res, pred: WindowPrediction) -> None:
        rec = WindowRecord(res.window_index, pred if keep_predictions else None, res, float(pred.engine_ms),
                           float(runner.fusion_ms.last))
        records.append(rec)
        win_bar_state["n"] += 1
        if bar is not None:
            bar.set_postfix(windows=win_bar_state["n"], inst=len(res.instances), map_pts=len(res.map_cloud))
        if writer is not None:
            writer.write_update(res.stamp_ns, res.window_cloud, res.map_cloud, res.instances, cfg.map_frame,
                                view_frames=list(pred.frame_ids), T_map_cam=res.T_map_cam,
                                view_stamps_ns=list(pred.view_stamps_ns))
        if on_window is not None:
            on_window(rec)

    errors: list[str] = []
    fusion = MapFusion(voxel_size=cfg.voxel_size, max_points=cfg.max_map_points, min_score=cfg.score_threshold,
                       conf_threshold=cfg.conf_threshold, map_frame=cfg.map_frame)
    runner = PipelineRunner(cameras, predictor.predict, slop_ns=int(cfg.slop_ms * 1e6),
                            sync_queue_size=cfg.sync_queue_size, window_size=cfg.window_size, stride=cfg.stride,
                            fusion=fusion, sync_mode=True, on_fusion=on_fusion,
                            on_error=lambda w, e: errors.append(f"window {w.index}: {type(e).__name__}: {e}"))
    counts: Counter = Counter()
    rejected: Counter = Counter()
    try:
        if writer is not None:
            writer.__enter__()
        for frame in frames_from_bag(bag, cameras, cfg.image_topics, cfg.use_known_intrinsics, counts, rejected,
                                     cfg.max_frame_sets):
            runner.feed(frame)
            if bar is not None:
                bar.update(1)
        runner.flush()
    finally:
        if bar is not None:
            bar.close()
        runner.stop()
        if writer is not None:
            writer.close()
    acc = runner.accounting()
    fr = acc["frames"]
    fs = acc["frame_sets"]
    n_sync_dropped = sum(fr["dropped"].values())
    frames_ok = counts["read"] == sum(rejected.values()) + fr["in_sets"] + n_sync_dropped + fr["pending"]
    sets_ok = fs["received"] == fs["processed"] + sum(fs["dropped"].values()) + fs["in_flight"]
    accounting = {
        "bag": str(Path(bag).resolve()),
        "cameras": cameras,
        "frames": {
            "read": int(counts["read"]),
            "rejected": dict(sorted(rejected.items())),
            "pushed": fr["pushed"],
            "in_sets": fr["in_sets"],
            "dropped_by_sync": fr["dropped"],
            "pending": fr["pending"],
        },
        "frame_sets": fs,
        "windows": {"emitted": acc["windows"]["emitted"], "fused": len(records),
                    "engine": acc["windows"]["engine"]},
        "fusion": acc["fusion"],
        "errors": errors,
        "balanced": bool(frames_ok and sets_ok and fs["in_flight"] == 0),
        "identities": {
            "frames": "read == sum(rejected) + in_sets + sum(dropped_by_sync) + pending",
            "frame_sets": "received == processed + sum(dropped) + in_flight",
        },
    }
    return ReplayResult(cameras, records, accounting, time.perf_counter() - t0,
                        dict(writer.counts) if writer is not None else {}, records[-1].fusion if records else None)
