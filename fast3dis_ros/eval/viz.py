"""CPU-only visualisation: label colours, depth colouring, PNG panels, point-cloud renders, PLY io.

No GPU and no display: images are composed in numpy and written with PIL; matplotlib (Agg) is used
only for colour maps. Point clouds are rendered by software splatting with a z-buffer (sort by pixel
and depth, keep the nearest point per pixel, then grow splats by a depth-aware dilation), which stays
linear-ish in the number of points and handles 1M points in about a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "BACKGROUND_COLOR",
    "label_color",
    "colorize_labels",
    "overlay_labels",
    "depth_to_color",
    "save_png",
    "save_views_png",
    "save_masks_comparison_png",
    "look_at_camera",
    "splat_points",
    "render_cloud_topdown_png",
    "render_cloud_perspective_png",
    "write_ply",
    "read_ply",
    "save_map_errors_png",
]

BACKGROUND_COLOR = np.array([96, 96, 96], dtype=np.uint8)  # label 0 (grey)
_GOLDEN = 0.618033988749895


def _hsv_to_rgb(h, s, v):
    import matplotlib.colors as mcolors

    return mcolors.hsv_to_rgb(np.stack([h, s, v], -1))


def label_color(ids) -> np.ndarray:
    """Stable colour (uint8 RGB) per id: hue by golden-ratio stepping, saturation / value cycling so
    neighbouring ids differ; id 0 -> BACKGROUND_COLOR. Same id -> same colour in every call."""
    ids = np.asarray(ids, dtype=np.int64)
    h = np.mod(ids * _GOLDEN + 0.1, 1.0)
    s = 0.55 + 0.45 * ((ids * 7) % 3) / 2.0
    v = 0.95 - 0.25 * ((ids * 5) % 2)
    rgb = np.round(_hsv_to_rgb(h, s, v) * 255).astype(np.uint8)
    rgb[ids == 0] = BACKGROUND_COLOR
    return rgb


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """(..., H, W) int labels -> (..., H, W, 3) uint8 colours (0 = grey)."""
    labels = np.asarray(labels).astype(np.int64)
    u, inv = np.unique(labels, return_inverse=True)
    return label_color(u)[inv.reshape(labels.shape)]


def overlay_labels(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend label colours over an RGB image (label 0 leaves the image unchanged). Labels are
    nearest-resized to the image size."""
    from fast3dis_ros.eval.metrics import resize_nearest

    img = np.asarray(image, dtype=np.float32)
    lab = resize_nearest(np.asarray(labels), img.shape[0], img.shape[1])
    col = colorize_labels(lab).astype(np.float32)
    m = (lab != 0)[..., None]
    return np.where(m, (1 - alpha) * img + alpha * col, img).round().astype(np.uint8)


