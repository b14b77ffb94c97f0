"""Map fusion: align each window's world to ``map`` with a Sim(3), lift its labels, track instances.

``map`` is the first window's world (camera of its view 0) and keeps that window's scale (DA3 units
unless the predictions are metric). For every later window the Sim(3) ``T_map_window`` comes from, in
order of preference:

1. views shared with earlier windows (same camera and same stamp; windows overlap when
   stride < window_size): camera poses of those views in ``map`` (remembered from the window that first
   saw them) vs. in the new window's world, ``geometry.align.align_cameras``. The scale is the median
   ratio of the shared views' depth maps (map units / window units), which is dense and far better
   conditioned than the spread of nearby camera centres; without usable depth the centres give it.
2. known poses (``use_known_poses=True`` and ``WindowPrediction.T_world_cam_known``): through the
   estimated ``T_map_knownworld`` (learned whenever 1. or the first window and known poses coexist).
3. otherwise the previous window's alignment is kept and ``events['no_overlap']`` is counted (an
   alignment that raises counts ``align_failed`` and falls through the same way).

The running map is a voxel map (``voxel_size`` in map units) holding mean xyz / colour, one instance id
per voxel (majority with vote hysteresis) and score; it never holds more than ``max_points`` voxels (the
least recently observed are evicted).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..geometry.align import align_cameras, sim3_decompose
from ..geometry.cameras import invert_se3
from ..geometry.clouds import empty_cloud, lift_prediction, pack_voxel_keys, voxel_keys
from .frames import InstanceCloud, InstanceSummary, WindowPrediction
from .stats import DropCounter
from .tracker import InstanceTracker

__all__ = ["MapFusion", "FusionResult", "VoxelMap"]


@dataclass
class FusionResult:
    window_index: int
    stamp_ns: int
    window_cloud: InstanceCloud  # this window, in map frame, voxelised, global instance ids
    map_cloud: InstanceCloud  # running map
    instances: list[InstanceSummary]
    T_map_cam: np.ndarray  # (V, 4, 4) rigid camera poses in map
    T_map_window: np.ndarray  # (4, 4) Sim(3) (scale in the 3x3 block)
    id_map: dict[int, int]  # window label (1-based) -> global id
    align_method: str = ""  # first | shared_views | known_poses | previous
    n_shared_views: int = 0
    scale: float = 1.0
    info: dict = field(default_factory=dict)


class VoxelMap:
    """Sorted-key voxel store with running sums; bounded by ``max_points`` voxels (LRU by window)."""

    def __init__(self, voxel_size: float, max_points: int) -> None:
        self.voxel_size = float(voxel_size)
        self.max_points = int(max_points)
        self.clear()

    def clear(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.xyz_sum = np.zeros((0, 3), np.float64)
        self.rgb_sum = np.zeros((0, 3), np.float64)
        self.n = np.zeros(0, np.float64)
        self.inst = np.zeros(0, np.uint32)
        self.votes = np.zeros(0, np.float64)
        self.score = np.zeros(0, np.float32)
        self.last_seen = np.zeros(0, np.int64)
        self.evicted = 0

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def integrate(self, keys, xyz_sum, rgb_sum, n, inst, score, tick: int) -> None:
        """Add window voxels (unique sorted ``keys``) with per-voxel sums / majority label / score."""
        m = len(self.keys)
        idx = np.searchsorted(self.keys, keys)
        idx_c = np.minimum(idx, max(m - 1, 0))
        found = (idx < m) & (self.keys[idx_c] == keys) if m else np.zeros(len(keys), bool)
        f = idx_c[found]
        self.xyz_sum[f] += xyz_sum[found]
        self.rgb_sum[f] += rgb_sum[found]
        self.n[f] += n[found]
        self.last_seen[f] = tick
        same = self.inst[f] == inst[found]
        nv = n[found]
        v = np.where(same, self.votes[f] + nv, self.votes[f] - nv)
        flip = v < 0
        self.votes[f] = np.abs(v)
        newl = np.where(flip, inst[found], self.inst[f])
        self.score[f] = np.where(flip, score[found], np.where(same, np.maximum(self.score[f], score[found]),
                                                               self.score[f]))
        self.inst[f] = newl
        nf = ~found
        if nf.any():
            keys_all = np.concatenate([self.keys, keys[nf]])
            order = np.argsort(keys_all, kind="stable")
            self.keys = keys_all[order]
            self.xyz_sum = np.concatenate([self.xyz_sum, xyz_sum[nf]])[order]
            self.rgb_sum = np.concatenate([self.rgb_sum, rgb_sum[nf]])[order]
            self.n = np.concatenate([self.n, n[nf]])[order]
            self.inst = np.concatenate([self.inst, inst[nf]])[order]
            self.votes = np.concatenate([self.votes, n[nf]])[order]
            self.score = np.concatenate([self.score, score[nf]])[order]
            self.last_seen = np.concatenate([self.last_seen, np.full(int(nf.sum()), tick, np.int64)])[order]
        if len(self.keys) > self.max_points:
            # newest ticks first; among voxels of the cut-off tick keep the first ones (no full argsort)
            ticks, counts = np.unique(self.last_seen, return_counts=True)
            above = np.cumsum(counts[::-1])  # voxels with tick >= ticks[::-1][j]
            j = int(np.searchsorted(above, self.max_points))  # cut-off tick index (descending)
            cut = ticks[::-1][j]
            n_above = int(above[j - 1]) if j > 0 else 0
            keep_mask = self.last_seen > cut
            at_cut = np.flatnonzero(self.last_seen == cut)[: self.max_points - n_above]
            keep_mask[at_cut] = True
            keep = np.flatnonzero(keep_mask)
            self.evicted += len(self.keys) - len(keep)
            for name in ("keys", "xyz_sum", "rgb_sum", "n", "inst", "votes", "score", "last_seen"):
                setattr(self, name, getattr(self, name)[keep])

    def cloud(self, frame_id: str, stamp_ns: int) -> InstanceCloud:
        if not len(self.keys):
            return empty_cloud(frame_id, stamp_ns)
        nn = self.n[:, None]
        return InstanceCloud(frame_id, stamp_ns, (self.xyz_sum / nn).astype(np.float32),
                             np.clip(np.rint(self.rgb_sum / nn), 0, 255).astype(np.uint8), self.inst.copy(),
                             self.score.copy())


@dataclass
class _ViewRecord:
    T_cam_map: np.ndarray  # rigid, map units
    depth_map_units: np.ndarray | None  # subsampled depth * scale


def _rigid_in_map(T_cam_world: np.ndarray, T_map_world: np.ndarray) -> np.ndarray:
    """Rigid camera extrinsics in map given the window's Sim(3) T_map_world (V, 4, 4)."""
    s, R, t = sim3_decompose(T_map_world)
    T_world_cam = invert_se3(T_cam_world)
    out = np.zeros_like(T_world_cam)
    out[:, :3, :3] = R @ T_world_cam[:, :3, :3]
    out[:, :3, 3] = (s * (R @ T_world_cam[:, :3, 3].T)).T + t
    out[:, 3, 3] = 1.0
    return out  # T_map_cam


