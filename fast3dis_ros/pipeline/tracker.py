"""Instance tracking across windows: voxel-overlap IoU + Hungarian matching to stable global ids.

A window instance is the set of (map-frame) voxels its points fall into; a map instance is the set of
map voxels whose label is that global id. IoU = |W ∩ M| / |W ∪ M| over voxels. Pairs with
IoU >= ``match_iou`` matched by Hungarian (maximum total IoU) keep the map id; other window instances get
new ids from a counter that never reuses ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["iou_matrix", "iou_from_pairs", "hungarian_match", "InstanceTrack", "InstanceTracker"]


def iou_matrix(
    win_keys: np.ndarray, win_labels: np.ndarray, map_keys: np.ndarray, map_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between window instances and map instances over voxel keys.

    ``win_keys``/``win_labels``: unique (voxel key, window label > 0) pairs (a voxel may hold several
    window labels). ``map_keys``: sorted unique voxel keys of the map, ``map_labels`` their single label
    (0 = none). Returns (iou (Kw, Km), window label per row, map label per column); columns only for map
    instances that intersect some window instance."""
    win_keys = np.asarray(win_keys, np.int64)
    win_labels = np.asarray(win_labels, np.int64)
    wl, w_inv, w_size = np.unique(win_labels, return_inverse=True, return_counts=True)
    if len(map_keys) == 0 or len(win_keys) == 0:
        return np.zeros((len(wl), 0)), wl, np.zeros(0, np.int64)
    idx = np.searchsorted(map_keys, win_keys)
    idx_c = np.minimum(idx, len(map_keys) - 1)
    hit = (idx < len(map_keys)) & (map_keys[idx_c] == win_keys)
    ml_hit = np.where(hit, map_labels[idx_c], 0).astype(np.int64)
    sel = ml_hit > 0
    if not sel.any():
        return np.zeros((len(wl), 0)), wl, np.zeros(0, np.int64)
    ml, m_inv = np.unique(ml_hit[sel], return_inverse=True)
    inter = np.zeros((len(wl), len(ml)))
    np.add.at(inter, (w_inv.reshape(-1)[sel], m_inv.reshape(-1)), 1.0)
    all_ml, all_cnt = np.unique(np.asarray(map_labels, np.int64), return_counts=True)
    m_size = all_cnt[np.searchsorted(all_ml, ml)].astype(np.float64)
    union = w_size[:, None] + m_size[None, :] - inter
    return inter / np.maximum(union, 1.0), wl, ml


