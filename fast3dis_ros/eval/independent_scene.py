"""A scene generator independent of ``data.synthetic``: scenes the package never generates nor trained on.

Why: held-out seeds of ``data.synthetic`` still share its room layout, object kinds, textures, rig and
camera path with the training data. This generator (numpy ray casting, no torch) differs in every one of
them: spheres and axis-aligned boxes standing on a checkered floor, a room with striped walls, a rig that
translates sideways on a straight line (not an arc) with its cameras yawed by +-35 degrees and pitched
down 15 degrees, flat Lambert shading with per-object noise. It produces the duck-typed scene that
``data.bags.write_scene_bag`` writes (instances with ``to_dict``, ``camera_names``, ``T_rig_cam``,
``frames[frame][camera]`` with ``rgb``, ``depth`` (z, metres), ``instance`` (0 = room), ``K``,
``T_world_cam``). World: z up, metres; cameras: OpenCV axes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["IndependentSceneConfig", "generate_independent_scene"]


@dataclass
class IndependentSceneConfig:
    n_cameras: int = 3
    n_frames: int = 8
    width: int = 224
    height: int = 168
    n_spheres: int = 5
    n_boxes: int = 5
    seed: int = 0
    fov_deg: float = 75.0
    yaw_step_deg: float = 35.0
    pitch_deg: float = 15.0
    rig_height: float = 1.25
    travel_m: float = 1.6  # sideways travel of the rig over the frames
    room_half: tuple[float, float] = (3.2, 3.0)  # x, y half extents
    room_height: float = 2.7


@dataclass
class _Instance:
    id: int
    kind: str
    center: list
    size: list
    bbox_min: list
    bbox_max: list
    color: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _View:
    camera: str
    frame_index: int
    rgb: np.ndarray
    depth: np.ndarray
    instance: np.ndarray
    K: np.ndarray
    T_world_cam: np.ndarray


@dataclass
class IndependentScene:
    config: IndependentSceneConfig
    camera_names: list
    instances: list
    frames: list
    T_rig_cam: dict


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _place_objects(cfg: IndependentSceneConfig, rng: np.random.Generator) -> list[_Instance]:
    objs: list[_Instance] = []
    disks: list[tuple[float, float, float]] = []  # footprint circles (x, y, r) for rejection
    kinds = ["sphere"] * cfg.n_spheres + ["box"] * cfg.n_boxes
    for kind in kinds:
        for _ in range(200):
            if kind == "sphere":
                r = rng.uniform(0.18, 0.42)
                half = np.array([r, r, r])
            else:
                half = np.array([rng.uniform(0.15, 0.4), rng.uniform(0.15, 0.4), rng.uniform(0.15, 0.5)])
                r = float(np.hypot(half[0], half[1]))
            x = rng.uniform(-cfg.room_half[0] + 0.5, cfg.room_half[0] - 0.5)
            y = rng.uniform(0.2, cfg.room_half[1] - 0.4)
            if all(np.hypot(x - a, y - b) > r + rb + 0.08 for a, b, rb in disks):
                break
        else:
            continue
        disks.append((x, y, r))
        c = np.array([x, y, half[2]])
        objs.append(_Instance(len(objs) + 1, kind, c.tolist(), (2 * half).tolist(), (c - half).tolist(),
                              (c + half).tolist(), rng.uniform(0.15, 0.95, 3).tolist()))
    return objs


def _render(cfg, objs, K, T_world_cam, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    H, W = cfg.height, cfg.width
    u, v = np.meshgrid(np.arange(W) + 0.0, np.arange(H) + 0.0)
    pix = np.stack([u.ravel(), v.ravel(), np.ones(H * W)], 1)
    d_cam = pix @ np.linalg.inv(K).T  # z = 1: the ray parameter is the z-depth
    R, o = T_world_cam[:3, :3], T_world_cam[:3, 3]
    d = d_cam @ R.T
    n = len(d)
    t_best = np.full(n, np.inf)
    inst = np.zeros(n, np.int64)
    normal = np.zeros((n, 3))
    # room: exit through the inside of the box
    lo = np.array([-cfg.room_half[0], -cfg.room_half[1], 0.0])
    hi = np.array([cfg.room_half[0], cfg.room_half[1], cfg.room_height])
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = np.where(d > 0, (hi - o) / d, (lo - o) / d)
    tx = np.where(np.isfinite(tx) & (tx > 0), tx, np.inf)
    axis = np.argmin(tx, 1)
    t_best = tx[np.arange(n), axis]
    normal[np.arange(n), axis] = -np.sign(d[np.arange(n), axis])
    room_axis = axis.copy()
    for ob in objs:
        c = np.asarray(ob.center)
        if ob.kind == "sphere":
            r = ob.size[0] / 2
            oc = o - c
            a = (d * d).sum(1)
            b = 2 * d @ oc
            disc = b * b - 4 * a * (oc @ oc - r * r)
            ok = disc > 0
            t = np.full(n, np.inf)
            t[ok] = (-b[ok] - np.sqrt(disc[ok])) / (2 * a[ok])
            t[t <= 1e-6] = np.inf
            hit = t < t_best
            p = o + d[hit] * t[hit, None]
            normal[hit] = (p - c) / r
        else:
            bl, bh = np.asarray(ob.bbox_min), np.asarray(ob.bbox_max)
            with np.errstate(divide="ignore", invalid="ignore"):
                t1, t2 = (bl - o) / d, (bh - o) / d
            tn = np.nanmax(np.minimum(t1, t2), 1)
            tf = np.nanmin(np.maximum(t1, t2), 1)
            t = np.where((tn <= tf) & (tn > 1e-6), tn, np.inf)
            hit = t < t_best
            ax = np.nanargmax(np.minimum(t1, t2)[hit], 1)
            nn = np.zeros((int(hit.sum()), 3))
            nn[np.arange(len(ax)), ax] = -np.sign(d[hit][np.arange(len(ax)), ax])
            normal[hit] = nn
        t_best = np.where(hit, t, t_best)
        inst[hit] = ob.id
        room_axis[hit] = -1
    p = o + d * t_best[:, None]
    light = np.array([0.3, -0.5, 0.8])
    light /= np.linalg.norm(light)
    shade = 0.3 + 0.7 * np.clip(normal @ light, 0, 1)
    col = np.zeros((n, 3))
    # room: checkered floor, striped walls, plain ceiling
    floor = room_axis == 2
    floor &= p[:, 2] < 0.5
    chk = ((np.floor(p[:, 0] / 0.5) + np.floor(p[:, 1] / 0.5)) % 2)[:, None]
    col[floor] = (0.35 + 0.35 * chk[floor]) * np.array([0.9, 0.85, 0.7])
    walls = (room_axis >= 0) & ~floor
    stripes = (np.sin(p[:, 2] * 9.0 + p[:, 0] * 2.0 + p[:, 1] * 2.0) > 0)[:, None]
    col[walls] = np.where(stripes[walls], [0.55, 0.62, 0.7], [0.75, 0.72, 0.66])
    for ob in objs:
        m = inst == ob.id
        col[m] = np.asarray(ob.color) * (0.85 + 0.3 * rng.random((int(m.sum()), 1)))
    rgb = np.clip(col * shade[:, None] * 255, 0, 255).astype(np.uint8).reshape(H, W, 3)
    depth = np.where(np.isfinite(t_best), t_best, 0).astype(np.float32).reshape(H, W)
    return rgb, depth, inst.astype(np.int32).reshape(H, W)


def generate_independent_scene(cfg: IndependentSceneConfig | None = None) -> IndependentScene:
    """Render ``cfg.n_frames`` frame sets of ``cfg.n_cameras`` cameras (module doc); deterministic per seed."""
    cfg = cfg or IndependentSceneConfig()
    rng = np.random.default_rng([cfg.seed, 16])
    objs = _place_objects(cfg, rng)
    f = cfg.width / 2 / np.tan(np.radians(cfg.fov_deg) / 2)
    K = np.array([[f, 0, (cfg.width - 1) / 2], [0, f, (cfg.height - 1) / 2], [0, 0, 1.0]])
    names = [f"cam{i}" for i in range(cfg.n_cameras)]
    yaws = (np.arange(cfg.n_cameras) - (cfg.n_cameras - 1) / 2) * np.radians(cfg.yaw_step_deg)
    # OpenCV camera looking along +y of the rig, pitched down: x right, y down, z forward
    base = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # columns: cam axes in rig (x, y=down, z=fwd)
    pitch = np.radians(cfg.pitch_deg)
    Rp = np.array([[1, 0, 0], [0, np.cos(pitch), np.sin(pitch)], [0, -np.sin(pitch), np.cos(pitch)]])
    T_rig_cam = {}
    for nm, yw in zip(names, yaws):
        T = np.eye(4)
        T[:3, :3] = _rot_z(-yw) @ base @ Rp
        T[:3, 3] = [0.06 * np.sin(yw), 0.06 * np.cos(yw), 0.0]
        T_rig_cam[nm] = T
    frames = []
    y0 = -cfg.room_half[1] + 0.6
    for fi in range(cfg.n_frames):
        T_world_rig = np.eye(4)
        T_world_rig[:3, 3] = [-cfg.travel_m / 2 + cfg.travel_m * fi / max(1, cfg.n_frames - 1), y0, cfg.rig_height]
        T_world_rig[:3, :3] = _rot_z(0.05 * np.sin(fi))
        views = []
        for nm in names:
            Twc = T_world_rig @ T_rig_cam[nm]
            rgb, depth, ins = _render(cfg, objs, K, Twc, rng)
            views.append(_View(nm, fi, rgb, depth, ins, K.copy(), Twc))
        frames.append(views)
    return IndependentScene(cfg, names, objs, frames, T_rig_cam)
