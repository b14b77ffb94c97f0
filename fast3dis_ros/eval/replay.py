"""Offline replay core shared by ``fast3dis-demo`` and ``fast3dis-eval`` (no ROS, no rclpy).

A rosbag2 (mcap or sqlite3) is read with ``data.bags.read_camera_streams`` and fed, at full speed, to the
same :class:`~fast3dis_ros.pipeline.runner.PipelineRunner` the node uses, in synchronous mode (every
window is processed, nothing is dropped for lack of time). Every result is written to an output bag
(``eval.output_bag``) exactly as the node would publish it.

Which streams are read is decided once, by ``plan_bag_streams`` through ``data/camera_identity.py``: one
image stream per camera (raw by default, ``image_transport``; the other one of a camera with both is
not read at all, so it is never a sync drop, and the choice is said once), the camera's CameraInfo,
namespaced topics and ``camera_map`` understood; streams that match no camera are logged and listed by
name; a configured camera with no stream is a ``StreamPlanError`` naming the cause and the fix.

Frames are built as the node builds them: RGB from the Image / CompressedImage, ``K`` from the camera's
CameraInfo with the same stamp (or the latest one) when its size matches the image
(``use_known_intrinsics``), ``frame_id`` from the header. ``known_geometry`` (``fast3dis-eval
--known-geometry``) adds the geometry a robot already has, from the bag's ``/tf`` + ``/tf_static``
(``geometry.tf_tree``): ``none`` (node default), ``rig`` (static extrinsics of each camera, the top of its
static chain, e.g. ``base_link <- <cam>_optical_frame``: metric scale and relative camera poses in fusion),
``poses`` (``known_pose_frame <- frame_id`` at the image stamp: fusion places every window on them; with
``pose_conditioning`` the network is conditioned on them too, as the node's ``use_known_poses`` does),
``rig+poses`` (both: the rig gives the scale of the network's depth). A frame whose transform is missing
goes without it (counted in ``accounting['known_geometry']``).
Per camera, ``accounting["calibration"]`` counts frames with a known K and, by reason, those whose K the
network estimates (said once per camera and reason in the log).

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

from ..data.bags import BagReadError
from fast3dis_ros.core.frames import CameraFrame, Window, WindowPrediction
from fast3dis_ros.pipeline.fusion import DEFAULT_INSTANCE_VOTE_WEIGHT, DEFAULT_SUPPORT_WINDOWS

log = logging.getLogger(__name__)
# launch.logging (imported by launch_testing's pytest plugin, or by any process that imports launch) makes
# LaunchLogger the logger class, whose instances do not propagate: this module's warnings would reach neither the
# root handlers nor pytest's caplog. They are meant to propagate.
log.propagate = True

__all__ = [
    "ReplayConfig",
    "ReplayResult",
    "WindowRecord",
    "camera_of_topic",
    "plan_bag_streams",
    "StreamPlanError",
    "frames_from_bag",
    "replay_bag",
]

def camera_of_topic(topic: str) -> str:
    """``/front/image_raw`` -> ``front``; ``/robot/cam_a/image_raw/compressed`` -> ``robot/cam_a`` (the stream
    name; which camera a stream belongs to is decided by ``data.camera_identity``)."""
    from ..data.camera_identity import stream_of_topic

    return stream_of_topic(topic)


@dataclass
class ReplayConfig:
    cameras: list[str] | None = None  # None: every camera with an image topic in the bag
    image_topics: list[str] | None = None  # explicit image topics (camera names: data/camera_identity.py)
    camera_map: dict[str, str] = field(default_factory=dict)  # stream | topic | frame id -> camera
    image_transport: str = "raw"  # raw | compressed: which one a camera with both uses
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
    known_geometry: str = "none"  # none | rig | poses | rig+poses (see the module doc)
    pose_conditioning: bool = False  # known poses also condition the network (DA3 camera encoder)
    known_pose_frame: str = "map"  # fixed frame of the bag's TF tree for known_geometry='poses'
    tf_tolerance_ms: float = 5.0  # nearest stamped transform accepted this far from the image stamp
    link_2d: bool = True  # fusion: link instances by mask overlap on shared views too
    link_decisions: bool = True  # fusion: explicit merge / split decisions
    instance_vote_weight: float = DEFAULT_INSTANCE_VOTE_WEIGHT  # fusion: instance vs background vote (node parameter)
    support_windows: int = DEFAULT_SUPPORT_WINDOWS  # fusion: windows for full score support (node parameter)


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
    identity: object | None = None  # data.camera_identity.CameraIdentity the replay used (frames learned)

    @property
    def final_map(self):
        return None if self.final is None else self.final.map_cloud


# ----------------------------------------------------------------------------------------------------
class StreamPlanError(BagReadError):
    """The bag is readable but its streams do not fit the cameras asked for (the message: cause and fix)."""


def plan_bag_streams(path, cameras: list[str] | None = None, image_topics: list[str] | None = None,
                     camera_map: dict[str, str] | None = None, image_transport: str = "raw"):
    """The bag's :class:`~fast3dis_ros.data.camera_identity.StreamPlan` (one image stream per camera, its
    CameraInfo, unmatched streams by name). Raises BagReadError with the cause and the fix when a configured
    camera has no stream, no image stream is found, or the configuration is contradictory."""
    from ..data.bags import bag_topics
    from ..data.camera_identity import CameraIdentity, plan_streams

    topics = {t: mt for t, (mt, _n) in bag_topics(path).items()}
    try:
        ident = CameraIdentity(list(cameras) if cameras else None, dict(camera_map or {}))
        plan = plan_streams(topics, ident, image_transport, image_topics)
    except ValueError as e:
        raise StreamPlanError(f"{path}: {e}") from e
    images = sorted(t for t, m in topics.items() if m.endswith(("/Image", "/CompressedImage"))
                    and not t.endswith(("/depth_gt", "/instance_gt")))
    if plan.missing:
        hint = ""
        if plan.unmatched:
            hint = (f"; streams that match no camera: {plan.unmatched}. Map them with --camera-map "
                    f"<stream>=<camera> (e.g. {camera_of_topic(plan.unmatched[0])}={plan.missing[0]})")
        raise StreamPlanError(f"{path}: no image stream for camera(s) {plan.missing} of --cameras "
                           f"{list(cameras or [])}{hint}; image topics in the bag: {images}")
    if not plan.cameras:
        raise StreamPlanError(f"{path}: no camera image topics found (sensor_msgs/Image or CompressedImage, not "
                           f"*/depth_gt or */instance_gt); topics in the bag: {sorted(topics)}")
    for t in plan.unmatched:
        log.warning("%s matches no camera of %s: not read (map it with --camera-map <stream>=<camera>)", t,
                    plan.cameras)
    for n in plan.notes:
        log.warning("%s", n)
    return plan


def _calibration_reason(ci: dict | None, hw: tuple[int, int], use_known: bool) -> tuple[np.ndarray | None, str]:
    """(K or None, reason): ``known``, or why the network estimates this view's K."""
    if not use_known:
        return None, "use_known_intrinsics off"
    if ci is None:
        return None, "no CameraInfo"
    if (ci["height"], ci["width"]) != hw:
        return None, f"CameraInfo is {ci['width']}x{ci['height']}, image {hw[1]}x{hw[0]}"
    Kc = np.asarray(ci["K"], np.float64).reshape(3, 3)
    if not (np.isfinite(Kc).all() and Kc[0, 0] > 0 and Kc[1, 1] > 0):
        return None, "CameraInfo K invalid (non-finite or non-positive focal)"
    return Kc, "known"