def depth_to_color(depth: np.ndarray, vmin: float | None = None, vmax: float | None = None, cmap: str = "turbo", invalid=(0, 0, 0)) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 via a matplotlib colour map; range defaults to the 2nd / 98th
    percentile of valid (finite, > 0) depth; invalid pixels get ``invalid``."""
    import matplotlib

    d = np.asarray(depth, dtype=np.float64)
    ok = np.isfinite(d) & (d > 0)
    if ok.any():
        lo = np.percentile(d[ok], 2) if vmin is None else vmin
        hi = np.percentile(d[ok], 98) if vmax is None else vmax
    else:
        lo, hi = 0.0, 1.0
    x = np.clip((d - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = (matplotlib.colormaps[cmap](np.where(ok, x, 0))[..., :3] * 255).round().astype(np.uint8)
    rgb[~ok] = invalid
    return rgb


def save_png(image: np.ndarray, path) -> str:
    from PIL import Image

    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path)
    return path


def _to_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    if img.dtype != np.uint8:
        img = np.clip(img * (255 if img.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return img[..., :3]


def _grid(tiles: list[list[np.ndarray]], pad: int = 4, bg=255) -> np.ndarray:
    """Compose rows of tiles (each HxWx3 uint8; resized by nearest to the first tile's size)."""
    from fast3dis_ros.eval.metrics import resize_nearest

    H, W = tiles[0][0].shape[:2]
    R, C = len(tiles), max(len(r) for r in tiles)
    out = np.full((R * H + (R + 1) * pad, C * W + (C + 1) * pad, 3), bg, np.uint8)
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            t = _to_rgb(t)
            if t.shape[:2] != (H, W):
                t = np.moveaxis(resize_nearest(np.moveaxis(t, -1, 0), H, W), 0, -1)
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            out[y : y + H, x : x + W] = t
    return out


def save_views_png(images, path, ncols: int | None = None) -> str:
    """Grid of V images ((V, H, W, 3) or a list; depth-like 2D arrays are shown as grey)."""
    images = list(images)
    n = len(images)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    rows = [images[i : i + ncols] for i in range(0, n, ncols)]
    return save_png(_grid(rows), path)


def save_masks_comparison_png(images, pred_labels, gt_labels, path, alpha: float = 0.55) -> str:
    """One row per view: rgb | predicted labels over rgb | GT labels over rgb. Labels may be at any
    resolution (nearest-resized to the image)."""
    rows = [[_to_rgb(im), overlay_labels(im, p, alpha), overlay_labels(im, g, alpha)] for im, p, g in zip(images, pred_labels, gt_labels)]
    return save_png(_grid(rows), path)


# ----------------------------------------------------------------------------------------------------
# Point-cloud rendering
# ----------------------------------------------------------------------------------------------------


def splat_points(u: np.ndarray, v: np.ndarray, z: np.ndarray, colors: np.ndarray, width: int, height: int, point_radius: int = 1, background=(255, 255, 255)) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffered splatting of points at pixel coords (u, v) (floats, pixel centres at +0.5) with
    depth z (smaller = nearer). Returns (image (H, W, 3) uint8, zbuffer (H, W), inf = empty)."""
    colors = np.asarray(colors)
    if colors.dtype != np.uint8:
        colors = np.clip(colors * (255.0 if colors.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    ui = np.floor(u).astype(np.int64)
    vi = np.floor(v).astype(np.int64)
    ok = (ui >= 0) & (ui < width) & (vi >= 0) & (vi < height) & np.isfinite(z)
    pix = vi[ok] * width + ui[ok]
    zz = np.asarray(z, dtype=np.float64)[ok]
    cc = colors[ok]
    order = np.lexsort((zz, pix))  # by pixel, then nearest first
    pix_s = pix[order]
    first = np.ones(len(pix_s), dtype=bool)
    first[1:] = pix_s[1:] != pix_s[:-1]
    sel = order[first]
    zbuf = np.full(height * width, np.inf)
    cbuf = np.empty((height * width, 3), np.uint8)
    cbuf[:] = np.asarray(background, np.uint8)
    zbuf[pix[sel]] = zz[sel]
    cbuf[pix[sel]] = cc[sel]
    zbuf = zbuf.reshape(height, width)
    cbuf = cbuf.reshape(height, width, 3)
    if point_radius > 0:  # depth-aware dilation: a pixel takes the nearest splat within the radius
        z0, c0 = zbuf.copy(), cbuf.copy()
        r = int(point_radius)
        zp = np.pad(z0, r, constant_values=np.inf)
        cp = np.pad(c0, ((r, r), (r, r), (0, 0)), mode="edge")
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dy == 0 and dx == 0 or dy * dy + dx * dx > r * r + r:
                    continue
                zs = zp[r + dy : r + dy + height, r + dx : r + dx + width]
                better = zs < zbuf
                zbuf = np.where(better, zs, zbuf)
                cbuf = np.where(better[..., None], cp[r + dy : r + dy + height, r + dx : r + dx + width], cbuf)
    return cbuf, zbuf


def render_cloud_topdown_png(
    xyz: np.ndarray,
    colors: np.ndarray,
    path,
    size: tuple[int, int] = (800, 800),
    up=(0.0, -1.0, 0.0),
    point_radius: int = 1,
    margin: float = 0.05,
    background=(255, 255, 255),
) -> np.ndarray:
    """Orthographic top-down render looking along -``up`` (default up = -y: OpenCV world of view 0,
    y down). The highest point (largest coordinate along ``up``) wins each pixel. ``size`` = (W, H).
    Writes the PNG and returns the image (H, W, 3) uint8."""
    xyz = np.asarray(xyz, dtype=np.float64)
    W, H = size
    up = np.asarray(up, np.float64)
    up /= np.linalg.norm(up)
    a = np.array([1.0, 0, 0]) if abs(up[0]) < 0.9 else np.array([0, 0, 1.0])
    e1 = a - up * (a @ up)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(up, e1)  # image "up" direction on the ground plane
    p1, p2, h = xyz @ e1, xyz @ e2, xyz @ up
    if len(xyz):
        lo1, hi1, lo2, hi2 = p1.min(), p1.max(), p2.min(), p2.max()
    else:
        lo1 = lo2 = 0.0
        hi1 = hi2 = 1.0
    span = max(hi1 - lo1, hi2 - lo2, 1e-9) * (1 + 2 * margin)
    scale = min(W, H) / span
    c1, c2 = (lo1 + hi1) / 2, (lo2 + hi2) / 2
    u = (p1 - c1) * scale + W / 2
    v = -(p2 - c2) * scale + H / 2
    img, _ = splat_points(u, v, -h, colors, W, H, point_radius, background)
    save_png(img, path)
    return img


def look_at_camera(eye, target, up=(0.0, -1.0, 0.0)) -> np.ndarray:
    """T_cam_world (4x4) of an OpenCV camera at ``eye`` looking at ``target`` (image y along -up)."""
    eye, target, up = (np.asarray(x, np.float64) for x in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:
        x = np.cross(z, np.array([1.0, 0, 0]) if abs(z[0]) < 0.9 else np.array([0, 0, 1.0]))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows: camera axes in world
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = -R @ eye
    return T


def render_cloud_perspective_png(
    xyz: np.ndarray,
    colors: np.ndarray,
    path,
    camera: dict | None = None,
    size: tuple[int, int] = (960, 720),
    point_radius: int = 1,
    background=(255, 255, 255),
) -> np.ndarray:
    """Pinhole render with z-buffer. ``camera`` = {"K": 3x3, "T_cam_world": 4x4} (OpenCV axes, K for
    ``size`` = (W, H)); None = an automatic view from behind-above the cloud's centroid (OpenCV world:
    -z behind, -y above) with a 60 degree horizontal field of view. Writes the PNG, returns the image."""
    xyz = np.asarray(xyz, dtype=np.float64)
    W, H = size
    if camera is None:
        c = np.median(xyz, 0) if len(xyz) else np.zeros(3)
        r = np.percentile(np.linalg.norm(xyz - c, axis=1), 95) if len(xyz) else 1.0
        r = max(r, 1e-6)
        T = look_at_camera(c + np.array([0.0, -1.0, -2.0]) * r * 1.2, c)
        f = W / 2 / np.tan(np.radians(30))
        K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]])
    else:
        K, T = np.asarray(camera["K"], np.float64), np.asarray(camera["T_cam_world"], np.float64)
    pc = xyz @ T[:3, :3].T + T[:3, 3]
    z = pc[:, 2]
    front = z > 1e-6
    zs = np.where(front, z, 1.0)
    u = K[0, 0] * pc[:, 0] / zs + K[0, 1] * pc[:, 1] / zs + K[0, 2]
    v = K[1, 1] * pc[:, 1] / zs + K[1, 2]
    img, _ = splat_points(u, v, np.where(front, z, np.inf), colors, W, H, point_radius, background)
    save_png(img, path)
    return img


def save_map_errors_png(xyz: np.ndarray, ids: np.ndarray, dist: np.ndarray, gt_label: np.ndarray, path,
                        tau: float = 0.10, max_dist: float = 0.5, max_points: int = 40_000, seed: int = 0) -> str:
    """What the robot sees, top-down in the GT world (z up; the highest 10 % of points hidden), three panels:

    1. the map coloured by instance id, each id written at its centroid;
    2. each point's distance to the GT surface (0 .. ``max_dist`` m, turbo; the map after its Sim(3));
    3. label errors: green = the point's id agrees with its GT object (the GT object the id mostly covers),
       red = wrong object / an id on background / no id on an object, grey = background both, black = farther
       than ``tau`` from any GT surface (no GT label; see ``eval/map_metrics.py``).

    ``xyz`` (N, 3) in GT frame, ``ids`` map ids (0 = none), ``dist`` (N,) m, ``gt_label`` (N,) transferred GT
    instance (0 = background or off-surface)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    xyz, ids = np.asarray(xyz, np.float64), np.asarray(ids, np.int64)
    dist, gt_label = np.asarray(dist, np.float64), np.asarray(gt_label, np.int64)
    if len(xyz):  # hide the top 10 % in height (a ceiling would cover the top-down view)
        low = xyz[:, 2] <= np.percentile(xyz[:, 2], 90)
        xyz, ids, dist, gt_label = xyz[low], ids[low], dist[low], gt_label[low]
    if len(xyz) > max_points:
        sel = np.sort(np.random.default_rng(seed).choice(len(xyz), max_points, replace=False))
        xyz, ids, dist, gt_label = xyz[sel], ids[sel], dist[sel], gt_label[sel]
    # the GT object each id mostly covers (on-surface points only)
    dom: dict[int, int] = {}
    on = (ids > 0) & (gt_label > 0)
    for i in np.unique(ids[on]):
        g, c = np.unique(gt_label[on & (ids == i)], return_counts=True)
        dom[int(i)] = int(g[np.argmax(c)])
    want = np.array([dom.get(int(i), -1) for i in ids]) if len(ids) else np.zeros(0, np.int64)
    err = np.full((len(xyz), 3), 0.55)
    err[(ids > 0) & (gt_label > 0) & (want == gt_label)] = (0.1, 0.7, 0.2)
    err[((ids > 0) != (gt_label > 0)) | ((ids > 0) & (gt_label > 0) & (want != gt_label))] = (0.85, 0.1, 0.1)
    err[dist > tau] = (0.0, 0.0, 0.0)
    fig, axs = plt.subplots(1, 3, figsize=(15, 5.2))
    order = np.argsort(xyz[:, 2]) if len(xyz) else np.zeros(0, np.int64)  # higher points drawn last (top-down)
    x, y = xyz[order, 0], xyz[order, 1]
    axs[0].scatter(x, y, c=label_color(ids[order]) / 255.0, s=1, linewidths=0)
    for i in np.unique(ids[ids > 0]):
        c = xyz[ids == i].mean(0)
        axs[0].annotate(str(int(i)), (c[0], c[1]), fontsize=7, ha="center", va="center",
                        bbox=dict(boxstyle="round,pad=0.1", fc="white", alpha=0.7, lw=0))
    axs[0].set_title(f"map ids ({len(np.unique(ids[ids > 0]))} instances, {len(xyz)} points shown)")
    sc = axs[1].scatter(x, y, c=np.clip(dist[order], 0, max_dist), cmap="turbo", vmin=0, vmax=max_dist, s=1,
                        linewidths=0)
    fig.colorbar(sc, ax=axs[1], fraction=0.046, label="distance to GT surface (m)")
    axs[1].set_title(f"geometry error (median {np.median(dist) if len(dist) else float('nan'):.2f} m)")
    axs[2].scatter(x, y, c=err[order], s=1, linewidths=0)
    ok = float(np.mean(err[:, 1] == 0.7)) if len(err) else 0.0
    axs[2].set_title(f"labels: green right ({100 * ok:.0f} %), red wrong,\nblack > {tau:.2f} m off the GT surface")
    for a in axs:
        a.set_aspect("equal")
        a.set_xlabel("x (m, GT world)")
    axs[0].set_ylabel("y (m)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------------------------------
# PLY
# ----------------------------------------------------------------------------------------------------

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def write_ply(path, xyz: np.ndarray, rgb: np.ndarray | None = None, instance: np.ndarray | None = None, score: np.ndarray | None = None) -> str:
    """Binary little-endian PLY: x y z (float), red green blue (uchar), instance (uint), score (float);
    the optional fields are written only when given. Readable by Open3D/CloudCompare/MeshLab (which
    keep or ignore the custom properties)."""
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    n = len(xyz)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if rgb is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if instance is not None:
        fields.append(("instance", "<u4"))
    if score is not None:
        fields.append(("score", "<f4"))
    arr = np.empty(n, dtype=fields)
    arr["x"], arr["y"], arr["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    if rgb is not None:
        rgb = np.asarray(rgb).reshape(-1, 3)
        if rgb.dtype != np.uint8:
            rgb = np.clip(rgb * (255.0 if rgb.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
        arr["red"], arr["green"], arr["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    if instance is not None:
        arr["instance"] = np.asarray(instance).astype(np.uint32).ravel()
    if score is not None:
        arr["score"] = np.asarray(score, dtype=np.float32).ravel()
    names = {"<f4": "float", "u1": "uchar", "<u4": "uint"}
    header = ["ply", "format binary_little_endian 1.0", "comment fast3dis_ros", f"element vertex {n}"]
    header += [f"property {names[t]} {name}" for name, t in fields]
    header.append("end_header")
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(arr.tobytes())
    return path


def read_ply(path) -> dict:
    """Read the vertex element of a PLY (binary little/big endian or ascii; no list properties).
    Returns {"xyz": (N, 3) float32, "rgb": (N, 3) uint8 if present, plus every other vertex property
    by name (e.g. "instance", "score")}."""
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise ValueError(f"{path}: not a PLY file")
        fmt, n, props, in_vertex, other_elems = None, 0, [], False, []
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: no end_header")
            tok = line.decode("ascii", "replace").split()
            if not tok:
                continue
            if tok[0] == "format":
                fmt = tok[1]
            elif tok[0] == "element":
                in_vertex = tok[1] == "vertex"
                if in_vertex:
                    n = int(tok[2])
                elif not props:
                    other_elems.append(tok[1])
            elif tok[0] == "property" and in_vertex:
                if tok[1] == "list":
                    raise ValueError(f"{path}: list properties in vertex element are not supported")
                props.append((tok[2], _PLY_TYPES[tok[1]]))
            elif tok[0] == "end_header":
                break
        if other_elems:
            raise ValueError(f"{path}: elements before 'vertex' are not supported: {other_elems}")
        if fmt == "ascii":
            data = np.loadtxt(f, max_rows=n, ndmin=2)
            arr = np.empty(n, dtype=[(k, t) for k, t in props])
            for i, (k, _) in enumerate(props):
                arr[k] = data[:, i]
        else:
            endian = "<" if fmt == "binary_little_endian" else ">"
            dt = np.dtype([(k, endian + t) for k, t in props])
            arr = np.frombuffer(f.read(dt.itemsize * n), dtype=dt, count=n)
    out = {"xyz": np.stack([arr["x"], arr["y"], arr["z"]], 1).astype(np.float32)}
    names = [k for k, _ in props]
    if all(c in names for c in ("red", "green", "blue")):
        out["rgb"] = np.stack([arr["red"], arr["green"], arr["blue"]], 1).astype(np.uint8)
    for k in names:
        if k not in ("x", "y", "z", "red", "green", "blue"):
            out[k] = np.asarray(arr[k]).copy()
    return out
