"""Randomised robot rigs for procedural training scenes (``SceneConfig(rig_variety=True)``).

Why: the fixed rig of ``data.synthetic`` (cameras at 0 / +60 / -60 deg yaw, one 70 deg FoV, an arc looking
at the room centre) taught the bundled model to predict its training rig's relative poses whatever the
images show (a +-50 deg rig came out as ~4 deg apart). Each varied scene therefore draws its own rig:

* mounting yaws: camera 0 within +-10 deg of forward; the others either symmetric at +-(25..60) deg (wide
  front/left/right rigs like 0/+50/-50) or independent in [-60, 60] deg at least 15 deg apart; cameras past
  the third anywhere around;
* per camera: horizontal FoV 55..100 deg, fy/fx within 2 %, principal point up to 4 % of the image size off
  centre, pitch = rig pitch (-5..30 deg, down positive) +- 6 deg, roll +- 3 deg, lever arm 3..20 cm;
* rig height 0.45..1.6 m and a robot-like motion, one of ``MOTIONS``: driving forward along a gently
  curving path, turning in place, driving then turning, or the old arc around the room centre.

Everything is drawn from the ``rng`` passed in, so a scene seed fixes its rig. No torch, no rendering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["MOTIONS", "RigSample", "sample_rig_variety", "camera_yaw_deg", "horizontal_fov_deg"]

MOTIONS = ("drive", "turn", "drive_turn", "arc")
_MOTION_P = (0.35, 0.2, 0.25, 0.2)
_WALL_MARGIN = 0.6  # metres between the rig path and any wall
# OpenCV optical axes in a REP 103 body frame (same matrix as data.synthetic.R_BODY_OPTICAL)
_R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _ry(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rx(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@dataclass
class RigSample:
    """One scene's rig: extrinsics and intrinsics per camera, rig poses per frame, the floor path to keep free."""

    T_rig_cam: dict[str, np.ndarray]  # (4,4) per camera name
    K: np.ndarray  # (C,3,3) per camera, camera order of the names
    T_world_rig: list[np.ndarray]  # (4,4) per frame
    path: np.ndarray  # (N,2) floor points the rig passes (objects keep clear of them)
    motion: str
    yaws_deg: list[float] = field(default_factory=list)
    pitches_deg: list[float] = field(default_factory=list)
    rolls_deg: list[float] = field(default_factory=list)
    hfov_deg: list[float] = field(default_factory=list)
    rig_height: float = 0.0

    def to_dict(self) -> dict:
        """What ``scene.json`` records under ``rig`` (the arrays themselves are stored per view)."""
        return {"motion": self.motion, "yaws_deg": self.yaws_deg, "pitches_deg": self.pitches_deg,
                "rolls_deg": self.rolls_deg, "hfov_deg": self.hfov_deg, "rig_height": self.rig_height}


def camera_yaw_deg(T_rig_cam: np.ndarray) -> float:
    """Mounting yaw (deg, left positive) of a camera: heading of its optical axis in the rig's x-y plane."""
    z = np.asarray(T_rig_cam)[:3, 2]
    return math.degrees(math.atan2(z[1], z[0]))


def horizontal_fov_deg(K: np.ndarray, width: int) -> float:
    """Horizontal FoV (deg) of a pinhole K for an image ``width`` pixels wide (principal point assumed central)."""
    return math.degrees(2.0 * math.atan((width / 2.0) / float(np.asarray(K)[0, 0])))


def _sample_yaws(n: int, rng: np.random.Generator) -> list[float]:
    yaws = [float(rng.uniform(-10.0, 10.0))]
    if n >= 3 and rng.uniform() < 0.5:  # symmetric wide rig: front / left / right
        a = float(rng.uniform(25.0, 60.0))
        yaws += [yaws[0] + a + float(rng.uniform(-5, 5)), yaws[0] - a + float(rng.uniform(-5, 5))]
    while len(yaws) < min(n, 3):
        for _ in range(50):
            y = float(rng.uniform(-60.0, 60.0))
            if min(abs(y - o) for o in yaws) >= 15.0:
                break
        yaws.append(y)
    while len(yaws) < n:
        yaws.append(float(rng.uniform(-180.0, 180.0)))
    return yaws[:n]


def _intrinsics(width: int, height: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    hfov = float(rng.uniform(55.0, 100.0))
    fx = (width / 2.0) / math.tan(math.radians(hfov) / 2.0)
    fy = fx * float(rng.uniform(0.98, 1.02))
    cx = (width - 1) / 2.0 + float(rng.uniform(-0.04, 0.04)) * width
    cy = (height - 1) / 2.0 + float(rng.uniform(-0.04, 0.04)) * height
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), hfov


def _inside(xy: np.ndarray, room: np.ndarray) -> bool:
    return bool(np.all(xy >= _WALL_MARGIN) and np.all(xy <= room[:2] - _WALL_MARGIN))


