"""Window-to-map instance association from two kinds of evidence, with explicit split / merge decisions.

Why: the voxel-overlap tracker links window instances to map ids only where the window's geometry puts
its points on the map's voxels. With the network's geometry (decimetres of error inside a window) that
overlap is near zero and no instance links. Consecutive windows share frame sets (stride < window size),
so the same images carry masks from both windows: the per-pixel overlap of a window's masks with the
map ids already painted on those images is exact, whatever the depth and poses.

Evidence per (window label w, map id m):

* **2D** (shared views): ``ViewLabelMemory`` keeps, per view (camera, stamp), the label image of the
  latest window that saw it, in map ids. ``overlap_2d`` counts pixels of w on those views (``px_w``),
  pixels of m (``px_m``) and their intersection.
* **3D** (voxels): voxels of w in map, voxels of m in the map, and the voxels they share.

``associate`` blends them per window label with ``c_w = min(1, px_w / min(support_px, px_all_w / 2))``
(how much 2D evidence w has: full weight once it has ``support_px`` pixels, or half of all its pixels in
the window, on the shared views): ``score = c_w * IoU_2d + (1 - c_w) * IoU_3d``; the same blend gives the two covers
``cover_w`` (share of w inside m) and ``cover_m`` (share of m inside w). Then, in order:

1. **links**: Hungarian on ``score`` (>= ``match_iou``).
2. **merges**: a window label that covers >= ``merge_cover`` of two or more map ids (each also a real part
   of it, ``cover_w >= min_part``) that no other window label was linked to: those ids are one object the
   map had split; they merge into the oldest (smallest) of them, which the window label takes.
3. **splits**: an unlinked window label lying mostly inside one map id (``cover_w >= split_cover``):
   a small part of it (``cover_m < split_part``) is a fragment and is **absorbed** (takes that id); a
   large part of an id that another window label is linked to is a real **split** (a new id).

Window labels with no decision get new ids. Everything is counted in ``Association.counts``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["LinkParams", "Association", "ViewLabelMemory", "overlap_2d", "overlap_3d", "associate",
           "resolve_alias"]


@dataclass
class LinkParams:
    match_iou: float = 0.2  # least blended score of a link
    # window-label pixels on shared views for full 2D weight (c_w = 1), counted in the stored label images
    # (subsampled by MapFusion's link_stride: 12 px = ~50 px of the processing resolution at stride 2)
    support_px: int = 12
    merge_cover: float = 0.6  # share of a map id inside one window label for a merge
    min_part: float = 0.1  # ... and share of that window label on the map id
    split_cover: float = 0.6  # share of an unlinked window label inside one map id (split or absorb)
    split_part: float = 0.25  # below this share of the map id it is a fragment (absorbed), else a split
    decisions: bool = True  # False: links only (the plain Hungarian of before)


@dataclass
class Association:
    id_map: dict[int, int]  # window label -> map id (existing) or 0 = needs a new id
    evidence: dict[int, str]  # window label -> '2d' | '3d' | 'mixed' for linked / absorbed labels
    merges: list[tuple[int, list[int]]] = field(default_factory=list)  # (kept id, ids merged into it)
    splits: list[tuple[int, int]] = field(default_factory=list)  # (window label, map id it split from)
    absorbed: list[tuple[int, int]] = field(default_factory=list)  # (window label, map id)
    counts: dict[str, int] = field(default_factory=dict)


class ViewLabelMemory:
    """Label image (map ids) per view, the latest window's, subsampled by ``stride``; the oldest views go
    past ``capacity``. Map ids merged later are resolved on read (``resolve_alias``)."""

    def __init__(self, capacity: int = 64, stride: int = 2) -> None:
        self.capacity = int(capacity)
        self.stride = max(1, int(stride))
        self._views: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._views)

    def clear(self) -> None:
        self._views.clear()

    def subsample(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels)[:: self.stride, :: self.stride]

    def put(self, key: tuple[str, int], map_labels: np.ndarray) -> None:
        """``map_labels``: full-resolution label image in map ids (0 = none)."""
        self._views[key] = np.ascontiguousarray(self.subsample(map_labels), dtype=np.int64)
        self._views.move_to_end(key)
        while len(self._views) > self.capacity:
            self._views.popitem(last=False)

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        return self._views.get(key)

    def relabel(self, lut: dict[int, int]) -> None:
        """Rewrite stored ids through ``lut`` (merged id -> kept id)."""
        if not lut:
            return
        src = np.fromiter(lut, np.int64)
        dst = np.fromiter(lut.values(), np.int64)
        for k, img in self._views.items():
            hit = np.isin(img, src)
            if hit.any():
                img[hit] = _map_values(img[hit], src, dst)


def _map_values(x: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    o = np.argsort(src)
    return dst[o][np.searchsorted(src[o], x)]


def resolve_alias(alias: dict[int, int], gid: int) -> int:
    """Final id of ``gid`` after chains of merges (a -> b -> c)."""
    seen = 0
    while gid in alias and seen < 1000:
        gid = alias[gid]
        seen += 1
    return gid


def overlap_2d(win: list[np.ndarray], mapped: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                         np.ndarray, np.ndarray]:
    """Pixel contingency of window labels vs map ids over paired images (same shapes).

    Returns (inter (Kw, Km), window labels wl (Kw,), map ids ml (Km,), px_w (Kw,) pixels of each window
    label on these views, px_m (Km,) pixels of each map id); labels / ids 0 are left out."""
    if not win:
        z = np.zeros(0, np.int64)
        return np.zeros((0, 0)), z, z, z, z
    w = np.concatenate([np.asarray(a, np.int64).ravel() for a in win])
    m = np.concatenate([np.asarray(a, np.int64).ravel() for a in mapped])
    wl, w_inv, px_w = np.unique(w, return_inverse=True, return_counts=True)
    ml, m_inv, px_m = np.unique(m, return_inverse=True, return_counts=True)
    inter = np.bincount(w_inv.ravel() * len(ml) + m_inv.ravel(), minlength=len(wl) * len(ml))
    inter = inter.reshape(len(wl), len(ml)).astype(np.float64)
    kw, km = wl > 0, ml > 0
    return inter[kw][:, km], wl[kw], ml[km], px_w[kw], px_m[km]


def overlap_3d(win_labels: np.ndarray, map_labels: np.ndarray, map_sizes: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Voxel contingency from unique (voxel, window label > 0) pairs: ``win_labels`` (P,), the map id of each
    pair's voxel ``map_labels`` (P,) (0 = none), voxels per map id ``map_sizes`` (indexed by id).

    Returns (inter (Kw, Km), wl, ml, voxels of each window label, voxels of each map id in the map)."""
    win_labels = np.asarray(win_labels, np.int64)
    map_labels = np.asarray(map_labels, np.int64)
    wl, w_inv, n_w = np.unique(win_labels, return_inverse=True, return_counts=True)
    sel = map_labels > 0
    ml, m_inv = np.unique(map_labels[sel], return_inverse=True)
    inter = np.bincount(w_inv.ravel()[sel] * len(ml) + m_inv.ravel(), minlength=len(wl) * len(ml))
    inter = inter.reshape(len(wl), len(ml)).astype(np.float64)
    sizes = np.asarray(map_sizes, np.float64)
    n_m = sizes[ml] if len(ml) else np.zeros(0)
    return inter, wl, ml, n_w.astype(np.float64), n_m