def frames_from_bag(path, cameras: list[str] | None, image_topics: list[str] | None = None,
                    use_known_intrinsics: bool = True, counts: Counter | None = None,
                    rejected: Counter | None = None, max_per_camera: int | None = None, plan=None,
                    calibration: dict[str, Counter] | None = None) -> Iterable[CameraFrame]:
    """Yield CameraFrames in bag order (an image is held until its CameraInfo of the same stamp arrives
    or the camera's next image does). ``plan``: the streams to read (default: ``plan_bag_streams``).
    ``counts['read']`` counts image messages of the cameras (``counts['read:<cam>']`` per camera);
    ``rejected`` counts frames refused by the checks in the module doc; ``calibration[cam]`` counts the
    camera's frames by where their K comes from (``known`` or the reason the network estimates it, said once
    per camera and reason in the log). Header frame ids are learned into ``plan.identity``."""
    from ..data.bags import read_camera_streams

    counts = Counter() if counts is None else counts
    rejected = Counter() if rejected is None else rejected
    calibration = {} if calibration is None else calibration
    if plan is None:
        plan = plan_bag_streams(path, cameras, image_topics)
    topic_cam = plan.topic_camera
    info: dict[str, dict] = {}
    first_size: dict[str, tuple[int, int]] = {}
    pending: dict[str, tuple] = {}  # cam -> (stamp, image, frame_id)
    n_cam: Counter = Counter()
    stream = read_camera_streams(path, topics=list(topic_cam), include_tf=False, skip_bad=True)

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
        K, why = _calibration_reason(ci, (h, w), use_known_intrinsics)
        cal = calibration.setdefault(cam, Counter())
        if why not in ("known", "use_known_intrinsics off") and not cal[why]:
            log.warning("camera %s: %s: the network estimates K for its views", cam, why)
        cal[why] += 1
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.dtype != np.uint8:
            img = np.clip(img.astype(np.float64) / (256.0 if img.dtype == np.uint16 else 1.0), 0, 255).astype(np.uint8)
        return CameraFrame(cam, int(stamp), np.ascontiguousarray(img[..., :3]), frame_id=fid or f"{cam}_optical_frame",
                           K=K)

    for m in stream:
        cam = topic_cam.get(m.topic)
        if cam is None:
            continue
        if m.kind == "bad_message":
            counts["bad_camera_info"] += 1
            log.warning("%s: undecodable message ignored: %s", cam, m.data)
        elif m.kind == "camera_info":
            info[cam] = m.data
            if plan.identity is not None:
                plan.identity.learn_frame(m.frame_id, cam)
            if cam in pending and pending[cam][0] == m.stamp_ns:
                f = emit(cam)
                if f is not None:
                    yield f
        elif m.kind in ("image", "bad_image"):
            if max_per_camera is not None and n_cam[cam] >= max_per_camera:
                continue
            n_cam[cam] += 1
            counts["read"] += 1
            counts[f"read:{cam}"] += 1
            if m.kind == "bad_image":
                rejected["undecodable"] += 1
                log.warning("%s: undecodable image message dropped: %s", cam, m.data)
                continue
            if plan.identity is not None:
                plan.identity.learn_frame(m.frame_id, cam)
            if cam in pending:
                f = emit(cam)
                if f is not None:
                    yield f
            pending[cam] = (int(m.stamp_ns), m.data, m.frame_id)
    for cam in list(pending):
        f = emit(cam)
        if f is not None:
            yield f