def _unicycle(start: np.ndarray, heading: float, steps: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Positions (F,2) and headings (F,) after each (forward metres, turn radians) step (first = start)."""
    xy, th = [start.copy()], [heading]
    for v, w in steps:
        h = th[-1] + 0.5 * w  # midpoint heading: a smooth arc per step
        xy.append(xy[-1] + v * np.array([math.cos(h), math.sin(h)]))
        th.append(th[-1] + w)
    return np.stack(xy), np.array(th)


def _motion_steps(motion: str, n: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """n-1 unicycle steps for a drive / turn / drive_turn motion over n frames."""
    k = max(1, n - 1)
    if motion == "drive":
        length, turn = rng.uniform(0.8, 2.5), math.radians(rng.uniform(-40.0, 40.0))
        return [(length / k, turn / k + math.radians(rng.uniform(-3, 3))) for _ in range(k)]
    if motion == "turn":
        turn = math.radians(rng.uniform(60.0, 200.0)) * (1 if rng.uniform() < 0.5 else -1)
        return [(float(rng.uniform(-0.02, 0.02)), turn / k) for _ in range(k)]
    # drive_turn: first half drive, second half turn in place
    kd = max(1, k // 2)
    length = rng.uniform(0.5, 1.5)
    turn = math.radians(rng.uniform(45.0, 120.0)) * (1 if rng.uniform() < 0.5 else -1)
    return [(length / kd, 0.0) for _ in range(kd)] + [(0.0, turn / max(1, k - kd)) for _ in range(k - kd)]


def _plan_path(motion: str, n: int, room: np.ndarray, rng: np.random.Generator):
    """(positions (n,2), headings (n,), motion actually used) inside the room's wall margin."""
    if motion != "arc":
        steps = _motion_steps(motion, n, rng)
        for attempt in range(60):
            scale = 0.7 ** (attempt // 20)  # shrink the path if a small room keeps rejecting it
            start = rng.uniform(_WALL_MARGIN, room[:2] - _WALL_MARGIN)
            # start heading towards the room's middle +-70 deg: a robot rarely drives along facing a bare wall
            to_mid = math.atan2(room[1] / 2 - start[1], room[0] / 2 - start[0])
            heading = to_mid + math.radians(float(rng.uniform(-70.0, 70.0)))
            xy, th = _unicycle(start, heading, [(v * scale, w) for v, w in steps])
            if all(_inside(p, room) for p in xy):
                return xy, th, motion
    # arc on an ellipse around the room centre, facing the centre (also the fallback)
    c = room[:2] / 2.0
    ax, ay = 0.25 * room[0], 0.25 * room[1]
    th0, span = rng.uniform(0.0, 2 * math.pi), math.radians(rng.uniform(40.0, 140.0)) * (1 if rng.uniform() < 0.5 else -1)
    t = th0 + span * np.linspace(0.0, 1.0, n)
    xy = np.stack([c[0] + ax * np.cos(t), c[1] + ay * np.sin(t)], 1)
    head = np.arctan2(c[1] - xy[:, 1], c[0] - xy[:, 0]) + np.radians(rng.uniform(-15, 15, n))
    return xy, head, "arc"


def _dense_path(xy: np.ndarray, per_segment: int = 8) -> np.ndarray:
    if len(xy) == 1:
        return xy.copy()
    pts = [xy[i] + (xy[i + 1] - xy[i]) * f for i in range(len(xy) - 1) for f in np.linspace(0, 1, per_segment, endpoint=False)]
    return np.vstack([np.stack(pts), xy[-1:]])


def sample_rig_variety(names: list[str], n_frames: int, width: int, height: int, room: np.ndarray,
                       rng: np.random.Generator) -> RigSample:
    """Draw one scene's rig (module docstring) for ``names`` cameras moving over ``n_frames`` frames."""
    n = len(names)
    yaws = _sample_yaws(n, rng)
    rig_pitch = float(rng.uniform(-5.0, 30.0))
    pitches = [rig_pitch + float(rng.uniform(-6.0, 6.0)) for _ in range(n)]
    rolls = [float(rng.uniform(-3.0, 3.0)) for _ in range(n)]
    T_rig_cam, Ks, fovs = {}, [], []
    for name, y, p, r in zip(names, yaws, pitches, rolls):
        Rz = _rz(math.radians(y))
        T = np.eye(4)
        T[:3, :3] = Rz @ _ry(math.radians(p)) @ _rx(math.radians(r)) @ _R_BODY_OPTICAL
        T[:3, 3] = Rz @ np.array([rng.uniform(0.03, 0.2), 0.0, rng.uniform(-0.05, 0.05)])
        T_rig_cam[name] = T
        K, fov = _intrinsics(width, height, rng)
        Ks.append(K)
        fovs.append(fov)
    height_m = float(rng.uniform(0.45, 1.6))
    motion = MOTIONS[int(rng.choice(len(MOTIONS), p=_MOTION_P))]
    xy, head, motion = _plan_path(motion, n_frames, room, rng)
    poses = []
    for i in range(n_frames):
        s = i / max(1, n_frames - 1)
        T = np.eye(4)
        T[:3, :3] = _rz(float(head[i]))
        T[:3, 3] = [xy[i, 0], xy[i, 1], height_m + 0.02 * math.sin(2 * math.pi * s)]
        poses.append(T)
    return RigSample(T_rig_cam=T_rig_cam, K=np.stack(Ks), T_world_rig=poses, path=_dense_path(xy), motion=motion,
                     yaws_deg=yaws, pitches_deg=pitches, rolls_deg=rolls, hfov_deg=fovs, rig_height=height_m)