class MapFusion:
    def __init__(
        self,
        voxel_size: float = 0.05,
        max_points: int = 500_000,
        min_score: float = 0.3,
        conf_threshold: float = 0.0,
        match_iou: float = 0.2,
        use_known_poses: bool = False,
        conf_mode: str = "abs",
        pixel_stride: int = 2,
        score_mode: str = "max",
        view_memory: int = 64,
        depth_ratio_stride: int = 4,
        map_frame: str = "map",
    ) -> None:
        if voxel_size <= 0 or max_points < 1:
            raise ValueError("MapFusion: voxel_size > 0 and max_points >= 1 required")
        self.voxel_size = float(voxel_size)
        self.max_points = int(max_points)
        self.min_score = float(min_score)
        self.conf_threshold = float(conf_threshold)
        self.conf_mode = conf_mode
        self.use_known_poses = bool(use_known_poses)
        self.pixel_stride = int(pixel_stride)
        self.view_memory = int(view_memory)
        self.depth_ratio_stride = int(depth_ratio_stride)
        self.map_frame = map_frame
        self.tracker = InstanceTracker(match_iou=match_iou, score_mode=score_mode)
        self.map = VoxelMap(voxel_size, max_points)
        self.events = DropCounter()
        self.reset()

    def reset(self) -> None:
        self.map.clear()
        self.tracker.reset()
        self._views: OrderedDict[tuple[str, int], _ViewRecord] = OrderedDict()
        self._T_map_window_prev: np.ndarray | None = None
        self._T_map_known: np.ndarray | None = None
        self._tick = 0

    # ------------------------------------------------------------------ alignment
    def _depth_ratio(self, pred: WindowPrediction, shared: list[tuple[int, _ViewRecord]]) -> float | None:
        st = self.depth_ratio_stride
        ratios = []
        for v, rec in shared:
            if rec.depth_map_units is None:
                continue
            d = pred.depth[v][::st, ::st]
            if d.shape != rec.depth_map_units.shape:
                continue
            ok = np.isfinite(d) & (d > 0) & np.isfinite(rec.depth_map_units) & (rec.depth_map_units > 0)
            if ok.sum() >= 16:
                ratios.append(rec.depth_map_units[ok] / d[ok])
        if not ratios:
            return None
        r = float(np.median(np.concatenate(ratios)))
        return r if np.isfinite(r) and r > 0 else None

    def _known(self, pred: WindowPrediction) -> np.ndarray | None:
        K = pred.T_world_cam_known
        if K is None:
            return None
        K = np.asarray(K, np.float64)
        ok = np.all(np.isfinite(K.reshape(len(K), -1)), axis=1)
        return ok if ok.any() else None

    def _align(self, pred: WindowPrediction, info: dict) -> tuple[np.ndarray, str, int, float | None]:
        keys = list(zip(pred.cameras, (int(s) for s in pred.view_stamps_ns)))
        shared = [(v, self._views[k]) for v, k in enumerate(keys) if k in self._views]
        if self._T_map_window_prev is None:
            return np.eye(4), "first", 0, None
        if shared:
            try:
                idx = [v for v, _ in shared]
                A = np.stack([rec.T_cam_map for _, rec in shared])
                B = np.asarray(pred.T_cam_world, np.float64)[idx]
                scale = self._depth_ratio(pred, shared)
                info["depth_scale"] = scale
                T = align_cameras(A, B, scale=scale, info=info)
                return T, "shared_views", len(shared), scale
            except (ValueError, np.linalg.LinAlgError) as exc:
                self.events.add("align_failed")
                info["align_error"] = str(exc)
        if self.use_known_poses and self._T_map_known is not None:
            ok = self._known(pred)
            if ok is not None:
                try:
                    A = invert_se3(np.asarray(pred.T_world_cam_known, np.float64)[ok])
                    B = np.asarray(pred.T_cam_world, np.float64)[ok]
                    T_known_window = align_cameras(A, B, info=info)
                    return self._T_map_known @ T_known_window, "known_poses", 0, None
                except (ValueError, np.linalg.LinAlgError) as exc:
                    self.events.add("align_failed")
                    info["align_error"] = str(exc)
        if not shared:
            self.events.add("no_overlap")
        return self._T_map_window_prev.copy(), "previous", len(shared), None

    # ------------------------------------------------------------------ main entry
    def integrate(self, pred: WindowPrediction) -> FusionResult:
        info: dict = {}
        V = pred.depth.shape[0]
        keys = list(zip(pred.cameras, (int(t) for t in pred.view_stamps_ns)))
        shared_idx = {v for v, k in enumerate(keys) if k in self._views}
        T_map_window, method, n_shared, _ = self._align(pred, info)
        s = sim3_decompose(T_map_window)[0]
        T_map_cam = _rigid_in_map(np.asarray(pred.T_cam_world, np.float64), T_map_window)

        # learn map <- known-world when both are available
        if self.use_known_poses and method in ("first", "shared_views"):
            ok = self._known(pred)
            if ok is not None:
                try:
                    A = invert_se3(T_map_cam[ok])  # T_cam_map
                    B = invert_se3(np.asarray(pred.T_world_cam_known, np.float64)[ok])
                    self._T_map_known = align_cameras(A, B)
                except (ValueError, np.linalg.LinAlgError):
                    self.events.add("align_failed")

        # remember this window's views (first estimate of a view wins: anchors do not drift)
        T_cam_map = invert_se3(T_map_cam)
        st = self.depth_ratio_stride
        for v in range(V):
            k = (pred.cameras[v], int(pred.view_stamps_ns[v]))
            if k not in self._views:
                self._views[k] = _ViewRecord(T_cam_map[v], (pred.depth[v][::st, ::st] * s).astype(np.float32))
        while len(self._views) > self.view_memory:
            self._views.popitem(last=False)
        self._T_map_window_prev = T_map_window
        self._tick += 1

        # lift all (confident) pixels into map, window labels with low score -> background
        cloud = lift_prediction(pred, T_map_window, conf_threshold=self.conf_threshold, conf_mode=self.conf_mode,
                                min_score=self.min_score, pixel_stride=self.pixel_stride, frame_id=self.map_frame)
        vs = self.voxel_size
        if len(cloud):
            pkeys = pack_voxel_keys(voxel_keys(cloud.xyz, vs))
            ukeys, inv = np.unique(pkeys, return_inverse=True)
            inv = inv.reshape(-1)
        else:
            ukeys, inv = np.zeros(0, np.int64), np.zeros(0, np.int64)
        # window instance voxel sets -> global ids
        lab = cloud.instance.astype(np.int64)
        fg = lab > 0
        pair = np.unique((inv[fg].astype(np.int64) << 32) | lab[fg])
        wkeys = ukeys[pair >> 32] if len(pair) else np.zeros(0, np.int64)
        wlabs = pair & 0xFFFFFFFF
        kept_labels = np.unique(lab[fg])
        id_map, iou = self.tracker.assign(wkeys, wlabs, self.map.keys, self.map.inst.astype(np.int64),
                                          all_window_labels=kept_labels)
        lut = np.zeros(max(int(pred.n_instances), int(lab.max()) if len(lab) else 0) + 1, np.uint32)
        for wlab, gid in id_map.items():
            if wlab < len(lut):
                lut[wlab] = gid
        cloud.instance = lut[lab] if len(lab) else cloud.instance

        # per-voxel aggregation of the window (majority global id, mean score of that id)
        m = len(ukeys)
        if m:
            n = np.bincount(inv, minlength=m).astype(np.float64)
            xyz_sum = np.stack([np.bincount(inv, weights=cloud.xyz[:, a], minlength=m) for a in range(3)], 1)
            rgb_sum = np.stack([np.bincount(inv, weights=cloud.rgb[:, a], minlength=m) for a in range(3)], 1)
            pr = (inv.astype(np.int64) << 32) | cloud.instance.astype(np.int64)
            up, pinv, pc = np.unique(pr, return_inverse=True, return_counts=True)
            psc = np.bincount(pinv.reshape(-1), weights=cloud.score, minlength=len(up)) / pc
            pv, pi = up >> 32, up & 0xFFFFFFFF
            order = np.lexsort((pi, -pc, pv))
            first = np.ones(len(order), bool)
            first[1:] = pv[order][1:] != pv[order][:-1]
            best = order[first]
            vinst = pi[best].astype(np.uint32)
            vscore = psc[best].astype(np.float32)
            self.map.integrate(ukeys, xyz_sum, rgb_sum, n, vinst, vscore, self._tick)
            window_cloud = InstanceCloud(self.map_frame, pred.stamp_ns, (xyz_sum / n[:, None]).astype(np.float32),
                                         np.clip(np.rint(rgb_sum / n[:, None]), 0, 255).astype(np.uint8), vinst,
                                         vscore)
        else:
            window_cloud = empty_cloud(self.map_frame, pred.stamp_ns)

        # instance metadata: score, views seen (views not seen in an earlier window only)
        scores = np.asarray(pred.scores, np.float32)
        nlab = len(lut)
        views_per_label = np.zeros(nlab, np.int64)
        for v in range(V):
            if v not in shared_idx:
                present = np.unique(pred.labels[v])
                present = present[(present > 0) & (present < nlab)]
                views_per_label[present] += 1
        for wlab, gid in id_map.items():
            sc = float(scores[wlab - 1]) if 0 < wlab <= len(scores) else 0.0
            self.tracker.update(gid, sc, int(views_per_label[wlab]) if wlab < nlab else 0, pred.window_index)
        map_cloud = self.map.cloud(self.map_frame, pred.stamp_ns)
        instances = self._summaries(map_cloud)
        self.tracker.prune([i.id for i in instances])
        info["map_voxels"] = len(self.map)
        info["evicted_total"] = self.map.evicted
        return FusionResult(pred.window_index, pred.stamp_ns, window_cloud, map_cloud, instances, T_map_cam,
                            T_map_window, id_map, method, n_shared, s, info)

    def _summaries(self, cloud: InstanceCloud) -> list[InstanceSummary]:
        inst = cloud.instance
        fg = inst > 0
        if not fg.any():
            return []
        ids = inst[fg].astype(np.int64)
        xyz = cloud.xyz[fg].astype(np.float64)
        order = np.argsort(ids, kind="stable")
        ids, xyz = ids[order], xyz[order]
        uid, start, cnt = np.unique(ids, return_index=True, return_counts=True)
        sums = np.add.reduceat(xyz, start, axis=0)
        mins = np.minimum.reduceat(xyz, start, axis=0)
        maxs = np.maximum.reduceat(xyz, start, axis=0)
        out = []
        for i, gid in enumerate(uid):
            tr = self.tracker.tracks.get(int(gid))
            out.append(InstanceSummary(int(gid), float(tr.score) if tr else 0.0, sums[i] / cnt[i], mins[i], maxs[i],
                                       int(cnt[i]), int(tr.views_seen) if tr else 0))
        return out


