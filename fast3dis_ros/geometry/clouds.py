"""Point clouds with instance labels: lifting, confidence filtering, voxel downsampling, packing.

``pointcloud_structured`` produces the byte layout of a sensor_msgs/PointCloud2 (little endian,
``POINT_FIELDS`` / ``POINT_STEP``) so the ROS layer only wraps ``arr.tobytes()`` in a message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fast3dis_ros.core.frames import InstanceCloud, WindowPrediction
from fast3dis_ros.geometry.cameras import invert_se3, pixel_grid, transform_points, unproject

__all__ = [
    "POINT_FIELDS",
    "POINT_STEP",
    "POINT_DTYPE",
    "PF_FLOAT32",
    "PF_UINT32",
    "empty_cloud",
    "concat_clouds",
    "select",
    "transform_cloud",
    "lift_view",
    "lift_prediction",
    "confidence_mask",
    "voxel_keys",
    "pack_voxel_keys",
    "packed_voxel_keys",
    "unpack_voxel_keys",
    "lift_prediction_arrays",
    "label_scores",
    "voxel_downsample",
    "pack_rgb",
    "unpack_rgb",
    "pointcloud_structured",
    "structured_to_cloud",
]

# sensor_msgs/PointField datatype codes
PF_INT8, PF_UINT8, PF_INT16, PF_UINT16, PF_INT32, PF_UINT32, PF_FLOAT32, PF_FLOAT64 = range(1, 9)

# (name, offset, datatype, count); tightly packed, 24-byte point step, little endian
POINT_FIELDS: list[tuple[str, int, int, int]] = [
    ("x", 0, PF_FLOAT32, 1),
    ("y", 4, PF_FLOAT32, 1),
    ("z", 8, PF_FLOAT32, 1),
    ("rgb", 12, PF_FLOAT32, 1),
    ("instance", 16, PF_UINT32, 1),
    ("score", 20, PF_FLOAT32, 1),
]
POINT_STEP = 24
_NP = {PF_FLOAT32: "<f4", PF_UINT32: "<u4"}
POINT_DTYPE = np.dtype(
    {
        "names": [f[0] for f in POINT_FIELDS],
        "formats": [_NP[f[2]] for f in POINT_FIELDS],
        "offsets": [f[1] for f in POINT_FIELDS],
        "itemsize": POINT_STEP,
    }
)


def empty_cloud(frame_id: str = "map", stamp_ns: int = 0) -> InstanceCloud:
    return InstanceCloud(
        frame_id,
        int(stamp_ns),
        np.zeros((0, 3), np.float32),
        np.zeros((0, 3), np.uint8),
        np.zeros((0,), np.uint32),
        np.zeros((0,), np.float32),
    )


def select(cloud: InstanceCloud, idx) -> InstanceCloud:
    """Subset of a cloud by boolean mask or index array."""
    return InstanceCloud(
        cloud.frame_id, cloud.stamp_ns, cloud.xyz[idx], cloud.rgb[idx], cloud.instance[idx], cloud.score[idx]
    )


def concat_clouds(clouds: list[InstanceCloud], frame_id: str | None = None, stamp_ns: int | None = None
                  ) -> InstanceCloud:
    if not clouds:
        return empty_cloud(frame_id or "map", stamp_ns or 0)
    return InstanceCloud(
        frame_id if frame_id is not None else clouds[0].frame_id,
        stamp_ns if stamp_ns is not None else max(c.stamp_ns for c in clouds),
        np.concatenate([c.xyz for c in clouds]).astype(np.float32, copy=False),
        np.concatenate([c.rgb for c in clouds]).astype(np.uint8, copy=False),
        np.concatenate([c.instance for c in clouds]).astype(np.uint32, copy=False),
        np.concatenate([c.score for c in clouds]).astype(np.float32, copy=False),
    )


def transform_cloud(cloud: InstanceCloud, T: np.ndarray, frame_id: str | None = None) -> InstanceCloud:
    """Apply a 4x4 (SE(3) or Sim(3)) transform to the points."""
    xyz = transform_points(T, cloud.xyz.astype(np.float64)).astype(np.float32)
    return InstanceCloud(frame_id or cloud.frame_id, cloud.stamp_ns, xyz, cloud.rgb, cloud.instance, cloud.score)


def confidence_mask(conf: np.ndarray, threshold: float, mode: str = "abs") -> np.ndarray:
    """Boolean mask of pixels to keep. ``mode='abs'``: conf >= threshold; ``mode='quantile'``:
    keep the pixels above the ``threshold`` quantile (0..1) of this map (DA3 confidences are
    unnormalised, so a quantile is scale free)."""
    conf = np.asarray(conf)
    if mode == "abs":
        return conf >= threshold
    if mode == "quantile":
        if threshold <= 0:
            return np.isfinite(conf)
        return conf >= np.quantile(conf[np.isfinite(conf)], threshold) if np.isfinite(conf).any() else \
            np.zeros(conf.shape, bool)
    raise ValueError(f"confidence_mask: unknown mode {mode!r} (abs|quantile)")


def lift_view(
    depth: np.ndarray,
    K: np.ndarray,
    T_out_cam: np.ndarray,
    rgb: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    conf: np.ndarray | None = None,
    conf_threshold: float = 0.0,
    conf_mode: str = "abs",
    min_depth: float = 1e-6,
    max_depth: float = np.inf,
    instances_only: bool = False,
    pixel_stride: int = 1,
    frame_id: str = "map",
    stamp_ns: int = 0,
) -> InstanceCloud:
    """Lift one (H, W) depth map to points in the output frame via ``T_out_cam`` (SE(3) or Sim(3)).

    ``labels`` (H, W) int, 0 = background, k -> ``scores[k-1]``; instance id in the cloud = label.
    Pixels with non-finite / out-of-range depth or confidence below the threshold are dropped.
    """
    depth = np.asarray(depth)
    h, w = depth.shape
    sl = (slice(None, None, pixel_stride), slice(None, None, pixel_stride))
    d = depth[sl]
    keep = np.isfinite(d) & (d > min_depth) & (d < max_depth)
    if conf is not None:
        keep &= confidence_mask(np.asarray(conf)[sl], conf_threshold, conf_mode)
    lab = None
    if labels is not None:
        lab = np.asarray(labels)[sl]
        if instances_only:
            keep &= lab > 0
    uv = pixel_grid(h, w)[sl][keep]
    pts = unproject(K, uv, d[keep])
    xyz = transform_points(T_out_cam, pts).astype(np.float32)
    n = xyz.shape[0]
    col = np.asarray(rgb)[sl][keep].astype(np.uint8) if rgb is not None else np.full((n, 3), 255, np.uint8)
    if lab is not None:
        li = lab[keep].astype(np.int64)
        inst = np.clip(li, 0, None).astype(np.uint32)
        if scores is not None and len(scores):
            sc = np.asarray(scores, np.float32)
            score = np.where(li > 0, sc[np.clip(li - 1, 0, len(sc) - 1)], 0.0).astype(np.float32)
        else:
            score = np.zeros(n, np.float32)
    else:
        inst = np.zeros(n, np.uint32)
        score = np.zeros(n, np.float32)
    return InstanceCloud(frame_id, int(stamp_ns), xyz, col, inst, score)


_RAY_CACHE: dict = {}


def _rays(K: np.ndarray, h: int, w: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ray coordinates (x/z, y/z) of the strided pixel grid (cached per K, size, stride)."""
    K = np.asarray(K, np.float64)
    key = (h, w, stride, K.tobytes())
    r = _RAY_CACHE.get(key)
    if r is None:
        fx, fy, cx, cy, s = K[0, 0], K[1, 1], K[0, 2], K[1, 2], K[0, 1]
        v = np.arange(0, h, stride, dtype=np.float64)
        u = np.arange(0, w, stride, dtype=np.float64)
        y = np.broadcast_to(((v - cy) / fy)[:, None], (len(v), len(u)))
        x = (u[None, :] - cx - s * y) / fx
        r = (np.ascontiguousarray(x), np.ascontiguousarray(y))
        if len(_RAY_CACHE) >= 64:
            _RAY_CACHE.pop(next(iter(_RAY_CACHE)))
        _RAY_CACHE[key] = r
    return r


