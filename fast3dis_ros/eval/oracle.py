"""Error budget: replace parts of each window's prediction with ground truth (``fast3dis-eval --oracle``).

Which stage limits the map? Swap one component at a time for GT and rescore: the difference is that
component's share of the error. Parts (any subset, ``parse_oracle``):

* ``masks``: per-pixel labels = the GT instance map nearest-resized to the processing grid, with
  **window-local shuffled ids** (every window draws a fresh random permutation of the GT ids present in it,
  so the tracker cannot link windows through GT ids); every instance scores 1.0.
* ``depth``: GT depth (metres) nearest-resized to the processing grid (invalid GT -> 0, not lifted).
* ``poses``: GT cameras: ``T_cam_world`` = inverse of the GT ``map -> <cam>_optical_frame`` pose, and
  ``K`` = GT intrinsics scaled to the processing grid (``geometry.cameras.scale_K``).

``depth`` without ``poses`` mixes metric depth with the network's up-to-scale cameras (and vice versa):
that is what the budget measures, not a bug. A view without the GT a part needs keeps its prediction and
is counted (``OraclePredictor.stats['views_without_gt']``).

``CachedPredictor`` runs the network once per window (keyed by the window's (camera, stamp) views), so
the configurations of an oracle table replay the same forward passes.

Known geometry (``ReplayConfig.known_geometry``: rig extrinsics and/or poses from the bag's TF, attached to
the frames by ``eval.replay.KnownGeometry``) is a second axis of the table: a row is (oracle parts, known
source), ``table_config`` / ``split_config`` / ``config_name``. Known geometry is not an oracle: it is what a
robot has, read from the bag exactly as ``fast3dis-eval --known-geometry`` reads it.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np

from fast3dis_ros.geometry.cameras import scale_K
from fast3dis_ros.core.frames import Window, WindowPrediction, known_poses_of
from .metrics import resize_nearest
from .replay import KNOWN_GEOMETRY

__all__ = ["ORACLE_PARTS", "ISSUE_TABLE_CONFIGS", "KNOWN_GEOMETRY_ROW_PARTS", "parse_oracle", "parse_known_sources",
           "all_oracle_configs", "oracle_name", "table_config", "split_config", "config_name", "known_geometry_configs",
           "apply_oracle", "OraclePredictor", "CachedPredictor"]

ORACLE_PARTS = ("masks", "depth", "poses")
# the issue's table: masks x (depth + poses)
ISSUE_TABLE_CONFIGS = [("masks", "depth", "poses"), ("depth", "poses"), ("masks",), ()]
# rows with a known-geometry source: the network's geometry (which the known source corrects) under network
# masks (the product) and GT masks (the mask error removed: what is left is geometry error)
KNOWN_GEOMETRY_ROW_PARTS = [("masks",), ()]


def parse_oracle(spec: str | None) -> tuple[str, ...]:
    """``"masks,depth"`` -> ("masks", "depth") in canonical order; ``""``/``"none"`` -> (); ``"all"`` -> all.
    Unknown parts raise ValueError."""
    if spec is None:
        return ()
    parts = {p.strip().lower() for p in str(spec).split(",") if p.strip()}
    if parts <= {"none"}:
        return ()
    if parts == {"all"}:
        return ORACLE_PARTS
    bad = sorted(parts - set(ORACLE_PARTS))
    if bad:
        raise ValueError(f"unknown oracle part(s) {bad}; choose from {','.join(ORACLE_PARTS)} (or all / none)")
    return tuple(p for p in ORACLE_PARTS if p in parts)


def all_oracle_configs() -> list[tuple[str, ...]]:
    """Every subset of ``ORACLE_PARTS``, the network alone first and all-GT last."""
    return [c for n in range(len(ORACLE_PARTS) + 1) for c in combinations(ORACLE_PARTS, n)]


def oracle_name(parts) -> str:
    return "+".join(parts) if parts else "none"


def parse_known_sources(spec: str | None) -> list[str]:
    """``"none,rig,poses,rig+poses"`` -> that list (order kept, duplicates dropped); ``"all"`` -> every
    source. Unknown sources raise ValueError."""
    if spec is None:
        return ["none"]
    items = [p.strip().lower() for p in str(spec).split(",") if p.strip()]
    if items == ["all"]:
        return list(KNOWN_GEOMETRY)
    bad = sorted(set(items) - set(KNOWN_GEOMETRY))
    if bad or not items:
        raise ValueError(f"unknown known-geometry source(s) {bad or [spec]}; choose from {','.join(KNOWN_GEOMETRY)} "
                         "(or all)")
    return list(dict.fromkeys(items))


def table_config(parts, known: str | None = None) -> tuple:
    """One row of the table: oracle ``parts`` replayed with known-geometry source ``known`` (None: the
    replay config's own ``known_geometry``, what a bare parts tuple means)."""
    if known is not None and known not in KNOWN_GEOMETRY:
        raise ValueError(f"unknown known-geometry source {known!r}; choose from {','.join(KNOWN_GEOMETRY)}")
    return (tuple(parts), known)


def split_config(config) -> tuple[tuple[str, ...], str | None]:
    """(parts, known) of a row: a ``table_config`` pair, or a bare parts tuple (known None)."""
    c = tuple(config)
    if len(c) == 2 and isinstance(c[0], tuple) and (c[1] is None or c[1] in KNOWN_GEOMETRY):
        return c[0], c[1]
    return c, None


def config_name(config) -> str:
    """Row key: ``oracle_name(parts)``, plus ``|known=<source>`` when the row names a source other than none."""
    parts, known = split_config(config)
    return oracle_name(parts) if known in (None, "none") else f"{oracle_name(parts)}|known={known}"


def known_geometry_configs(base_configs, sources) -> list[tuple]:
    """The table's rows: ``base_configs`` without known geometry when ``sources`` holds ``none``, then for
    every other source the ``KNOWN_GEOMETRY_ROW_PARTS`` rows (network geometry, network / GT masks)."""
    rows = [table_config(p, "none") for p in base_configs] if "none" in sources else []
    return rows + [table_config(p, k) for k in sources if k != "none" for p in KNOWN_GEOMETRY_ROW_PARTS]


def apply_oracle(pred: WindowPrediction, gt, parts, rng: np.random.Generator,
                 stats: Counter | None = None) -> WindowPrediction:
    """A copy of ``pred`` with ``parts`` replaced by GT (module doc); ``pred`` itself is not modified."""
    stats = Counter() if stats is None else stats
    parts = set(parts)
    if not parts:
        return dataclasses.replace(pred)
    V, h, w = pred.depth.shape
    depth, labels = pred.depth.copy(), pred.labels.copy()
    K, T = pred.K.copy(), pred.T_cam_world.copy()
    gt_lab = np.zeros((V, h, w), np.int64)
    have_mask = np.zeros(V, bool)
    for v, (cam, st) in enumerate(zip(pred.cameras, pred.view_stamps_ns)):
        st = int(st)
        dep = (gt.depth.get(cam) or {}).get(st)
        ins = (gt.instance.get(cam) or {}).get(st)
        pose = (gt.T_world_cam.get(cam) or {}).get(st)
        Kg = gt.K.get(cam)
        gt_hw = next((np.shape(a)[:2] for a in (dep, ins) if a is not None), None)  # the grid of the GT K
        need = {"masks": ins, "depth": dep, "poses": None if pose is None or Kg is None or gt_hw is None else pose}
        if any(need[p] is None for p in parts):
            stats["views_without_gt"] += 1
            continue
        stats["views_replaced"] += 1
        if "masks" in parts:
            gt_lab[v] = resize_nearest(np.asarray(ins, np.int64), h, w)
            have_mask[v] = True
        if "depth" in parts:
            d = resize_nearest(np.asarray(dep, np.float32), h, w)
            depth[v] = np.where(np.isfinite(d) & (d > 0), d, 0.0)
        if "poses" in parts:
            T[v] = np.linalg.inv(np.asarray(pose, np.float64))
            K[v] = scale_K(Kg, gt_hw, (h, w))
    scores = pred.scores
    if "masks" in parts and have_mask.any():
        ids = np.unique(gt_lab[have_mask])
        ids = ids[ids > 0]
        lut = np.zeros(int(ids.max()) + 1 if len(ids) else 1, np.int32)
        lut[ids] = rng.permutation(len(ids)) + 1  # window-local, shuffled
        labels = np.where(have_mask[:, None, None], lut[gt_lab], 0).astype(np.int32)
        scores = np.ones(len(ids), np.float32)
    return dataclasses.replace(pred, depth=depth, labels=labels, K=K, T_cam_world=T, scores=scores,
                               extras=dict(pred.extras))


class CachedPredictor:
    """``predict`` runs ``base.predict`` once per window (keyed by its (camera, stamp) views) and returns a
    fresh shallow copy each time (the engine writes ``engine_ms`` into what it gets). With ``folder`` the
    predictions are also kept on disk (``predictions.pkl``, ``save()``), so a rerun skips the network.

    The known geometry a window's frames carry (``T_world_cam``, ``T_rig_cam``) is re-read from *this*
    window each time, as ``Predictor.predict`` passes it on: the rows of one table replay the same windows
    with different known sources, and a copy of the first row's prediction would carry the first row's (none).
    Poses that condition the network (``condition_on_poses``) change its output, so they are part of the key."""

    def __init__(self, base, folder: Path | None = None) -> None:
        self.base = base
        self.folder = None if folder is None else Path(folder)
        self._cache: dict = {}
        if self.folder is not None and (self.folder / "predictions.pkl").is_file():
            self._cache = pickle.loads((self.folder / "predictions.pkl").read_bytes())
        self.forward_calls = 0

    def save(self) -> None:
        """Write the cache to ``folder`` (nothing without one)."""
        if self.folder is not None:
            (self.folder / "predictions.pkl").write_bytes(pickle.dumps(self._cache))

    def predict(self, window: Window) -> WindowPrediction:
        from fast3dis_ros.geometry.rig import rig_extrinsics_of

        cond = bool(getattr(self.base, "condition_on_poses", False))
        key = tuple((f.camera, int(f.stamp_ns), cond and f.T_world_cam is not None) for f in window.views)
        if key not in self._cache:
            self.forward_calls += 1
            self._cache[key] = self.base.predict(window)
        p = self._cache[key]
        return dataclasses.replace(p, window_index=window.index, extras=dict(p.extras),
                                   T_world_cam_known=known_poses_of(window.views),
                                   T_rig_cam_known=rig_extrinsics_of(window.views))


class OraclePredictor:
    """Wraps a predictor; ``predict`` replaces ``parts`` of each window's prediction with GT
    (``apply_oracle``). ``seed`` fixes the shuffled mask ids (one stream per window index)."""

    def __init__(self, base, gt, parts, seed: int = 0) -> None:
        self.base, self.gt, self.parts, self.seed = base, gt, tuple(parts), int(seed)
        self.stats: Counter = Counter(views_replaced=0, views_without_gt=0)

    def predict(self, window: Window) -> WindowPrediction:
        pred = self.base.predict(window)
        rng = np.random.default_rng([self.seed, int(window.index)])
        return apply_oracle(pred, self.gt, self.parts, rng, self.stats)