# ---------------------------------------------------------------------------------------------- benchmark
def random_prediction(rng: np.random.Generator, views: int, h: int, w: int, window_index: int = 0,
                      n_instances: int = 20, depth_range: tuple[float, float] = (0.5, 8.0)) -> WindowPrediction:
    """Worst-case window for the fusion benchmark: i.i.d. random depth (almost every point its own voxel),
    random camera poses, ``n_instances`` random rectangles of labels per view."""
    from scipy.spatial.transform import Rotation

    depth = rng.uniform(*depth_range, (views, h, w)).astype(np.float32)
    labels = np.zeros((views, h, w), np.int32)
    for v in range(views):
        for k in range(n_instances):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            labels[v, y0:y0 + rng.integers(2, max(3, h // 3)), x0:x0 + rng.integers(2, max(3, w // 3))] = k + 1
    K = np.array([[0.8 * w, 0, (w - 1) / 2], [0, 0.8 * w, (h - 1) / 2], [0, 0, 1.0]])
    T = np.repeat(np.eye(4)[None], views, 0)
    T[:, :3, :3] = Rotation.from_euler("y", rng.uniform(-30, 30, (views, 1)), degrees=True).as_matrix()
    T[:, :3, 3] = rng.uniform(-0.5, 0.5, (views, 3))
    stamps = [window_index * 1000 + v for v in range(views)]
    return WindowPrediction(
        window_index, stamps[-1], [f"cam{v}" for v in range(views)], [f"cam{v}" for v in range(views)], stamps,
        rng.integers(0, 256, (views, h, w, 3), dtype=np.uint8), depth, np.ones((views, h, w), np.float32),
        np.repeat(K[None], views, 0), T, labels, rng.uniform(0.2, 1.0, n_instances).astype(np.float32))


def bench_integrate(views: int = 8, h: int = 168, w: int = 224, max_points: int = 1_000_000, windows: int = 8,
                    voxel_size: float = 0.05, pixel_stride: int = 2, seed: int = 0, verbose: bool = True) -> dict:
    """Milliseconds per ``MapFusion.integrate`` of ``views``-view windows at ``h`` x ``w`` with random depth
    (worst case: almost every lifted point is a new voxel); the map is first filled to ``max_points``.
    Prints and returns {'first_ms', 'median_ms', 'max_ms', 'map_voxels'}."""
    import time

    rng = np.random.default_rng(seed)
    preds = [random_prediction(rng, views, h, w, i) for i in range(4)]
    T0 = [p.T_cam_world.copy() for p in preds]

    def window(i: int) -> WindowPrediction:  # new stamps and a shifted rig: new voxels every window
        p = preds[i % len(preds)]
        p.window_index, p.view_stamps_ns = i, [i * 1000 + v for v in range(views)]
        p.T_cam_world = T0[i % len(preds)].copy()
        p.T_cam_world[:, :3, 3] += rng.uniform(-50, 50, 3)
        return p

    f = MapFusion(voxel_size=voxel_size, max_points=max_points, pixel_stride=pixel_stride)
    t0 = time.perf_counter()
    f.integrate(window(0))
    first = (time.perf_counter() - t0) * 1e3
    i = 1
    while len(f.map) < max_points and i < 200:  # fill to the cap (not timed)
        f.integrate(window(i))
        i += 1
    ts = []
    for _ in range(windows):
        p = window(i)
        t0 = time.perf_counter()
        f.integrate(p)
        ts.append((time.perf_counter() - t0) * 1e3)
        i += 1
    out = {"first_ms": first, "median_ms": float(np.median(ts)), "max_ms": float(np.max(ts)),
           "map_voxels": len(f.map)}
    if verbose:
        print(f"bench_integrate: {views} views {w}x{h} stride {pixel_stride}, cap {max_points}: first window "
              f"{first:.1f} ms, at cap {out['median_ms']:.1f} ms median / {out['max_ms']:.1f} ms max per window "
              f"({out['map_voxels']} voxels)")
    return out


if __name__ == "__main__":
    import sys

    a = [int(x) for x in sys.argv[1:4]] or [8, 168, 224]
    bench_integrate(*a, max_points=int(sys.argv[4]) if len(sys.argv) > 4 else 1_000_000)