KNOWN_GEOMETRY = ("none", "rig", "poses", "rig+poses")


def _set_pose_conditioning(predictor, on: bool) -> None:
    """``condition_on_poses`` of the predictor (or of the predictors it wraps through ``.base``)."""
    p, depth = predictor, 0
    while p is not None and depth < 8:
        if hasattr(p, "condition_on_poses"):
            p.condition_on_poses = bool(on)
        p, depth = getattr(p, "base", None), depth + 1


class KnownGeometry:
    """The bag's TF tree (read once) and what ``ReplayConfig.known_geometry`` takes from it per frame."""

    def __init__(self, bag, cfg: ReplayConfig) -> None:
        from ..data.bags import read_camera_streams
        from fast3dis_ros.geometry.tf_tree import TransformTree

        self.mode = cfg.known_geometry
        self.frame = cfg.known_pose_frame
        self.tol_ns = int(cfg.tf_tolerance_ms * 1e6)
        self.tree = TransformTree()
        self.counts: Counter = Counter()
        for m in read_camera_streams(bag, topics=[t for t in ("/tf", "/tf_static") if t in _topics(bag)],
                                     include_tf=False, skip_bad=True):
            if m.kind != "tf":
                self.counts["bad_tf_message"] += 1
                continue
            for t in m.data:
                try:
                    self.tree.add(t["parent"], t["child"], t["T"], t["stamp_ns"], static=m.topic == "/tf_static")
                except ValueError:
                    self.counts["bad_transform"] += 1

    def attach(self, frame: CameraFrame) -> CameraFrame:
        from fast3dis_ros.geometry.tf_tree import TransformLookupError

        fid = frame.frame_id
        if "rig" in self.mode:
            root, T = self.tree.static_root(fid)
            if root == fid:
                self.counts["no_rig_extrinsics"] += 1
                log.warning("%s: no static transform above %s: frame without rig extrinsics", frame.camera, fid)
            else:
                frame.T_rig_cam = T
                self.counts["with_rig_extrinsics"] += 1
        if "poses" in self.mode:
            try:
                frame.T_world_cam = self.tree.lookup(self.frame, fid, frame.stamp_ns, self.tol_ns)
                self.counts["with_pose"] += 1
            except TransformLookupError as e:
                self.counts["no_pose"] += 1
                log.warning("%s: no pose %s <- %s at %d: %s", frame.camera, self.frame, fid, frame.stamp_ns, e)
        return frame


