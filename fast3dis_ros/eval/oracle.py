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
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from itertools import combinations

import numpy as np

from fast3dis_ros.geometry.cameras import scale_K
from fast3dis_ros.core.frames import Window, WindowPrediction
from .metrics import resize_nearest

__all__ = ["ORACLE_PARTS", "ISSUE_TABLE_CONFIGS", "parse_oracle", "all_oracle_configs", "oracle_name",
           "apply_oracle", "OraclePredictor", "CachedPredictor"]

ORACLE_PARTS = ("masks", "depth", "poses")
# the issue's table: masks x (depth + poses)
ISSUE_TABLE_CONFIGS = [("masks", "depth", "poses"), ("depth", "poses"), ("masks",), ()]


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
    fresh shallow copy each time (the engine writes ``engine_ms`` into what it gets)."""

    def __init__(self, base) -> None:
        self.base = base
        self._cache: dict = {}
        self.forward_calls = 0

    def predict(self, window: Window) -> WindowPrediction:
        key = tuple((f.camera, int(f.stamp_ns)) for f in window.views)
        if key not in self._cache:
            self.forward_calls += 1
            self._cache[key] = self.base.predict(window)
        p = self._cache[key]
        return dataclasses.replace(p, window_index=window.index, extras=dict(p.extras))


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