Runner = Callable[[list[Callable[[], Any]]], list]  # runs thunks (e.g. on threads), returns their results in order


def _serial(fns: list[Callable[[], Any]]) -> list:
    """Default ``Runner`` of ``lift_prediction_arrays``: the thunks one after another on this thread."""
    return [f() for f in fns]


def _view_index(vlist: list[int]) -> slice | np.ndarray:
    """Index of ``vlist`` into a (V, ...) array: a slice (a view, no copy) when the views are ascending and
    contiguous (every view of a window, the usual case), else an int array (one gather)."""
    if vlist and vlist[0] >= 0 and vlist == list(range(vlist[0], vlist[0] + len(vlist))):
        return slice(vlist[0], vlist[0] + len(vlist))
    return np.asarray(vlist, np.int64)


def _view_transforms(T_cam_world: np.ndarray, vlist: list[int], T_out_world: np.ndarray) -> np.ndarray:
    """(n, 4, 4) ``T_out_world @ inv(T_cam_world[v])`` for each listed view. One 4x4 product per view (not a
    batched one), so that each view's transform has the same bits whatever views are lifted with it."""
    Tcw = np.asarray(T_cam_world, np.float64)
    return np.stack([T_out_world @ invert_se3(Tcw[v]) for v in vlist])


def _view_rays(K: np.ndarray, vlist: list[int], h: int, w: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Rays (x/z, y/z) of the listed views: one (h', w') pair broadcast over the views when they share K (a
    rig of one camera model, the usual case: no per-view copy), else stacked (n, h', w')."""
    Ks = np.asarray(K, np.float64).reshape(-1, 3, 3)[np.asarray(vlist, np.int64)]
    if (Ks == Ks[:1]).all():
        return _rays(Ks[0], h, w, stride)
    rays = [_rays(k, h, w, stride) for k in Ks]
    return np.stack([r[0] for r in rays]), np.stack([r[1] for r in rays])


def _keep_pixels(d: np.ndarray, conf: np.ndarray | None, labels: np.ndarray | None, conf_threshold: float,
                 conf_mode: str, min_depth: float) -> np.ndarray:
    """(v, h', w') pixels to lift of a block of views: depth in (``min_depth``, inf) (NaN drops), confidence
    kept by ``confidence_mask`` (a quantile is taken per view, as ``lift_view`` does), label > 0 when
    ``labels`` (instances only) is given."""
    with np.errstate(invalid="ignore"):
        keep = d > min_depth  # False for NaN
        keep &= d < np.inf
        if conf is not None:
            if conf_mode == "abs":  # the whole block in one comparison
                keep &= confidence_mask(conf, conf_threshold, "abs")
            else:
                for v in range(len(conf)):
                    keep[v] &= confidence_mask(conf[v], conf_threshold, conf_mode)
    if labels is not None:
        keep &= labels > 0
    return keep


def _low_score_labels(scores: np.ndarray, min_score: float) -> np.ndarray | None:
    """Label k -> True when instance k scores below ``min_score`` (index 0, background: False). None when no
    label is low (nothing to relabel)."""
    scores = np.asarray(scores, np.float32)
    if not (min_score > 0 and len(scores)):
        return None
    low = np.concatenate([[False], scores < min_score])
    return low if low.any() else None


def _window_labels(lb: np.ndarray, low: np.ndarray | None) -> np.ndarray:
    """Window labels of lifted pixels: negative -> 0, low-score instances (``_low_score_labels``) -> 0; labels
    past the score list follow the last score."""
    lb = np.maximum(lb, 0)
    if low is None:
        return lb
    lut = np.arange(int(lb.max()) + 1, dtype=np.int64)
    lut[low[np.minimum(lut, len(low) - 1)]] = 0
    return lut[lb]


_BLOCK_PIXELS = 1 << 16  # pixels lifted per block when one worker lifts all views


def _view_blocks(n_views: int, pixels_per_view: int, parts: int) -> list[list[tuple[int, int]]]:
    """The views cut into ``parts`` contiguous groups (one per worker), each a list of blocks ``(a, b)`` of
    whole views lifted together.

    Why: with one worker, blocks of about ``_BLOCK_PIXELS`` pixels keep the float64 temporaries small (a
    whole window's are megabytes of fresh pages in a process whose allocator has not grown yet: up to 2x
    slower at 24 views of 504x378). With several workers each group is one block: every block costs a few
    dozen numpy calls, and threads hand the GIL over for each (measured slower on the node's path)."""
    k = max(1, min(int(parts), n_views))
    cuts = [n_views * i // k for i in range(k + 1)]
    per = max(1, _BLOCK_PIXELS // max(pixels_per_view, 1)) if k == 1 else n_views
    return [[(a, min(a + per, b1)) for a in range(a0, b1, per)] for a0, b1 in zip(cuts[:-1], cuts[1:])]


def _lift_outputs(n: int, rows: bool, with_keys: bool) -> tuple:
    """Output arrays of ``lift_prediction_arrays`` for ``n`` points, and (3, N) views of xyz and rgb that the
    fill writes whatever the layout."""
    if rows:
        xyz, rgb = np.empty((3, n)), np.empty((3, n), np.uint8)
        x_rows, c_rows = xyz, rgb
    else:
        xyz, rgb = np.empty((n, 3), np.float32), np.empty((n, 3), np.uint8)
        x_rows, c_rows = xyz.T, rgb.T
    keys = np.empty(n, np.int64) if with_keys else None
    return xyz, rgb, np.empty(n, np.int64), keys, x_rows, c_rows


def lift_prediction_arrays(
    pred: WindowPrediction,
    T_out_world: np.ndarray | None = None,
    conf_threshold: float = 0.0,
    conf_mode: str = "abs",
    min_score: float = 0.0,
    instances_only: bool = False,
    pixel_stride: int = 1,
    views: list[int] | None = None,
    min_depth: float = 1e-6,
    layout: str = "points",
    voxel_size: float | None = None,
    run: Runner | None = None,
    parts: int = 1,
) -> tuple[np.ndarray, ...]:
    """Lift a window's views into the output frame (``T_out_world`` may be Sim(3)): (xyz, rgb, label (N,)
    int64 >= 0), plus each point's packed voxel key (N,) int64 when ``voxel_size`` is given. The one
    implementation behind ``lift_prediction`` and fusion's ``lift_window``.

    Points and order are those of ``lift_view`` per view (``views``, default all, in that order): pixels
    with depth outside (``min_depth``, inf) or confidence below the threshold are dropped, background too
    with ``instances_only``. ``label`` is the window label with negative labels and instances of score <
    ``min_score`` -> 0. The key is ``packed_voxel_keys`` of the point's float32 xyz, computed per block of
    views while the points are in cache. ``layout``: ``"points"``, xyz (N, 3) float32 and rgb (N, 3) uint8
    (a cloud's columns); ``"rows"``, xyz (3, N) float64 holding the same float32 values and rgb (3, N)
    uint8 (contiguous coordinate rows, which ``np.bincount`` takes without a conversion: fusion's sums).

    Why it is fast: rays are cached per K/size/stride and each view's (Sim(3)) transform is folded into them
    (a few multiply-adds per point), and views are lifted in blocks (one strided read per input array, no
    per-view loop). ``run``/``parts``: the views are cut into ``parts`` contiguous groups whose work ``run``
    (a callable running a list of thunks, e.g. on threads: numpy releases the GIL here) does side by side;
    the output does not depend on it."""
    if layout not in ("points", "rows"):
        raise ValueError(f"lift_prediction_arrays: unknown layout {layout!r} (points|rows)")
    rows = layout == "rows"
    depth = np.asarray(pred.depth)
    V, H, W = depth.shape
    vlist = list(range(V)) if views is None else [int(v) for v in views]
    st = max(int(pixel_stride), 1)
    if not vlist:
        return _lift_outputs(0, rows, voxel_size is not None)[:3 if voxel_size is None else 4]
    T_out = np.eye(4) if T_out_world is None else np.asarray(T_out_world, np.float64)
    T = _view_transforms(pred.T_cam_world, vlist, T_out)
    xr, yr = _view_rays(pred.K, vlist, H, W, st)
    low = _low_score_labels(pred.scores, min_score)
    conf = None if pred.depth_conf is None else np.asarray(pred.depth_conf)
    images, labels = np.asarray(pred.images), np.asarray(pred.labels)

    def prepare(a: int, b: int) -> tuple:
        """For the views ``vlist[a:b]``: their index (``_view_index``), depth (float64), strided labels (read
        here with ``instances_only``, else None: ``fill`` reads them), kept flat indices (None: all) and
        their count."""
        idx = _view_index(vlist[a:b])
        d = depth[idx, ::st, ::st].astype(np.float64)  # (v, h', w'), one strided read
        lb = labels[idx, ::st, ::st] if instances_only else None
        keep = _keep_pixels(d, None if conf is None else conf[idx, ::st, ::st], lb, conf_threshold, conf_mode,
                            min_depth)
        flat = keep.reshape(-1)
        n = int(np.count_nonzero(flat))
        return idx, d, lb, (None if n == flat.size else np.flatnonzero(flat)), n

    groups = _view_blocks(len(vlist), len(range(0, H, st)) * len(range(0, W, st)), parts)
    run = run or _serial
    blocks = [blk for g in groups for blk in g]
    preps = [p for ps in run([lambda g=g: [prepare(a, b) for a, b in g] for g in groups]) for p in ps]
    offs = np.cumsum([0] + [p[-1] for p in preps]).tolist()
    xyz, rgb, lab, keys, x_rows, c_rows = _lift_outputs(offs[-1], rows, voxel_size is not None)

    def fill(a: int, b: int, idx: slice | np.ndarray, d: np.ndarray, lb: np.ndarray | None, sel: np.ndarray | None,
             o0: int, o1: int) -> None:
        """Points of the views ``vlist[a:b]`` (``prepare``'s outputs) into ``[o0, o1)`` of the outputs."""
        if o1 == o0:
            return
        xg, yg = (xr, yr) if xr.ndim == 2 else (xr[a:b], yr[a:b])
        Tg = T[a:b]
        tmp = np.empty(d.shape)
        for i in range(3):  # out_i = (T_i0 x + T_i1 y + T_i2) d + T_i3, rounded to float32
            v = np.multiply(xg, Tg[:, i, 0, None, None], out=tmp)
            v += yg * Tg[:, i, 1, None, None]
            v += Tg[:, i, 2, None, None]
            v *= d
            v += Tg[:, i, 3, None, None]
            v = v.reshape(-1)
            if sel is not None:
                v = v[sel]
            x_rows[i, o0:o1] = v.astype(np.float32) if rows else v
        if keys is not None:
            packed_voxel_keys(x_rows[:, o0:o1].T, voxel_size, out=keys[o0:o1])
        im = images[idx, ::st, ::st]
        for ch in range(3):  # one channel at a time: a strided uint8 copy is fast, a (.., 3) pixel copy is not
            x = im[..., ch].reshape(-1)
            c_rows[ch, o0:o1] = x if sel is None else x[sel]
        lb = (labels[idx, ::st, ::st] if lb is None else lb).reshape(-1)
        lab[o0:o1] = _window_labels(lb if sel is None else lb[sel], low)

    jobs = [(a, b, *prep[:4], offs[j], offs[j + 1]) for j, ((a, b), prep) in enumerate(zip(blocks, preps))]
    cut = np.cumsum([0] + [len(g) for g in groups]).tolist()
    run([lambda js=jobs[i:j]: [fill(*job) for job in js] for i, j in zip(cut[:-1], cut[1:])])
    return (xyz, rgb, lab) if keys is None else (xyz, rgb, lab, keys)


def label_scores(lab: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-point score of window labels as ``lift_view`` assigns it (label k -> scores[k-1], 0 -> 0)."""
    sc = np.asarray(scores, np.float32)
    if not len(sc):
        return np.zeros(len(lab), np.float32)
    lut = np.concatenate([[0.0], sc]).astype(np.float32)
    return lut[np.minimum(lab, len(sc))]


def lift_prediction(
    pred: WindowPrediction,
    T_out_world: np.ndarray | None = None,
    conf_threshold: float = 0.0,
    conf_mode: str = "abs",
    min_score: float = 0.0,
    instances_only: bool = False,
    pixel_stride: int = 1,
    frame_id: str = "map",
    views: list[int] | None = None,
) -> InstanceCloud:
    """Lift every view of a prediction into the output frame (``T_out_world`` may be Sim(3)).

    Instances with score < ``min_score`` become background (instance 0). Same points as ``lift_view``
    per view (concatenated), computed by ``lift_prediction_arrays``."""
    xyz, rgb, lab = lift_prediction_arrays(pred, T_out_world, conf_threshold, conf_mode, min_score,
                                           instances_only, pixel_stride, views)
    return InstanceCloud(frame_id, int(pred.stamp_ns), xyz, rgb, lab.astype(np.uint32),
                         label_scores(lab, pred.scores))


def voxel_keys(xyz: np.ndarray, voxel_size: float) -> np.ndarray:
    """(N, 3) int64 integer voxel coordinates floor(xyz / voxel_size)."""
    return np.floor(np.asarray(xyz, np.float64) / voxel_size).astype(np.int64)


_KB = 21  # bits per axis in a packed voxel key (+-1M voxels per axis)
_KOFF = 1 << (_KB - 1)


def pack_voxel_keys(ijk: np.ndarray) -> np.ndarray:
    """Pack (N, 3) int voxel coords into one int64 each (range +-2^20 per axis, raises outside)."""
    ijk = np.asarray(ijk, np.int64)
    if ijk.size and (ijk.min() < -_KOFF or ijk.max() >= _KOFF):
        raise ValueError("voxel coordinates out of the packable range (+-2^20 voxels per axis); "
                         "increase voxel_size or check the points")
    u = ijk + _KOFF
    return (u[:, 0] << (2 * _KB)) | (u[:, 1] << _KB) | u[:, 2]


def packed_voxel_keys(xyz: np.ndarray, voxel_size: float, out: np.ndarray | None = None) -> np.ndarray:
    """``pack_voxel_keys(voxel_keys(xyz, voxel_size))`` in one pass per axis (same values, same errors).

    ``xyz`` may be any (N, 3) view, e.g. the transpose of (3, N) coordinate rows (each axis is then read
    contiguously); ``out``: (N,) int64 to write the keys into (a chunk of a larger array: threaded callers)."""
    xyz = np.asarray(xyz)
    n = xyz.shape[0]
    out = np.zeros(n, np.int64) if out is None else out
    if n == 0:
        return out
    for a in range(3):
        c = np.divide(xyz[:, a], voxel_size, dtype=np.float64)  # float64 first, as voxel_keys
        np.floor(c, out=c)
        lo, hi = c.min(), c.max()
        if not (lo >= -_KOFF and hi < _KOFF):
            raise ValueError("voxel coordinates out of the packable range (+-2^20 voxels per axis); "
                             "increase voxel_size or check the points")
        c += _KOFF
        ci = c.astype(np.int64)
        if a < 2:
            ci <<= (2 - a) * _KB
        if a == 0:
            out[...] = ci  # ``out`` may hold anything
        else:
            out |= ci
    return out


def unpack_voxel_keys(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, np.int64)
    m = (1 << _KB) - 1
    return np.stack([(keys >> (2 * _KB)) & m, (keys >> _KB) & m, keys & m], axis=1) - _KOFF


def voxel_downsample(cloud: InstanceCloud, voxel_size: float, return_inverse: bool = False):
    """One point per occupied voxel: mean xyz, mean colour, majority instance (ties -> smaller id),
    mean score of the points carrying the majority instance. Output is sorted by voxel key.

    With ``return_inverse`` also returns (voxel index per input point, packed voxel keys)."""
    if voxel_size <= 0:
        raise ValueError("voxel_size must be > 0")
    n = len(cloud)
    if n == 0:
        out = empty_cloud(cloud.frame_id, cloud.stamp_ns)
        return (out, np.zeros(0, np.int64), np.zeros(0, np.int64)) if return_inverse else out
    keys = pack_voxel_keys(voxel_keys(cloud.xyz, voxel_size))
    ukeys, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    m = len(ukeys)
    xyz = np.empty((m, 3), np.float32)
    for a in range(3):
        xyz[:, a] = np.bincount(inv, weights=cloud.xyz[:, a], minlength=m) / counts
    rgb = np.empty((m, 3), np.uint8)
    for a in range(3):
        rgb[:, a] = np.rint(np.bincount(inv, weights=cloud.rgb[:, a], minlength=m) / counts)
    # majority instance: count (voxel, instance) pairs
    pair = (inv.astype(np.int64) << 32) | cloud.instance.astype(np.int64)
    upair, pinv, pcount = np.unique(pair, return_inverse=True, return_counts=True)
    pscore = np.bincount(pinv.reshape(-1), weights=cloud.score, minlength=len(upair)) / pcount
    pv = upair >> 32
    pi = upair & 0xFFFFFFFF
    order = np.lexsort((pi, -pcount, pv))  # by voxel, then count desc, then id asc
    first = np.ones(len(order), bool)
    first[1:] = pv[order][1:] != pv[order][:-1]
    best = order[first]
    inst = pi[best].astype(np.uint32)
    score = pscore[best].astype(np.float32)
    out = InstanceCloud(cloud.frame_id, cloud.stamp_ns, xyz, rgb, inst, score)
    return (out, inv, ukeys) if return_inverse else out


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 RGB -> (N,) float32 whose bits are uint32 0x00RRGGBB (PCL/RViz convention)."""
    rgb = np.asarray(rgb, np.uint8)
    n = rgb.shape[0]
    b4 = np.zeros((n, 4), np.uint8)  # little endian bytes: B G R 0
    b4[:, 0] = rgb[:, 2]
    b4[:, 1] = rgb[:, 1]
    b4[:, 2] = rgb[:, 0]
    return b4.view("<u4").reshape(n).view("<f4")


def unpack_rgb(rgb_f32: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(rgb_f32, dtype="<f4").view("<u4")
    return np.stack([(u >> 16) & 255, (u >> 8) & 255, u & 255], axis=1).astype(np.uint8)


def pointcloud_structured(cloud: InstanceCloud, out: np.ndarray | None = None) -> np.ndarray:
    """(N,) structured array with dtype ``POINT_DTYPE`` (fields/offsets as ``POINT_FIELDS``).

    ``arr.tobytes()`` is the PointCloud2 ``data`` (height 1, width N, point_step ``POINT_STEP``,
    is_bigendian False, is_dense True when all xyz are finite). ``out``: optional reusable buffer of
    at least ``N * POINT_STEP`` bytes (any dtype, C-contiguous); reusing one avoids page faults of a
    fresh 24 MB allocation per 1M points (the result is a view into it)."""
    n = len(cloud)
    if out is None:
        buf = np.empty((n, POINT_STEP // 4), "<f4")
    else:
        flat = out.reshape(-1).view(np.uint8)
        if flat.nbytes < n * POINT_STEP:
            raise ValueError(f"out buffer too small: {flat.nbytes} < {n * POINT_STEP} bytes")
        buf = flat[: n * POINT_STEP].view("<f4").reshape(n, POINT_STEP // 4)
    # xyz: copy 12-byte rows as opaque void items (much faster than a (N, 3) strided float copy)
    xyz = np.ascontiguousarray(cloud.xyz, dtype="<f4")
    buf.view(np.uint8)[:, 0:12].view("V12").reshape(n)[...] = xyz.view("V12").reshape(n)
    # rgb: 0x00RRGGBB built in a contiguous uint32 temp, then one strided store
    rgb = np.asarray(cloud.rgb, np.uint8)
    col = rgb[:, 0].astype("<u4")
    col <<= 8
    col |= rgb[:, 1]
    col <<= 8
    col |= rgb[:, 2]
    u = buf.view("<u4")
    u[:, 3] = col
    u[:, 4] = cloud.instance
    buf[:, 5] = cloud.score
    return buf.view(POINT_DTYPE).reshape(n)


def structured_to_cloud(arr: np.ndarray, frame_id: str = "map", stamp_ns: int = 0) -> InstanceCloud:
    """Inverse of ``pointcloud_structured`` (for tests and the bag reader)."""
    xyz = np.stack([arr["x"], arr["y"], arr["z"]], axis=1).astype(np.float32)
    return InstanceCloud(frame_id, stamp_ns, xyz, unpack_rgb(arr["rgb"]), arr["instance"].astype(np.uint32),
                         arr["score"].astype(np.float32))
