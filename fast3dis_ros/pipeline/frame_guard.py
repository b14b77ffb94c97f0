"""Per-camera image geometry guard: which frames may reach the network (no ROS).

Why: the network runs every view of a window at the processing resolution of view 0, and fusion aligns a
window to the map through the depth maps of views it shares with earlier windows. A frame whose shape
differs from its camera's usual shape (a portrait frame from a landscape camera, a 1x4000 strip) changes
the geometry of the whole window it lands in; a 1x1 image has no geometry at all. Such frames are
rejected here, before synchronisation, and counted per camera under a reason:

- ``image_too_small``: shorter side below ``min_side`` pixels.
- ``image_aspect``: long side / short side above ``max_aspect``.
- ``shape_changed``: not the shape this camera has been sending (its first accepted frame fixes it).

A camera that really changes resolution (driver reconfigured) keeps sending the new shape: after
``confirm_frames`` consecutive frames of one new shape the camera's geometry follows
(``check`` reports ``geometry_changed`` with the frame accepted); a few odd frames never move it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FrameGeometryGuard", "GeometryVerdict"]


@dataclass(frozen=True)
class GeometryVerdict:
    accept: bool
    reason: str | None = None  # rejection reason, or 'geometry_changed' on an accepted new shape
    detail: str = ""


class FrameGeometryGuard:
    def __init__(self, min_side: int = 16, max_aspect: float = 8.0, confirm_frames: int = 20) -> None:
        if min_side < 1 or max_aspect < 1.0 or confirm_frames < 1:
            raise ValueError("FrameGeometryGuard: min_side >= 1, max_aspect >= 1, confirm_frames >= 1 required")
        self.min_side = int(min_side)
        self.max_aspect = float(max_aspect)
        self.confirm_frames = int(confirm_frames)
        self._shape: dict[str, tuple[int, int]] = {}  # camera -> (h, w) it has been sending
        self._candidate: dict[str, tuple[tuple[int, int], int]] = {}  # camera -> (new shape, frames in a row)

    def shape(self, camera: str) -> tuple[int, int] | None:
        return self._shape.get(camera)

    def check(self, camera: str, h: int, w: int) -> GeometryVerdict:
        """Verdict for one frame of ``camera`` of ``h`` x ``w`` pixels (updates the camera's state)."""
        h, w = int(h), int(w)
        if min(h, w) < self.min_side:
            return GeometryVerdict(False, "image_too_small", f"{w}x{h} (shorter side < {self.min_side} px)")
        if max(h, w) / min(h, w) > self.max_aspect:
            return GeometryVerdict(False, "image_aspect", f"{w}x{h} (aspect {max(h, w) / min(h, w):.1f} > "
                                                          f"{self.max_aspect:g})")
        known = self._shape.get(camera)
        if known is None:
            self._shape[camera] = (h, w)
            return GeometryVerdict(True)
        if known == (h, w):
            self._candidate.pop(camera, None)
            return GeometryVerdict(True)
        cand, n = self._candidate.get(camera, ((h, w), 0))
        n = n + 1 if cand == (h, w) else 1
        if n >= self.confirm_frames:
            self._shape[camera] = (h, w)
            self._candidate.pop(camera, None)
            return GeometryVerdict(True, "geometry_changed", f"{known[1]}x{known[0]} -> {w}x{h} after {n} frames")
        self._candidate[camera] = ((h, w), n)
        return GeometryVerdict(False, "shape_changed", f"{w}x{h}, camera sends {known[1]}x{known[0]}")