def _embed(inter, wl, ml, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``inter`` (rows ``wl``, columns ``ml``) placed into a (rows, cols) matrix (labels not in ``rows``
    dropped; ``cols`` holds every id of ``ml``)."""
    out = np.zeros((len(rows), len(cols)))
    keep = np.isin(wl, rows)
    if inter.size and keep.any():
        ri = np.searchsorted(rows, wl[keep])
        ci = np.searchsorted(cols, ml)
        out[np.ix_(ri, ci)] = inter[keep]
    return out


def _sizes(vals, keys, rows) -> np.ndarray:
    out = np.zeros(len(rows))
    keep = np.isin(keys, rows)
    if keep.any():
        out[np.searchsorted(rows, keys[keep])] = np.asarray(vals)[keep]
    return out


def associate(labels: np.ndarray, o2d: tuple, o3d: tuple, params: LinkParams,
              px_all: np.ndarray | None = None) -> Association:
    """Decide, for every window label in ``labels`` (> 0), its map id (0 = new) from the 2D overlap ``o2d``
    and the 3D overlap ``o3d`` (outputs of ``overlap_2d`` / ``overlap_3d``); ``px_all[label]``: pixels of
    each label on all the window's views (same subsampling as ``o2d``; None: ``support_px`` alone); see the
    module doc."""
    rows = np.unique(np.asarray(labels, np.int64))
    rows = rows[rows > 0]
    i2, wl2, ml2, pxw, pxm = o2d
    i3, wl3, ml3, nw3, nm3 = o3d
    cols = np.union1d(ml2, ml3).astype(np.int64)
    counts = {"window_instances": len(rows), "linked_2d": 0, "linked_3d": 0, "linked_mixed": 0, "merges": 0,
              "merged_ids": 0, "splits": 0, "absorbed": 0}
    if not len(rows) or not len(cols):
        return Association({int(r): 0 for r in rows}, {}, counts=counts)
    I2 = _embed(i2, wl2, ml2, rows, cols)
    I3 = _embed(i3, wl3, ml3, rows, cols)
    pw = _sizes(pxw, wl2, rows)[:, None]
    pm = np.zeros(len(cols))
    pm[np.searchsorted(cols, ml2)] = pxm
    nw = _sizes(nw3, wl3, rows)[:, None]
    nm = np.zeros(len(cols))
    nm[np.searchsorted(cols, ml3)] = nm3
    need = np.full(pw.shape, float(max(1, params.support_px)))
    if px_all is not None:
        tot = np.asarray(px_all, np.float64)[np.clip(rows, 0, len(px_all) - 1)][:, None]
        need = np.maximum(1.0, np.minimum(need, 0.5 * tot))
    c = np.minimum(1.0, pw / need)
    safe = lambda a, b: np.divide(a, b, out=np.zeros_like(a), where=b > 0)  # noqa: E731
    iou2 = safe(I2, pw + pm[None] - I2)
    iou3 = safe(I3, nw + nm[None] - I3)
    score = c * iou2 + (1 - c) * iou3
    cover_w = c * safe(I2, np.broadcast_to(pw, I2.shape)) + (1 - c) * safe(I3, np.broadcast_to(nw, I3.shape))
    cover_m = c * safe(I2, np.broadcast_to(pm[None], I2.shape)) + (1 - c) * safe(I3, np.broadcast_to(nm[None], I3.shape))

    def kind(i: int) -> str:
        return "2d" if c[i, 0] >= 1.0 else ("3d" if c[i, 0] <= 0.0 else "mixed")

    link: dict[int, int] = {}  # row -> col
    r, cc = linear_sum_assignment(-score)
    for i, j in zip(r, cc):
        if score[i, j] >= params.match_iou and score[i, j] > 0:
            link[int(i)] = int(j)
    out = Association({int(x): 0 for x in rows}, {}, counts=counts)
    for i, j in link.items():
        out.id_map[int(rows[i])] = int(cols[j])
        out.evidence[int(rows[i])] = kind(i)
        counts[f"linked_{kind(i)}"] += 1
    if not params.decisions:
        return out
    claimed = set(link.values())
    merged: set[int] = set()
    for i in range(len(rows)):  # merges
        strong = [j for j in np.flatnonzero(cover_m[i] >= params.merge_cover) if cover_w[i, j] >= params.min_part]
        if len(strong) < 2:
            continue
        keep = link.get(i)
        if keep is None or keep not in strong:
            keep = max(strong, key=lambda j: score[i, j])
            if keep in claimed or keep in merged:
                continue
            link[i] = keep
            claimed.add(keep)
            out.id_map[int(rows[i])] = int(cols[keep])
            out.evidence[int(rows[i])] = kind(i)
            counts[f"linked_{kind(i)}"] += 1
        gone = [j for j in strong if j != keep and j not in claimed and j not in merged]
        if gone:
            merged.update(gone)
            ids = sorted(int(cols[j]) for j in [keep] + gone)  # the oldest (smallest) id lives on
            out.id_map[int(rows[i])] = ids[0]
            out.merges.append((ids[0], ids[1:]))
            counts["merges"] += 1
            counts["merged_ids"] += len(gone)
    for i in range(len(rows)):  # splits / fragments of unlinked labels
        if i in link:
            continue
        j = int(np.argmax(cover_w[i]))
        if cover_w[i, j] < params.split_cover or j in merged:
            continue
        if cover_m[i, j] < params.split_part or j not in claimed:
            out.id_map[int(rows[i])] = int(cols[j])
            out.evidence[int(rows[i])] = kind(i)
            out.absorbed.append((int(rows[i]), int(cols[j])))
            counts["absorbed"] += 1
        else:
            out.splits.append((int(rows[i]), int(cols[j])))
            counts["splits"] += 1
    return out
