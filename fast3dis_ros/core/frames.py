"""Plain data types that flow through the pipeline (sync -> window -> engine -> fusion -> publish).

They are the contract between the ROS layer and everything below it, so they hold numpy arrays and
nanosecond integer stamps only, never ROS messages. Conventions (see docs/ARCHITECTURE.md):
OpenCV optical axes; ``T_a_b`` maps points from frame b to frame a; images are HxWx3 uint8 RGB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CameraFrame:
    """One image of one camera, already converted to RGB uint8.

    ``K`` is the 3x3 pinhole matrix from CameraInfo (None when unknown or invalid);
    ``T_world_cam`` is a known camera pose from TF (None unless the user enables known poses).
    ``T_rig_cam`` is the camera's known mounting on its rig (static TF ``base_link <- frame_id``; None
    unless the user enables known rig extrinsics).
    """

    camera: str
    stamp_ns: int
    image: np.ndarray
    frame_id: str = ""
    K: np.ndarray | None = None
    T_world_cam: np.ndarray | None = None
    T_rig_cam: np.ndarray | None = None

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass
class FrameSet:
    """Frames of all cameras that the synchroniser grouped as taken at the same moment."""

    index: int
    stamp_ns: int  # stamp of the newest frame in the set
    frames: list[CameraFrame]  # in the configured camera order

    @property
    def cameras(self) -> list[str]:
        return [f.camera for f in self.frames]


@dataclass
class Window:
    """A run of consecutive frame sets handed to the engine as one multi-view batch.

    Views are ordered frame-set-major then camera order: view ``i`` is
    ``frame_sets[i // n_cams].frames[i % n_cams]``.
    """

    index: int
    frame_sets: list[FrameSet]
    created_ns: int = 0  # monotonic clock when the window was emitted (latency accounting)

    @property
    def views(self) -> list[CameraFrame]:
        return [f for fs in self.frame_sets for f in fs.frames]

    @property
    def stamp_ns(self) -> int:
        return self.frame_sets[-1].stamp_ns

    @property
    def n_views(self) -> int:
        return sum(len(fs.frames) for fs in self.frame_sets)


@dataclass
class WindowPrediction:
    """What the engine returns for one window, in numpy, at processing resolution (H, W).

    World frame of the prediction = the camera of view 0 unless known poses were given.
    ``labels[v]`` is a per-pixel instance index into ``scores`` (0 = none; instance k is ``k-1``),
    already resolved so that each pixel belongs to at most one instance.
    ``depth_scale_metric`` says whether depth is metric (True) or up to scale (False).
    """

    window_index: int
    stamp_ns: int
    cameras: list[str]  # per view
    frame_ids: list[str]  # per view
    view_stamps_ns: list[int]  # per view
    images: np.ndarray  # (V, H, W, 3) uint8
    depth: np.ndarray  # (V, H, W) float32
    depth_conf: np.ndarray  # (V, H, W) float32
    K: np.ndarray  # (V, 3, 3) float64 at processing resolution
    T_cam_world: np.ndarray  # (V, 4, 4) float64
    labels: np.ndarray  # (V, H, W) int32, 0 = background
    scores: np.ndarray  # (N,) float32, score of instance k+1 at index k
    engine_ms: float = 0.0
    depth_scale_metric: bool = False
    extras: dict = field(default_factory=dict)
    # Optional known camera poses (e.g. from TF) per view, (V, 4, 4) T_knownworld_cam; views whose pose
    # is unknown hold NaN. Only used by MapFusion(use_known_poses=True) as an alignment fallback.
    T_world_cam_known: np.ndarray | None = None
    # Optional known rig extrinsics per view, (V, 4, 4) T_rig_cam (metric, static TF); NaN where unknown.
    # MapFusion uses them to make each window metric (known vs predicted distances between the cameras of
    # one frame set) and to fix the cameras' relative poses inside a frame set.
    T_rig_cam_known: np.ndarray | None = None

    @property
    def n_instances(self) -> int:
        return int(self.scores.shape[0])


@dataclass
class InstanceCloud:
    """A point cloud with per-point colour, instance id (0 = unassigned) and score, in one frame."""

    frame_id: str
    stamp_ns: int
    xyz: np.ndarray  # (N, 3) float32
    rgb: np.ndarray  # (N, 3) uint8
    instance: np.ndarray  # (N,) uint32
    score: np.ndarray  # (N,) float32

    def __len__(self) -> int:
        return int(self.xyz.shape[0])


@dataclass
class InstanceSummary:
    """One instance of the running map, as published in InstanceArray / MarkerArray."""

    id: int
    score: float
    centroid: np.ndarray  # (3,)
    bbox_min: np.ndarray  # (3,)
    bbox_max: np.ndarray  # (3,)
    n_points: int
    views_seen: int


def stack_known(mats, shape: tuple[int, ...]) -> np.ndarray | None:
    """Per-view matrices (``None`` where a view's is unknown) as one ``(V, *shape)`` float64 array with NaN
    for the unknown ones; None when no view has one. Why NaN and not a drop: the views keep their index,
    and consumers test ``isfinite`` per view (known intrinsics, poses, rig extrinsics)."""
    if all(m is None for m in mats):
        return None
    nan = np.full(shape, np.nan)
    return np.stack([nan if m is None else np.asarray(m, np.float64) for m in mats])


def known_poses_of(views) -> np.ndarray | None:
    """``WindowPrediction.T_world_cam_known`` of a window's views (``CameraFrame.T_world_cam``)."""
    return stack_known([v.T_world_cam for v in views], (4, 4))