def _topics(bag) -> dict:
    from ..data.bags import bag_topics

    return bag_topics(bag)


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
    plan = plan_bag_streams(bag, cfg.cameras, cfg.image_topics, cfg.camera_map, cfg.image_transport)
    cameras = list(plan.cameras)
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
    if cfg.known_geometry not in KNOWN_GEOMETRY:
        raise ValueError(f"known_geometry must be one of {KNOWN_GEOMETRY}, got {cfg.known_geometry!r}")
    from ..pipeline.linking import LinkParams

    fusion = MapFusion(voxel_size=cfg.voxel_size, max_points=cfg.max_map_points, min_score=cfg.score_threshold,
                       conf_threshold=cfg.conf_threshold, map_frame=cfg.map_frame, link_2d=cfg.link_2d,
                       link=LinkParams(decisions=cfg.link_decisions),
                       instance_vote_weight=cfg.instance_vote_weight, support_windows=cfg.support_windows,
                       use_known_poses="poses" in cfg.known_geometry, use_rig="rig" in cfg.known_geometry)
    geo = KnownGeometry(bag, cfg) if cfg.known_geometry != "none" else None
    _set_pose_conditioning(predictor, cfg.pose_conditioning)
    runner = PipelineRunner(cameras, predictor.predict, slop_ns=int(cfg.slop_ms * 1e6),
                            sync_queue_size=cfg.sync_queue_size, window_size=cfg.window_size, stride=cfg.stride,
                            fusion=fusion, sync_mode=True, on_fusion=on_fusion,
                            on_error=lambda w, e: errors.append(f"window {w.index}: {type(e).__name__}: {e}"))
    counts: Counter = Counter()
    rejected: Counter = Counter()
    calibration: dict[str, Counter] = {}
    try:
        if writer is not None:
            writer.__enter__()
        for frame in frames_from_bag(bag, cameras, cfg.image_topics, cfg.use_known_intrinsics, counts, rejected,
                                     cfg.max_frame_sets, plan=plan, calibration=calibration):
            runner.feed(geo.attach(frame) if geo is not None else frame)
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
        "streams": {c: {"image_topic": plan.image_topic[c], "transport": plan.transport[c],
                        "camera_info_topic": plan.info_topic[c]} for c in cameras},
        "streams_unmatched": list(plan.unmatched),
        "streams_not_used": dict(plan.not_used),
        "stream_notes": list(plan.notes),
        "calibration": {c: dict(calibration.get(c, {})) for c in cameras},
        "frames": {
            "read": int(counts["read"]),
            "read_per_camera": {c: int(counts[f"read:{c}"]) for c in cameras},
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
        "known_geometry": {"mode": cfg.known_geometry, **(geo.counts if geo is not None else {})},
        "errors": errors,
        "balanced": bool(frames_ok and sets_ok and fs["in_flight"] == 0),
        "identities": {
            "frames": "read == sum(rejected) + in_sets + sum(dropped_by_sync) + pending",
            "frame_sets": "received == processed + sum(dropped) + in_flight",
        },
    }
    return ReplayResult(cameras, records, accounting, time.perf_counter() - t0,
                        dict(writer.counts) if writer is not None else {}, records[-1].fusion if records else None,
                        identity=plan.identity)
