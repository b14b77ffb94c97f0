"""Plausibility of pinhole intrinsics and lens distortion against the image they describe (no ROS).

Why: a K that is finite and positive can still be absurd (fx = 1e-30 or 1e300, a principal point a
million pixels outside the image, a skew of 1e6); given to the network and to fusion it scatters the
map, and the damage stays. Such a K is refused here with a reason; the node then lets the network
estimate K (and says so in diagnostics).

Limits (all relative to the image size ``w`` x ``h`` the K is used with):

- focal lengths: ``fx / w`` and ``fy / h`` in ``[FOCAL_MIN, FOCAL_MAX]`` (a field of view between ~1 deg and
  ~170 deg), ``fx / fy`` in ``[1 / MAX_PIXEL_ASPECT, MAX_PIXEL_ASPECT]``;
- principal point inside the image: ``0 <= cx <= w``, ``0 <= cy <= h``;
- skew ``|K[0, 1]| <= MAX_SKEW * fx``.

Distortion: the images are **not undistorted** (the network sees them as they come). A distortion
model is accepted when its largest displacement over the image border is at most ``max_shift_px``
pixels (then K is used and the distortion ignored, said so); a larger distortion, or a model this module
cannot evaluate, is refused (K not used). Models: ``plumb_bob`` / ``rational_polynomial`` (OpenCV
radial-tangential) and ``equidistant`` (fisheye: a fisheye projection even with all-zero D); any model
with an empty or all-zero D other than ``equidistant`` means none.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_intrinsics", "distortion_shift_px", "FOCAL_MIN", "FOCAL_MAX", "MAX_SKEW", "MAX_PIXEL_ASPECT"]

FOCAL_MIN = 0.04  # fx / w: ~170 deg horizontal field of view
FOCAL_MAX = 60.0  # fx / w: ~1 deg
MAX_SKEW = 0.1
MAX_PIXEL_ASPECT = 4.0


def check_intrinsics(K: np.ndarray, w: int, h: int) -> str | None:
    """Why ``K`` (3x3, finite, positive focal lengths) is implausible for a ``w`` x ``h`` image, or None."""
    fx, fy, cx, cy, s = K[0, 0], K[1, 1], K[0, 2], K[1, 2], K[0, 1]
    if not (FOCAL_MIN <= fx / w <= FOCAL_MAX and FOCAL_MIN <= fy / h <= FOCAL_MAX):
        return (f"implausible focal length fx={fx:.4g}, fy={fy:.4g} for {w}x{h} (fx/w, fy/h must lie in "
                f"[{FOCAL_MIN}, {FOCAL_MAX}])")
    if not (1.0 / MAX_PIXEL_ASPECT <= fx / fy <= MAX_PIXEL_ASPECT):
        return f"implausible pixel aspect fx/fy={fx / fy:.4g}"
    if not (0.0 <= cx <= w and 0.0 <= cy <= h):
        return f"principal point ({cx:.4g}, {cy:.4g}) outside the {w}x{h} image"
    if abs(s) > MAX_SKEW * fx:
        return f"implausible skew {s:.4g} (|skew| <= {MAX_SKEW} fx)"
    return None


def _border_points(K: np.ndarray, w: int, h: int, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates of points along the image border (where distortion is largest)."""
    u = np.concatenate([np.linspace(0, w, n), np.linspace(0, w, n), np.zeros(n), np.full(n, float(w))])
    v = np.concatenate([np.zeros(n), np.full(n, float(h)), np.linspace(0, h, n), np.linspace(0, h, n)])
    y = (v - K[1, 2]) / K[1, 1]
    x = (u - K[0, 2] - K[0, 1] * y) / K[0, 0]
    return x, y


def distortion_shift_px(model: str, D, K: np.ndarray, w: int, h: int) -> float | None:
    """Largest displacement in pixels that distortion ``model`` with coefficients ``D`` applies along the
    border of the image (None: model unknown here)."""
    d = np.asarray(list(D), np.float64)
    fisheye = model in ("equidistant", "fisheye")  # a fisheye projection even with all-zero D
    if not fisheye and (d.size == 0 or not np.any(d)):
        return 0.0
    if not np.all(np.isfinite(d)):
        return float("inf")
    x, y = _border_points(K, w, h)
    r2 = x * x + y * y
    if model in ("plumb_bob", "rational_polynomial"):
        k = np.zeros(8)
        k[:min(8, d.size)] = d[:8]
        k1, k2, p1, p2, k3, k4, k5, k6 = k
        radial = (1 + k1 * r2 + k2 * r2**2 + k3 * r2**3) / (1 + k4 * r2 + k5 * r2**2 + k6 * r2**3)
        xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    elif fisheye:
        k = np.zeros(4)
        k[:min(4, d.size)] = d[:4]
        r = np.sqrt(r2)
        th = np.arctan(r)
        thd = th * (1 + k[0] * th**2 + k[1] * th**4 + k[2] * th**6 + k[3] * th**8)
        f = np.where(r > 1e-12, thd / np.maximum(r, 1e-12), 1.0)
        xd, yd = x * f, y * f
    else:
        return None
    with np.errstate(all="ignore"):
        shift = np.hypot((xd - x) * K[0, 0], (yd - y) * K[1, 1])
    m = float(np.max(shift))
    return m if np.isfinite(m) else float("inf")
