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
(``use_known_intrinsics``), ``frame_id`` from the header. Known poses are not used (node default).
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
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..data.bags import BagReadError
from ..pipeline.frames import CameraFrame, Window, WindowPrediction

log = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_CHECKPOINT",
    "RANDOM_WEIGHTS_WARNING",
    "ReplayConfig",
    "ReplayResult",
    "WindowRecord",
    "load_predictor",
    "camera_of_topic",
    "plan_bag_streams",
    "StreamPlanError",
    "frames_from_bag",
    "replay_bag",
]

from ..model.checkpoint import BUNDLED_CHECKPOINT  # noqa: E402  (one definition, in model/checkpoint.py)
RANDOM_WEIGHTS_WARNING = (
    "WEIGHTS ARE RANDOM: no FAST3DIS checkpoint found (bundled one expected at {path}); using "
    "Predictor.random_tiny(0). Depth, poses and instances below are NOT meaningful."
)


def _checkpoint_ok(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def load_predictor(checkpoint: str | Path | None = None, device: str = "cpu", *, with_features: bool = False,
                   backend: str = "torch", engine: str | None = None, **kw):
    """(predictor, info). ``checkpoint`` None -> the bundled tiny checkpoint, or random tiny weights with a
    loud warning when it is absent. An explicit path that is not a checkpoint raises FileNotFoundError.

    ``with_features``: capture the pixel decoder's mask features of every forward (model output
    ``mask_features``) into ``WindowPrediction.extras['mask_features']`` (V, C, h, w) float32 through a
    forward hook (the Predictor does not put them in extras itself); used by the HDBSCAN baseline.
    ``backend`` 'onnxruntime' / 'tensorrt': the network runs from ``engine`` (deploy/backends.py) instead."""
    from ..model.predictor import Predictor

    if backend != "torch":
        from ..deploy.backends import engine_predictor

        if with_features:
            raise ValueError(f"backend '{backend}' has no mask-feature output: the HDBSCAN baseline needs 'torch'")
        pred = engine_predictor(backend, engine or "", **kw)
        return pred, {"device": str(pred.device), "weights": backend, "checkpoint": None, "engine": str(engine),
                      "random_weights": False, "config": pred.cfg.backbone.__dict__}

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    info: dict = {"device": device}
    if checkpoint is not None:
        p = Path(checkpoint)
        if not _checkpoint_ok(p):
            raise FileNotFoundError(f"{p}: not a FAST3DIS checkpoint folder (needs config.json + model.safetensors)")
        pred = Predictor.from_checkpoint(str(p), device=device, **kw)
        info.update(weights="checkpoint", checkpoint=str(p.resolve()), random_weights=False)
    elif _checkpoint_ok(BUNDLED_CHECKPOINT):
        pred = Predictor.from_checkpoint(str(BUNDLED_CHECKPOINT), device=device, **kw)
        info.update(weights="bundled", checkpoint=str(BUNDLED_CHECKPOINT), random_weights=False)
    else:
        msg = RANDOM_WEIGHTS_WARNING.format(path=BUNDLED_CHECKPOINT)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        pred = Predictor.random_tiny(0, device=device, **kw)
        info.update(weights="random", checkpoint=None, random_weights=True, warning=msg)
    info["config"] = getattr(getattr(pred, "cfg", None), "backbone", None).__dict__ if hasattr(
        getattr(pred, "cfg", None), "backbone") else None
    if with_features:
        _attach_feature_hook(pred)
    return pred, info


def _attach_feature_hook(pred) -> None:
    store: dict = {}

    def hook(_m, _inp, out):
        if isinstance(out, dict) and "mask_features" in out:
            store["mask_features"] = out["mask_features"][0].detach().float().cpu().numpy()

    pred.model.register_forward_hook(hook)
    orig = pred.predict

    def predict(window: Window) -> WindowPrediction:
        store.clear()
        wp = orig(window)
        if "mask_features" in store and "mask_features" not in wp.extras:
            wp.extras["mask_features"] = store["mask_features"]
        return wp

    pred.predict = predict


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
    from ..pipeline.fusion import MapFusion
    from ..pipeline.runner import PipelineRunner
    from .output_bag import OutputBagWriter

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
    fusion = MapFusion(voxel_size=cfg.voxel_size, max_points=cfg.max_map_points, min_score=cfg.score_threshold,
                       conf_threshold=cfg.conf_threshold, map_frame=cfg.map_frame)
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