def iou_from_pairs(
    win_labels: np.ndarray, map_labels: np.ndarray, map_sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU from (voxel, window label > 0) pairs without sorting (all labels are small non-negative ints).

    ``win_labels`` (P,): window label of each unique (voxel, window label) pair; ``map_labels`` (P,): the
    map label of that voxel (0 = not in the map / unlabelled); ``map_sizes``: voxels per map label,
    indexed by label. Same result as ``iou_matrix``."""
    win_labels = np.asarray(win_labels, np.int64)
    map_labels = np.asarray(map_labels, np.int64)
    wcnt = np.bincount(win_labels) if len(win_labels) else np.zeros(0, np.int64)
    wl = np.flatnonzero(wcnt)
    w_size = wcnt[wl].astype(np.float64)
    sel = map_labels > 0
    if not sel.any():
        return np.zeros((len(wl), 0)), wl, np.zeros(0, np.int64)
    mls = map_labels[sel]
    ml = np.flatnonzero(np.bincount(mls))
    m_lut = np.zeros(int(ml[-1]) + 1, np.int64)
    m_lut[ml] = np.arange(len(ml))
    w_lut = np.zeros(int(wl[-1]) + 1, np.int64)
    w_lut[wl] = np.arange(len(wl))
    code = w_lut[win_labels[sel]] * len(ml) + m_lut[mls]
    inter = np.bincount(code, minlength=len(wl) * len(ml)).reshape(len(wl), len(ml)).astype(np.float64)
    m_size = np.asarray(map_sizes, np.float64)[ml]
    union = w_size[:, None] + m_size[None, :] - inter
    return inter / np.maximum(union, 1.0), wl, ml


def hungarian_match(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(row, col) pairs maximising total IoU, each with IoU >= threshold."""
    if iou.size == 0:
        return []
    r, c = linear_sum_assignment(-iou)
    return [(int(i), int(j)) for i, j in zip(r, c) if iou[i, j] >= threshold and iou[i, j] > 0]


@dataclass
class InstanceTrack:
    id: int
    score: float
    views_seen: int = 0
    windows_seen: int = 0
    first_window: int = -1
    last_window: int = -1


class InstanceTracker:
    """Global instance ids and their running metadata (score as running max or EMA, views seen)."""

    def __init__(self, match_iou: float = 0.2, score_mode: str = "max", ema_alpha: float = 0.3) -> None:
        if score_mode not in ("max", "ema"):
            raise ValueError("score_mode must be 'max' or 'ema'")
        self.match_iou = float(match_iou)
        self.score_mode = score_mode
        self.ema_alpha = float(ema_alpha)
        self.tracks: dict[int, InstanceTrack] = {}
        self._next_id = 1

    def reset(self) -> None:
        self.tracks.clear()
        self._next_id = 1

    def new_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def assign(
        self,
        win_keys: np.ndarray,
        win_labels: np.ndarray,
        map_keys: np.ndarray,
        map_labels: np.ndarray,
        all_window_labels: np.ndarray | None = None,
    ) -> tuple[dict[int, int], np.ndarray]:
        """Map window labels to global ids. Returns (id_map {window label: global id}, iou matrix).

        Labels in ``all_window_labels`` that have no voxel also get new ids."""
        iou, wl, ml = iou_matrix(win_keys, win_labels, map_keys, map_labels)
        return self._assign(iou, wl, ml, all_window_labels), iou

    def assign_pairs(
        self,
        win_labels: np.ndarray,
        map_labels: np.ndarray,
        map_sizes: np.ndarray,
        all_window_labels: np.ndarray | None = None,
    ) -> tuple[dict[int, int], np.ndarray]:
        """``assign`` from precomputed voxel pairs (see ``iou_from_pairs``)."""
        iou, wl, ml = iou_from_pairs(win_labels, map_labels, map_sizes)
        return self._assign(iou, wl, ml, all_window_labels), iou

    def _assign(self, iou, wl, ml, all_window_labels) -> dict[int, int]:
        id_map: dict[int, int] = {}
        for i, j in hungarian_match(iou, self.match_iou):
            id_map[int(wl[i])] = int(ml[j])
        labels = set(int(x) for x in wl)
        if all_window_labels is not None:
            labels |= set(int(x) for x in np.asarray(all_window_labels).ravel() if x > 0)
        for lab in sorted(labels):
            if lab not in id_map:
                id_map[lab] = self.new_id()
        return id_map

    def update(self, gid: int, score: float, new_views: int, window_index: int) -> InstanceTrack:
        tr = self.tracks.get(gid)
        if tr is None:
            tr = self.tracks[gid] = InstanceTrack(gid, float(score), int(new_views), 1, window_index, window_index)
            return tr
        if self.score_mode == "max":
            tr.score = max(tr.score, float(score))
        else:
            tr.score = (1 - self.ema_alpha) * tr.score + self.ema_alpha * float(score)
        tr.views_seen += int(new_views)
        if tr.last_window != window_index:  # several labels of one window (absorbed fragments): one window
            tr.windows_seen += 1
        tr.last_window = window_index
        return tr

    def merge(self, lut: dict[int, int]) -> None:
        """Fold the tracks of merged ids (keys of ``lut``) into the kept ones (values): running-max score,
        views and windows added, earliest first window. Merged ids are never reused."""
        for src, dst in lut.items():
            a = self.tracks.pop(int(src), None)
            if a is None:
                continue
            b = self.tracks.get(int(dst))
            if b is None:
                self.tracks[int(dst)] = InstanceTrack(int(dst), a.score, a.views_seen, a.windows_seen, a.first_window,
                                                      a.last_window)
                continue
            b.score = max(b.score, a.score)
            b.views_seen += a.views_seen
            b.windows_seen = max(b.windows_seen, a.windows_seen)
            b.first_window = min(b.first_window, a.first_window)
            b.last_window = max(b.last_window, a.last_window)

    def support_score(self, gid: int, support_windows: int) -> float:
        """The track's score times min(1, windows seen / ``support_windows``) (0: the score alone); 0 for an
        unknown id. Why: the map's AP ranks instances by score, and with the network's masks an id that only
        one window produced is a true object far less often than one that windows kept linking to
        (docs/BENCHMARKS.md, "Issue 16: fusion of network masks")."""
        tr = self.tracks.get(int(gid))
        if tr is None:
            return 0.0
        if support_windows <= 0:
            return float(tr.score)
        return float(tr.score) * min(1.0, tr.windows_seen / float(support_windows))

    def prune(self, alive_ids) -> None:
        alive = set(int(i) for i in alive_ids)
        for gid in [g for g in self.tracks if g not in alive]:
            del self.tracks[gid]
